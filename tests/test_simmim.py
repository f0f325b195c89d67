"""SimMIM: the masked L1 loss op on every backend (family specifics; the registry covers the
samples), and the SimMIM model (Swin / SwinV2 encoder) against microsoft/SimMIM's forward
re-derived step by step and against its reference twin (every op on the reference path)."""
import math

import pytest
import torch
import torch.nn.functional as F

import mixkernels as mk
from mixkernels import reference as ref
from mixkernels.models import simmim_swin_tiny_test, simmim_swinv2_tiny_test
from mixkernels.ops import OPERATORS_REGISTRY
from mixkernels.testing import assert_close_2x

SPEC = OPERATORS_REGISTRY["simmim_loss"]
MODELS = {"swin": simmim_swin_tiny_test, "swinv2": simmim_swinv2_tiny_test}
_GPU = pytest.mark.gpu
COMBOS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton-interp"),
    pytest.param("triton", "cuda", id="triton-cuda", marks=_GPU),
    pytest.param("cuda", "cuda", id="cuda", marks=_GPU),
]


def _official_loss(x, x_rec, mask, patch_size, in_chans=3):
    """microsoft/SimMIM ``SimMIM.forward``'s loss, verbatim semantics (with its +1e-5)."""
    m = mask.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1).contiguous()
    loss_recon = F.l1_loss(x, x_rec, reduction="none")
    return (loss_recon * m).sum() / (m.sum() + 1e-5) / in_chans


def _check(backend, device, pred, imgs, mask, p, reduction, dtype):
    pred = pred.to(device)
    imgs, mask = imgs.to(device), mask.to(device)
    leaf = pred.detach().to(dtype).requires_grad_()
    out = mk.simmim_loss(leaf, imgs, mask, p, reduction=reduction, backend=backend)
    p64 = pred.detach().double().requires_grad_()
    r64 = ref.simmim_loss(p64, imgs.double(), mask, p, reduction=reduction)
    p1 = pred.detach().to(dtype).requires_grad_()
    r1 = ref.simmim_loss(p1, imgs, mask, p, reduction=reduction)
    g = torch.randn(r64.shape, dtype=torch.float64, device=device)
    assert_close_2x(out, r64, r1 if dtype != torch.float64 else None, name=f"{backend} loss")
    (d,) = torch.autograd.grad(out, leaf, g.to(out.dtype))
    (d64,) = torch.autograd.grad(r64, p64, g)
    (d1,) = torch.autograd.grad(r1, p1, g.to(r1.dtype))
    assert d.dtype == dtype
    assert_close_2x(d, d64, d1 if dtype != torch.float64 else None, name=f"{backend} dpred")


def _skip_unless(backend, device, dtype=torch.float32):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    kw = dict(pred=torch.zeros(1, 3, 4, 4, device=device, dtype=dtype), imgs=torch.zeros(1, 3, 4, 4, device=device),
              mask=torch.ones(4, device=device), patch_size=2)
    if backend not in SPEC.backends_for(kw):
        pytest.skip(f"{backend} unavailable here: {SPEC.reason(backend, *SPEC.dispatch_key(kw))}")


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("reduction", ["mean", "per_image", "none"])
@pytest.mark.parametrize("p,H,W,per_image", [(4, 8, 20, True), (3, 9, 6, False), (32, 32, 64, True), (5, 10, 135, True)])
def test_loss_matches_reference(backend, device, reduction, p, H, W, per_image):
    # odd and large patch sizes, rows longer than one program's 128 columns, shared and per-image masks
    _skip_unless(backend, device)
    B = 2
    pred, imgs = torch.randn(B, 3, H, W), torch.randn(B, 3, H, W)
    shape = (B, H // p, W // p) if per_image else (H // p, W // p)
    mask = torch.rand(shape) < 0.6
    mask[..., 0, 0] = True  # a mean over no masked patch is NaN
    dtypes = (torch.float32, torch.float64) if backend == "cpu" else (torch.float32,)
    for dt in dtypes:
        _check(backend, device, pred, imgs, mask, p, reduction, dt)


@pytest.mark.parametrize("backend,device", COMBOS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_pred_with_float32_images(backend, device, dtype):
    # autocast: bf16/fp16 reconstruction against float32 images, one channel, (B, L) mask
    _skip_unless(backend, device, dtype)
    _check(backend, device, torch.randn(2, 1, 8, 12), torch.randn(2, 1, 8, 12), torch.rand(2, 6) < 0.5, 4, "mean",
           dtype)


@pytest.mark.parametrize("backend,device", COMBOS)
def test_poisoned_and_unmasked_nan_never_read(backend, device):
    # NaN in unmasked pixels does not reach the loss or the gradient (the mask selects); every dpred
    # element is written (empty_like garbage would show as non-zero where unmasked)
    _skip_unless(backend, device)
    B, p = 2, 4
    pred, imgs = torch.randn(B, 3, 8, 8, device=device), torch.randn(B, 3, 8, 8, device=device)
    mask = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool, device=device)
    imgs[:, :, :4, 4:] = float("nan")  # patch (0, 1): unmasked
    leaf = pred.clone().requires_grad_()
    out = mk.simmim_loss(leaf, imgs, mask, p, reduction="none", backend=backend)
    assert torch.isfinite(out).all() and (out[:, 1] == 0).all() and (out[:, 2] == 0).all()
    (d,) = torch.autograd.grad(out.sum(), leaf)
    assert torch.isfinite(d).all()
    up = ref.upsample_mask(mask, B, 2, 2, p).expand_as(d)
    assert (d[~up] == 0).all() and (d[up] != 0).all()
    torch.testing.assert_close(mk.simmim_loss(pred, imgs, mask, p, backend=backend),
                               ref.simmim_loss(pred, imgs, mask, p), rtol=1e-5, atol=1e-6)


def test_reference_is_simmims_formula():
    x, x_rec = torch.randn(3, 3, 16, 24, dtype=torch.float64), torch.randn(3, 3, 16, 24, dtype=torch.float64)
    mask = torch.rand(3, 4, 6) < 0.6
    want = _official_loss(x, x_rec, mask.double(), 4)
    got = ref.simmim_loss(x_rec, x, mask, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # differs only by SimMIM's +1e-5 in the count


def test_compile_fullgraph_loss():
    torch._dynamo.reset()
    pred, imgs, mask = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 3, 8, 8), torch.rand(2, 2, 2) < 0.5

    def f(x):
        return mk.simmim_loss(x, imgs, mask, 4, reduction="per_image").sum()

    out = torch.compile(f, fullgraph=True)(pred)
    (g,) = torch.autograd.grad(out, pred)
    p2 = pred.detach().requires_grad_()
    out2 = f(p2)
    (g2,) = torch.autograd.grad(out2, p2)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(g, g2)


# ---------------------------------------------------------------- the model
def _official_forward(model, imgs, mask):
    """microsoft/SimMIM ``SwinTransformerForSimMIM.forward`` + ``SimMIM.forward`` re-derived on the
    model's modules: (B, L, C) layout, mask token mixed by multiplication, transpose + reshape to
    NCHW, 1x1 conv, PixelShuffle, the official loss."""
    x = model.patch_embed(imgs)
    B, h, w, C = x.shape
    x = x.reshape(B, h * w, C)
    tok = model.mask_token.expand(B, h * w, -1)
    wgt = mask.flatten(1).unsqueeze(-1).type_as(tok)
    x = (x * (1.0 - wgt) + tok * wgt).reshape(B, h, w, C)
    for layer in model.layers:
        for blk in layer.blocks:
            x = blk(x)
        if layer.downsample is not None:
            x = layer.downsample(x)
    x = model.norm(x).flatten(1, 2).transpose(1, 2)
    side = int(x.shape[2] ** 0.5)
    z = x.reshape(B, x.shape[1], side, side)
    x_rec = F.pixel_shuffle(model.decoder[0](z), model.encoder_stride)
    return _official_loss(imgs, x_rec, mask, model.patch_size), x_rec


@pytest.mark.parametrize("encoder", MODELS)
def test_model_matches_official_semantics(encoder):
    torch.manual_seed(0)
    model = MODELS[encoder](img_size=64, window_size=4).double().eval()
    imgs = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    mask = model.random_masks(2)
    loss, x_rec, m = model(imgs, mask)
    assert x_rec.shape == imgs.shape and m.shape == (2, 16, 16)
    loss_o, x_rec_o = _official_forward(model, imgs, mask)
    torch.testing.assert_close(x_rec, x_rec_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, loss_o, rtol=1e-6, atol=0)


@pytest.mark.parametrize("encoder", MODELS)
def test_model_matches_reference_twin(encoder):
    """Fused model vs the same weights with every op on the reference path: loss, reconstruction
    and every parameter gradient, fp32 against the float64 twin (flash-attn's rule)."""
    fused = MODELS[encoder](drop_path_rate=0.0)
    twin = MODELS[encoder](reference=True)
    twin.load_state_dict(fused.state_dict())
    with torch.no_grad():  # SwinV2 zero-inits its block norms (blocks start as identities): make them count
        for n, p in fused.named_parameters():
            if "norm" in n:
                p.add_(0.5 * torch.randn_like(p))
    twin.load_state_dict(fused.state_dict())
    twin64 = MODELS[encoder](reference=True).double()
    twin64.load_state_dict(fused.state_dict())
    imgs = torch.randn(2, 3, 32, 32)
    mask = fused.random_masks(2)
    outs = {}
    for name, m, x in (("fused", fused, imgs), ("twin", twin, imgs), ("twin64", twin64, imgs.double())):
        loss, rec, _ = m(x, mask)
        grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
        outs[name] = (loss, rec, grads)
    (lf, rf, gf), (lt, rt, gt), (l64, r64, g64) = outs["fused"], outs["twin"], outs["twin64"]
    assert_close_2x(lf, l64, lt, name="loss")
    assert_close_2x(rf, r64, rt, name="x_rec")
    names = [n for n, _ in fused.named_parameters()]
    for n, a, b, c in zip(names, gf, g64, gt):
        assert (a is None) == (b is None), n
        if a is not None:
            assert_close_2x(a, b, c, name=f"d{n}")


def test_random_masks_follow_the_mask_generator():
    model = simmim_swin_tiny_test(img_size=64, mask_patch_size=16, mask_ratio=0.6)
    m = model.random_masks(5, generator=torch.Generator().manual_seed(1))
    assert m.shape == (5, 16, 16) and m.dtype == torch.bool
    coarse = m[:, ::4, ::4]
    assert torch.equal(m, coarse.repeat_interleave(4, 1).repeat_interleave(4, 2))  # whole 16 px mask patches
    assert (coarse.flatten(1).sum(1) == math.ceil(16 * 0.6)).all()
    assert not torch.equal(m[0], m[1])  # per image


def test_swinv2_encoder_uses_cosine_attention():
    from mixkernels.nn import SwinV2Block

    model = simmim_swinv2_tiny_test()
    blocks = [b for b in model.modules() if isinstance(b, SwinV2Block)]
    assert len(blocks) == 4 and all(hasattr(b.attn, "logit_scale") for b in blocks)
    assert all(float(b.norm1.weight.detach().abs().sum()) == 0 for b in blocks)  # res-post-norm init


# ---------------------------------------------------------------- the CUDA kernels, on the CPU SIMT emulator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("p,H,W,shared", [(4, 8, 20, False), (3, 6, 9, True), (32, 32, 64, False), (160, 160, 160, True)])
def test_cuda_kernels_on_the_emulator(dtype, p, H, W, shared):
    """csrc/cuda/simmim_loss.cu run unchanged by tests/_cuda_emu.py: patch sizes under, at and over one
    block's 128 threads, rows wider than a block, shared/per-image masks, bf16 pred with float32 images;
    outputs poisoned with NaN (unwritten elements show)."""
    import _cuda_emu as E

    why = E.unavailable()
    if why:
        pytest.skip(why)
    DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    B, C = 2, 3
    pred, imgs = E.aligned(torch.randn(B, C, H, W).to(dtype)), E.aligned(torch.randn(B, C, H, W))
    L = (H // p) * (W // p)
    mask = (torch.rand(1 if shared else B, L) < 0.6).to(torch.uint8)
    mask[:, 0] = 1
    m = mask[0] if shared else mask
    out = E.empty((B, L), torch.float32)
    ms = 0 if shared else L
    assert E.call("emu_simmim_loss_fwd", pred, DT[dtype], imgs, 0, mask, ms, out, B, C, H, W, p) == 0
    p64 = pred.double().requires_grad_()
    want = ref.simmim_loss(p64, imgs.double(), m, p, reduction="none")
    p1 = pred.detach().clone().requires_grad_()
    same = ref.simmim_loss(p1, imgs, m, p, reduction="none")
    assert_close_2x(out, want, same, name="emulated cuda loss")
    g = E.aligned(torch.randn(B, L))
    dpred = E.empty((B, C, H, W), dtype)
    assert E.call("emu_simmim_loss_bwd", g, pred, DT[dtype], imgs, 0, mask, ms, dpred, B, C, H, W, p) == 0
    (d64,) = torch.autograd.grad(want, p64, g.double())
    (d1,) = torch.autograd.grad(same, p1, g)
    assert_close_2x(dpred, d64, d1, name="emulated cuda dpred")
