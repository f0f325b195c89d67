"""Triton kernels for Swin's roll + window partition and window merge + reverse roll (one pass each).

x (B,H,W,C) <-> windows (B*nW, N, C), N = wh*ww, windows row-major on the rolled grid,
batch outermost (csrc/ops.cpp). Both directions are pure row gathers: each output row
computes its source row, so every output element is written exactly once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._rows import needs_int64, tile

__all__ = ["window_partition", "window_merge"]


@triton.jit
def _rows_cols(BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """This program's output rows (int64 when the offsets need it) and its contiguous column block."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    return rows, cols


@triton.jit
def _partition_kernel(x, out, R, H, W, C, wh, ww, sh, sw, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                      INT64: tl.constexpr):
    # Output row r = (window, n) reads token ((wi*wh + n/ww + sh) % H, (wj*ww + n%ww + sw) % W).
    rows, cols = _rows_cols(BLOCK_R, BLOCK_C, INT64)
    N = wh * ww
    nww = W // ww
    nw = (H // wh) * nww
    win = rows // N
    n = rows % N
    b = win // nw
    w = win % nw
    y = ((w // nww) * wh + n // ww + sh) % H
    xx = ((w % nww) * ww + n % ww + sw) % W
    src = (b * H + y) * W + xx
    io = (rows < R)[:, None] & (cols < C)[None, :]
    v = tl.load(x + src[:, None] * C + cols[None, :], mask=io)
    tl.store(out + rows[:, None] * C + cols[None, :], v, mask=io)


@triton.jit
def _merge_kernel(win_ptr, out, R, H, W, C, wh, ww, sh, sw, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  INT64: tl.constexpr):
    # Output token (b,y,x) sits at (y-sh, x-sw) mod (H,W) on the rolled grid.
    rows, cols = _rows_cols(BLOCK_R, BLOCK_C, INT64)
    HW = H * W
    b = rows // HW
    y = (rows // W) % H
    xx = rows % W
    yr = (y - sh + H) % H
    xr = (xx - sw + W) % W
    nww = W // ww
    win = b * ((H // wh) * nww) + (yr // wh) * nww + xr // ww
    src = win * (wh * ww) + (yr % wh) * ww + xr % ww
    io = (rows < R)[:, None] & (cols < C)[None, :]
    v = tl.load(win_ptr + src[:, None] * C + cols[None, :], mask=io)
    tl.store(out + rows[:, None] * C + cols[None, :], v, mask=io)


# ---------------------------------------------------------------- launchers
def window_partition(x: torch.Tensor, wh: int, ww: int, sh: int, sw: int) -> torch.Tensor:
    """x (B,H,W,C) -> (B*nW, wh*ww, C) = partition(roll(x, (-sh, -sw)))."""
    B, H, W, C = x.shape
    nW = (H // wh) * (W // ww)
    out = torch.empty((B * nW, wh * ww, C), dtype=x.dtype, device=x.device)
    R = B * H * W
    if R == 0 or C == 0:
        return out
    br, bc, nw = tile(C, R)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    _partition_kernel[grid](x, out, R, H, W, C, wh, ww, sh, sw, BLOCK_R=br, BLOCK_C=bc, INT64=needs_int64(x),
                            num_warps=nw)
    return out


def window_merge(windows: torch.Tensor, H: int, W: int, wh: int, ww: int, sh: int, sw: int) -> torch.Tensor:
    """windows (B*nW, wh*ww, C) -> (B,H,W,C) = roll(merge(windows), (sh, sw))."""
    C = windows.shape[2]
    nW = (H // wh) * (W // ww)
    B = windows.shape[0] // nW
    out = torch.empty((B, H, W, C), dtype=windows.dtype, device=windows.device)
    R = B * H * W
    if R == 0 or C == 0:
        return out
    br, bc, nw = tile(C, R)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    _merge_kernel[grid](windows, out, R, H, W, C, wh, ww, sh, sw, BLOCK_R=br, BLOCK_C=bc,
                        INT64=needs_int64(windows), num_warps=nw)
    return out
