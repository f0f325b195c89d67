"""Per-image reconstruction losses: MixMIM dual reconstruction and MAE/UM-MAE masked loss.

The kernels return the per-patch losses ``(B, L)`` in float32 (patchify, norm-pix, un-mixing
and the squared error fused in one pass); the reduction over those few values is done here
with plain torch ops, which keeps it deterministic and lets autograd hand the kernels'
backward a ``(B, L)`` per-patch gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import acc_dtype, compiled_reason, kernel, select, triton_reason

__all__ = ["mixmim_loss", "masked_recon_loss"]
_FAMILY = "losses"
_REDUCTIONS = ("mean", "per_image", "none")


def _checks(name: str, pred: Tensor, imgs: Tensor):
    def both(fn):
        return fn(pred) or fn(imgs)

    return {
        "cpu": lambda: both(lambda t: compiled_reason("cpu", name, t, chk.FLOATS)),
        "cuda": lambda: both(lambda t: compiled_reason("cuda", name, t)),
        "triton": lambda: both(lambda t: triton_reason(_FAMILY, name, t)),
    }


def _acc(pred: Tensor, imgs: Tensor) -> torch.dtype:
    """Per-patch loss dtype: float32, float64 when pred or imgs is float64."""
    return acc_dtype(torch.promote_types(pred.dtype, imgs.dtype))


# ---------------------------------------------------------------- mixmim
@torch.library.custom_op("mixkernels::mixmim_loss", mutates_args=())
def _mixmim(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool, eps: float, backend: str) -> Tensor:
    return kernel(_FAMILY, "mixmim_loss", backend)(pred, imgs, mask, patch_size, norm_pix, eps)


@_mixmim.register_fake
def _(pred, imgs, mask, patch_size, norm_pix, eps, backend):
    return pred.new_empty((pred.shape[0] // 2, pred.shape[1]), dtype=_acc(pred, imgs))


@torch.library.custom_op("mixkernels::mixmim_loss_backward", mutates_args=())
def _mixmim_bwd(grad: Tensor, pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool, eps: float,
                backend: str) -> Tensor:
    return kernel(_FAMILY, "mixmim_loss_backward", backend)(grad, pred, imgs, mask, patch_size, norm_pix, eps)


@_mixmim_bwd.register_fake
def _(grad, pred, imgs, mask, patch_size, norm_pix, eps, backend):
    return torch.empty_like(pred)


def _mixmim_setup(ctx, inputs, output):
    pred, imgs, mask, ctx.p, ctx.norm_pix, ctx.eps, ctx.backend = inputs
    ctx.save_for_backward(pred, imgs, mask)


def _mixmim_backward(ctx, grad):
    pred, imgs, mask = ctx.saved_tensors
    dpred = _mixmim_bwd(grad.to(_acc(pred, imgs)).contiguous(), pred, imgs, mask, ctx.p, ctx.norm_pix, ctx.eps, ctx.backend)
    return dpred, None, None, None, None, None, None


_mixmim.register_autograd(_mixmim_backward, setup_context=_mixmim_setup)


# ---------------------------------------------------------------- masked (MAE / UM-MAE)
@torch.library.custom_op("mixkernels::masked_recon_loss", mutates_args=())
def _masked(pred: Tensor, imgs: Tensor, patch_idx: Tensor, patch_size: int, norm_pix: bool, eps: float, backend: str) -> Tensor:
    return kernel(_FAMILY, "masked_recon_loss", backend)(pred, imgs, patch_idx, patch_size, norm_pix, eps)


@_masked.register_fake
def _(pred, imgs, patch_idx, patch_size, norm_pix, eps, backend):
    return pred.new_empty(tuple(pred.shape[:2]), dtype=_acc(pred, imgs))


@torch.library.custom_op("mixkernels::masked_recon_loss_backward", mutates_args=())
def _masked_bwd(grad: Tensor, pred: Tensor, imgs: Tensor, patch_idx: Tensor, patch_size: int, norm_pix: bool, eps: float,
                backend: str) -> Tensor:
    return kernel(_FAMILY, "masked_recon_loss_backward", backend)(grad, pred, imgs, patch_idx, patch_size, norm_pix, eps)


@_masked_bwd.register_fake
def _(grad, pred, imgs, patch_idx, patch_size, norm_pix, eps, backend):
    return torch.empty_like(pred)


def _masked_setup(ctx, inputs, output):
    pred, imgs, idx, ctx.p, ctx.norm_pix, ctx.eps, ctx.backend = inputs
    ctx.save_for_backward(pred, imgs, idx)


def _masked_backward(ctx, grad):
    pred, imgs, idx = ctx.saved_tensors
    dpred = _masked_bwd(grad.to(_acc(pred, imgs)).contiguous(), pred, imgs, idx, ctx.p, ctx.norm_pix, ctx.eps, ctx.backend)
    return dpred, None, None, None, None, None, None


_masked.register_autograd(_masked_backward, setup_context=_masked_setup)


# ---------------------------------------------------------------- public API
def _validate(pred: Tensor, imgs: Tensor, patch_size: int, reduction: str, eps: float):
    chk.tensor("pred", pred, ndim=(3,), floating=True)
    chk.tensor("imgs", imgs, ndim=(4,), floating=True)
    chk.same_device("imgs", imgs, pred, "pred")
    p = chk.positive_int("patch_size", patch_size)
    if imgs.shape[1] != 3:
        raise ValueError(f"imgs must be (B, 3, H, W), got shape {tuple(imgs.shape)}")
    H, W = imgs.shape[2], imgs.shape[3]
    if H % p or W % p:
        raise ValueError(f"imgs size (H, W) = {(H, W)} must be divisible by patch_size = {p}")
    if pred.shape[2] != p * p * 3:
        raise ValueError(f"pred's last dim must be patch_size**2 * 3 = {p * p * 3}, got {pred.shape[2]}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return p, (H // p) * (W // p)


def _reduce(loss: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "per_image":
        return loss.sum(1) / (weight.sum(1) if weight is not None else loss.shape[1])
    return loss.sum() / (weight.sum() if weight is not None else loss.numel())


def mixmim_loss(
    pred: Tensor,
    imgs: Tensor,
    mask: Tensor,
    patch_size: int,
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """MixMIM dual-reconstruction loss, fused.

    Args:
        pred: ``(2B, L, p*p*3)`` dual decoder output (fp16/bf16/fp32).
        imgs: ``(B, 3, H, W)`` with ``L = (H/p)*(W/p)``.
        mask: bool/0-1 ``(L,)`` (batch-shared) or ``(B, L)``; 1 where image ``i`` holds its partner's token.
        patch_size: ``p``.
        norm_pix: normalize targets per patch (mean, unbiased variance, ``eps``).
        reduction: ``"mean"`` (scalar), ``"per_image"`` ``(B,)`` or ``"none"`` ``(B, L)``.
    Returns:
        float32 loss (float64 for float64 inputs); gradient flows to ``pred`` only.
    """
    p, L = _validate(pred, imgs, patch_size, reduction, eps)
    B = imgs.shape[0]
    if pred.shape[0] != 2 * B or pred.shape[1] != L:
        raise ValueError(f"pred must have shape (2B, L, D) = {(2 * B, L, p * p * 3)} for imgs {tuple(imgs.shape)}, got {tuple(pred.shape)}")
    m = chk.mask_2d("mask", mask, B, (L,), pred)
    b = select("mixmim_loss", pred.device, _checks("mixmim_loss", pred, imgs), backend)
    if b == "reference":
        return ref.mixmim_loss(pred, imgs, mask, p, norm_pix=norm_pix, eps=eps, reduction=reduction)
    loss = _mixmim(pred.contiguous(), imgs.contiguous(), m, p, bool(norm_pix), float(eps), b)
    return _reduce(loss, None, reduction)


def masked_recon_loss(
    pred: Tensor,
    imgs: Tensor,
    mask: Tensor,
    patch_size: int,
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """MAE / UM-MAE reconstruction loss on the masked patches, fused.

    Args:
        pred: ``(B, L, p*p*3)`` (all patches) or ``(B, Lm, p*p*3)`` (masked patches only,
            row-major order of ``mask == 1``; every image masks ``Lm`` patches).
        imgs: ``(B, 3, H, W)``.
        mask: bool/0-1 ``(L,)`` or ``(B, L)``; 1 = masked = counted.
        reduction: ``"mean"`` over masked patches, ``"per_image"`` ``(B,)``, or ``"none"``:
            ``(B, L)`` per patch with zeros where unmasked, or ``(B, Lm)``.
    Returns:
        float32 loss (float64 for float64 inputs); gradient flows to ``pred`` only.
    """
    p, L = _validate(pred, imgs, patch_size, reduction, eps)
    B = imgs.shape[0]
    if pred.shape[0] != B:
        raise ValueError(f"pred's batch must equal imgs' batch {B}, got {pred.shape[0]}")
    m = chk.mask_2d("mask", mask, B, (L,), pred)
    Lp = pred.shape[1]
    compact = Lp != L
    if compact and not torch.compiler.is_compiling():
        counts = m.sum(1)
        if (counts != Lp).any():
            raise ValueError(
                f"pred has {Lp} rows per image but mask selects {counts.tolist()} patches (need {L} rows, or exactly the masked count)"
            )
    b = select("masked_recon_loss", pred.device, _checks("masked_recon_loss", pred, imgs), backend)
    if b == "reference":
        return ref.masked_recon_loss(pred, imgs, mask, p, norm_pix=norm_pix, eps=eps, reduction=reduction)
    mb = m.expand(B, L).bool()
    if compact:
        idx = mb.nonzero()[:, 1].reshape(B, Lp)  # row-major positions of the masked patches
        weight = None
    else:
        idx = torch.where(mb, torch.arange(L, device=pred.device), -1)
        weight = mb.to(_acc(pred, imgs))
    loss = _masked(pred.contiguous(), imgs.contiguous(), idx.contiguous(), p, bool(norm_pix), float(eps), b)
    return _reduce(loss, weight, reduction)
