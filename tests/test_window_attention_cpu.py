"""The compiled CPU window-attention kernel (backend="cpu") against the float64 reference.

Forward and every gradient (qkv, rel_pos_bias, attn_bias) through the public op, with
flash-attn's 2x rule (mixkernels.testing.assert_close_2x).
"""
import pytest
import torch

import mixkernels
from mixkernels import _ext
from mixkernels.reference import window_attention as ref_wattn
from mixkernels.testing import assert_close_2x, noncontiguous

pytestmark = pytest.mark.skipif(
    not _ext.has_kernel("window_attention", "CPU"), reason=f"CPU kernel not built ({_ext.cpu_error})"
)


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _make(B, H, W, nH, d, window, *, dtype, rpb=True, ab=True, group=None, coords=None, coord_range=None):
    wh, ww = _pair(window)
    N = wh * ww
    qkv = torch.randn(B, H, W, 3 * nH * d, dtype=dtype)
    extra = {}
    if rpb:
        rh, rw = _pair(coord_range) if coords is not None else (wh, ww)
        extra["rel_pos_bias"] = torch.randn((2 * rh - 1) * (2 * rw - 1), nH, dtype=dtype)
    if ab:
        extra["attn_bias"] = torch.randn(nH, N, N, dtype=dtype) * 0.5
    if group == "hw":
        extra["group"] = torch.rand(H, W) < 0.5
    elif group == "bhw":
        extra["group"] = torch.randint(0, 3, (B, H, W), dtype=torch.int32)
    if coords is not None:
        extra["coords"] = coords
        extra["coord_range"] = coord_range
    return qkv, extra


def _run(fn, qkv, extra, dout, **kw):
    """Output and grads of (qkv, rel_pos_bias, attn_bias) of fn on leaf copies of the inputs."""
    leaves = {"qkv": qkv.detach().clone().requires_grad_()}
    args = dict(extra)
    for k in ("rel_pos_bias", "attn_bias"):
        if k in extra:
            args[k] = leaves[k] = extra[k].detach().clone().requires_grad_()
    out = fn(leaves["qkv"], **args, **kw)
    grads = torch.autograd.grad(out, list(leaves.values()), dout)
    return out.detach(), dict(zip(leaves, grads))


def _cast(extra, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in extra.items()}


def check(qkv, extra, nH, window, shift, *, make_qkv=None, **kw):
    """Compare backend="cpu" with the reference in float64 and in qkv's dtype."""
    dtype = qkv.dtype
    B, H, W, _ = qkv.shape
    dout = torch.randn(B, H, W, qkv.shape[-1] // 3, dtype=dtype)
    common = dict(num_heads=nH, window_size=window, shift_size=shift, **kw)
    q_in = make_qkv(qkv) if make_qkv else qkv

    def cpu(q, **a):
        return mixkernels.window_attention(q, backend="cpu", **a)

    out, grads = _run(lambda q, **a: cpu(q, **a), q_in, extra, dout, **common)
    out64, grads64 = _run(ref_wattn, qkv.double(), _cast(extra, torch.float64), dout.double(), **common)
    same = None
    if dtype != torch.float64:
        same = _run(ref_wattn, qkv, extra, dout, **common)
    assert out.dtype == dtype
    assert_close_2x(out, out64, same[0] if same else None, name="out")
    for k, g in grads.items():
        assert g.dtype == dtype, k
        assert_close_2x(g, grads64[k], same[1][k] if same else None, name=f"d{k}")
    return out, grads


@pytest.mark.parametrize("shift", [0, (3, 2)])
@pytest.mark.parametrize("group", [None, "hw", "bhw"])
@pytest.mark.parametrize("rpb,ab", [(False, False), (True, False), (False, True), (True, True)])
def test_grid_float64(shift, group, rpb, ab):
    qkv, extra = _make(2, 14, 10, 2, 8, (7, 5), dtype=torch.float64, rpb=rpb, ab=ab, group=group)
    check(qkv, extra, 2, (7, 5), shift)


@pytest.mark.parametrize(
    "dtype,d,window,grid",
    [
        (torch.float32, 8, (7, 5), (14, 15)),
        (torch.float32, 16, (3, 3), (9, 9)),
        (torch.float32, 32, (7, 7), (14, 14)),
        (torch.bfloat16, 32, (7, 7), (14, 14)),
        (torch.bfloat16, 16, (7, 5), (14, 10)),
        (torch.float16, 32, (3, 3), (6, 9)),
    ],
)
def test_dtypes_head_dims(dtype, d, window, grid):
    qkv, extra = _make(2, *grid, 3, d, window, dtype=dtype, group="bhw")
    shift = tuple(w // 2 for w in window)
    check(qkv, extra, 3, window, shift)


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_coords(per_image, shift, dtype):
    # UM-MAE: a compact 8x8 image whose tokens keep their original (row, col) on a 16x16 grid.
    B, H, W, nH, d = 2, 8, 8, 2, 8
    base = torch.stack(torch.meshgrid(torch.arange(H) * 2, torch.arange(W) * 2, indexing="ij"), -1)
    jitter = torch.randint(0, 2, (B, H, W, 2) if per_image else (H, W, 2))
    coords = base + jitter  # shifted windows wrap around: differences up to 15
    qkv, extra = _make(B, H, W, nH, d, 4, dtype=dtype, group="hw", coords=coords, coord_range=(16, 16))
    check(qkv, extra, nH, 4, shift)


def test_noncontiguous_qkv():
    qkv, extra = _make(2, 14, 14, 2, 16, 7, dtype=torch.float32, group="hw")
    check(qkv, extra, 2, 7, 3, make_qkv=noncontiguous)


def test_many_windows_chunked_reduction():
    # 3*81 = 243 windows > 64 reduction chunks: several windows per chunk, uneven chunk edges.
    qkv, extra = _make(3, 27, 27, 2, 8, 3, dtype=torch.float64, group="bhw")
    check(qkv, extra, 2, 3, 1)


def test_masked_probabilities_are_zero():
    # Group labels alternate, so every token attends only to its own label: the output of a
    # token equals attention over same-label tokens only (checked through the reference), and
    # isolated tokens (unique label) copy their own v exactly.
    B, H, W, nH, d = 1, 4, 4, 1, 8
    qkv = torch.randn(B, H, W, 3 * nH * d, dtype=torch.float64)
    group = torch.arange(H * W).reshape(H, W)  # every token alone
    out = mixkernels.window_attention(qkv, nH, 4, group=group, backend="cpu")
    torch.testing.assert_close(out, qkv[..., 2 * nH * d :], rtol=0, atol=0)


@pytest.mark.parametrize("with_coords", [False, True])
def test_deterministic_bias_grads(with_coords):
    qkv, extra = _make(2, 24, 24, 2, 16, 4, dtype=torch.float32, group="bhw")
    if with_coords:
        extra["coords"] = torch.randint(0, 4, (24, 24, 2))
        extra["coord_range"] = (4, 4)
        extra["rel_pos_bias"] = torch.randn(49, 2)
    dout = torch.randn(2, 24, 24, 32)
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (threads, 1, threads):
            torch.set_num_threads(n)
            runs.append(_run(lambda q, **a: mixkernels.window_attention(q, 2, 4, shift_size=2, backend="cpu", **a),
                             qkv, extra, dout)[1])
    finally:
        torch.set_num_threads(threads)
    for r in runs[1:]:
        for k in ("rel_pos_bias", "attn_bias", "qkv"):
            assert torch.equal(r[k], runs[0][k]), k


def test_coords_out_of_range_add_no_bias():
    # docs/SEMANTICS.md rule 3 (was: raised). Token 0 is out of range of every other token.
    qkv = torch.randn(1, 4, 4, 6)
    coords = torch.zeros(4, 4, 2, dtype=torch.long)
    coords[0, 0] = torch.tensor([5, 0])
    rpb = torch.randn(9, 1)
    out = mixkernels.window_attention(qkv, 1, 4, rel_pos_bias=rpb, coords=coords, coord_range=(2, 2), backend="cpu")
    bias = torch.full((1, 16, 16), rpb[4, 0].item())  # difference (0, 0): table row 4
    bias[0, 0, 1:] = bias[0, 1:, 0] = 0.0
    torch.testing.assert_close(out, ref_wattn(qkv, 1, 4, attn_bias=bias))


def test_opcheck():
    B, H, W, nH, d, wh, ww = 2, 6, 6, 2, 8, 3, 3
    qkv = torch.randn(B, H, W, 3 * nH * d, requires_grad=True)
    rpb = torch.randn(25, nH, requires_grad=True)
    ab = torch.randn(nH, 9, 9, requires_grad=True)
    group = torch.randint(0, 2, (B, H, W), dtype=torch.int32)
    args = (qkv, nH, wh, ww, 1, 1, rpb, ab, group, None, wh, ww, d**-0.5, True, "cpu")
    torch.library.opcheck(torch.ops.mixkernels.window_attention.default, args)
    coords = torch.randint(0, 3, (1, H, W, 2), dtype=torch.int32)
    args = (qkv, nH, wh, ww, 0, 0, rpb, None, None, coords, wh, ww, d**-0.5, False, "cpu")
    torch.library.opcheck(torch.ops.mixkernels.window_attention.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    qkv, extra = _make(2, 14, 14, 2, 16, 7, dtype=torch.float32, group="bhw")

    def f(q, rpb, ab):
        return mixkernels.window_attention(q, 2, 7, shift_size=3, rel_pos_bias=rpb, attn_bias=ab,
                                           group=extra["group"], backend="cpu").square().sum()

    compiled = torch.compile(f, fullgraph=True)
    leaves = [qkv.clone().requires_grad_(), extra["rel_pos_bias"].clone().requires_grad_(),
              extra["attn_bias"].clone().requires_grad_()]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    loss64 = ref_wattn(leaves64[0], 2, 7, shift_size=3, rel_pos_bias=leaves64[1], attn_bias=leaves64[2],
                       group=extra["group"]).square().sum()
    grads64 = torch.autograd.grad(loss64, leaves64)
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-4, atol=1e-4)
    for g, g64 in zip(grads, grads64):
        torch.testing.assert_close(g.double(), g64, rtol=1e-4, atol=1e-4)


def test_baseline_isa_path():
    # The kernel picks an AVX2+FMA build of its loops at run time on x86; cover the baseline
    # build too, in a fresh process (the choice is made once per process).
    import os
    import subprocess
    import sys

    code = (
        "import torch, mixkernels\n"
        "from mixkernels.reference import window_attention as ref\n"
        "torch.manual_seed(0)\n"
        "q = torch.randn(2, 14, 10, 48, dtype=torch.float64, requires_grad=True)\n"
        "rpb = torch.randn(13 * 9, 2, dtype=torch.float64, requires_grad=True)\n"
        "kw = dict(shift_size=(3, 2), rel_pos_bias=rpb, group=torch.rand(2, 14, 10) < 0.5)\n"
        "errs = []\n"
        "for dt in (torch.float64, torch.float32):\n"
        "    qd, rd = q.detach().to(dt).requires_grad_(), rpb.detach().to(dt).requires_grad_()\n"
        "    o = mixkernels.window_attention(qd, 2, (7, 5), backend='cpu', **dict(kw, rel_pos_bias=rd))\n"
        "    r = ref(q, 2, (7, 5), **kw)\n"
        "    g = torch.randn_like(r)\n"
        "    a = torch.autograd.grad(o, (qd, rd), g.to(dt))\n"
        "    b = torch.autograd.grad(r, (q, rpb), g)\n"
        "    e = [(o.double() - r).abs().max()] + [(x.double() - y).abs().max() for x, y in zip(a, b)]\n"
        "    errs.append(max(t.item() for t in e))\n"
        "print(errs[0], errs[1])\n"
    )
    env = dict(os.environ, MIXKERNELS_CPU_BASELINE="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    e64, e32 = map(float, res.stdout.split())
    assert e64 < 1e-10 and e32 < 1e-4, (e64, e32)
