"""SwinV2 cosine window attention (``logit_scale=``): every backend that has it against the float64
reference, forward and every gradient (qkv, rel_pos_bias, attn_bias, logit_scale), by flash-attn's
2x rule; plus the reference against timm's own formula and the honest dispatch of backends without it.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mixkernels
from mixkernels import BackendUnavailable
from mixkernels import reference as ref
from mixkernels.ops.window_attention import _checks
from mixkernels.testing import assert_close_2x, noncontiguous, tolerance

GRADS = ("qkv", "rel_pos_bias", "attn_bias", "logit_scale")
_GPU = pytest.mark.gpu
COMBOS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interp"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=_GPU),
    pytest.param("cuda", "cuda", id="cuda", marks=_GPU),
]


def _logit_scale(nH, shape=None, clamp=True, device="cpu"):
    ls = math.log(10.0) + 0.5 * torch.randn(nH, dtype=torch.float64)
    if clamp:
        ls[0] = math.log(100.0) + 0.3  # above the clamp: gradient exactly 0
    return ls.reshape(shape or (nH,)).to(device)


def _case(B, H, W, nH, d, window, *, shift=0, rpb=True, ab=False, group=None, coords=None, coord_range=None,
          ls_shape=None, device="cpu"):
    """float64 leaves and the non-differentiable keyword arguments."""
    wh, ww = window if isinstance(window, tuple) else (window, window)
    N = wh * ww
    leaves = {"qkv": torch.randn(B, H, W, 3 * nH * d, dtype=torch.float64, device=device),
              "logit_scale": _logit_scale(nH, ls_shape, device=device)}
    kw = dict(num_heads=nH, window_size=window, shift_size=shift)
    if coords is not None:
        kw.update(coords=coords.to(device), coord_range=coord_range)
    rh, rw = coord_range if coords is not None else (wh, ww)
    if rpb:  # the CPB table: 16 * sigmoid(...) in [0, 16]
        leaves["rel_pos_bias"] = 16 * torch.sigmoid(torch.randn((2 * rh - 1) * (2 * rw - 1), nH, dtype=torch.float64,
                                                                device=device))
    if ab:
        leaves["attn_bias"] = torch.randn(nH, N, N, dtype=torch.float64, device=device)
    if group == "hw":
        kw["group"] = torch.rand(H, W, device=device) < 0.5
    elif group == "bhw":
        kw["group"] = torch.randint(0, 3, (B, H, W), dtype=torch.int32, device=device)
    return leaves, kw


def _run(fn, leaves, kw, dout, dtype, make_qkv=None):
    xs = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}
    q = make_qkv(xs["qkv"]) if make_qkv else xs["qkv"]
    out = fn(q, **{k: v for k, v in xs.items() if k != "qkv"}, **kw)
    names = list(xs)
    grads = torch.autograd.grad(out, [xs[n] for n in names], dout.to(dtype))
    return out.detach(), dict(zip(names, grads))


def check(backend, leaves, kw, dtype, make_qkv=None):
    """backend in ``dtype`` vs the reference in float64 and in ``dtype``."""
    B, H, W, C3 = leaves["qkv"].shape
    dout = torch.randn(B, H, W, C3 // 3, dtype=torch.float64, device=leaves["qkv"].device)

    def op(q, **a):
        return mixkernels.window_attention(q, backend=backend, **a)

    out, g = _run(op, leaves, kw, dout, dtype, make_qkv)
    out64, g64 = _run(ref.window_attention, leaves, kw, dout, torch.float64)
    same = _run(ref.window_attention, leaves, kw, dout, dtype) if dtype != torch.float64 else None
    assert out.dtype == dtype
    assert_close_2x(out, out64, same[0] if same else None, name=f"{backend} out", atol=_atol(out64, dtype))
    for n in g:
        assert g[n].shape == leaves[n].shape, n
        assert_close_2x(g[n], g64[n], same[1][n] if same else None, name=f"{backend} d{n}", atol=_atol(g64[n], dtype))
    return out, g


def _atol(ref64, dtype):
    """The 2x rule's slack, relative to the tensor's size: cosine logits reach ~116 (logit scale up
    to 100 plus the CPB's 16) and the gradients grow with the scale, so any float32 computation
    (the reference's included: median error ratio kernel/reference 0.9-1.0 over 30 seeds) errs
    by ~1e-6 of the magnitude, above the absolute slack meant for O(1) values."""
    return tolerance(dtype) * max(1.0, ref64.abs().max().item())


def _skip_unless(backend, device, d=8, N=16, dtype=torch.float32):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    qkv = torch.empty(1, 1, 1, 3 * d, device=device, dtype=dtype)
    why = _checks(qkv, d, N, cosine=True)[backend]()
    if why:
        pytest.skip(f"{backend} cannot run cosine mode here: {why}")


# ---------------------------------------------------------------- the reference is timm's formula
def test_reference_is_timms_cosine_attention():
    """One window, no shift: the reference equals timm's swin_transformer_v2.WindowAttention math."""
    nH, d, w = 3, 8, 4
    leaves, kw = _case(2, w, w, nH, d, w, ls_shape=(nH, 1, 1))
    qkv, ls, table = leaves["qkv"], leaves["logit_scale"], leaves["rel_pos_bias"]
    q, k, v = qkv.reshape(2, w * w, 3, nH, d).permute(2, 0, 3, 1, 4)
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(ls, max=math.log(1.0 / 0.01)).exp()
    idx = ref.relative_position_index(w, w)
    attn = attn + table[idx.reshape(-1)].reshape(w * w, w * w, nH).permute(2, 0, 1)
    want = (attn.softmax(-1) @ v).transpose(1, 2).reshape(2, w, w, nH * d)
    got = ref.window_attention(qkv, nH, w, rel_pos_bias=table, logit_scale=ls)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- kernels vs the reference
@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("shift,group,rpb,ab", [
    (0, None, True, False), ((2, 1), "hw", True, True), (2, "bhw", False, True), ((1, 2), None, False, False)])
def test_matches_reference(backend, device, shift, group, rpb, ab):
    d = 16 if backend == "triton" else 8  # Triton's smallest head_dim is 16
    _skip_unless(backend, device, d=d)
    big = backend != "triton" or device == "cuda"  # the interpreter is slow: a few windows only
    H, W = (8, 12) if big else (8, 4)
    leaves, kw = _case(2, H, W, 2, d, 4, shift=shift, rpb=rpb, ab=ab, group=group, device=device)
    for dtype in ((torch.float64, torch.float32) if backend == "cpu" else (torch.float32,)):
        check(backend, leaves, kw, dtype)


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(backend, device, dtype):
    _skip_unless(backend, device, d=16, N=16, dtype=dtype)
    leaves, kw = _case(2, 8, 4, 2, 16, 4, shift=2, group="hw", ls_shape=(2, 1, 1), device=device)
    check(backend, leaves, kw, dtype)


@pytest.mark.parametrize("per_image", [False, True])
def test_cpu_coords_odd_window(per_image):
    # UM-MAE-style true coordinates with cosine attention, a non-square window and head dim 5.
    _skip_unless("cpu", "cpu")
    B, H, W = 2, 6, 10
    base = torch.stack(torch.meshgrid(torch.arange(H) * 2, torch.arange(W) * 2, indexing="ij"), -1)
    coords = base + torch.randint(0, 2, (B, H, W, 2) if per_image else (H, W, 2))
    leaves, kw = _case(B, H, W, 3, 5, (3, 5), shift=(1, 2), group="bhw", coords=coords, coord_range=(2 * H, 2 * W))
    check("cpu", leaves, kw, torch.float64)
    check("cpu", leaves, kw, torch.float32)


def test_cpu_noncontiguous_and_many_windows():
    # 3 * 81 windows > 64 reduction chunks: the logit-scale gradient is reduced over uneven chunks.
    _skip_unless("cpu", "cpu")
    leaves, kw = _case(3, 27, 27, 2, 8, 3, shift=1, group="bhw")
    check("cpu", leaves, kw, torch.float64)
    leaves, kw = _case(2, 14, 14, 2, 16, 7, shift=3)
    check("cpu", leaves, kw, torch.float32, make_qkv=noncontiguous)


def test_cpu_zero_rows_take_the_eps_branch():
    """q/k rows of norm 0 (F.normalize divides by eps = 1e-12 there): forward exact, gradients
    ~1e12 and compared relative to their size."""
    _skip_unless("cpu", "cpu")
    leaves, kw = _case(1, 4, 4, 1, 8, 4)
    leaves["qkv"][0, 0, :2] = 0  # two tokens: q, k and v all zero
    leaves["qkv"][0, 1, 0, :8] = 1e-14  # a q row under eps
    dout = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    out, g = _run(lambda q, **a: mixkernels.window_attention(q, backend="cpu", **a), leaves, kw, dout, torch.float64)
    out64, g64 = _run(ref.window_attention, leaves, kw, dout, torch.float64)
    torch.testing.assert_close(out, out64, rtol=1e-10, atol=1e-12)
    assert g64["qkv"].abs().max() > 1e10  # the eps branch is really taken
    for n in g:
        torch.testing.assert_close(g[n], g64[n], rtol=1e-9, atol=1e-9 * g64[n].abs().max().item())


def test_cpu_logit_scale_gradient_is_zero_where_clamped_and_deterministic():
    _skip_unless("cpu", "cpu")
    leaves, kw = _case(2, 16, 16, 3, 8, 4, shift=2, group="bhw")
    leaves["logit_scale"][1] = math.log(100.0)  # exactly at the clamp: the gradient passes (torch.clamp)
    dout = torch.randn(2, 16, 16, 24, dtype=torch.float64)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (threads, 1):
            torch.set_num_threads(n)
            runs.append(_run(lambda q, **a: mixkernels.window_attention(q, backend="cpu", **a), leaves, kw, dout,
                             torch.float32)[1])
    finally:
        torch.set_num_threads(threads)
    dls = runs[0]["logit_scale"]
    assert dls[0] == 0 and dls[1] != 0 and dls[2] != 0
    for k in runs[0]:
        assert torch.equal(runs[0][k], runs[1][k]), k


# ---------------------------------------------------------------- dispatch and validation
def test_backends_without_cosine_say_so():
    """Automatic choice never computes something else: a backend without the cosine kernels is
    skipped with a reason naming the mode, and asking for it explicitly raises with that reason."""
    qkv = torch.randn(1, 4, 4, 3 * 16)
    ls = torch.zeros(1)
    for backend, why in _checks(qkv, 16, 16, cosine=True).items():
        why = why()
        if why and "cosine" in why:
            with pytest.raises(BackendUnavailable, match="cosine mode not implemented"):
                mixkernels.window_attention(qkv, 1, 4, logit_scale=ls, backend=backend)
    # whatever runs is the cosine computation
    out = mixkernels.window_attention(qkv, 1, 4, logit_scale=ls)
    torch.testing.assert_close(out, ref.window_attention(qkv, 1, 4, logit_scale=ls), rtol=1e-5, atol=1e-6)


def test_compile_fullgraph_cosine():
    _skip_unless("cpu", "cpu")
    torch._dynamo.reset()
    leaves, kw = _case(2, 8, 8, 2, 8, 4, shift=2, group="hw")

    def f(q, rpb, ls):
        return mixkernels.window_attention(q, rel_pos_bias=rpb, logit_scale=ls, backend="cpu", **kw).square().sum()

    xs = [leaves[k].float().requires_grad_() for k in ("qkv", "rel_pos_bias", "logit_scale")]
    loss = torch.compile(f, fullgraph=True)(*xs)
    grads = torch.autograd.grad(loss, xs)
    eager = [x.detach().clone().requires_grad_() for x in xs]  # the same kernels, called eagerly
    loss_e = f(*eager)
    torch.testing.assert_close(loss, loss_e, rtol=1e-6, atol=0)
    for a, b in zip(grads, torch.autograd.grad(loss_e, eager)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the CUDA kernels, on the CPU SIMT emulator
def _emu_case(B, H, W, nH, d, win, shift, rpb, ab, group, dtype):
    leaves, kw = _case(B, H, W, nH, d, win, shift=shift, rpb=rpb, ab=ab, group=group)
    return {k: v.to(dtype) if k == "qkv" else v.float() for k, v in leaves.items()}, kw


def _emu_check(leaves, kw, dtype, deterministic=False):
    """The emulated CUDA kernels (tests/_cuda_emu.py) vs the reference: out, dqkv, drpb, dbias and the
    logit-scale gradient (the kernels' raw sums times the clamp mask, as the binding applies it)."""
    import _cuda_emu as E

    qkv, ls = leaves["qkv"], leaves["logit_scale"]
    nH, win = kw["num_heads"], kw["window_size"]
    win = win if isinstance(win, tuple) else (win, win)
    shift = kw["shift_size"] if isinstance(kw["shift_size"], tuple) else (kw["shift_size"],) * 2
    c = E.Call(qkv, nH, win, shift, leaves.get("rel_pos_bias"), leaves.get("attn_bias"), kw.get("group"),
               logit_scale=ls)
    out, lse = c.forward()
    B, H, W, C3 = qkv.shape
    dout = torch.randn(B, H, W, C3 // 3, dtype=dtype)
    dqkv, drpb, dbias, dls = c.backward(dout, out, lse, deterministic=deterministic)
    dls = torch.where(ls.reshape(-1).float() <= math.log(100.0), dls, torch.zeros(()))
    got = {"out": out, "qkv": dqkv, "rel_pos_bias": drpb, "attn_bias": dbias, "logit_scale": dls}
    r64 = _run(ref.window_attention, leaves, kw, dout.double(), torch.float64)
    r1 = _run(ref.window_attention, leaves, kw, dout.double(), dtype)
    assert_close_2x(out, r64[0], r1[0], name="emulated out", atol=_atol(r64[0], dtype))
    for n, g64 in r64[1].items():
        g = got[n].reshape(g64.shape)
        assert_close_2x(g, g64, r1[1][n].to(g.dtype), name=f"emulated d{n}", atol=_atol(g64, dtype))


EMU_CASES = [  # (B, H, W, heads, head_dim, window, shift, rpb, attn_bias, group): fused kernels unless noted
    ("swinv2_w8_shift", 2, 16, 16, 2, 32, (8, 8), (4, 4), True, False, None),
    ("group_odd_window", 2, 6, 10, 3, 16, (3, 5), (1, 2), True, False, "bhw"),
    ("d64_no_bias", 1, 14, 14, 2, 64, (7, 7), (3, 3), False, False, "hw"),
    ("attn_bias", 2, 12, 12, 2, 32, (6, 6), (2, 3), True, True, None),  # fused forward, legacy backward
    ("d128", 1, 8, 16, 1, 128, (8, 8), (0, 4), True, False, None),  # legacy backward
]


@pytest.fixture(scope="module")
def emulator():
    import _cuda_emu as E

    why = E.unavailable()
    if why:
        pytest.skip(why)
    return E


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: c[0])
def test_cuda_kernels_on_the_emulator(emulator, case, dtype):
    leaves, kw = _emu_case(*case[1:], dtype)
    _emu_check(leaves, kw, dtype)


def test_cuda_float32_legacy_and_deterministic_on_the_emulator(emulator, monkeypatch):
    leaves, kw = _emu_case(2, 12, 12, 2, 32, (6, 6), (2, 3), True, True, "bhw", torch.float32)
    _emu_check(leaves, kw, torch.float32)  # float32: the legacy kernels
    leaves, kw = _emu_case(3, 14, 14, 2, 32, (7, 7), (3, 3), True, False, "bhw", torch.bfloat16)
    _emu_check(leaves, kw, torch.bfloat16, deterministic=True)
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", "24000")  # legacy kernels with K/V in column chunks
    leaves, kw = _emu_case(1, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "hw", torch.bfloat16)
    _emu_check(leaves, kw, torch.bfloat16)
    _emu_check(leaves, kw, torch.bfloat16, deterministic=True)
