"""MixMIM token mixing ops: validation, backend choice, autograd, torch.library registration."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import acc_dtype, compiled_reason, kernel, select, triton_reason

__all__ = ["mix_tokens", "unmix_tokens"]
_FAMILY = "mixing"


def _checks(name: str, t: Tensor):
    return {
        "cpu": lambda: compiled_reason("cpu", name, t, chk.FLOATS),
        "cuda": lambda: compiled_reason("cuda", name, t),
        "triton": lambda: triton_reason(_FAMILY, name, t),
    }


# ---------------------------------------------------------------- mix_tokens
@torch.library.custom_op("mixkernels::mix_tokens", mutates_args=())
def _mix(x: Tensor, mask: Tensor, backend: str) -> Tensor:
    return kernel(_FAMILY, "mix_tokens", backend)(x, mask)


@_mix.register_fake
def _(x, mask, backend):
    return torch.empty_like(x)


@torch.library.custom_op("mixkernels::mix_tokens_backward", mutates_args=())
def _mix_bwd(grad: Tensor, mask: Tensor, backend: str) -> Tensor:
    return kernel(_FAMILY, "mix_tokens_backward", backend)(grad, mask)


@_mix_bwd.register_fake
def _(grad, mask, backend):
    return torch.empty_like(grad)


def _mix_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.backend = inputs[2]


def _mix_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    return _mix_bwd(grad.contiguous(), mask, ctx.backend), None, None


_mix.register_autograd(_mix_backward, setup_context=_mix_setup)


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
    m = chk.mask_2d("mask", mask, B, tuple(x.shape[1:-1]), x)
    b = select("mix_tokens", x.device, _checks("mix_tokens", x), backend)
    if b == "reference":
        return ref.mix_tokens(x, mask)
    L = m.shape[1]
    return _mix(x.reshape(B, L, C).contiguous(), m, b).reshape(x.shape)


# ---------------------------------------------------------------- unmix_tokens
@torch.library.custom_op("mixkernels::unmix_tokens", mutates_args=())
def _unmix(x: Tensor, mask: Tensor, mask_token: Tensor, pos_embed: Optional[Tensor], backend: str) -> Tensor:
    return kernel(_FAMILY, "unmix_tokens", backend)(x, mask, mask_token, pos_embed)


@_unmix.register_fake
def _(x, mask, mask_token, pos_embed, backend):
    return x.new_empty((2 * x.shape[0],) + tuple(x.shape[1:]))


@torch.library.custom_op("mixkernels::unmix_tokens_backward", mutates_args=())
def _unmix_bwd(grad: Tensor, mask: Tensor, need_token: bool, need_pos: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(kernel(_FAMILY, "unmix_tokens_backward", backend)(grad, mask, need_token, need_pos))


@_unmix_bwd.register_fake
def _(grad, mask, need_token, need_pos, backend):
    B2, L, C = grad.shape
    acc = acc_dtype(grad.dtype)
    tok = grad.new_empty((C,) if need_token else (0,), dtype=acc)
    pos = grad.new_empty((L, C) if need_pos else (0,), dtype=acc)
    return grad.new_empty((B2 // 2, L, C)), tok, pos


def _unmix_setup(ctx, inputs, output):
    x, mask, token, pos, backend = inputs
    ctx.save_for_backward(mask)
    ctx.backend = backend
    ctx.has_pos = pos is not None


def _unmix_backward(ctx, grad):
    (mask,) = ctx.saved_tensors
    need_token = ctx.needs_input_grad[2]
    need_pos = ctx.has_pos and ctx.needs_input_grad[3]
    dx, dtok, dpos = _unmix_bwd(grad.contiguous(), mask, need_token, need_pos, ctx.backend)
    return (
        dx,
        None,
        dtok.to(grad.dtype) if need_token else None,
        dpos.to(grad.dtype) if need_pos else None,
        None,
    )


_unmix.register_autograd(_unmix_backward, setup_context=_unmix_setup)


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
        try:
            torch.broadcast_shapes(pos_embed.shape, (1, L, C))
        except RuntimeError:
            raise ValueError(f"pos_embed must broadcast to (1, {L}, {C}), got shape {tuple(pos_embed.shape)}") from None
        if pos_embed.dim() == 3 and pos_embed.shape[0] != 1:
            raise ValueError(f"pos_embed must broadcast to (1, {L}, {C}), got shape {tuple(pos_embed.shape)}")
    b = select("unmix_tokens", x.device, _checks("unmix_tokens", x), backend)
    if b == "reference":
        return ref.unmix_tokens(x, mask, mask_token, pos_embed)
    tok = mask_token.reshape(C).to(x.dtype).contiguous()
    pos = None if pos_embed is None else pos_embed.to(x.dtype).expand(1, L, C).reshape(L, C).contiguous()
    return _unmix(x.contiguous(), m, tok, pos, b)
