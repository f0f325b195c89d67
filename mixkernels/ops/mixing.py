"""MixMIM token mixing ops: validation, backend choice, autograd, torch.library registration."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import acc_dtype, kernel
from ._kernel_op import KernelOp
from .registry import OPERATORS_REGISTRY

__all__ = ["mix_tokens", "unmix_tokens"]
_FAMILY = "mixing"
_MIX_SPEC, _UNMIX_SPEC = OPERATORS_REGISTRY["mix_tokens"], OPERATORS_REGISTRY["unmix_tokens"]


# ---------------------------------------------------------------- mix_tokens
def _mix_impl(x: Tensor, mask: Tensor, backend: str) -> Tensor:
    return kernel(_FAMILY, "mix_tokens", backend)(x, mask)


def _mix_bwd_impl(grad: Tensor, mask: Tensor, backend: str) -> Tensor:
    return kernel(_FAMILY, "mix_tokens_backward", backend)(grad, mask)


_MIX = KernelOp("mix_tokens", _mix_impl, lambda x, mask, backend: torch.empty_like(x))
_MIX_BWD = KernelOp("mix_tokens_backward", _mix_bwd_impl, lambda grad, mask, backend: torch.empty_like(grad))


def _mix_backward(ctx, grad):
    return _MIX.grads(x=_MIX_BWD(grad.contiguous(), _MIX.saved(ctx).mask, ctx.attrs.backend))


_MIX.autograd(_mix_backward, save=("mask",))


def mix_tokens(x: Tensor, mask: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """MixMIM mixing: ``out[i, p] = x[B-1-i, p] if mask[i, p] else x[i, p]``.

    Args:
        x: ``(B, L, C)`` or ``(B, H, W, C)``, any float dtype.
        mask: bool/0-1 ``(L,)``/``(H, W)`` shared by the batch, or ``(B, L)``/``(B, H, W)``.
        backend: ``None`` (automatic), ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``.
    Returns:
        Tensor shaped and typed like ``x``.
    """
    chk.tensor("x", x, ndim=(3, 4), floating=True)
    B, C = x.shape[0], x.shape[-1]
    m = chk.mask_2d("mask", mask, B, x.shape[1:-1], x)
    b = _MIX_SPEC.choose(backend, x.device.type, (x.dtype,))
    if b == "reference":
        return ref.mix_tokens(x, mask)
    if x.dim() == 3:
        return _MIX(x.contiguous(), m, b)
    return _MIX(x.reshape(B, m.shape[1], C).contiguous(), m, b).reshape(x.shape)


# ---------------------------------------------------------------- unmix_tokens
def _unmix_impl(x: Tensor, mask: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor], backend: str) -> Tensor:
    return kernel(_FAMILY, "unmix_tokens", backend)(x, mask, mask_token, pos_embed)


def _unmix_fake(x, mask, mask_token, pos_embed, backend):
    return x.new_empty((2 * x.shape[0],) + tuple(x.shape[1:]))


def _unmix_bwd_impl(grad: Tensor, mask: Tensor, need_token: bool, need_pos: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(kernel(_FAMILY, "unmix_tokens_backward", backend)(grad, mask, need_token, need_pos))


def _unmix_bwd_fake(grad, mask, need_token, need_pos, backend):
    B2, L, C = grad.shape
    acc = acc_dtype(grad.dtype)
    tok = grad.new_empty((C,) if need_token else (0,), dtype=acc)
    pos = grad.new_empty((L, C) if need_pos else (0,), dtype=acc)
    return grad.new_empty((B2 // 2, L, C)), tok, pos


_UNMIX = KernelOp("unmix_tokens", _unmix_impl, _unmix_fake)
_UNMIX_BWD = KernelOp("unmix_tokens_backward", _unmix_bwd_impl, _unmix_bwd_fake, outputs=("dx", "dtoken", "dpos"))


def _unmix_backward(ctx, grad):
    need_token, need_pos = _UNMIX.needs(ctx, "mask_token"), _UNMIX.needs(ctx, "pos_embed")  # False for None
    dx, dtok, dpos = _UNMIX_BWD(grad.contiguous(), _UNMIX.saved(ctx).mask, need_token, need_pos, ctx.attrs.backend)
    return _UNMIX.grads(x=dx, mask_token=dtok.to(grad.dtype) if need_token else None,
                        pos_embed=dpos.to(grad.dtype) if need_pos else None)


_UNMIX.autograd(_unmix_backward, save=("mask",))


def _check_pos(pos_embed: Tensor, L: int, C: int) -> None:
    # Broadcastable to (1, L, C), checked without building shapes (this runs on every call).
    ps = pos_embed.shape
    if len(ps) > 3 or (len(ps) >= 1 and ps[-1] not in (1, C)) or (len(ps) >= 2 and ps[-2] not in (1, L)) \
            or (len(ps) == 3 and ps[0] != 1):
        raise ValueError(f"pos_embed must broadcast to (1, {L}, {C}), got shape {tuple(ps)}")


def unmix_tokens(
    x: Tensor,
    mask: Tensor,
    mask_token: Tensor,
    pos_embed: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """The MixMIM dual decoder's input in one pass.

    Args:
        x: ``(B, L, C)`` decoder-embedded tokens.
        mask: bool/0-1 ``(L,)`` or ``(B, L)``.
        mask_token: ``(C,)`` or ``(1, 1, C)``.
        pos_embed: optional, broadcastable to ``(1, L, C)``.
    Returns:
        ``(2B, L, C)`` in ``x.dtype``: first half ``x*(1-m) + mask_token*m``, second half
        ``x*m + mask_token*(1-m)``, then ``+ pos_embed``. Gradients reach ``x``,
        ``mask_token`` and ``pos_embed``.
    """
    chk.tensor("x", x, ndim=(3,), floating=True)
    B, L, C = x.shape
    m = chk.mask_2d("mask", mask, B, (L,), x)
    chk.tensor("mask_token", mask_token, floating=True)
    chk.same_device("mask_token", mask_token, x, "x")
    if mask_token.numel() != C:
        raise ValueError(f"mask_token must have {C} elements ((C,) or (1,1,C)), got shape {tuple(mask_token.shape)}")
    if pos_embed is not None:
        chk.tensor("pos_embed", pos_embed, floating=True)
        chk.same_device("pos_embed", pos_embed, x, "x")
        _check_pos(pos_embed, L, C)
    b = _UNMIX_SPEC.choose(backend, x.device.type, (x.dtype,))
    if b == "reference":
        return ref.unmix_tokens(x, mask, mask_token, pos_embed)
    tok = chk.vector(mask_token, C).to(x.dtype).contiguous()
    pos = None if pos_embed is None else _rows(pos_embed.to(x.dtype), L, C).contiguous()
    return _UNMIX(x.contiguous(), m, tok, pos, b)


def _rows(pos: Tensor, L: int, C: int) -> Tensor:
    """``pos`` (broadcastable to ``(1, L, C)``) as ``(L, C)``, with the fewest ops for the usual shapes."""
    if pos.shape[-2:] == (L, C):
        return pos if pos.dim() == 2 else pos.reshape(L, C)
    return pos.expand(1, L, C).reshape(L, C)
