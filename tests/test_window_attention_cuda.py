"""CUDA C++ window attention (backend="cuda") against the float64 reference, forward and every gradient.

GPU only: every test carries ``@pytest.mark.gpu`` (skipped without CUDA). Rule: flash-attn's
``|out - ref64| <= 2 * |ref_same_dtype - ref64| + atol`` (mixkernels.testing.assert_close_2x).
MIXKERNELS_WATTN_SMEM_LIMIT (read by the CUDA launchers) lowers the shared-memory budget so that
small shapes take the column-chunked / several-row-block paths.
"""
from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x, noncontiguous

DTYPES = [torch.float16, torch.bfloat16, torch.float32]

# (name, B, H, W, heads, head_dim, window, shift, rpb, attn_bias, group ("none"/"shared"/"per_image"), coords)
CASES = [
    ("mixmim_s4", 2, 14, 14, 2, 32, (7, 7), (0, 0), True, False, "per_image", False),
    ("swin_shift", 2, 14, 14, 2, 32, (7, 7), (3, 3), True, False, "none", False),
    ("odd_window", 2, 6, 10, 3, 16, (3, 5), (1, 2), False, True, "none", False),
    ("everything", 2, 12, 12, 2, 32, (6, 6), (2, 3), True, True, "per_image", False),
    ("ummae_coords", 2, 8, 8, 2, 32, (4, 4), (2, 2), True, False, "shared", True),
    ("n196_d32", 1, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "shared", False),
    # one-window packs without shift: the forward's aligned segment layout wherever the rounded segments fit
    ("n196_group", 2, 28, 28, 2, 32, (14, 14), (0, 0), True, True, "shared", False),
    ("n256_d64", 1, 16, 32, 2, 64, (16, 16), (8, 0), True, True, "none", False),
    ("n144_d128", 1, 12, 24, 1, 128, (12, 12), (0, 6), True, True, "per_image", False),
    ("row_window", 2, 4, 16, 2, 16, (1, 8), (0, 3), True, False, "per_image", False),
    ("no_bias", 3, 8, 8, 4, 16, (8, 8), (0, 0), False, False, "none", False),
]


def _make(case, dtype, device="cuda", coord_range=(6, 5)):
    name, B, H, W, nh, d, win, shift, use_rpb, use_ab, group, use_coords = case
    N = win[0] * win[1]
    qkv = torch.randn(B, H, W, 3 * nh * d, device=device, dtype=dtype)
    kw = dict(shift_size=shift)
    R = coord_range if use_coords else win
    if use_rpb:
        kw["rel_pos_bias"] = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), nh, device=device)
    if use_ab:
        kw["attn_bias"] = torch.randn(nh, N, N, device=device)
    if group == "shared":
        kw["group"] = torch.randint(0, 2, (H, W), device=device)
    elif group == "per_image":
        kw["group"] = torch.randint(0, 3, (B, H, W), device=device, dtype=torch.int32)
    if use_coords:
        kw["coords"] = torch.stack(
            [torch.randint(0, R[0], (B, H, W), device=device), torch.randint(0, R[1], (B, H, W), device=device)], -1
        )
        kw["coord_range"] = R
    return qkv, nh, win, kw


def _run(fn, qkv, nh, win, kw, dout, cast=None, **extra):
    """Forward + grads of qkv, rel_pos_bias, attn_bias with `fn`; inputs cast by `cast` first."""
    cast = cast or (lambda t: t)
    x = cast(qkv).detach().requires_grad_(True)
    kw2 = dict(kw)
    leaves = [x]
    for key in ("rel_pos_bias", "attn_bias"):
        if key in kw2:
            kw2[key] = (kw2[key].double() if cast(qkv).dtype == torch.float64 else kw2[key]).detach().requires_grad_(True)
            leaves.append(kw2[key])
    out = fn(x, nh, win, **kw2, **extra)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out] + list(grads)


def _check(case, dtype, deterministic=False):
    qkv, nh, win, kw = _make(case, dtype)
    B, H, W, C3 = qkv.shape
    dout = torch.randn(B, H, W, C3 // 3, device=qkv.device, dtype=dtype)
    got = _run(mixkernels.window_attention, qkv, nh, win, kw, dout, backend="cuda", deterministic=deterministic)
    r64 = _run(ref.window_attention, qkv, nh, win, kw, dout, cast=lambda t: t.double())
    same = _run(ref.window_attention, qkv, nh, win, kw, dout)
    names = ["out", "dqkv"] + [k for k in ("rel_pos_bias", "attn_bias") if k in kw]
    for n, g, r, s in zip(names, got, r64, same):
        assert g.dtype == s.dtype, f"{n}: dtype {g.dtype} != {s.dtype}"
        assert_close_2x(g, r, s, name=f"{case[0]}/{dtype}/{n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_reference(case, dtype):
    _check(case, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[6]], ids=lambda c: c[0])
def test_deterministic_matches_reference(case):
    _check(case, torch.bfloat16, deterministic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[5]], ids=lambda c: c[0])
def test_deterministic_bit_identical(case, dtype):
    # Enough windows that CTAs walk several windows (legacy kernels: 64 slots) or packs of windows
    # (fused kernels: 256 slots of packs) in their fixed order.
    name, B, H, W, nh, d, win, *rest = case
    nW = (H // win[0]) * (W // win[1])
    windows = max(64, 256 * _pack(win[0] * win[1], 10**9)) + 1
    case = (name, -(-windows // nW), H, W, nh, d, win, *rest)
    qkv, nh, win, kw = _make(case, dtype)
    dout = torch.randn(qkv.shape[:-1] + (qkv.shape[-1] // 3,), device="cuda", dtype=dtype)
    runs = [
        _run(mixkernels.window_attention, qkv, nh, win, kw, dout, backend="cuda", deterministic=True) for _ in range(3)
    ]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        assert torch.equal(a, b)
    fast = _run(mixkernels.window_attention, qkv, nh, win, kw, dout, backend="cuda", deterministic=False)
    for a, b in zip(runs[0], fast):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 if dtype == torch.float32 else 2e-2)


def _pack(N, nwin):
    """Windows per CTA pack of the fused kernels: pick_pack in csrc/cuda/window_attention_index.cuh."""
    best, best_fill, P = 1, 0.0, 1
    while P * N <= 208 and P <= nwin:
        fill = P * N / ((P * N + 15) // 16 * 16)
        if fill >= best_fill - 1e-6:
            best, best_fill = P, fill
        P += 1
    return best


def _poison_allocator(shapes_dtypes):
    # Fill blocks of the output sizes with NaN, all alive at once (so that no fill reuses another's
    # block), then free them together: the op's at::empty calls of those sizes get NaN-filled memory.
    torch.cuda.synchronize()
    bufs = [torch.full(shape, float("nan"), device="cuda", dtype=dt) for shape, dt in shapes_dtypes]
    del bufs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_kernel_level_outputs_fully_written(dtype):
    case = CASES[3]
    qkv, nh, (wh, ww), kw = _make(case, dtype)
    B, H, W, C3 = qkv.shape
    sh, sw = kw["shift_size"]
    N, nW = wh * ww, (H // wh) * (W // ww)
    rpb, ab = kw["rel_pos_bias"], kw["attn_bias"]
    g = kw["group"].to(torch.int32).contiguous()
    scale = (C3 // 3 // nh) ** -0.5
    op = torch.ops.mixkernels_C
    _poison_allocator([((B, H, W, C3 // 3), dtype), ((B * nW, nh, N), torch.float32)])
    out, lse = op.window_attention(qkv, nh, wh, ww, sh, sw, rpb, ab, g, None, wh, ww, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref_out = ref.window_attention(qkv.double(), nh, (wh, ww), shift_size=(sh, sw), rel_pos_bias=rpb.double(),
                                   attn_bias=ab.double(), group=g, scale=scale)
    same = ref.window_attention(qkv, nh, (wh, ww), shift_size=(sh, sw), rel_pos_bias=rpb, attn_bias=ab, group=g,
                                scale=scale)
    assert_close_2x(out, ref_out, same, name="out")
    dout = torch.randn_like(out)
    for det in (False, True):
        _poison_allocator([(qkv.shape, dtype), (rpb.shape, torch.float32), (ab.shape, torch.float32)])
        dqkv, drpb, dbias = op.window_attention_backward(dout, qkv, out, lse, nh, wh, ww, sh, sw, rpb, ab, g, None,
                                                         wh, ww, scale, True, True, det)
        for t in (dqkv, drpb, dbias):
            assert torch.isfinite(t).all(), f"unwritten or non-finite output (deterministic={det})"
    # Only the requested gradients come back.
    _, e1, e2 = op.window_attention_backward(dout, qkv, out, lse, nh, wh, ww, sh, sw, rpb, ab, g, None, wh, ww, scale,
                                             False, False, False)
    assert e1.numel() == 0 and e2.numel() == 0


@pytest.mark.gpu
def test_lse_matches_reference():
    case = CASES[3]
    qkv, nh, (wh, ww), kw = _make(case, torch.float32)
    B, H, W, C3 = qkv.shape
    sh, sw = kw["shift_size"]
    d, N = C3 // 3 // nh, wh * ww
    rpb, ab, g = kw["rel_pos_bias"], kw["attn_bias"], kw["group"].to(torch.int32)
    _, lse = torch.ops.mixkernels_C.window_attention(qkv, nh, wh, ww, sh, sw, rpb, ab, g, None, wh, ww, d**-0.5)
    # Logits from the reference pieces, in float64.
    win = ref.window_partition(qkv.double(), (wh, ww), (sh, sw))
    q, k, _ = win.reshape(-1, N, 3, nh, d).permute(2, 0, 3, 1, 4).unbind(0)
    s = (q * d**-0.5) @ k.transpose(-2, -1)
    idx = ref.relative_position_index(wh, ww, device=qkv.device)
    s = s + rpb.double()[idx.reshape(-1)].reshape(N, N, nh).permute(2, 0, 1) + ab.double()
    ids = ref.shift_region_ids(H, W, (wh, ww), (sh, sw), device=qkv.device)
    idw = ref.window_partition(ids[None, :, :, None], (wh, ww)).reshape(-1, N)
    gw = ref.window_partition(g.long()[..., None], (wh, ww), (sh, sw)).reshape(B, -1, N)
    allowed = (idw[None, :, :, None] == idw[None, :, None, :]) & (gw[..., :, None] == gw[..., None, :])
    s = s.reshape(B, -1, nh, N, N).masked_fill(~allowed[:, :, None], float("-inf")).reshape(-1, nh, N, N)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_noncontiguous_and_misaligned_inputs():
    case = CASES[4]
    qkv, nh, win, kw = _make(case, torch.float16)
    dout = torch.randn(qkv.shape[:-1] + (qkv.shape[-1] // 3,), device="cuda", dtype=torch.float16)
    det = dict(backend="cuda", deterministic=True)  # bitwise comparison: no atomics
    want = _run(mixkernels.window_attention, qkv, nh, win, kw, dout, **det)
    nc = _run(mixkernels.window_attention, noncontiguous(qkv), nh, win, kw, noncontiguous(dout), **det)
    flat = torch.empty(qkv.numel() + 1, device="cuda", dtype=qkv.dtype)
    shifted = flat[1:].view(qkv.shape)  # 2-byte offset: not 16-byte aligned
    shifted.copy_(qkv)
    mis = _run(mixkernels.window_attention, shifted, nh, win, kw, dout, **det)
    for a, b, c in zip(want, nc, mis):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    case = CASES[1]
    qkv, nh, win, kw = _make(case, torch.bfloat16)
    B, H, W, C3 = qkv.shape
    dout = torch.randn(B, H, W, C3 // 3, device="cuda", dtype=torch.bfloat16)
    static_qkv = qkv.clone().requires_grad_(True)
    rpb = kw.pop("rel_pos_bias").requires_grad_(True)

    def step():
        out = mixkernels.window_attention(static_qkv, nh, win, rel_pos_bias=rpb, backend="cuda", **kw)
        return (out,) + torch.autograd.grad(out, (static_qkv, rpb), dout)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_res = step()
    new = torch.randn_like(qkv)
    with torch.no_grad():
        static_qkv.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(static_res, eager):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_opcheck_cuda_backend():
    case = CASES[3]
    qkv, nh, (wh, ww), kw = _make(case, torch.float16)
    sh, sw = kw["shift_size"]
    d = qkv.shape[-1] // 3 // nh
    rpb = kw["rel_pos_bias"].requires_grad_(True)
    ab = kw["attn_bias"].requires_grad_(True)
    g = kw["group"].to(torch.int32).contiguous()
    args = (qkv.requires_grad_(True), nh, wh, ww, sh, sw, rpb, ab, g, None, wh, ww, d**-0.5, False, "cuda")
    torch.library.opcheck(torch.ops.mixkernels.window_attention.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _smem_budget(case, dtype, deterministic):
    """A shared-memory budget (bytes) that fits every legacy kernel with one warp and one 32-column
    chunk but not the window resident (nor the fused kernels): mirrors make_plan and TokSmem in
    csrc/cuda/window_attention_legacy.cuh."""
    name, B, H, W, nh, d, win, shift, use_rpb, use_ab, group, use_coords = case
    es = torch.empty((), dtype=dtype).element_size()
    N = win[0] * win[1]
    cap = (N + 31) // 32 * 32
    R = (6, 5) if use_coords else win
    T = (2 * R[0] - 1) * (2 * R[1] - 1)
    ld = (d + 16 // es) * es
    base = ld * (2 * 16 + 2 * 32) + 52 * cap  # dq / dkdv: 2 row tiles of 16, 2 column tiles of 32
    acc = 8 if dtype == torch.float32 else 4  # bias-gradient tables: double for float32
    tab = ((T + 32) * acc if deterministic else T * acc) if use_rpb else 0
    return max(base + tab, base + 2 * cap * 4)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[5]], ids=lambda c: c[0])
def test_column_chunks_and_row_blocks(case, dtype, deterministic, monkeypatch):
    # A tight shared-memory budget forces what only large windows reach on real devices: K/V
    # (forward, dq) and Q/dO (dkdv) streamed in 32-column chunks, several row blocks per window and
    # fewer warps per CTA. Every row's first chunk is fully masked somewhere in the shifted cases.
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", str(_smem_budget(case, dtype, deterministic)))
    _check(case, dtype, deterministic=deterministic)


@pytest.mark.gpu
def test_smem_limit_too_small_raises(monkeypatch):
    qkv, nh, win, kw = _make(CASES[1], torch.float16)
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", "1024")
    with pytest.raises(RuntimeError, match="shared memory"):
        mixkernels.window_attention(qkv, nh, win, backend="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "det"])
def test_partial_bias_grads_and_bool_group(deterministic):
    # need_drpb=False with a table present (drpb_dst == nullptr path), need_dbias=True, and MixMIM's
    # batch-shared boolean mask as the group.
    B, H, W, nh, d, win = 3, 14, 14, 2, 32, (7, 7)
    N = win[0] * win[1]
    qkv = torch.randn(B, H, W, 3 * nh * d, device="cuda", dtype=torch.bfloat16)
    rpb = torch.randn((2 * win[0] - 1) * (2 * win[1] - 1), nh, device="cuda")  # no grad
    ab = torch.randn(nh, N, N, device="cuda")
    group = torch.rand(H, W, device="cuda") < 0.5
    dout = torch.randn(B, H, W, nh * d, device="cuda", dtype=torch.bfloat16)

    def run(fn, x, a, **extra):
        x = x.detach().requires_grad_(True)
        a = a.detach().requires_grad_(True)
        out = fn(x, nh, win, rel_pos_bias=rpb.to(a.dtype), attn_bias=a, group=group, **extra)
        return [out] + list(torch.autograd.grad(out, (x, a), dout.to(out.dtype)))

    got = run(mixkernels.window_attention, qkv, ab, backend="cuda", deterministic=deterministic)
    r64 = run(ref.window_attention, qkv.double(), ab.double())
    same = run(ref.window_attention, qkv, ab)
    for n, g, r, s in zip(("out", "dqkv", "dbias"), got, r64, same):
        assert_close_2x(g, r, s, name=n)


@pytest.mark.gpu
def test_large_batch_offsets():
    # Swin-T stage 1 at batch 128 (56x56 tokens, 3C = 384): 154M qkv elements, 8192 windows. Images
    # are independent (per-image group), so the first and last images are checked against the
    # reference run on those two images alone; offsets that wrap or mix images show up there.
    B, H, W, nh, d, win, shift = 128, 56, 56, 4, 32, (7, 7), (3, 3)
    if torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs ~3 GiB of GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, H, W, 3 * nh * d, device="cuda", dtype=torch.float16, generator=g)
    group = torch.randint(0, 2, (B, H, W), device="cuda", generator=g, dtype=torch.int32)
    rpb = torch.randn((2 * win[0] - 1) * (2 * win[1] - 1), nh, device="cuda", generator=g)
    dout = torch.randn(B, H, W, nh * d, device="cuda", dtype=torch.float16, generator=g)
    x = qkv.clone().requires_grad_(True)
    out = mixkernels.window_attention(x, nh, win, shift_size=shift, rel_pos_bias=rpb, group=group, backend="cuda")
    (dx,) = torch.autograd.grad(out, (x,), dout)
    sel = torch.tensor([0, B - 1], device="cuda")
    kw = dict(shift_size=shift, group=group[sel])
    got = [out[sel], dx[sel]]
    r64 = _run(ref.window_attention, qkv[sel], nh, win, dict(kw, rel_pos_bias=rpb), dout[sel], cast=lambda t: t.double())
    same = _run(ref.window_attention, qkv[sel], nh, win, dict(kw, rel_pos_bias=rpb), dout[sel])
    for n, a, r, s in zip(("out", "dqkv"), got, r64, same):
        assert_close_2x(a, r, s, name=f"large/{n}")
    assert torch.isfinite(out).all() and torch.isfinite(dx).all()


# ---- Edge-input rules (COMMON.md) on the CUDA path, and the fused kernels against the legacy ones.
def _kernel_op(qkv, nh, win, shift, rpb=None, ab=None, group=None, coords=None, R=None):
    d = qkv.shape[-1] // 3 // nh
    R = R or win
    return torch.ops.mixkernels_C.window_attention(qkv, nh, win[0], win[1], shift[0], shift[1], rpb, ab, group, coords,
                                                   R[0], R[1], d**-0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("gdtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_group_labels_compare_at_full_width(gdtype):
    # int64 labels 5 and 5 + 2**32 are different groups; the kernel op takes int32 or int64 as is.
    B, H, W, nh, win = 2, 14, 14, 2, (7, 7)
    qkv = torch.randn(B, H, W, 3 * nh * 32, device="cuda", dtype=torch.bfloat16)
    rpb = torch.randn(169, nh, device="cuda")
    bits = torch.randint(0, 2, (B, H, W), device="cuda")
    g = (bits * (2**32 if gdtype == torch.int64 else 7) + 5).to(gdtype)
    out, _ = _kernel_op(qkv, nh, win, (0, 0), rpb=rpb, group=g)
    want = ref.window_attention(qkv.double(), nh, win, rel_pos_bias=rpb.double(), group=g)
    same = ref.window_attention(qkv, nh, win, rel_pos_bias=rpb, group=g)
    assert_close_2x(out, want, same, name="out")


@pytest.mark.gpu
def test_int64_coords():
    B, H, W, nh, win, R = 2, 8, 8, 2, (4, 4), (6, 5)
    qkv = torch.randn(B, H, W, 3 * nh * 32, device="cuda", dtype=torch.bfloat16)
    rpb = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), nh, device="cuda")
    c = torch.stack([torch.randint(0, R[0], (B, H, W)), torch.randint(0, R[1], (B, H, W))], -1).cuda()
    out64, _ = _kernel_op(qkv, nh, win, (2, 2), rpb=rpb, coords=c.long(), R=R)
    out32, _ = _kernel_op(qkv, nh, win, (2, 2), rpb=rpb, coords=c.int(), R=R)
    assert torch.equal(out64, out32)
    want = ref.window_attention(qkv.double(), nh, win, shift_size=2, rel_pos_bias=rpb.double(), coords=c,
                                coord_range=R)
    same = ref.window_attention(qkv, nh, win, shift_size=2, rel_pos_bias=rpb, coords=c, coord_range=R)
    assert_close_2x(out64, want, same, name="out")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_fully_masked_rows_are_nan(dtype):
    # Every bias entry of head 1 is -inf: every row of head 1 is fully masked -> NaN (rule 2), lse -inf.
    qkv = torch.randn(2, 14, 14, 3 * 2 * 32, device="cuda", dtype=dtype)
    rpb = torch.randn(169, 2, device="cuda")
    rpb[:, 1] = float("-inf")
    out, lse = _kernel_op(qkv, 2, (7, 7), (0, 0), rpb=rpb)
    assert torch.isnan(out[..., 32:]).all() and torch.isfinite(out[..., :32]).all()
    assert torch.isneginf(lse[:, 1]).all()


@pytest.mark.gpu
def test_nan_in_v_spreads_like_the_reference():
    # A NaN in V of a token other groups cannot see still reaches their rows through the reference's
    # 0 * NaN in P @ V: the same NaN pattern on the CUDA path.
    B, H, W, nh, win = 2, 14, 14, 2, (7, 7)
    qkv = torch.randn(B, H, W, 3 * nh * 32, device="cuda", dtype=torch.bfloat16)
    g = torch.randint(0, 2, (B, H, W), device="cuda", dtype=torch.int32)
    qkv[0, 3, 4, 2 * 64 + 5] = float("nan")
    out, _ = _kernel_op(qkv, nh, win, (0, 0), group=g)
    want = ref.window_attention(qkv.double(), nh, win, group=g)
    assert torch.equal(torch.isnan(out), torch.isnan(want))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5], CASES[7]], ids=lambda c: c[0])
def test_fused_kernels_agree_with_legacy(case, monkeypatch):
    # The same call through the fused kernels and, under a tiny shared-memory budget, the legacy ones.
    qkv, nh, win, kw = _make(case, torch.bfloat16)
    dout = torch.randn(qkv.shape[:-1] + (qkv.shape[-1] // 3,), device="cuda", dtype=torch.bfloat16)
    fused = _run(mixkernels.window_attention, qkv, nh, win, kw, dout, backend="cuda")
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", str(_smem_budget(case, torch.bfloat16, False)))
    legacy = _run(mixkernels.window_attention, qkv, nh, win, kw, dout, backend="cuda")
    for a, b in zip(fused, legacy):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
