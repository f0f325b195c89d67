"""Reference MixMIM token mixing and the dual decoder's un-mixing."""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["mix_tokens", "unmix_tokens"]


def _mask_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bool mask ``(G, *spatial, 1)`` broadcasting against ``x`` ``(B, *spatial, C)``, ``G`` in {1, B}.

    Every mask shape the public ops accept works for both layouts of ``x``: ``(L,)``/``(H, W)``
    shared by the batch, ``(B, L)``/``(B, H, W)`` per image (``L = H*W``).
    """
    spatial = tuple(x.shape[1:-1])
    m = mask != 0
    shared = tuple(m.shape) in (spatial, (math.prod(spatial),))
    return m.reshape((1 if shared else x.shape[0],) + spatial + (1,))


def mix_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MixMIM mixing: ``out[i, p] = x[B-1-i, p] if mask[i, p] else x[i, p]``.

    Args:
        x: ``(B, L, C)`` or ``(B, H, W, C)``.
        mask: ``(L,)``/``(H, W)`` shared by the batch or ``(B, L)``/``(B, H, W)``, any
            dtype; nonzero (NaN included) means "take the partner's token".
    A select: NaN/Inf of the token not taken never reach the output.
    """
    return torch.where(_mask_like(mask, x), x.flip(0), x)


def unmix_tokens(
    x: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The MixMIM decoder input: ``(2B, L, C)``.

    First half ``mask_token where m else x``, second half ``x where m else mask_token``
    (the official ``x*(1-m) + mask_token*m``, as a select: NaN/Inf of the operand not taken
    never leak), then ``+ pos_embed`` (broadcastable to ``(1, L, C)``). ``mask`` as in
    :func:`mix_tokens`.
    """
    m = _mask_like(mask, x)
    tok = mask_token.reshape(1, 1, -1).to(x.dtype)
    out = torch.cat([torch.where(m, tok, x), torch.where(m, x, tok)], dim=0)
    if pos_embed is not None:
        out = out + pos_embed.to(x.dtype)
    return out
