"""Reference UM-MAE uniform sampling (one unit of every 2x2 cell) and its inverse."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["uniform_sample", "uniform_scatter"]


def _cells(x: torch.Tensor, unit: int) -> torch.Tensor:
    """``(B, H, W, C)`` -> ``(B, H/2u, W/2u, 4, u, u, C)``: the four units of every 2x2 cell."""
    B, H, W, C = x.shape
    hc, wc = H // (2 * unit), W // (2 * unit)
    x = x.reshape(B, hc, 2, unit, wc, 2, unit, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, hc, wc, 4, unit, unit, C)


def uniform_sample(
    x: torch.Tensor,
    keep: torch.Tensor,
    unit: int,
    *,
    mask_token: Optional[torch.Tensor] = None,
    secondary: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Gather the kept unit of each 2x2 cell into the compact image.

    Args:
        x: ``(B, H, W, C)`` tokens; ``H`` and ``W`` divisible by ``2*unit``.
        keep: ``(B, H/2u, W/2u)`` integer in ``0..3``: row-major position of the kept unit.
            Only its two low bits are read (``keep & 3``), as by every kernel; the public
            op rejects other values where checking costs no device sync (CPU tensors).
        unit: side of a mask unit in tokens.
        mask_token: ``(C,)``; required with ``secondary``.
        secondary: ``(B, H/2u, W/2u)`` bool: compact units replaced by ``mask_token``.

    Returns:
        ``(B, H/2, W/2, C)``.
    """
    B, H, W, C = x.shape
    u = unit
    cells = _cells(x, u)
    hc, wc = cells.shape[1], cells.shape[2]
    idx = (keep.long() & 3).reshape(B, hc, wc, 1, 1, 1, 1).expand(B, hc, wc, 1, u, u, C)
    kept = cells.gather(3, idx).squeeze(3)  # (B, hc, wc, u, u, C)
    if secondary is not None:
        sec = (secondary != 0).reshape(B, hc, wc, 1, 1, 1)
        kept = torch.where(sec, mask_token.reshape(-1).to(x.dtype), kept)
    return kept.permute(0, 1, 3, 2, 4, 5).reshape(B, H // 2, W // 2, C)


def uniform_scatter(compact: torch.Tensor, keep: torch.Tensor, unit: int) -> torch.Tensor:
    """Inverse of :func:`uniform_sample`: ``(B, h, w, C)`` -> ``(B, 2h, 2w, C)``, zeros elsewhere.

    ``keep`` as in :func:`uniform_sample` (two low bits read)."""
    B, h, w, C = compact.shape
    u = unit
    hc, wc = h // u, w // u
    units = compact.reshape(B, hc, u, wc, u, C).permute(0, 1, 3, 2, 4, 5).unsqueeze(3)  # (B,hc,wc,1,u,u,C)
    cells = compact.new_zeros(B, hc, wc, 4, u, u, C)
    idx = (keep.long() & 3).reshape(B, hc, wc, 1, 1, 1, 1).expand(B, hc, wc, 1, u, u, C)
    cells = cells.scatter(3, idx, units)
    cells = cells.reshape(B, hc, wc, 2, 2, u, u, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return cells.reshape(B, 2 * h, 2 * w, C)
