"""Per-image reconstruction losses: MixMIM dual reconstruction, MAE/UM-MAE masked loss, SimMIM L1.

The kernels return the per-patch losses ``(B, L)`` in float32 (patchify, norm-pix, un-mixing
and the squared error fused in one pass; SimMIM: the masked L1 on full-resolution images with
the patch mask read per patch, never upsampled); the reduction over those few values is done here
with plain torch ops, which keeps it deterministic and lets autograd hand the kernels'
backward a ``(B, L)`` per-patch gradient.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import acc_dtype, kernel
from ._kernel_op import KernelOp
from .registry import OPERATORS_REGISTRY

__all__ = ["mixmim_loss", "masked_recon_loss", "simmim_loss"]
_FAMILY = "losses"
_REDUCTIONS = ("mean", "per_image", "none")
_MIXMIM_SPEC, _MASKED_SPEC = OPERATORS_REGISTRY["mixmim_loss"], OPERATORS_REGISTRY["masked_recon_loss"]
_SIMMIM_SPEC = OPERATORS_REGISTRY["simmim_loss"]


def _acc(pred: Tensor, imgs: Tensor) -> torch.dtype:
    """Per-patch loss dtype: float32, float64 when pred or imgs is float64."""
    return acc_dtype(torch.promote_types(pred.dtype, imgs.dtype))


# Both losses: forward (pred, imgs, <patch selection>, patch_size, norm_pix, eps, backend) -> per-patch
# losses; backward (grad, <the forward's arguments>) -> dpred. Only pred gets a gradient.
def _mixmim_impl(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool, eps: float,
                 backend: str) -> Tensor:
    return kernel(_FAMILY, "mixmim_loss", backend)(pred, imgs, mask, patch_size, norm_pix, eps)


def _mixmim_bwd_impl(grad: Tensor, pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, norm_pix: bool,
                     eps: float, backend: str) -> Tensor:
    return kernel(_FAMILY, "mixmim_loss_backward", backend)(grad, pred, imgs, mask, patch_size, norm_pix, eps)


def _masked_impl(pred: Tensor, imgs: Tensor, patch_idx: Tensor, patch_size: int, norm_pix: bool, eps: float,
                 backend: str) -> Tensor:
    return kernel(_FAMILY, "masked_recon_loss", backend)(pred, imgs, patch_idx, patch_size, norm_pix, eps)


def _masked_bwd_impl(grad: Tensor, pred: Tensor, imgs: Tensor, patch_idx: Tensor, patch_size: int, norm_pix: bool,
                     eps: float, backend: str) -> Tensor:
    return kernel(_FAMILY, "masked_recon_loss_backward", backend)(grad, pred, imgs, patch_idx, patch_size, norm_pix, eps)


# SimMIM: (pred, imgs, mask, patch_size, backend) -> per-patch mean L1 (B, L); backward (grad, ...) -> dpred.
def _simmim_impl(pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, backend: str) -> Tensor:
    return kernel(_FAMILY, "simmim_loss", backend)(pred, imgs, mask, patch_size)


def _simmim_bwd_impl(grad: Tensor, pred: Tensor, imgs: Tensor, mask: Tensor, patch_size: int, backend: str) -> Tensor:
    return kernel(_FAMILY, "simmim_loss_backward", backend)(grad, pred, imgs, mask, patch_size)


def _simmim_fake(pred, imgs, mask, patch_size, backend):
    L = (pred.shape[2] // patch_size) * (pred.shape[3] // patch_size)
    return pred.new_empty((pred.shape[0], L), dtype=_acc(pred, imgs))


def _dpred_fake(grad, pred, *rest):
    return torch.empty_like(pred)


_MIXMIM = KernelOp("mixmim_loss", _mixmim_impl,
                   lambda pred, imgs, *rest: pred.new_empty((pred.shape[0] // 2, pred.shape[1]), dtype=_acc(pred, imgs)))
_MIXMIM_BWD = KernelOp("mixmim_loss_backward", _mixmim_bwd_impl, _dpred_fake)
_MASKED = KernelOp("masked_recon_loss", _masked_impl,
                   lambda pred, imgs, *rest: pred.new_empty(tuple(pred.shape[:2]), dtype=_acc(pred, imgs)))
_MASKED_BWD = KernelOp("masked_recon_loss_backward", _masked_bwd_impl, _dpred_fake)
_SIMMIM = KernelOp("simmim_loss", _simmim_impl, _simmim_fake)
_SIMMIM_BWD = KernelOp("simmim_loss_backward", _simmim_bwd_impl, _dpred_fake)


def _loss_autograd(fwd: KernelOp, bwd: KernelOp) -> None:
    def backward(ctx, grad):
        s = fwd.saved(ctx)  # (pred, imgs, selection): the backward takes the forward's arguments after grad
        return fwd.grads(pred=bwd(grad.to(_acc(s.pred, s.imgs)).contiguous(), *s, *ctx.attrs))

    fwd.autograd(backward, save=fwd.names[:3])


_loss_autograd(_MIXMIM, _MIXMIM_BWD)
_loss_autograd(_MASKED, _MASKED_BWD)
_loss_autograd(_SIMMIM, _SIMMIM_BWD)


# ---------------------------------------------------------------- public API
def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


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
    _check_reduction(reduction)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    return p, (H // p) * (W // p)


def _reduce(loss: Tensor, reduction: str, counted: Optional[Tensor] = None) -> Tensor:
    """``counted``: ``(B, L)`` bool of the patches that count (None: all). The kernels write 0
    for the rows that do not count, so the sums need no weights; counts are exact integers."""
    if reduction == "none":
        return loss
    if reduction == "per_image":
        return loss.sum(1) / (counted.count_nonzero(1) if counted is not None else loss.shape[1])
    return loss.sum() / (counted.count_nonzero() if counted is not None else loss.numel())


_POSITIONS: Dict[tuple, Tuple[Tensor, Tensor]] = {}


def _positions(L: int, device: torch.device):
    """``(arange(L), -1)`` as tensors on ``device``, made once: they cost ~2 us per call otherwise."""
    if torch.compiler.is_compiling():
        return torch.arange(L, device=device), -1
    key = (L, device)
    hit = _POSITIONS.get(key)
    if hit is None:
        hit = _POSITIONS[key] = (torch.arange(L, device=device), torch.tensor(-1, device=device))
    return hit


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
    b = _MIXMIM_SPEC.choose(backend, pred.device.type, (pred.dtype, imgs.dtype), (p,))
    if b == "reference":
        return ref.mixmim_loss(pred, imgs, mask, p, norm_pix=norm_pix, eps=eps, reduction=reduction)
    loss = _MIXMIM(pred.contiguous(), imgs.contiguous(), m, p, bool(norm_pix), float(eps), b)
    return _reduce(loss, reduction)


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
    m = chk.mask_2d("mask", mask, B, (L,), pred, torch.bool)
    Lp = pred.shape[1]
    compact = Lp != L
    if compact and not torch.compiler.is_compiling():
        counts = m[: B if mask.dim() == 2 else 1].sum(1)  # per mask row: one for a batch-shared mask
        if (counts != Lp).any():
            raise ValueError(
                f"pred has {Lp} rows per image but mask selects {counts.tolist()} patches (need {L} rows, or exactly the masked count)"
            )
    b = _MASKED_SPEC.choose(backend, pred.device.type, (pred.dtype, imgs.dtype), (p,))
    if b == "reference":
        return ref.masked_recon_loss(pred, imgs, mask, p, norm_pix=norm_pix, eps=eps, reduction=reduction)
    if compact:
        idx = m.nonzero()[:, 1].reshape(B, Lp)  # row-major positions of the masked patches
    else:
        idx = torch.where(m, *_positions(L, pred.device))
    loss = _MASKED(pred.contiguous(), imgs.contiguous(), idx.contiguous(), p, bool(norm_pix), float(eps), b)
    return _reduce(loss, reduction, None if compact else m)


def simmim_loss(
    pred: Tensor,
    imgs: Tensor,
    mask: Tensor,
    patch_size: int,
    *,
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> Tensor:
    """SimMIM's masked L1 loss on full-resolution predictions, fused.

    ``(|pred - imgs| * M).sum() / (M.sum() * C)`` with ``M`` the patch mask upsampled to pixels
    (``repeat_interleave`` by ``patch_size``): the kernels read the patch mask per patch and never
    read an unmasked patch (the mask selects: NaN/Inf there do not propagate).

    Args:
        pred: ``(B, C, H, W)`` reconstruction (fp16/bf16/fp32; fp64 on cpu/reference).
        imgs: ``(B, C, H, W)`` targets, any float dtype (e.g. float32 images under autocast).
        mask: bool/0-1 over ``patch_size`` patches: ``(H/p, W/p)`` or ``(L,)`` (batch-shared),
            ``(B, H/p, W/p)`` or ``(B, L)``; 1 = masked = counted. (SimMIM's mask generator gives
            it at the model patch size, e.g. ``p = 4`` for Swin.)
        patch_size: ``p``, dividing ``H`` and ``W``.
        reduction: ``"mean"`` (scalar, the formula above), ``"per_image"`` ``(B,)``, or ``"none"``
            ``(B, L)``: each patch's mean ``|pred - imgs|`` over its ``C*p*p`` values, 0 where unmasked.
    Returns:
        float32 loss (float64 for float64 inputs); gradient flows to ``pred`` only. A mean over
        no masked patch is NaN (SimMIM's code adds 1e-5 to the count instead).
    """
    chk.tensor("pred", pred, ndim=(4,), floating=True)
    chk.tensor("imgs", imgs, ndim=(4,), floating=True)
    chk.same_device("imgs", imgs, pred, "pred")
    p = chk.positive_int("patch_size", patch_size)
    if tuple(imgs.shape) != tuple(pred.shape):
        raise ValueError(f"imgs must have pred's shape {tuple(pred.shape)}, got {tuple(imgs.shape)}")
    B, C, H, W = pred.shape
    if H % p or W % p:
        raise ValueError(f"image size (H, W) = {(H, W)} must be divisible by patch_size = {p}")
    _check_reduction(reduction)
    m = chk.mask_2d("mask", mask, B, (H // p, W // p), pred)
    b = _SIMMIM_SPEC.choose(backend, pred.device.type, (pred.dtype, imgs.dtype), (p,))
    if b == "reference":
        return ref.simmim_loss(pred, imgs, mask, p, reduction=reduction)
    loss = _SIMMIM(pred.contiguous(), imgs.contiguous(), m, p, b)
    if reduction == "none":
        return loss
    counted = m.bool().expand(B, m.shape[1])
    return _reduce(loss, reduction, counted)
