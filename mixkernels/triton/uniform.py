"""Triton kernels for UM-MAE uniform sampling (fused secondary masking), its backward and scatter.

x (B,H,W,C); compact (B,H/2,W/2,C); keep uint8 (B,hc,wc) read as ``keep & 3`` (row-major
unit of each 2x2 cell of u x u units); secondary uint8 (B,hc,wc); mask_token (C,) x.dtype.
H, W and the unit are compile-time constants (one compile per image geometry, which a model keeps):
the per-row index math then divides by constants (multiply + shift), not by runtime integers.
dtoken is float32, summed deterministically (per-program partials, fixed-order torch sum).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._rows import acc_empty, needs_int64, tile

__all__ = ["uniform_sample", "uniform_sample_backward", "uniform_scatter"]


@triton.jit
def _sample_kernel(x, keep, sec, tok, out, R, H: tl.constexpr, W: tl.constexpr, C, u: tl.constexpr,
                   HAS_SEC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    # Compact row t = (b,Y,X) reads the kept unit of cell (Y/u, X/u) at offset (Y%u, X%u).
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    rm = rows < R
    cm = cols < C
    h = H // 2
    w = W // 2
    hc = H // (2 * u)
    wc = W // (2 * u)
    b = rows // (h * w)
    Y = (rows // w) % h
    X = rows % w
    cell = (b * hc + Y // u) * wc + X // u
    k = tl.load(keep + cell, mask=rm, other=0).to(tl.int32) & 3
    y = (2 * (Y // u) + (k >> 1)) * u + Y % u
    xx = (2 * (X // u) + (k & 1)) * u + X % u
    src = (b * H + y) * W + xx
    io = rm[:, None] & cm[None, :]
    if HAS_SEC:
        s = tl.load(sec + cell, mask=rm, other=0) != 0
        v = tl.load(x + src[:, None] * C + cols[None, :], mask=io & (~s)[:, None], other=0.0)
        t = tl.load(tok + cols, mask=cm, other=0.0)
        v = tl.where(s[:, None], t[None, :], v)
    else:
        v = tl.load(x + src[:, None] * C + cols[None, :], mask=io)
    tl.store(out + rows[:, None] * C + cols[None, :], v, mask=io)


@triton.jit
def _scatter_kernel(compact, keep, sec, out, tok_part, R, H: tl.constexpr, W: tl.constexpr, C, u: tl.constexpr,
                    HAS_SEC: tl.constexpr, NEED_TOK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    INT64: tl.constexpr):
    # Full row r = (b,y,x): the compact row if (y,x) is in its cell's kept unit (and not secondary),
    # else 0. Kept-but-secondary rows are the mask token's gradient: summed per program.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    rm = rows < R
    cm = cols < C
    hc = H // (2 * u)
    wc = W // (2 * u)
    b = rows // (H * W)
    y = (rows // W) % H
    xx = rows % W
    ci = y // (2 * u)
    cj = xx // (2 * u)
    cell = (b * hc + ci) * wc + cj
    q = ((y // u) & 1) * 2 + ((xx // u) & 1)
    k = tl.load(keep + cell, mask=rm, other=0).to(tl.int32) & 3
    kept = k == q
    src = (b * (H // 2) + ci * u + y % u) * (W // 2) + cj * u + xx % u
    io = rm[:, None] & cm[None, :]
    v = tl.load(compact + src[:, None] * C + cols[None, :], mask=io & kept[:, None], other=0.0)
    if HAS_SEC:
        s = tl.load(sec + cell, mask=rm, other=0) != 0
        if NEED_TOK:
            part = tl.sum(tl.where(s[:, None], v.to(tl.float32), 0.0), axis=0)
            tl.store(tok_part + tl.program_id(0) * C + cols, part, mask=cm)
        v = tl.where(s[:, None], tl.zeros_like(v), v)  # in v's dtype: no float32 round trip
    tl.store(out + rows[:, None] * C + cols[None, :], v, mask=io)


# ---------------------------------------------------------------- launchers
def uniform_sample(x: torch.Tensor, keep: torch.Tensor, unit: int, mask_token: Optional[torch.Tensor],
                   secondary: Optional[torch.Tensor]) -> torch.Tensor:
    """x (B,H,W,C), keep uint8 (B,H/2u,W/2u), mask_token (C,) / secondary uint8 or None -> (B,H/2,W/2,C)."""
    B, H, W, C = x.shape
    out = torch.empty((B, H // 2, W // 2, C), dtype=x.dtype, device=x.device)
    R = out.numel() // C if C else 0
    if R == 0:
        return out
    has_sec = secondary is not None
    br, bc, nw = tile(C, R)
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    _sample_kernel[grid](x, keep, secondary if has_sec else keep, mask_token if has_sec else x, out, R, H, W, C,
                         unit, HAS_SEC=has_sec, BLOCK_R=br, BLOCK_C=bc, INT64=needs_int64(x), num_warps=nw)
    return out


def _scatter(compact, keep, unit, secondary, need_token):
    B, h, w, C = compact.shape
    H, W = 2 * h, 2 * w
    out = torch.empty((B, H, W, C), dtype=compact.dtype, device=compact.device)
    R = B * H * W
    has_sec = secondary is not None
    want_tok = need_token and has_sec
    if R == 0 or C == 0:
        return out, torch.zeros(C, dtype=torch.float32, device=compact.device)
    br, bc, nw = tile(C, R)
    if want_tok:  # twice the rows: the per-program mask-token reduction costs half as much per row
        br = min(br * 2, triton.next_power_of_2(R))
    grid = (triton.cdiv(R, br), triton.cdiv(C, bc))
    tok_part = torch.empty((grid[0], C), dtype=torch.float32, device=compact.device) if want_tok else acc_empty(compact)
    _scatter_kernel[grid](compact, keep, secondary if has_sec else keep, out, tok_part, R, H, W, C, unit,
                          HAS_SEC=has_sec, NEED_TOK=want_tok, BLOCK_R=br, BLOCK_C=bc, INT64=needs_int64(out),
                          num_warps=nw)
    if want_tok:
        return out, tok_part.sum(dim=0)  # fixed-order reduction, no atomics
    return out, torch.zeros(C, dtype=torch.float32, device=compact.device)


def uniform_sample_backward(grad: torch.Tensor, keep: torch.Tensor, unit: int, secondary: Optional[torch.Tensor],
                            need_token: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """grad (B,h,w,C) -> (dx (B,2h,2w,C) grad.dtype, dtoken (C,) float32 or empty)."""
    dx, dtok = _scatter(grad, keep, unit, secondary, need_token)
    return dx, (dtok if need_token else acc_empty(grad))


def uniform_scatter(compact: torch.Tensor, keep: torch.Tensor, unit: int) -> torch.Tensor:
    """compact (B,h,w,C), keep uint8 (B,h/u,w/u) -> (B,2h,2w,C) with zeros outside the kept units."""
    return _scatter(compact, keep, unit, None, False)[0]
