"""Reference reconstruction losses: MixMIM dual reconstruction and MAE/UM-MAE masked loss.

The mask chooses with selects, never by multiplying: a pred row or patch that does not count
contributes nothing, not even a NaN/Inf it holds (``0 * NaN``), to the loss or the gradient.
NaN/Inf in what does count propagate; a constant patch with ``norm_pix`` and ``eps=0`` is
``0/0`` = NaN; a mean over zero counted patches is NaN (as ``torch.mean`` of nothing).
"""
from __future__ import annotations

import torch

__all__ = ["patchify", "patch_targets", "mixmim_loss", "masked_recon_loss", "simmim_loss", "upsample_mask"]


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MAE ``patchify``: ``(B, 3, H, W)`` -> ``(B, L, p*p*3)``, last dim ordered ``(p, p, 3)``."""
    B, c, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    x = imgs.reshape(B, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(B, h * w, p * p * c)


def patch_targets(imgs: torch.Tensor, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Patchified targets, normalized per patch with the unbiased variance when ``norm_pix``."""
    t = patchify(imgs, patch_size)
    if norm_pix:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)  # unbiased, as the official code
        t = (t - mean) / (var + eps) ** 0.5
    return t


def _reduce(loss: torch.Tensor, weight, reduction: str) -> torch.Tensor:
    """``loss`` ``(B, L)`` per-patch; ``weight`` ``(B, L)`` 0/1 or None (all count)."""
    if weight is None:
        if reduction == "mean":
            return loss.mean()
        if reduction == "per_image":
            return loss.mean(dim=1)
        return loss
    loss = torch.where(weight != 0, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "mean":
        return loss.sum() / weight.sum()
    if reduction == "per_image":
        return loss.sum(dim=1) / weight.sum(dim=1)
    return loss


def _batch_mask(mask: torch.Tensor, B: int, L: int, dtype) -> torch.Tensor:
    m = mask != 0
    return (m.unsqueeze(0) if m.dim() == 1 else m).expand(B, L).to(dtype)


def mixmim_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """MixMIM dual-reconstruction loss.

    Args:
        pred: ``(2B, L, p*p*3)`` dual decoder output.
        imgs: ``(B, 3, H, W)``, ``L = (H/p)*(W/p)``.
        mask: bool/0-1 ``(L,)`` or ``(B, L)``; 1 where image ``i`` was replaced by its partner.
    Returns:
        scalar (``mean``), ``(B,)`` (``per_image``) or ``(B, L)`` (``none``), float32 or wider.
    """
    B = imgs.shape[0]
    t = patch_targets(imgs.to(_acc(pred, imgs)), patch_size, norm_pix, eps)
    L = t.shape[1]
    p = pred.to(t.dtype)
    m = _batch_mask(mask, B, L, t.dtype).unsqueeze(-1)
    unmix = torch.where(m != 0, p[:B], p[B:].flip(0))
    loss = ((unmix - t) ** 2).mean(dim=-1)
    return _reduce(loss, None, reduction)


def masked_recon_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    norm_pix: bool = True,
    eps: float = 1e-6,
    reduction: str = "mean",
) -> torch.Tensor:
    """MAE / UM-MAE loss on masked patches only.

    Args:
        pred: ``(B, L, D)`` for all patches or ``(B, Lm, D)`` for the masked patches only
            (row-major order of ``mask == 1``; every image must mask ``Lm`` patches).
        mask: bool/0-1 ``(L,)`` or ``(B, L)``; 1 = masked (counts in the loss).
    Returns:
        scalar mean over masked patches, ``(B,)`` per image, or per patch (``(B, L)`` with
        zeros where unmasked, or ``(B, Lm)``).
    """
    B = imgs.shape[0]
    t = patch_targets(imgs.to(_acc(pred, imgs)), patch_size, norm_pix, eps)
    L = t.shape[1]
    p = pred.to(t.dtype)
    m = _batch_mask(mask, B, L, t.dtype)
    if p.shape[1] == L:
        # Select before the square: an uncounted patch gets gradient 0, not 0 * (NaN - t).
        e = torch.where(m.unsqueeze(-1) != 0, p - t, torch.zeros((), dtype=t.dtype, device=t.device))
        return _reduce((e ** 2).mean(dim=-1), m, reduction)
    t = t[m.bool()].reshape(B, p.shape[1], t.shape[-1])
    loss = ((p - t) ** 2).mean(dim=-1)
    return _reduce(loss, None, reduction)


def upsample_mask(mask: torch.Tensor, B: int, h: int, w: int, patch_size: int) -> torch.Tensor:
    """SimMIM's pixel mask: a patch mask ``(h, w)``, ``(L,)``, ``(B, h, w)`` or ``(B, L)`` as 0/1
    ``(B, 1, h*p, w*p)`` (``repeat_interleave`` by the patch size along both axes)."""
    m = (mask != 0).reshape(-1, h, w).expand(B, h, w)
    return m.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)


def simmim_loss(
    pred: torch.Tensor,
    imgs: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """SimMIM's masked L1 loss on full-resolution predictions.

    ``loss = (|pred - imgs| * M).sum() / (M.sum() * C)`` with ``M`` the patch mask upsampled to
    pixels (``repeat_interleave`` by ``patch_size``), as microsoft/SimMIM computes it (which adds
    ``1e-5`` to ``M.sum()``; here a mean over no masked pixel is NaN, as ``masked_recon_loss``).
    The mask selects (``where``), it does not multiply: NaN/Inf in unmasked pixels never reach
    the loss or the gradient.

    Args:
        pred: ``(B, C, H, W)`` reconstruction (the decoder's PixelShuffle output).
        imgs: ``(B, C, H, W)`` targets.
        mask: bool/0-1 over patches of ``patch_size`` px: ``(h, w)`` or ``(L,)`` (batch-shared),
            ``(B, h, w)`` or ``(B, L)``, ``h = H/p``, ``w = W/p``; 1 = masked = counted.
        reduction: ``"mean"`` (scalar, the formula above), ``"per_image"`` ``(B,)`` (each image's
            masked mean), ``"none"`` ``(B, L)`` (per patch mean of ``|pred - imgs|`` over its
            ``C*p*p`` values, 0 where unmasked).
    Returns:
        float32 or wider; gradient flows to ``pred`` only (``sign(pred - imgs)``, 0 at ties).
    """
    B, C, H, W = imgs.shape
    p = patch_size
    h, w = H // p, W // p
    acc = _acc(pred, imgs)
    m = upsample_mask(mask, B, h, w, p)  # bool (B, 1, H, W)
    zero = torch.zeros((), dtype=acc, device=imgs.device)
    err = torch.where(m, pred.to(acc) - imgs.to(acc), zero).abs()  # (B, C, H, W)
    if reduction == "mean":
        return err.sum() / (m.sum().to(acc) * C)
    if reduction == "per_image":
        return err.sum((1, 2, 3)) / (m.sum((1, 2, 3)).to(acc) * C)
    per_patch = err.reshape(B, C, h, p, w, p).sum((1, 3, 5)) / (C * p * p)
    return per_patch.reshape(B, h * w)


def _acc(pred: torch.Tensor, imgs: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 when either input is float64."""
    if torch.float64 in (pred.dtype, imgs.dtype):
        return torch.float64
    return torch.float32
