"""Reference MixMIM token mixing and the dual decoder's un-mixing."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["mix_tokens", "unmix_tokens"]


def _mask_like(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bool mask shaped to broadcast against ``x`` (batch-shared masks get a leading 1)."""
    m = mask != 0
    if m.dim() == x.dim() - 2:  # batch-shared (L,) / (H, W)
        m = m.unsqueeze(0)
    return m.unsqueeze(-1)


def mix_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MixMIM mixing: ``out[i, p] = x[B-1-i, p] if mask[i, p] else x[i, p]``.

    Args:
        x: ``(B, L, C)`` or ``(B, H, W, C)``.
        mask: bool/0-1, ``(L,)``/``(H, W)`` shared by the batch or ``(B, L)``/``(B, H, W)``.
    """
    return torch.where(_mask_like(mask, x), x.flip(0), x)


def unmix_tokens(
    x: torch.Tensor,
    mask: torch.Tensor,
    mask_token: torch.Tensor,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The MixMIM decoder input: ``(2B, L, C)``.

    First half ``x*(1-m) + mask_token*m``, second half ``x*m + mask_token*(1-m)``,
    then ``+ pos_embed`` (broadcastable to ``(1, L, C)``).
    """
    m = _mask_like(mask, x).to(x.dtype)
    tok = mask_token.reshape(1, 1, -1).to(x.dtype)
    out = torch.cat([x * (1 - m) + tok * m, x * m + tok * (1 - m)], dim=0)
    if pos_embed is not None:
        out = out + pos_embed.to(x.dtype)
    return out
