"""Fused window attention, every backend, against the float64 reference (flash-attn's 2x rule).

Backends run where ``mixkernels.ops._dispatch`` says they can: triton on CPU tensors under the
interpreter (conftest) or on CUDA, the compiled cpu kernel once registered, cuda on a GPU.
Interpreter programs are slow, so shapes are a few windows and the option grid is a
hand-picked cover (every option, every pairwise interaction that matters), not a product.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import mixkernels
from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x, noncontiguous

_OPS = importlib.import_module("mixkernels.ops.window_attention")
_GPU = pytest.mark.gpu
COMBOS = [
    pytest.param("triton", "cpu", id="triton-cpu"),
    pytest.param("cpu", "cpu", id="cpu-cpu"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=_GPU),
    pytest.param("cuda", "cuda", id="cuda-cuda", marks=_GPU),
]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def _skip_unless_available(backend, qkv, nh, win):
    reason = _OPS._checks(qkv, qkv.shape[-1] // (3 * nh), win[0] * win[1])[backend]()
    if reason:
        pytest.skip(f"{backend} unavailable: {reason}")


def _case(device, dtype=F32, B=2, win=(4, 4), grid=(2, 1), nh=2, d=16, shift=(0, 0), rpb=False, bias=False,
          group=None, coords=None):
    """Inputs in float64 (cast per use). grid = windows along (H, W)."""
    wh, ww = win
    H, W = grid[0] * wh, grid[1] * ww
    N = wh * ww
    kw = dict(window_size=win, shift_size=shift)
    R = win
    if coords is not None:  # UM-MAE-like: compact-image token (y, x) keeps original (2y+a, 2x+b)
        G = B if coords == "per" else 1
        off = torch.randint(0, 2, (G, H, W, 2), device=device)
        base = torch.stack(torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device),
                                          indexing="ij"), -1)
        c = 2 * base + off
        kw["coords"] = c if coords == "per" else c[0]
        R = (2 * H, 2 * W)
        kw["coord_range"] = R
    if group is not None:
        g = torch.randint(0, 2, (B, H, W), device=device)
        kw["group"] = g if group == "per" else g[0].bool()
    qkv = torch.randn(B, H, W, 3 * nh * d, dtype=torch.float64, device=device)
    leaves = {"qkv": qkv}
    if rpb:
        leaves["rel_pos_bias"] = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), nh, dtype=torch.float64, device=device)
    if bias:
        leaves["attn_bias"] = torch.randn(nh, N, N, dtype=torch.float64, device=device)
    return dtype, nh, kw, leaves


def _ref_and_grads(leaves, nh, kw, dtype, dout):
    """Reference output and gradients with qkv in ``dtype`` (biases stay fp32/fp64 like the kernels)."""
    bias_dt = torch.float64 if dtype == torch.float64 else torch.float32
    ins = {k: v.detach().to(dtype if k == "qkv" else bias_dt).requires_grad_() for k, v in leaves.items()}
    out = ref.window_attention(ins["qkv"], nh, kw["window_size"], **{**_rest(kw), **_biases(ins)})
    grads = torch.autograd.grad(out, list(ins.values()), dout.to(out.dtype))
    return out, dict(zip(ins, grads))


def _rest(kw):
    return {k: v for k, v in kw.items() if k != "window_size"}


def _biases(ins):
    return {k: v for k, v in ins.items() if k != "qkv"}


def _check(backend, device, dtype, nh, kw, leaves, *, deterministic=None, make_qkv=None):
    qkv = leaves["qkv"].detach().to(dtype)
    _skip_unless_available(backend, qkv, nh, kw["window_size"])
    if make_qkv is not None:
        qkv = make_qkv(qkv)
    ins = {"qkv": qkv.requires_grad_()}
    ins.update({k: v.detach().float().requires_grad_() for k, v in leaves.items() if k != "qkv"})
    out = mixkernels.window_attention(ins["qkv"], nh, kw["window_size"], backend=backend,
                                      deterministic=deterministic, **{**_rest(kw), **_biases(ins)})
    dout = torch.randn(out.shape, dtype=torch.float64, device=device)
    grads = dict(zip(ins, torch.autograd.grad(out, list(ins.values()), dout.to(dtype))))
    out64, g64 = _ref_and_grads(leaves, nh, kw, torch.float64, dout)
    out_s, g_s = _ref_and_grads(leaves, nh, kw, dtype, dout)
    assert out.dtype == dtype
    assert_close_2x(out, out64, out_s if dtype != torch.float64 else None, name="out")
    for k in ins:
        assert grads[k].dtype == ins[k].dtype, k
        assert_close_2x(grads[k], g64[k], g_s[k], atol=_grad_atol(k, dtype), name=f"d{k}")
    return out, grads


def _grad_atol(name, dtype):
    # Bias gradients are sums over windows and batch of dS: scale the slack with the count.
    from mixkernels.testing import tolerance

    return tolerance(dtype) * (8 if name != "qkv" else 1)


CASES = {
    # name: (dtype, _case kwargs, deterministic)
    "plain_rpb_f32": (F32, dict(rpb=True), None),
    "shift_rpb_d32_f32": (F32, dict(shift=(2, 2), grid=(2, 2), d=32, rpb=True), None),
    "shift_group_per_rpb_bias_f16": (F16, dict(win=(4, 3), shift=(2, 1), group="per", rpb=True, bias=True), False),
    "group_shared_bias_bf16": (BF16, dict(group="shared", bias=True), None),
    "win7x5_shift_group_shared_rpb_f32": (F32, dict(win=(7, 5), grid=(1, 2), nh=1, shift=(3, 2), group="shared",
                                                    rpb=True), None),
    "win3x3_d64_f16": (F16, dict(win=(3, 3), grid=(2, 2), d=64, rpb=True), None),
    "nomask_nobias_d32_bf16": (BF16, dict(d=32, grid=(1, 2)), None),
    "coords_per_rpb_f32": (F32, dict(coords="per", rpb=True), False),
    "coords_shared_shift_group_per_rpb_bias_bf16": (BF16, dict(coords="shared", shift=(2, 2), group="per",
                                                               rpb=True, bias=True), None),
    "det_shift_group_per_rpb_bias_f32": (F32, dict(win=(4, 3), shift=(1, 2), group="per", rpb=True, bias=True),
                                         True),
    "det_coords_per_rpb_f16": (F16, dict(win=(2, 3), grid=(2, 2), nh=1, coords="per", rpb=True), True),
    # coords with several heads: rpb (T, nH) read in place and drpb summed in that layout (stride nH)
    "det_coords_shared_rpb_nh3_f32": (F32, dict(win=(2, 3), grid=(2, 1), nh=3, coords="shared", rpb=True), True),
    # Triton tile paths (interpreter tiles are 16 wide): one tile (N < 16), one pass with a tail
    # tile (N = 20, 35), two passes (N = 49), odd window counts per program, coords on multi tiles.
    "win5x4_coords_per_rpb_bias_bf16": (BF16, dict(win=(5, 4), grid=(1, 1), nh=1, coords="per", rpb=True,
                                                   bias=True), False),
    "det_win5x4_coords_shared_shift_rpb_f32": (F32, dict(win=(5, 4), grid=(1, 2), nh=1, coords="shared",
                                                          shift=(2, 1), rpb=True), True),
    "win7x7_shift_group_per_rpb_bias_f16": (F16, dict(win=(7, 7), B=1, grid=(1, 1), nh=1, shift=(3, 3),
                                                      group="per", rpb=True, bias=True), None),
    "det_win7x7_group_shared_rpb_bf16": (BF16, dict(win=(7, 7), B=1, grid=(1, 1), nh=1, group="shared", rpb=True),
                                         True),
    # the tail row tile's transposed one-block pass (16-bit, no coords/attn_bias): N = 20 (one tile
    # + tail; d = 64 fills V^T's 64 padded rows), N = 49 with shift and per-image groups
    "win5x4_shift_rpb_f16": (F16, dict(win=(5, 4), grid=(1, 2), shift=(2, 1), rpb=True), None),
    "win5x4_d64_shift_group_per_rpb_bf16": (BF16, dict(win=(5, 4), grid=(1, 2), d=64, shift=(2, 1), group="per",
                                                       rpb=True), None),
    "win7x7_shift_group_per_rpb_bf16": (BF16, dict(win=(7, 7), B=1, grid=(1, 1), shift=(3, 3), group="per",
                                                   rpb=True), None),
    "win3x5_d128_group_per_bias_f32": (F32, dict(win=(3, 5), B=3, grid=(1, 1), nh=1, d=128, group="per",
                                                 bias=True), None),
    # d = 32 over several tiles: the key-major single pass (a full query block, a tail block, every mask)
    "sp_win5x4_d32_shift_group_per_rpb_bias_bf16": (BF16, dict(win=(5, 4), B=1, grid=(1, 2), nh=2, d=32,
                                                              shift=(2, 1), group="per", rpb=True, bias=True), None),
    "sp_win6x6_d32_group_shared_rpb_f16": (F16, dict(win=(6, 6), B=1, grid=(1, 1), nh=1, d=32, group="shared",
                                                     rpb=True), None),
    # d = 128 over one tile: the two-phase backward (the others take the single pass)
    "det_win5x4_d128_shift_group_per_rpb_bias_bf16": (BF16, dict(win=(5, 4), B=1, grid=(1, 2), nh=1, d=128,
                                                                shift=(2, 1), group="per", rpb=True, bias=True), True),
    "win4x4_d128_coords_per_rpb_f16": (F16, dict(win=(4, 4), B=1, grid=(1, 2), nh=1, d=128, coords="per", rpb=True),
                                       False),
}


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward(backend, device, name):
    dtype, ckw, det = CASES[name]
    _, nh, kw, leaves = _case(device, dtype, **ckw)
    _check(backend, device, dtype, nh, kw, leaves, deterministic=det)


@pytest.mark.parametrize("backend,device", COMBOS)
def test_noncontiguous_qkv(backend, device):
    _, nh, kw, leaves = _case(device, F16, win=(4, 3), shift=(1, 1), rpb=True, group="shared")
    _check(backend, device, F16, nh, kw, leaves, make_qkv=noncontiguous)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
def test_triton_poisoned_outputs(device, monkeypatch):
    """Every output the Triton launchers allocate starts as NaN: any unwritten element fails."""
    tw = pytest.importorskip("mixkernels.triton.window_attention")

    def poisoned(shape, dtype, dev):
        return torch.full(shape, float("nan"), dtype=dtype, device=dev)

    monkeypatch.setattr(tw, "_alloc", poisoned)
    for det in (False, True):
        _, nh, kw, leaves = _case(device, F32, win=(7, 5), grid=(1, 2), nh=1, shift=(3, 2), rpb=True, bias=True)
        _check("triton", device, F32, nh, kw, leaves, deterministic=det)


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("coords", [None, "per"])
@pytest.mark.parametrize("tiles", ["one", "several"])
def test_deterministic_bias_grads_bit_identical(backend, device, coords, tiles):
    """Bit-identical bias gradients with deterministic=True, on windows of one tile (in-register
    sums) and of several tiles (program-private partial sums; Triton interpreter tiles are 16)."""
    if tiles == "one":
        ckw = dict(win=(2, 3), grid=(2, 2), nh=1, coords="per") if coords else dict(win=(4, 3), shift=(1, 1))
        dtype = F16
    else:
        ckw = dict(win=(5, 4), grid=(1, 2), nh=1, coords="per") if coords else dict(win=(4, 5), shift=(1, 2))
        dtype = BF16
    _, nh, kw, leaves = _case(device, dtype, rpb=True, bias=True, group="per", **ckw)
    qkv = leaves["qkv"].to(dtype)
    _skip_unless_available(backend, qkv, nh, kw["window_size"])
    dout = torch.randn(qkv.shape[:-1] + (qkv.shape[-1] // 3,), device=device, dtype=dtype)
    runs = []
    for _ in range(2):
        ins = [qkv.clone().requires_grad_(), leaves["rel_pos_bias"].float().requires_grad_(),
               leaves["attn_bias"].float().requires_grad_()]
        out = mixkernels.window_attention(ins[0], nh, kw["window_size"], rel_pos_bias=ins[1], attn_bias=ins[2],
                                          deterministic=True, backend=backend, **_rest(kw))
        runs.append(torch.autograd.grad(out, ins, dout))
    for a, b, n in zip(*runs, ("dqkv", "drpb", "dattn_bias")):
        assert torch.equal(a, b), f"{n} differs between two deterministic runs"


def _tiny(device, dtype=F32):
    qkv = torch.randn(1, 2, 4, 3 * 16, device=device, dtype=dtype, requires_grad=True)
    rpb = torch.randn(3 * 3, 1, device=device, requires_grad=True)
    return qkv, rpb


@pytest.mark.parametrize("backend,device", COMBOS)
def test_opcheck(backend, device):
    qkv, rpb = _tiny(device)
    _skip_unless_available(backend, qkv, 1, (2, 2))
    group = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 0]]], dtype=torch.int32, device=device)
    args = (qkv, 1, 2, 2, 1, 1, rpb, None, group, None, 2, 2, 0.25, True, backend)
    torch.library.opcheck(torch.ops.mixkernels.window_attention.default, args)


@pytest.mark.parametrize("backend,device", COMBOS)
def test_torch_compile_fullgraph(backend, device):
    qkv, rpb = _tiny(device)
    _skip_unless_available(backend, qkv, 1, (2, 2))
    torch._dynamo.reset()

    def f(qkv, rpb):
        return mixkernels.window_attention(qkv, 1, 2, shift_size=1, rel_pos_bias=rpb, backend=backend)

    eager = f(qkv, rpb)
    ge = torch.autograd.grad(eager.square().sum(), (qkv, rpb))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv, rpb)
    gc = torch.autograd.grad(compiled.square().sum(), (qkv, rpb))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- bad inputs (public API)


def _good(**over):
    args = dict(qkv=torch.randn(2, 4, 4, 3 * 32), num_heads=2, window_size=2)
    args.update(over)
    return args


def _call(**over):
    a = _good(**over)
    return mixkernels.window_attention(a.pop("qkv"), a.pop("num_heads"), a.pop("window_size"), **a)


@pytest.mark.parametrize(
    "over,exc,needle",
    [
        (dict(qkv=torch.randint(0, 3, (2, 4, 4, 96))), TypeError, "qkv"),
        (dict(qkv=torch.randn(4, 4, 96)), ValueError, "qkv"),
        (dict(qkv=torch.randn(2, 4, 4, 95)), ValueError, "95"),
        (dict(window_size=3), ValueError, "window_size"),
        (dict(shift_size=2), ValueError, "shift_size"),
        (dict(rel_pos_bias=torch.randn(8, 2)), ValueError, "rel_pos_bias"),
        (dict(attn_bias=torch.randn(2, 4, 5)), ValueError, "attn_bias"),
        (dict(group=torch.zeros(3, 4, 4, dtype=torch.int64)), ValueError, "group"),
        (dict(group=torch.zeros(4, 4)), TypeError, "group"),
        (dict(coords=torch.zeros(4, 4, 2, dtype=torch.int64)), ValueError, "coord_range"),
        (dict(coords=torch.zeros(4, 4, dtype=torch.int64), coord_range=4), ValueError, "coords"),
    ],
)
def test_bad_inputs(over, exc, needle):
    with pytest.raises(exc, match=needle):
        _call(**over)


_DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_unsupported_head_dim_triton():
    qkv = torch.randn(1, 4, 4, 3 * 2 * 8, device=_DEV)
    with pytest.raises(mixkernels.BackendUnavailable, match="head_dim 8"):
        mixkernels.window_attention(qkv, 2, 2, backend="triton")


def test_window_too_large_triton():
    qkv = torch.randn(1, 17, 17, 3 * 16, device=_DEV)
    with pytest.raises(mixkernels.BackendUnavailable, match="289 tokens"):
        mixkernels.window_attention(qkv, 1, 17, backend="triton")


# ---------------------------------------------------------------- Triton edge inputs (kernel level)


def _triton_module():
    return pytest.importorskip("mixkernels.triton.window_attention")


def _kernel_vs_reference(device, qkv, nh, win, shift, rpb=None, bias=None, group=None, coords=None, crange=None):
    """Run the Triton launchers directly (no ops-layer conversions: int64 labels/coords reach the
    kernels as they are; group (G,H,W), coords (G,H,W,2)), forward and backward."""
    tw = _triton_module()
    wh, ww = win
    sh, sw = shift
    d = qkv.shape[-1] // (3 * nh)
    rh, rw = crange if crange is not None else win
    scale = d ** -0.5
    args = (nh, wh, ww, sh, sw, rpb, bias, group, coords, rh, rw, scale)
    out, lse = tw.window_attention(qkv, *args)
    dout = torch.randn_like(out)
    dqkv, drpb, dbias = tw.window_attention_backward(dout, qkv, out, lse, *args, rpb is not None, bias is not None,
                                                     False)
    return out, dout, dqkv, drpb, dbias


@pytest.mark.parametrize("win,d", [((4, 4), 16), ((5, 4), 32)])
def test_triton_int64_group_labels_are_exact(win, d):
    """Labels equal modulo 2**32 stay different (edge rule 1): 0 and 2**32 must not attend.
    (d = 32 over several tiles: the single-pass backward.)"""
    device = _DEV
    nh = 1
    qkv = torch.randn(1, win[0], 2 * win[1], 3 * d, device=device)
    lab = torch.tensor([0, 2**32, -1, 2**32 - 1], dtype=torch.int64, device=device)
    group = lab[torch.randint(0, 4, (1, win[0], 2 * win[1]), device=device)]
    out, dout, dqkv, _, _ = _kernel_vs_reference(device, qkv, nh, win, (0, 0), group=group)
    q = qkv.double().requires_grad_()
    ref = ref_wa(q, nh, win, group=group)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(ref, q, dout.double())
    torch.testing.assert_close(dqkv.double(), g, atol=1e-5, rtol=1e-5)
    # the same labels truncated to int32 would merge 0 with 2**32 and -1 with 2**32 - 1
    merged = ref_wa(qkv.double(), nh, win, group=group.to(torch.int32))
    assert (merged - ref).abs().max() > 1e-3


def ref_wa(qkv, nh, win, **kw):
    return ref.window_attention(qkv, nh, win, **kw)


@pytest.mark.parametrize("win,d", [((4, 3), 16), ((7, 5), 16), ((7, 5), 32)])
def test_triton_fully_masked_rows_are_nan(win, d):
    """A real row whose every key is -inf (attn_bias) is NaN like the reference; other rows are not.
    (d = 32 over several tiles: the single-pass backward.)"""
    nh = 2
    N = win[0] * win[1]
    qkv = torch.randn(1, win[0], 2 * win[1], 3 * nh * d, device=_DEV, dtype=torch.float64).float()
    bias = torch.randn(nh, N, N, device=_DEV)
    bias[0, 3, :] = float("-inf")
    bias[1, N - 1, :] = float("-inf")
    out, dout, dqkv, _, dbias = _kernel_vs_reference(_DEV, qkv, nh, win, (0, 0), bias=bias)
    q = qkv.double().requires_grad_()
    b = bias.double().requires_grad_()
    r = ref_wa(q, nh, win, attn_bias=b)
    gq, gb = torch.autograd.grad(r, (q, b), dout.double())
    for name, got, want in (("out", out, r), ("dqkv", dqkv, gq), ("dbias", dbias, gb)):
        assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN positions differ"
        fin = torch.isfinite(want)
        assert fin.any()
        torch.testing.assert_close(got.double()[fin], want[fin], atol=2e-5, rtol=1e-4, msg=name)
    y, x = divmod(3, win[1])  # token 3 of window 0, head 0
    assert torch.isnan(out[0, y, x, :d]).all() and torch.isfinite(out[0, y, x, d:]).all()


@pytest.mark.parametrize("labels", ["shared", "per"])
def test_triton_sp_group_fully_masked_rows(labels):
    """The single-pass backward with group labels and fully masked rows (-inf attn_bias): batch-shared
    labels fold the group mask into the per-window-position bias tile (``_bias_tile``), per-image
    labels mask in the kernel; both match the reference's gradients where it is finite, and keep
    dS exactly 0 at the pairs the group rule masks (finite gradients for rows that cannot see
    the NaN row's keys)."""
    tw = _triton_module()
    nh, d, win = 2, 32, (5, 4)
    N = win[0] * win[1]
    qkv = torch.randn(2, win[0], 2 * win[1], 3 * nh * d, device=_DEV, dtype=torch.float64).float()
    group = torch.randint(0, 2, (1 if labels == "shared" else 2, win[0], 2 * win[1]), device=_DEV)
    group[:, 0, 0] = 0
    group[:, 0, 1] = 1  # both labels in the first window
    bias = torch.randn(nh, N, N, device=_DEV)
    bias[0, 3, :] = float("-inf")
    rpb = torch.randn((2 * win[0] - 1) * (2 * win[1] - 1), nh, device=_DEV)
    args = (nh, *win, 0, 0, rpb, bias, group, None, *win, d ** -0.5)
    out, lse = tw.window_attention(qkv, *args)
    dout = torch.randn_like(out)
    dqkv, drpb, dbias = tw.window_attention_backward(dout, qkv, out, lse, *args, True, True, False)
    q = qkv.double().requires_grad_()
    b = bias.double().requires_grad_()
    t = rpb.double().requires_grad_()
    r = ref_wa(q, nh, win, attn_bias=b, rel_pos_bias=t, group=group)
    gq, gb, gt = torch.autograd.grad(r, (q, b, t), dout.double())
    for name, got, want in (("out", out, r), ("dqkv", dqkv, gq), ("dbias", dbias, gb), ("drpb", drpb, gt)):
        fin = torch.isfinite(want)
        assert fin.any() and torch.isfinite(got[fin]).all(), f"{name}: NaN where the reference is finite"
        torch.testing.assert_close(got.double()[fin], want[fin], atol=2e-5, rtol=1e-4, msg=name)
    assert torch.isnan(dqkv).any()


def _torch_bias_tile(rpb, attn_bias, labels, wh, ww, nh, nk, nq, scale):
    """The single pass's bias tile built by torch ops (the spec of ``_sp_bias_kernel``)."""
    n = wh * ww
    bias = torch.zeros((nh, n, n), dtype=torch.float32)
    if rpb is not None:
        j = torch.arange(n)
        c = (j // ww) * (2 * ww - 1) + j % ww
        bias = bias + rpb[c[:, None] - c[None, :] + ((wh - 1) * (2 * ww - 1) + ww - 1)].permute(2, 0, 1)
    if attn_bias is not None:
        bias = bias + attn_bias
    tile = torch.zeros((nh, nk, nq), dtype=torch.float32)
    tile[:, n:, :] = float("-inf")
    tile[:, :n, :n] = bias.transpose(1, 2) * torch.tensor(1.0 / scale, dtype=torch.float32)
    if labels is None:
        return tile
    same = torch.ones((labels.shape[0], nk, nq), dtype=torch.bool)
    same[:, :n, :n] = labels[:, :, None] == labels[:, None, :]
    return torch.where(same[:, None], tile[None], float("-inf")).reshape(labels.shape[0] * nh, nk, nq)


@pytest.mark.parametrize("rpb,bias,group", [(True, False, True), (False, True, False), (True, True, False),
                                            (False, False, True)])
def test_triton_sp_bias_tile_kernel(rpb, bias, group):
    """The single pass's bias tile (one launch, ``_sp_bias_kernel``) equals the torch-built tile bit for bit
    (table + attn_bias over the scale, padded keys -inf, padded queries 0, per window position -inf where
    the batch-shared labels differ: int64 labels that differ only above bit 32 stay apart), and the
    launch zeroes the poisoned bias-gradient sums."""
    tw = pytest.importorskip("mixkernels.triton.window_attention_bwd")
    nh, wh, ww = 3, 3, 5
    n, nk, nq = wh * ww, 32, 24
    H, W = 2 * wh, 3 * ww
    t = torch.randn((2 * wh - 1) * (2 * ww - 1), nh) if rpb else None
    ab = torch.randn(nh, n, n) if bias else None
    g = None
    if group:
        g = torch.randint(0, 2, (1, H, W), dtype=torch.int64) + (torch.randint(0, 2, (1, H, W)) << 33)
    qkv = torch.empty(1, H, W, 3 * nh * 16)
    dsum = torch.full((nh, nk, nq), float("nan"))
    got = tw._bias_tile(t, ab, g, wh, ww, nh, nk, nq, 0.37, qkv, dsum)
    labels = None
    if group:
        labels = g[0].reshape(H // wh, wh, W // ww, ww).permute(0, 2, 1, 3).reshape(-1, n)
        assert (labels[:, :, None] != labels[:, None, :]).any() and ((labels >> 33) != (labels & 1)).any()
    want = _torch_bias_tile(t, ab, labels, wh, ww, nh, nk, nq, 0.37)
    assert got.shape == want.shape and torch.equal(got, want)
    assert torch.equal(dsum, torch.zeros_like(dsum))


@pytest.mark.parametrize("nh,win", [(2, (5, 4)), (16, (6, 6)), (17, (7, 7))])
def test_triton_gather_table_kernel(nh, win):
    """The table gradient's gather (drpb[t, h] = sum of dS over the pairs with Swin index t), both of its
    summation schemes (>= 16 heads: queries in chunks), on the single pass's padded key-major layout."""
    tw = pytest.importorskip("mixkernels.triton.window_attention_bwd")
    wh, ww = win
    N = wh * ww
    nk, nq = N + 5, N + 3
    dsum = torch.randn(nh, nk, nq, device=_DEV)  # [h, key j, query i], padded
    T = (2 * wh - 1) * (2 * ww - 1)
    drpb = torch.full((T, nh), float("nan"), device=_DEV)
    tw._gather_table_kernel[(T,)](dsum, drpb, nh, dsum.stride(0), dsum.stride(2), dsum.stride(1), N=N,
                                  N_PAD=triton_next_pow2(N), NH_PAD=triton_next_pow2(nh), WH=wh, WW=ww)
    yy, xx = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    y, x = yy.reshape(-1), xx.reshape(-1)
    idx = (y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)  # [i, j]
    dq = dsum[:, :N, :N].transpose(1, 2).double()  # [h, i, j]
    want = torch.zeros(T, nh, dtype=torch.float64).index_add_(0, idx.reshape(-1).to(_DEV),
                                                               dq.reshape(nh, -1).t())
    torch.testing.assert_close(drpb.double(), want, atol=1e-4, rtol=1e-5)


def triton_next_pow2(n):
    return 1 << (n - 1).bit_length()


@pytest.mark.parametrize("win", [(3, 3), (5, 4)])
def test_triton_out_of_range_coords_add_no_bias(win):
    """Pairs whose coordinate difference is outside coord_range get no table bias and still attend
    (edge rule 3); int64 coordinates far apart must not wrap into range. Two heads: the table's
    columns (rpb (T, nH) read in place, stride nH) must not mix."""
    nh, (wh, ww) = 2, win
    N = wh * ww
    B = 2
    qkv = torch.randn(B, wh, ww, 3 * nh * 16, device=_DEV)
    base = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"), -1).to(_DEV)
    coords = (base * 3).to(torch.int64)  # spread: many differences fall outside R = (3, 3)
    coords[0, 0] = torch.tensor([2**40, -(2**40)], device=_DEV)
    R = (3, 3)
    table = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), nh, device=_DEV)
    out, dout, dqkv, drpb, _ = _kernel_vs_reference(_DEV, qkv, nh, win, (0, 0), rpb=table, coords=coords[None],
                                                    crange=R)
    # expected: the in-range table bias as a dense attn_bias (one window per image, coords shared)
    c = coords.reshape(N, 2)
    rel = c[:, None, :] - c[None, :, :]
    inr = ((rel[..., 0].abs() < R[0]) & (rel[..., 1].abs() < R[1]))
    idx = torch.where(inr, (rel[..., 0] + R[0] - 1) * (2 * R[1] - 1) + (rel[..., 1] + R[1] - 1), 0)
    t64 = table.double().requires_grad_()
    dense = torch.where(inr[None], t64[idx].permute(2, 0, 1), torch.zeros((), dtype=torch.float64, device=_DEV))
    q = qkv.double().requires_grad_()
    r = ref_wa(q, nh, win, attn_bias=dense)
    gq, gt = torch.autograd.grad(r, (q, t64), dout.double())
    assert not inr.all() and inr.any()
    torch.testing.assert_close(out.double(), r, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dqkv.double(), gq, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(drpb.double(), gt, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_GPU)])
@pytest.mark.parametrize("case", ["single_coords", "multi_group_shift", "sp_group_shift"])
def test_triton_poisoned_outputs_paths(device, case, monkeypatch):
    """Poisoned outputs on the single-tile path (coords table) and the two-pass multi-tile path."""
    tw = pytest.importorskip("mixkernels.triton.window_attention")
    monkeypatch.setattr(tw, "_alloc",
                        lambda shape, dtype, dev: torch.full(shape, float("nan"), dtype=dtype, device=dev))
    if case == "single_coords":
        ckw = dict(win=(3, 4), grid=(1, 3), nh=2, coords="per", rpb=True, bias=True)
    elif case == "multi_group_shift":
        ckw = dict(win=(7, 7), B=1, grid=(1, 1), nh=1, shift=(3, 2), group="per", rpb=True, bias=True)
    else:  # d = 32: the single pass (non-deterministic), the two phases (deterministic)
        ckw = dict(win=(5, 4), B=1, grid=(1, 2), nh=1, d=32, shift=(2, 1), group="per", rpb=True, bias=True)
    for det in (False, True):
        _, nh, kw, leaves = _case(device, F32, **ckw)
        _check("triton", device, F32, nh, kw, leaves, deterministic=det)


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("segments", [False, True])
def test_triton_tail_rows_nan_and_poison(dtype, segments, monkeypatch):
    """The tail rows' one-block pass (16-bit, window 7: rows 48.. of the interpreter's 16-row tiles;
    ``segments``: the by-segment forward instead, which a group mask selects by default):
    a head whose table is all -inf gives NaN rows (edge rule 2), the other head matches the
    reference, and padded rows are never stored (poisoned outputs)."""
    tw = pytest.importorskip("mixkernels.triton.window_attention")
    monkeypatch.setattr(tw, "SEGMENTS", segments)
    monkeypatch.setattr(tw, "_alloc",
                        lambda shape, dtype, dev: torch.full(shape, float("nan"), dtype=dtype, device=dev))
    nh, win = 2, (7, 7)
    qkv = torch.randn(1, 7, 14, 3 * nh * 16, device=_DEV).to(dtype)
    table = torch.randn(13 * 13, nh, device=_DEV)
    table[:, 0] = float("-inf")
    group = torch.randint(0, 2, (1, 7, 14), device=_DEV)
    out, lse = tw.window_attention(qkv, nh, 7, 7, 0, 0, table, None, group, None, 7, 7, 16 ** -0.5)
    assert torch.isnan(out[..., :16]).all() and not torch.isfinite(lse[:, 0]).any()
    assert torch.isfinite(out[..., 16:]).all() and torch.isfinite(lse[:, 1]).all()
    r64 = ref_wa(qkv.double(), nh, win, rel_pos_bias=table.double(), group=group)
    r_s = ref_wa(qkv, nh, win, rel_pos_bias=table, group=group)
    assert_close_2x(out[..., 16:], r64[..., 16:], r_s[..., 16:], name="out")
