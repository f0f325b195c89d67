"""Shape logic around the fused op, kept out of traced control flow.

The fused op needs a window-divisible grid, so blocks pad before it and crop after it; how
the padding meets the cyclic shift differs per library. Every branch on a tensor's size lives
in these helpers, and each module that calls them registers them with ``torch.fx.wrap`` (which
patches the caller's globals, so the registration sits next to every call site). Symbolic
tracers (``torch.fx``, torchvision's ``create_feature_extractor``, timm's fx features) then see
one leaf call each instead of Python ``if``s on proxies; ``torch.compile`` and ``torch.export``
trace through them as ordinary Python.

Two padding orders exist:

* torchvision and Hugging Face pad bottom/right first and roll the *padded* map: exactly the
  op's own order, so ``pad -> op(shift) -> crop``.
* timm rolls the *unpadded* map, then pads (``roll_first=True``). The op rolls the padded map,
  so the input is pre-arranged as ``roll(pad(roll(x, -s)), +s)`` and the output is cropped as
  ``roll(roll(out, -s)[:H, :W], +s)``; the extra rolls run only when the grid needs padding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PAD_GROUP", "pad_to_windows", "pad_group", "crop_windows", "drop_shift_where_one_window"]

# Group label given to padding tokens: they then never share a label with a real token.
PAD_GROUP = -(2 ** 31)


def _pads(H: int, W: int, window: Tuple[int, int]) -> Tuple[int, int]:
    return (window[0] - H % window[0]) % window[0], (window[1] - W % window[1]) % window[1]


def pad_to_windows(x: Tensor, window: Tuple[int, int], shift: Tuple[int, int] = (0, 0), roll_first: bool = False,
                   pad_error: Optional[str] = None) -> Tensor:
    """``(B, H, W, C)`` -> ``(B, Hp, Wp, C)`` zero-padded bottom/right to window multiples.

    Returns ``x`` itself when the grid is already divisible. ``roll_first``: timm's order (see
    the module docstring). ``pad_error``: raise ``ValueError`` with this text instead of padding.
    """
    H, W = x.shape[1], x.shape[2]
    ph, pw = _pads(H, W, window)
    if not (ph or pw):
        return x
    if pad_error is not None:
        raise ValueError(f"{pad_error}, got (H, W) = {(H, W)} with window {tuple(window)}")
    rolled = roll_first and any(shift)
    if rolled:
        x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
    x = F.pad(x, (0, 0, 0, pw, 0, ph))
    if rolled:
        x = torch.roll(x, (shift[0], shift[1]), (1, 2))
    return x


def pad_group(group: Tensor, window: Tuple[int, int], shift: Tuple[int, int] = (0, 0),
              roll_first: bool = False) -> Tensor:
    """Group labels ``(H, W)`` or ``(B, H, W)`` padded like :func:`pad_to_windows`; pad tokens get
    :data:`PAD_GROUP`, so real tokens never attend to them. ``group`` itself when divisible."""
    H, W = group.shape[-2], group.shape[-1]
    ph, pw = _pads(H, W, window)
    if not (ph or pw):
        return group
    group = group.to(torch.int64)
    rolled = roll_first and any(shift)
    if rolled:
        group = torch.roll(group, (-shift[0], -shift[1]), (-2, -1))
    group = F.pad(group, (0, pw, 0, ph), value=PAD_GROUP)
    if rolled:
        group = torch.roll(group, (shift[0], shift[1]), (-2, -1))
    return group


def crop_windows(out: Tensor, H: int, W: int, shift: Tuple[int, int] = (0, 0), roll_first: bool = False) -> Tensor:
    """Undo :func:`pad_to_windows` on the op's ``(B, Hp, Wp, C)`` output; ``out`` itself when unpadded."""
    if out.shape[1] == H and out.shape[2] == W:
        return out
    if roll_first and any(shift):  # timm crops the merged, still-rolled map, then rolls back
        out = torch.roll(out, (-shift[0], -shift[1]), (1, 2))[:, :H, :W]
        return torch.roll(out, (shift[0], shift[1]), (1, 2))
    return out[:, :H, :W]


def drop_shift_where_one_window(x: Tensor, window: Tuple[int, int], shift: Tuple[int, int]) -> Tuple[int, int]:
    """torchvision's rule: no shift along a dimension whose (padded) size fits in one window.

    ``x`` is the padded ``(B, Hp, Wp, C)`` map. Returns the shift to use, as Python ints.
    """
    return (0 if window[0] >= x.shape[1] else int(shift[0]), 0 if window[1] >= x.shape[2] else int(shift[1]))
