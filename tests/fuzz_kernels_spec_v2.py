"""Kernel-level spec and call generators of the SwinV2/SimMIM ops for the fuzzer
(tests/fuzz_kernels.py): ``window_attention_cosine`` (+ backward) and ``simmim_loss``
(+ backward). Same conventions as tests/fuzz_kernels_spec.py, whose helpers they reuse: the
cosine ops are the window-attention spec with the logit scale in place of ``scale``.
"""
from __future__ import annotations

import torch

from fuzz_kernels_spec import (
    FLOATS, _ref_wattn, _ref_wattn_bwd, _mask, _rand, _fdt, acc_of, contiguous_or_lenient, gen_wattn, grad_of, hi,
    need, ref, tens, wattn_bwd_args,
)


# ---------------------------------------------------------------- spec
def _ref_wattn_cos(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, ls):
    return _ref_wattn(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, None, ls)


def _ref_wattn_cos_bwd(dout, qkv, out, lse, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, ls,
                       need_drpb, need_dbias, need_dls, det):
    """The gradient at the forward's own out/lse: ``out``/``lse`` are checked for shape and dtype
    only. Cosine logits reach ~116, where P = exp(S - lse) with lse rounded to float32 loses
    precision, so a kernel may recompute P and delta = rowsum(P dP) from the logits (the CPU
    kernel does; csrc/cpu/window_attention.cpp), which does not read the given values."""
    return _ref_wattn_bwd(dout, qkv, out, lse, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, None,
                          need_drpb, need_dbias, det, ls, need_dls)


def _simmim_contract(pred, imgs, mask, p):
    tens("pred", pred, dtypes=FLOATS, ndim=4)
    tens("imgs", imgs, dtypes=FLOATS, shape=pred.shape)
    B, _, H, W = imgs.shape
    need(p > 0 and H % p == 0 and W % p == 0, "patch_size")
    L = (H // p) * (W // p)
    tens("mask", mask, dtypes=(torch.uint8,), ndim=2)
    need(mask.shape[0] in (1, B) and mask.shape[1] == L, "mask shape")
    contiguous_or_lenient(pred, imgs, mask)
    return B, L, acc_of(torch.promote_types(pred.dtype, imgs.dtype))


def _simmim_fn(imgs, mask, p):
    B = imgs.shape[0]
    return lambda pred: ref.simmim_loss(pred, hi(imgs), mask.expand(B, -1), p, reduction="none")


def _ref_simmim(pred, imgs, mask, p):
    B, L, acc = _simmim_contract(pred, imgs, mask, p)
    return (_simmim_fn(imgs, mask, p)(hi(pred)).to(acc),)


def _ref_simmim_bwd(grad, pred, imgs, mask, p):
    (loss,) = _ref_simmim(pred, imgs, mask, p)
    tens("grad", grad, dtypes=(loss.dtype,))
    need(grad.numel() == loss.numel(), "grad numel")  # read as the (B, L) loss it is the gradient of
    contiguous_or_lenient(grad)
    return (grad_of(_simmim_fn(imgs, mask, p), {"pred": pred}, grad.reshape(loss.shape), ["pred"])[0]
            .to(pred.dtype),)


# ---------------------------------------------------------------- case generation
def gen_wattn_cos(rng):
    # head_dim >= 2: at 1, normalize(q) = sign(q) has derivative 0 and every implementation
    # returns rounding noise ~eps/|q| there (no error bound relative to a 0 result holds)
    a = gen_wattn(rng)
    while a[0].shape[-1] == 3 * a[1]:
        a = gen_wattn(rng)
    nH, acc = a[1], acc_of(a[0].dtype)
    # log(100) = 4.6 clamps the head scale: x3 puts some heads above it (gradient 0 there)
    a[12] = _rand(rng, (nH,), acc) * rng.choice((1.0, 3.0))
    return a


def gen_wattn_cos_bwd(rng):
    return wattn_bwd_args(rng, gen_wattn_cos(rng), "window_attention_cosine", more_flags=1)  # + need_dlogit_scale


def gen_simmim(rng):
    p, B, C = rng.choice((1, 2, 4)), rng.choice((0, 1, 2)), rng.choice((1, 3))
    h, w = rng.choice((1, 2)), rng.choice((1, 2, 3))
    G = rng.choice((1, B)) if B else 1
    shape = (B, C, h * p, w * p)
    return [_rand(rng, shape, _fdt(rng)), _rand(rng, shape, _fdt(rng)), _mask(rng, G, h * w, (0, 1, 1, 2)), p]


def gen_simmim_bwd(rng):
    a = gen_simmim(rng)
    B, _, H, W = a[1].shape
    L = (H // a[3]) * (W // a[3])
    return [_rand(rng, (B, L), acc_of(torch.promote_types(a[0].dtype, a[1].dtype))), *a]


OPS_V2 = {
    # name: (generator, spec, positions of index-like args whose values may go out of range)
    "window_attention_cosine": (gen_wattn_cos, _ref_wattn_cos, (1, 2, 3, 4, 5, 8, 9, 10, 11)),
    "window_attention_cosine_backward": (gen_wattn_cos_bwd, _ref_wattn_cos_bwd, (4, 5, 6, 7, 8, 11, 12, 13, 14)),
    "simmim_loss": (gen_simmim, _ref_simmim, (2, 3)),
    "simmim_loss_backward": (gen_simmim_bwd, _ref_simmim_bwd, (3, 4)),
}
