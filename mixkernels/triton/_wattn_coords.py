"""Triton window attention with ``coords`` (UM-MAE): the relative-position table read in place.

The single-tile kernels (forward and backward) take rpb itself, (T, nH) fp32 (a head's entries at
stride nH), unscaled: no scaled (nH, T) copy before the launch. The log2e scale costs no instruction:
the backward folds it into the bias add (an FFMA where an FADD was); the forward keeps its logits in
natural units and folds it into the softmax's subtraction of the row max (an FFMA where an FADD was;
a log2 table would cost an FMUL per element there, where the add fuses with the QK^T scale). The
backward sums the table gradient in the same (T, nH) layout (``_bias_grads``' stride TS), so the
launcher returns it without a transpose copy. The multi-tile paths keep the (nH, T) log2 table.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._wattn_common import _coord_off, _gather, _in_range

__all__ = ["_add_coord_bias", "_coord_off"]


@triton.jit
def _add_coord_bias(t, tab_h, cy_m, cx_m, cy_n, cx_n, RH, RW, NH, LOG2: tl.constexpr, ASM: tl.constexpr):
    """``t`` (a tile's fp32 logits) plus the relative-position bias of every (query, key) pair from the
    rows' and keys' int64 coordinates (edge rules 1 and 3: exact differences; 0 for a pair outside
    the table). ``tab_h`` = rpb + h with rpb (T, nH) fp32 contiguous, T = (2RH-1)(2RW-1), read
    unscaled. LOG2: ``t`` in log2 units, the bias scaled by log2e in the add's FFMA; else natural units."""
    _dy, iny = _in_range(cy_m[:, None], cy_n[None, :], RH)
    _dx, inx = _in_range(cx_m[:, None], cx_n[None, :], RW)
    inr = iny & inx
    g = _gather(tab_h + _coord_off(cy_m, cx_m, cy_n, cx_n, RH, RW, NH), inr, True, ASM)
    if LOG2:
        return tl.fma(g, 1.4426950408889634, t)
    else:
        return t + g
