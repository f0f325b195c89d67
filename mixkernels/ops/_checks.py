"""Input validation shared by the op families: errors name the argument and what it got."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

__all__ = ["tensor", "pair", "positive_int", "mask_2d", "same_device", "window_geometry", "bytes01", "vector", "FLOATS"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, *, ndim: Optional[Sequence[int]] = None, floating: bool = False,
           dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() not in ndim:
        raise ValueError(f"{name} must have {' or '.join(str(n) for n in ndim)} dims, got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOATS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    return t


def same_device(name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {t.device}")


def positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v <= 0:
        raise ValueError(f"{name} must be positive, got {v}")
    return v


def pair(name: str, v, *, minimum: int = 1) -> Tuple[int, int]:
    """An int or a 2-sequence of ints, each >= minimum."""
    if type(v) is int:  # the common case, without building a sequence
        if v < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
        return v, v
    vals = tuple(v) if isinstance(v, (tuple, list, torch.Size)) else (v, v)
    if len(vals) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in vals):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if vals[0] < minimum or vals[1] < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return vals  # type: ignore[return-value]


def window_geometry(window_size, shift_size, H: int, W: int) -> Tuple[int, int, int, int]:
    """``(wh, ww, sh, sw)``: windows must tile the ``(H, W)`` grid, shifts be smaller than windows."""
    wh, ww = pair("window_size", window_size)
    sh, sw = pair("shift_size", shift_size, minimum=0)
    if H <= 0 or W <= 0:  # no windows: window_merge (and the partition backward) would divide by nW = 0
        raise ValueError(f"the token grid (H, W) = {(H, W)} must be non-empty")
    if H % wh or W % ww:
        raise ValueError(f"window_size {(wh, ww)} must divide the token grid (H, W) = {(H, W)}; pad first")
    if sh >= wh or sw >= ww:
        raise ValueError(f"shift_size {(sh, sw)} must be smaller than window_size {(wh, ww)}")
    return wh, ww, sh, sw


_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64) + FLOATS


def mask_2d(name: str, mask, B: int, spatial: Tuple[int, ...], ref: torch.Tensor,
            dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Validate a 0/1 mask over token positions, batch-shared ``spatial`` or per image ``(B, *spatial)``.

    Returns it as contiguous uint8 ``(G, prod(spatial))`` with ``G`` in ``{1, B}`` (nonzero = 1),
    or with ``dtype=torch.bool`` as a bool ``(B, prod(spatial))`` view (fewer ops: this runs
    on every call).
    """
    tensor(name, mask, dtypes=_MASK_DTYPES)
    same_device(name, mask, ref, "x")
    shape = tuple(mask.shape)
    spatial = tuple(spatial)
    L = 1
    for s in spatial:
        L *= s
    if shape == spatial or shape == (L,):
        G = 1
    elif shape == (B,) + spatial or shape == (B, L):
        G = B
    else:
        raise ValueError(
            f"{name} must have shape {spatial} (batch-shared) or {(B,) + spatial} (per image), got {shape}"
        )
    if dtype == torch.bool:
        m = mask if mask.dtype == torch.bool else mask != 0
        if shape == (B, L):
            return m
        return (m if len(shape) == 1 else m.reshape(G, L)).expand(B, L)
    return bytes01(mask).reshape(G, L).contiguous()


def vector(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` (``n`` elements, any shape) as ``(n,)``; no reshape op when it already is."""
    return t if t.dim() == 1 else t.reshape(n)


def bytes01(t: torch.Tensor) -> torch.Tensor:
    """``t != 0`` as uint8 0/1 (a bool tensor is stored that way already: a free view)."""
    return (t if t.dtype == torch.bool else t != 0).view(torch.uint8)
