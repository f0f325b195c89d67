"""Reference Swin window partition / merge with the cyclic shift folded in."""
from __future__ import annotations

import torch

__all__ = ["window_partition", "window_merge"]


def _pair(v):
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def window_partition(x: torch.Tensor, window_size, shift_size=0) -> torch.Tensor:
    """``roll(x, -shift)`` then Swin's ``window_partition``.

    Args:
        x: ``(B, H, W, C)``.
    Returns:
        ``(B*nW, wh*ww, C)``, windows row-major, batch outermost.
    """
    B, H, W, C = x.shape
    wh, ww = _pair(window_size)
    sh, sw = _pair(shift_size)
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    x = x.reshape(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B * (H // wh) * (W // ww), wh * ww, C)


def window_merge(windows: torch.Tensor, window_size, H: int, W: int, shift_size=0) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, N, C)`` -> ``(B, H, W, C)``."""
    wh, ww = _pair(window_size)
    sh, sw = _pair(shift_size)
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // wh) * (W // ww))  # explicit: -1 is ambiguous for empty tensors
    x = windows.reshape(B, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(B, H, W, C)
    if sh or sw:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    return x
