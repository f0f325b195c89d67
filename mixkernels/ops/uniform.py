"""UM-MAE uniform sampling (with fused secondary masking) and its inverse scatter."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import acc_dtype, kernel
from ._kernel_op import KernelOp
from .registry import OPERATORS_REGISTRY

__all__ = ["uniform_sample", "uniform_scatter", "uniform_masks"]
_FAMILY = "uniform"
_INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_SAMPLE_SPEC, _SCATTER_SPEC = OPERATORS_REGISTRY["uniform_sample"], OPERATORS_REGISTRY["uniform_scatter"]


def _sample_impl(x: Tensor, keep: Tensor, unit: int, mask_token: Optional[Tensor], secondary: Optional[Tensor],
                 backend: str) -> Tensor:
    return kernel(_FAMILY, "uniform_sample", backend)(x, keep, unit, mask_token, secondary)


def _sample_fake(x, keep, unit, mask_token, secondary, backend):
    B, H, W, C = x.shape
    return x.new_empty((B, H // 2, W // 2, C))


def _sample_bwd_impl(grad: Tensor, keep: Tensor, unit: int, secondary: Optional[Tensor], need_token: bool,
                     backend: str) -> tuple[Tensor, Tensor]:
    return tuple(kernel(_FAMILY, "uniform_sample_backward", backend)(grad, keep, unit, secondary, need_token))


def _sample_bwd_fake(grad, keep, unit, secondary, need_token, backend):
    B, h, w, C = grad.shape
    tok = grad.new_empty((C,) if need_token else (0,), dtype=acc_dtype(grad.dtype))
    return grad.new_empty((B, 2 * h, 2 * w, C)), tok


def _scatter_impl(compact: Tensor, keep: Tensor, unit: int, backend: str) -> Tensor:
    return kernel(_FAMILY, "uniform_scatter", backend)(compact, keep, unit)


def _scatter_fake(compact, keep, unit, backend):
    B, h, w, C = compact.shape
    return compact.new_empty((B, 2 * h, 2 * w, C))


_SAMPLE = KernelOp("uniform_sample", _sample_impl, _sample_fake)
_SAMPLE_BWD = KernelOp("uniform_sample_backward", _sample_bwd_impl, _sample_bwd_fake, outputs=("dx", "dtoken"))
_SCATTER = KernelOp("uniform_scatter", _scatter_impl, _scatter_fake)


def _sample_backward(ctx, grad):
    s, a = _SAMPLE.saved(ctx), ctx.attrs
    need_token = _SAMPLE.needs(ctx, "mask_token")
    dx, dtok = _SAMPLE_BWD(grad.contiguous(), s.keep, a.unit, s.secondary, need_token, a.backend)
    return _SAMPLE.grads(x=dx, mask_token=dtok.to(grad.dtype) if need_token else None)


def _scatter_backward(ctx, grad):  # the scatter's adjoint is the plain sample
    a = ctx.attrs
    return _SCATTER.grads(compact=_SAMPLE(grad.contiguous(), _SCATTER.saved(ctx).keep, a.unit, None, None, a.backend))


_SAMPLE.autograd(_sample_backward, save=("keep", "secondary"))
_SCATTER.autograd(_scatter_backward, save=("keep",))


def _cells(name: str, t: Optional[Tensor], B: int, hc: int, wc: int, ref_t: Tensor, dtypes) -> Optional[Tensor]:
    if t is None:
        return None
    chk.tensor(name, t, dtypes=dtypes)
    chk.same_device(name, t, ref_t, "x")
    if tuple(t.shape) != (B, hc, wc):
        raise ValueError(f"{name} must have shape {(B, hc, wc)}, got {tuple(t.shape)}")
    return t


def _check_keep(keep: Tensor) -> None:
    # Range check only where it costs no device sync; kernels read `keep & 3`.
    if keep.device.type == "cpu" and keep.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(keep))
        if lo < 0 or hi > 3:
            raise ValueError(f"keep must hold values in 0..3, got range [{lo}, {hi}]")


def uniform_sample(
    x: Tensor,
    keep: Tensor,
    unit: int,
    *,
    mask_token: Optional[Tensor] = None,
    secondary: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """UM-MAE Uniform Sampling with fused Secondary Masking.

    Args:
        x: ``(B, H, W, C)`` tokens, ``H`` and ``W`` divisible by ``2*unit``.
        keep: ``(B, H/2u, W/2u)`` integer in ``0..3``, the kept unit of each 2x2 cell (row-major).
        unit: mask-unit side in tokens.
        mask_token: ``(C,)``, required with ``secondary``.
        secondary: ``(B, H/2u, W/2u)`` bool: compact units replaced by ``mask_token``.
    Returns:
        ``(B, H/2, W/2, C)`` compact image in ``x.dtype``.
    """
    chk.tensor("x", x, ndim=(4,), floating=True)
    chk.positive_int("unit", unit)
    B, H, W, C = x.shape
    if H % (2 * unit) or W % (2 * unit):
        raise ValueError(f"x's token grid (H, W) = {(H, W)} must be divisible by 2*unit = {2 * unit}")
    hc, wc = H // (2 * unit), W // (2 * unit)
    _cells("keep", keep, B, hc, wc, x, _INTS)
    _check_keep(keep)
    _cells("secondary", secondary, B, hc, wc, x, _INTS + (torch.bool,))
    if secondary is not None and mask_token is None:
        raise ValueError("mask_token is required when secondary is given, got None")
    if mask_token is not None:
        chk.tensor("mask_token", mask_token, floating=True)
        chk.same_device("mask_token", mask_token, x, "x")
        if mask_token.numel() != C:
            raise ValueError(f"mask_token must have {C} elements, got shape {tuple(mask_token.shape)}")
    b = _SAMPLE_SPEC.choose(backend, x.device.type, (x.dtype,))
    if b == "reference":
        return ref.uniform_sample(x, keep, unit, mask_token=mask_token if secondary is not None else None, secondary=secondary)
    k = keep.to(torch.uint8).contiguous()
    sec = None if secondary is None else chk.bytes01(secondary).contiguous()
    tok = None if sec is None else chk.vector(mask_token, C).to(x.dtype).contiguous()
    return _SAMPLE(x.contiguous(), k, unit, tok, sec, b)


def uniform_scatter(compact: Tensor, keep: Tensor, unit: int, *, backend: Optional[str] = None) -> Tensor:
    """Inverse of :func:`uniform_sample`: ``(B, h, w, C)`` -> ``(B, 2h, 2w, C)`` with zeros elsewhere."""
    chk.tensor("compact", compact, ndim=(4,), floating=True)
    chk.positive_int("unit", unit)
    B, h, w, C = compact.shape
    if h % unit or w % unit:
        raise ValueError(f"compact's grid (h, w) = {(h, w)} must be divisible by unit = {unit}")
    _cells("keep", keep, B, h // unit, w // unit, compact, _INTS)
    _check_keep(keep)
    b = _SCATTER_SPEC.choose(backend, compact.device.type, (compact.dtype,))
    if b == "reference":
        return ref.uniform_scatter(compact, keep, unit)
    return _SCATTER(compact.contiguous(), keep.to(torch.uint8).contiguous(), unit, b)


def uniform_masks(
    batch: int,
    cells: Tuple[int, int],
    *,
    secondary_ratio: float = 0.25,
    generator: Optional[torch.Generator] = None,
    device=None,
) -> Tuple[Tensor, Tensor]:
    """Draw UM-MAE masks on ``device``: ``keep`` uint8 ``(B, hc, wc)`` uniform in 0..3 and
    ``secondary`` bool ``(B, hc, wc)`` with exactly ``round(ratio * hc * wc)`` true per image."""
    hc, wc = chk.pair("cells", cells)
    if not 0.0 <= secondary_ratio < 1.0:
        raise ValueError(f"secondary_ratio must be in [0, 1), got {secondary_ratio}")
    keep = torch.randint(0, 4, (batch, hc, wc), generator=generator, device=device, dtype=torch.int64).to(torch.uint8)
    n = hc * wc
    k = int(round(secondary_ratio * n))
    noise = torch.rand(batch, n, generator=generator, device=device)
    rank = noise.argsort(dim=1).argsort(dim=1)
    return keep, (rank < k).reshape(batch, hc, wc)
