"""Fused reconstruction losses (mixmim_loss, masked_recon_loss) on every backend.

Forward and dpred are compared with the float64 reference (flash-attn's 2x rule against the
same-dtype reference), and the reference itself with the official formulas of Sense-X/MixMIM
(``MixMIM.forward_loss``), implus/UM-MAE (``forward_loss`` on compact preds) and MAE (full
preds, loss averaged over removed patches), recomputed here from the same tensors.
Triton runs under its interpreter on CPU tensors when there is no GPU: shapes stay tiny.
"""
from __future__ import annotations

import pytest
import torch

import mixkernels as mk
from mixkernels import reference as ref
from mixkernels.ops._dispatch import kernel
from mixkernels.testing import assert_close_2x, noncontiguous

HAS_CUDA = torch.cuda.is_available()
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
BACKENDS = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
# (pred dtype, imgs dtype); float64 only on the CPU kernels.
DTYPES = [(F32, F32), (BF16, BF16), (F16, F16), (BF16, F32), (F32, F16), (F64, F64), (F64, F32)]
# (B, H, W, p, batch-shared mask): odd batch, rectangular images, p = 4..32, and p = 6 with
# W % 4 != 0 (the CUDA scalar path).
SHAPES = [(3, 12, 8, 4, True), (2, 16, 24, 8, False), (1, 32, 16, 16, False), (2, 64, 32, 32, True),
          (2, 12, 18, 6, False)]


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _cases(with_compact: bool = False):
    """The test grid; under the Triton interpreter a thinner one (a few programs per launch)."""
    out = []
    for backend in BACKENDS:
        name = backend if isinstance(backend, str) else backend.values[0]
        interp = name == "triton" and not HAS_CUDA
        for dts in DTYPES:
            if F64 in dts and name != "cpu":
                continue
            for norm in (True, False):
                if interp and not norm and dts != (F32, F32):
                    continue
                for si, shape in enumerate(SHAPES):
                    if interp and si % 2 != (DTYPES.index(dts) % 2) and dts != (F32, F32):
                        continue  # every dtype pair still meets both mask kinds and several p
                    for compact in ((False, True) if with_compact else (None,)):
                        marks = backend.marks if not isinstance(backend, str) else ()
                        ident = f"{name}-{dts[0]}-{dts[1]}-{'norm' if norm else 'raw'}-p{shape[3]}"
                        ident = ident.replace("torch.", "") + ("" if compact is None else ("-compact" if compact else "-full"))
                        out.append(pytest.param(name, dts, norm, shape, compact, marks=marks, id=ident))
    return out


def _images(B, H, W, dtype, device):
    # Offsets per patch and channel make the norm-pix statistics matter.
    return (torch.rand(B, 3, H, W, device=device) * 2 + torch.randn(B, 3, 1, 1, device=device)).to(dtype)


def _mask(B, L, shared, device, count=None):
    """0/1 mask; with ``count``, exactly that many ones per image (compact preds)."""
    if count is None:
        m = torch.rand((1 if shared else B), L, device=device) < 0.5
        m[:, 0] = True  # every image counts at least one patch (per_image divides by the count)
        m[:, -1] = False
        return m.reshape(L) if shared else m
    rows = 1 if shared else B
    idx = torch.rand(rows, L, device=device).argsort(1)[:, :count]
    m = torch.zeros(rows, L, dtype=torch.bool, device=device).scatter_(1, idx, True)
    return m.reshape(L) if shared else m


def _compare(fn, ref_fn, pred, imgs, mask, p, backend, norm_pix, reduction="none", gscale=None):
    """Forward and dpred of ``fn`` vs ``ref_fn`` in float64 and in the inputs' dtypes."""
    x = pred.detach().requires_grad_()
    out = fn(x, imgs, mask, p, norm_pix=norm_pix, reduction=reduction, backend=backend)
    wide = F64 in (pred.dtype, imgs.dtype)
    assert out.dtype == (F64 if wide else F32)
    # Upstream gradient scaled so dpred is O(1) (|dpred| < ~4): tolerances then bite on wrong
    # gradients, while one bf16 ulp of the largest values stays within the atol.
    g = torch.randn(out.shape, dtype=F64, device=out.device) * (gscale or pred.shape[-1]) / 16
    (dx,) = torch.autograd.grad(out, x, g.to(out.dtype))
    x64 = pred.detach().double().requires_grad_()
    r64 = ref_fn(x64, imgs.double(), mask, p, norm_pix=norm_pix, reduction=reduction)
    (d64,) = torch.autograd.grad(r64, x64, g)
    xs = pred.detach().clone().requires_grad_()
    rs = ref_fn(xs, imgs, mask, p, norm_pix=norm_pix, reduction=reduction)
    (ds,) = torch.autograd.grad(rs, xs, g.to(rs.dtype))
    assert_close_2x(out, r64, None if wide else rs, name="loss")
    assert dx.dtype == pred.dtype
    assert_close_2x(dx, d64, None if pred.dtype == F64 else ds, name="dpred")
    return out, dx


@pytest.mark.parametrize("backend,dtypes,norm_pix,shape,compact", _cases())
def test_mixmim_loss(backend, dtypes, norm_pix, shape, compact):
    B, H, W, p, shared = shape
    dev = _device(backend)
    L, D = (H // p) * (W // p), p * p * 3
    pred = torch.randn(2 * B, L, D, device=dev).to(dtypes[0])
    imgs = _images(B, H, W, dtypes[1], dev)
    _compare(mk.mixmim_loss, ref.mixmim_loss, pred, imgs, _mask(B, L, shared, dev), p, backend, norm_pix)


@pytest.mark.parametrize("backend,dtypes,norm_pix,shape,compact", _cases(with_compact=True))
def test_masked_recon_loss(backend, dtypes, norm_pix, shape, compact):
    B, H, W, p, shared = shape
    dev = _device(backend)
    L, D = (H // p) * (W // p), p * p * 3
    mask = _mask(B, L, shared, dev, count=max(1, L // 2) if compact else None)
    Lp = max(1, L // 2) if compact else L
    pred = torch.randn(B, Lp, D, device=dev).to(dtypes[0])
    imgs = _images(B, H, W, dtypes[1], dev)
    out, dx = _compare(mk.masked_recon_loss, ref.masked_recon_loss, pred, imgs, mask, p, backend, norm_pix)
    if not compact:  # uncounted patches: loss exactly 0 and no gradient
        off = ~mask.bool().expand(B, L)
        assert (out[off] == 0).all() and (dx[off] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mixmim", "masked", "masked-compact"])
@pytest.mark.parametrize("reduction", ["mean", "per_image", "none"])
def test_reductions(backend, loss, reduction):
    B, H, W, p = 2, 16, 16, 8
    dev = _device(backend)
    L, D = 4, p * p * 3
    imgs = _images(B, H, W, F32, dev)
    if loss == "mixmim":
        args = (mk.mixmim_loss, ref.mixmim_loss, torch.randn(2 * B, L, D, device=dev), imgs, _mask(B, L, False, dev))
    elif loss == "masked":
        args = (mk.masked_recon_loss, ref.masked_recon_loss, torch.randn(B, L, D, device=dev), imgs,
                torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], device=dev))  # unequal counts per image
    else:
        args = (mk.masked_recon_loss, ref.masked_recon_loss, torch.randn(B, 2, D, device=dev), imgs,
                _mask(B, L, False, dev, count=2))
    out, _ = _compare(*args, p, backend, True, reduction=reduction, gscale=D * B * L)
    assert out.shape == {"mean": (), "per_image": (B,), "none": (B, args[2].shape[1])}[reduction]


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    B, H, W, p = 2, 16, 8, 8
    dev = _device(backend)
    L, D = 2, p * p * 3
    imgs = _images(B, H, W, BF16, dev).contiguous(memory_format=torch.channels_last)
    pred = noncontiguous(torch.randn(2 * B, L, D, device=dev))
    assert not pred.is_contiguous() and not imgs.is_contiguous()
    _compare(mk.mixmim_loss, ref.mixmim_loss, pred, imgs, _mask(B, L, False, dev), p, backend, True)
    predm = noncontiguous(torch.randn(B, L, D, device=dev, dtype=F16))
    _compare(mk.masked_recon_loss, ref.masked_recon_loss, predm, imgs, _mask(B, L, True, dev), p, backend, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_output_element_written(backend):
    """Kernel outputs are allocated NaN-filled (deterministic mode): every element must be written."""
    B, H, W, p = 2, 16, 16, 8
    dev = _device(backend)
    L, D = 4, p * p * 3
    imgs = _images(B, H, W, F32, dev)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.uint8, device=dev)
    pred = torch.randn(2 * B, L, D, device=dev, dtype=BF16)
    idx = torch.tensor([[2, -1, 0, -1], [-1, -1, 3, 1]], device=dev)
    grad = torch.randn(B, L, device=dev)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4, device=dev).isnan().all()  # the poisoning is active
        loss = kernel("losses", "mixmim_loss", backend)(pred, imgs, mask, p, True, 1e-6)
        dpred = kernel("losses", "mixmim_loss_backward", backend)(grad, pred, imgs, mask, p, True, 1e-6)
        mloss = kernel("losses", "masked_recon_loss", backend)(pred[:B], imgs, idx, p, False, 1e-6)
        mdpred = kernel("losses", "masked_recon_loss_backward", backend)(grad, pred[:B].contiguous(), imgs, idx, p, False, 1e-6)
    finally:
        torch.use_deterministic_algorithms(prev)
    for t in (loss, dpred, mloss, mdpred):
        assert torch.isfinite(t).all()
    # Rows no patch loss used carry exactly zero gradient: first half where mask=0, second where flipped mask=1.
    used = torch.cat([mask.bool(), ~mask.bool().flip(0)])
    assert (dpred[~used] == 0).all() and (dpred[used] != 0).any(dim=-1).all()
    assert (mloss[idx < 0] == 0).all() and (mdpred[idx < 0] == 0).all() and (mloss[idx >= 0] > 0).all()
    assert_close_2x(loss, ref.mixmim_loss(pred.double(), imgs.double(), mask, p, reduction="none"), None, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    B, H, W, p = 1, 8, 16, 8
    dev = _device(backend)
    L, D = 2, p * p * 3
    imgs = _images(B, H, W, F32, dev)
    pred = torch.randn(2 * B, L, D, device=dev, requires_grad=True)
    mask = torch.tensor([[1, 0]], dtype=torch.uint8, device=dev)
    idx = torch.tensor([[-1, 1]], device=dev)
    grad = torch.randn(B, L, device=dev)
    ops = torch.ops.mixkernels
    torch.library.opcheck(ops.mixmim_loss.default, (pred, imgs, mask, p, True, 1e-6, backend))
    torch.library.opcheck(ops.mixmim_loss_backward.default, (grad, pred.detach(), imgs, mask, p, True, 1e-6, backend))
    predm = pred.detach()[:B].clone().requires_grad_()
    torch.library.opcheck(ops.masked_recon_loss.default, (predm, imgs, idx, p, False, 1e-6, backend))
    torch.library.opcheck(ops.masked_recon_loss_backward.default, (grad, predm.detach(), imgs, idx, p, False, 1e-6, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    B, H, W, p = 2, 16, 8, 8
    dev = _device(backend)
    L, D = 2, p * p * 3
    imgs = _images(B, H, W, F32, dev)
    mask = _mask(B, L, False, dev, count=1)

    def step(pred_mix, pred_mae, pred_compact):
        a = mk.mixmim_loss(pred_mix, imgs, mask, p, backend=backend)
        b = mk.masked_recon_loss(pred_mae, imgs, mask, p, reduction="per_image", backend=backend).sum()
        c = mk.masked_recon_loss(pred_compact, imgs, mask, p, backend=backend)
        return a + b + c

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = [torch.randn(2 * B, L, D, device=dev), torch.randn(B, L, D, device=dev), torch.randn(B, 1, D, device=dev)]
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    want, got = step(*eager_in), compiled(*comp_in)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    for a, b in zip(comp_in, eager_in):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------- official formulas
def _official_targets(imgs, p, norm_pix, mask=None):
    """MAE patchify (square images, einsum order n h w p q c) and norm-pix, as the official repos write it;
    with ``mask`` the targets are gathered first (UM-MAE normalizes after selecting)."""
    n, h = imgs.shape[0], imgs.shape[2] // p
    t = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, 3, h, p, h, p)).reshape(n, h * h, p * p * 3)
    if mask is not None:
        t = t[mask].reshape(n, -1, t.shape[-1])
    if norm_pix:
        t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
    return t


def _official_mixmim(x_rec, imgs, mask_1l1, p, norm_pix):
    """Sense-X/MixMIM ``forward_loss``: x_rec (2B,L,D), mask (1,L,1) float, 1 = token from the partner."""
    half = x_rec.shape[0] // 2
    unmixed = x_rec[:half] * mask_1l1 + x_rec[half:].flip(0) * (1 - mask_1l1)
    return ((unmixed - _official_targets(imgs, p, norm_pix)) ** 2).mean()


def _official_ummae(pred, imgs, mask, p, norm_pix):
    """implus/UM-MAE ``forward_loss``: pred (N, #masked, D) on the removed patches, mask (N,L) bool."""
    return ((pred - _official_targets(imgs, p, norm_pix, mask)) ** 2).mean()


def _official_mae(pred, imgs, mask, p, norm_pix):
    """MAE ``forward_loss`` (full pred): per-patch mean, averaged over removed patches."""
    per_patch = ((pred - _official_targets(imgs, p, norm_pix)) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def _check_official(official, fused, reference, pred, imgs, mask_official, mask, p, backend, norm_pix):
    o64 = pred.detach().double().requires_grad_()
    want64 = official(o64, imgs.double(), mask_official, p, norm_pix)
    r64 = o64.detach().clone().requires_grad_()
    got_ref = reference(r64, imgs.double(), mask, p, norm_pix=norm_pix)
    # The reference is the official formula (float64, same tensors).
    torch.testing.assert_close(got_ref, want64, rtol=1e-12, atol=1e-12)
    (g_want,) = torch.autograd.grad(want64, o64)
    (g_ref,) = torch.autograd.grad(got_ref, r64)
    torch.testing.assert_close(g_ref, g_want, rtol=1e-12, atol=1e-14)
    # The fused op against the official formula in float64 and in float32.
    x = pred.detach().requires_grad_()
    got = fused(x, imgs, mask, p, norm_pix=norm_pix, backend=backend)
    (g_got,) = torch.autograd.grad(got, x)
    o32 = pred.detach().requires_grad_()
    want32 = official(o32, imgs, mask_official.float() if mask_official.is_floating_point() else mask_official, p,
                      norm_pix)
    (g32,) = torch.autograd.grad(want32, o32)
    assert_close_2x(got, want64, want32, name="loss")
    assert_close_2x(g_got, g_want, g32, atol=1e-8, name="dpred")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_official_mixmim_formula(backend, norm_pix):
    B, S, p = 2, 32, 16  # official patchify needs square images
    dev = _device(backend)
    L = (S // p) ** 2
    # MixMIM's random_masking: one mask for the whole batch, int(L * ratio) ones from argsort(noise).
    mask = torch.zeros(1, L, device=dev).scatter_(1, torch.rand(1, L, device=dev).argsort(1)[:, : L // 2], 1.0)
    pred = torch.randn(2 * B, L, p * p * 3, device=dev)
    imgs = _images(B, S, S, F32, dev)
    _check_official(_official_mixmim, mk.mixmim_loss, ref.mixmim_loss, pred, imgs, mask.reshape(1, L, 1),
                    mask.reshape(L), p, backend, norm_pix)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_official_ummae_formula(backend, norm_pix):
    B, S, p = 2, 32, 8
    dev = _device(backend)
    g = S // p
    # UM-MAE's uniform masking: per image, one kept patch in every 2x2 cell, the other three removed.
    keep = torch.randint(0, 4, (B, g // 2, g // 2), device=dev)
    kept = torch.zeros(B, g // 2, g // 2, 4, dtype=torch.bool, device=dev).scatter_(3, keep[..., None], True)
    kept = kept.reshape(B, g // 2, g // 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, g * g)
    mask = ~kept
    pred = torch.randn(B, int(mask[0].sum()), p * p * 3, device=dev)
    imgs = _images(B, S, S, F32, dev)
    _check_official(_official_ummae, mk.masked_recon_loss, ref.masked_recon_loss, pred, imgs, mask, mask, p, backend,
                    norm_pix)


@pytest.mark.parametrize("backend", BACKENDS)
def test_official_mae_formula_full_pred(backend):
    B, S, p = 2, 16, 8
    dev = _device(backend)
    L = (S // p) ** 2
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 0]], device=dev)  # float 0/1 as MAE keeps it; unequal counts
    pred = torch.randn(B, L, p * p * 3, device=dev)
    imgs = _images(B, S, S, F32, dev)
    _check_official(_official_mae, mk.masked_recon_loss, ref.masked_recon_loss, pred, imgs, mask, mask, p, backend,
                    True)


# ---------------------------------------------------------------- bad inputs and limits
def _bad_cases():
    imgs, p = torch.rand(2, 3, 16, 16), 8
    D = p * p * 3
    mix, mae = torch.randn(4, 4, D), torch.randn(2, 4, D)
    m = torch.tensor([1, 0, 1, 0])
    return [
        ("mask", lambda: mk.mixmim_loss(mix, imgs, torch.ones(5), p)),
        ("mask", lambda: mk.masked_recon_loss(mae, imgs, torch.ones(2, 3), p)),
        ("last dim", lambda: mk.mixmim_loss(torch.randn(4, 4, D + 3), imgs, m, p)),
        ("last dim", lambda: mk.masked_recon_loss(torch.randn(2, 4, 2 * D), imgs, m, p)),
        ("divisible", lambda: mk.mixmim_loss(mix, torch.rand(2, 3, 16, 12), m, p)),
        ("divisible", lambda: mk.masked_recon_loss(mae, torch.rand(2, 3, 20, 16), m, p)),
        ("2B", lambda: mk.mixmim_loss(torch.randn(3, 4, D), imgs, m, p)),
        ("2B", lambda: mk.mixmim_loss(torch.randn(2, 4, D), imgs, m, p)),
        ("reduction", lambda: mk.mixmim_loss(mix, imgs, m, p, reduction="sum")),
        ("reduction", lambda: mk.masked_recon_loss(mae, imgs, m, p, reduction="batch")),
        ("selects", lambda: mk.masked_recon_loss(torch.randn(2, 2, D), imgs, torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]]), p)),
        ("imgs", lambda: mk.mixmim_loss(mix, torch.rand(2, 4, 16, 16), m, p)),
        ("batch", lambda: mk.masked_recon_loss(torch.randn(3, 4, D), imgs, m, p)),
        ("eps", lambda: mk.mixmim_loss(mix, imgs, m, p, eps=-1.0)),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_raise(case):
    what, call = _bad_cases()[case]
    with pytest.raises(ValueError, match=what):
        call()


def test_bad_types_raise():
    imgs = torch.rand(1, 3, 8, 8)
    with pytest.raises(TypeError, match="pred"):
        mk.mixmim_loss(torch.randn(2, 1, 192).int(), imgs, torch.ones(1), 8)
    with pytest.raises(TypeError, match="patch_size"):
        mk.mixmim_loss(torch.randn(2, 1, 192), imgs, torch.ones(1), 8.0)


@pytest.mark.gpu
def test_cuda_rejects_large_patches_and_triton_takes_them():
    imgs, p = torch.rand(1, 3, 40, 40, device="cuda"), 40
    pred = torch.randn(2, 1, p * p * 3, device="cuda")
    with pytest.raises(RuntimeError, match="patch_size"):
        mk.mixmim_loss(pred, imgs, torch.ones(1, device="cuda"), p, backend="cuda")
    out = mk.mixmim_loss(pred, imgs, torch.ones(1, device="cuda"), p, backend="triton", reduction="none")
    torch.testing.assert_close(out, ref.mixmim_loss(pred, imgs, torch.ones(1, device="cuda"), p, reduction="none"))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_deterministic_and_mixmim_b_shape(backend):
    B, S, p = 16, 224, 32
    L = (S // p) ** 2
    pred = torch.randn(2 * B, L, p * p * 3, device="cuda", dtype=BF16, requires_grad=True)
    imgs = _images(B, S, S, F32, "cuda")
    mask = _mask(B, L, True, "cuda")
    outs = []
    for _ in range(2):
        loss = mk.mixmim_loss(pred, imgs, mask, p, backend=backend)
        (g,) = torch.autograd.grad(loss, pred)
        outs.append((loss, g))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    want = ref.mixmim_loss(pred.double(), imgs.double(), mask, p)
    assert abs(outs[0][0].item() - want.item()) < 1e-4


def _offset(t, k):
    """A contiguous copy of ``t`` whose data pointer sits ``k`` elements past an aligned allocation."""
    buf = torch.empty(t.numel() + k, dtype=t.dtype, device=t.device)
    out = buf[k:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("p", [1, 3, 4, 7, 8, 12, 16, 32])
@pytest.mark.parametrize("off", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtypes", [(BF16, F32), (F32, F16)], ids=["bf16-f32", "f32-f16"])
def test_cuda_vector_and_scalar_paths(p, off, dtypes):
    """The CUDA kernels take 8-pixel vector units when p % 8 == 0, W % 8 == 0 and pred/imgs/dpred are
    16-byte aligned (p 8/16/32: one, one and four warps), 4-pixel units when only p % 4 == 0 and W % 4 == 0
    (p 4/12), else one pixel per unit: misaligned base pointers (p = 32: the scalar path with 1024
    units, 4 per thread), odd p with W % 4 != 0, and p = 1 (D - 1 = 2 in the variance)."""
    dev, B = "cuda", 3
    H, W = 2 * p, 3 * p
    L, D = 6, p * p * 3
    imgs = _offset(_images(B, H, W, dtypes[1], dev), off)
    pred = _offset(torch.randn(2 * B, L, D, device=dev).to(dtypes[0]), off)
    for norm in (True, False):
        _compare(mk.mixmim_loss, ref.mixmim_loss, pred, imgs, _mask(B, L, False, dev), p, "cuda", norm)
        predm = _offset(torch.randn(B, 3, D, device=dev).to(dtypes[0]), off)
        _compare(mk.masked_recon_loss, ref.masked_recon_loss, predm, imgs, _mask(B, L, True, dev, count=3), p, "cuda",
                 norm)


@pytest.mark.gpu
def test_cuda_mixmim_b_batch_and_empty():
    """B = 128 at 224 px (25088 CTAs, p = 16: 64 vector units per patch), per-image masks, compact
    masked preds; and B = 0, which must launch nothing."""
    dev, B, S, p = "cuda", 128, 224, 16
    L, D = (S // p) ** 2, p * p * 3
    imgs = _images(B, S, S, F32, dev)
    pred = torch.randn(2 * B, L, D, device=dev, dtype=BF16)
    _compare(mk.mixmim_loss, ref.mixmim_loss, pred, imgs, _mask(B, L, False, dev), p, "cuda", True)
    predm = torch.randn(B, L // 4, D, device=dev, dtype=BF16)
    _compare(mk.masked_recon_loss, ref.masked_recon_loss, predm, imgs, _mask(B, L, False, dev, count=L // 4), p,
             "cuda", True)
    e_imgs, e_pred = torch.rand(0, 3, 32, 32, device=dev), torch.randn(0, 4, 16 * 16 * 3, device=dev)
    mask, idx = torch.ones(1, 4, dtype=torch.uint8, device=dev), torch.zeros(0, 4, dtype=torch.int64, device=dev)
    assert kernel("losses", "mixmim_loss", "cuda")(e_pred, e_imgs, mask, 16, True, 1e-6).shape == (0, 4)
    grad = torch.zeros(0, 4, device=dev)
    assert kernel("losses", "mixmim_loss_backward", "cuda")(grad, e_pred, e_imgs, mask, 16, True, 1e-6).shape == e_pred.shape
    assert kernel("losses", "masked_recon_loss", "cuda")(e_pred, e_imgs, idx, 16, True, 1e-6).shape == (0, 4)
    assert kernel("losses", "masked_recon_loss_backward", "cuda")(grad, e_pred, e_imgs, idx, 16, True, 1e-6).shape == (0, 4, 768)
