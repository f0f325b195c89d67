"""Triton kernels for MixMIM mixing (mix_tokens) and the dual decoder's un-mixing (unmix_tokens).

Layouts follow csrc/ops.cpp: x (B,L,C) contiguous, mask uint8 (G,L) with G in {1,B},
mask_token (C,) and pos_embed (L,C) in x.dtype. Reduced gradients are float32, summed
deterministically (per-program partials, then a fixed-order torch sum; no atomics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._rows import acc_empty, interpreting, needs_int64, tile

__all__ = ["mix_tokens", "mix_tokens_backward", "unmix_tokens", "unmix_tokens_backward"]


@triton.jit
def _row_tile(R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if INT64:
        rows = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    return rows, cols, rows < R, cols < C


@triton.jit
def _mix_kernel(x, mask, out, R, L, B, C, SHARED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                INT64: tl.constexpr):
    rows, cols, rm, cm = _row_tile(R, C, BLOCK_R, BLOCK_C, INT64)
    i = rows // L
    p = rows % L
    if SHARED:
        m = tl.load(mask + p, mask=rm, other=0)
    else:
        m = tl.load(mask + rows, mask=rm, other=0)
    src = tl.where(m != 0, (B - 1 - i) * L + p, rows)
    io = rm[:, None] & cm[None, :]
    v = tl.load(x + src[:, None] * C + cols[None, :], mask=io)
    tl.store(out + rows[:, None] * C + cols[None, :], v, mask=io)


@triton.jit
def _mix_bwd_kernel(g, mask, dx, R, L, B, C, SHARED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                    INT64: tl.constexpr):
    # dx[j,p] = mask[B-1-j,p] * g[B-1-j,p] + (1 - mask[j,p]) * g[j,p]
    rows, cols, rm, cm = _row_tile(R, C, BLOCK_R, BLOCK_C, INT64)
    j = rows // L
    p = rows % L
    partner = (B - 1 - j) * L + p
    if SHARED:
        m_self = tl.load(mask + p, mask=rm, other=0) != 0
        m_partner = m_self
    else:
        m_self = tl.load(mask + rows, mask=rm, other=0) != 0
        m_partner = tl.load(mask + partner, mask=rm, other=0) != 0
    io = rm[:, None] & cm[None, :]
    a = tl.load(g + partner[:, None] * C + cols[None, :], mask=io & m_partner[:, None], other=0.0)
    s = tl.load(g + rows[:, None] * C + cols[None, :], mask=io & (~m_self)[:, None], other=0.0)
    v = a.to(tl.float32) + s.to(tl.float32)
    tl.store(dx + rows[:, None] * C + cols[None, :], v.to(dx.dtype.element_ty), mask=io)


@triton.jit
def _unmix_kernel(x, mask, tok, pos, out, R, L, B, C, SHARED: tl.constexpr, HAS_POS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    # Row r = (i, p) of the (2B, L, C) output: image i % B, the mask token where row i takes it.
    rows, cols, rm, cm = _row_tile(R, C, BLOCK_R, BLOCK_C, INT64)
    i = rows // L
    p = rows % L
    b = i % B
    if SHARED:
        masked = tl.load(mask + p, mask=rm, other=0) != 0
    else:
        masked = tl.load(mask + b * L + p, mask=rm, other=0) != 0
    use_tok = tl.where(i < B, masked, ~masked)
    io = rm[:, None] & cm[None, :]
    xv = tl.load(x + (b * L + p)[:, None] * C + cols[None, :], mask=io & (~use_tok)[:, None], other=0.0)
    tv = tl.load(tok + cols, mask=cm, other=0.0)
    v = tl.where(use_tok[:, None], tv[None, :], xv)
    if HAS_POS:
        pe = tl.load(pos + p[:, None] * C + cols[None, :], mask=io, other=0.0)
        v = (v.to(tl.float32) + pe.to(tl.float32)).to(out.dtype.element_ty)
    tl.store(out + rows[:, None] * C + cols[None, :], v, mask=io)


@triton.jit
def _unmix_bwd_kernel(g, mask, dx, tok_part, pos_part, L, B, C, SHARED: tl.constexpr,
                      NEED_TOK: tl.constexpr, NEED_POS: tl.constexpr, B_CHUNK: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    # Program (pid_p, pid_c, k): positions of block pid_p, images [k*B_CHUNK, (k+1)*B_CHUNK) that are < B.
    # dx[b,p] = g[B+b,p] if mask else g[b,p]; partial sums over b go out in float32.
    # The trip count is a constexpr (a power of two): Triton 3.6's interpreter cannot take loop
    # bounds from kernel arguments with numpy >= 2.4 (int() of a 1-element array).
    pid_p = tl.program_id(0)
    k = tl.program_id(2)
    p, cols, pm, cm = _row_tile(L, C, BLOCK_P, BLOCK_C, INT64)
    io = pm[:, None] & cm[None, :]
    tok_acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    pos_acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for i in range(0, B_CHUNK):
        b = k * B_CHUNK + i
        pb = pm & (tl.zeros_like(p) + b < B)  # as a vector: Triton 3.9's interpreter rejects scalar masks here
        live = pb[:, None] & cm[None, :]
        if SHARED:
            masked = tl.load(mask + p, mask=pm, other=0) != 0
        else:
            masked = tl.load(mask + b * L + p, mask=pb, other=0) != 0
        r1 = b * L + p
        r2 = (B + b) * L + p
        g1 = tl.load(g + r1[:, None] * C + cols[None, :], mask=live, other=0.0)
        g2 = tl.load(g + r2[:, None] * C + cols[None, :], mask=live, other=0.0)
        tl.store(dx + r1[:, None] * C + cols[None, :], tl.where(masked[:, None], g2, g1), mask=live)
        if NEED_TOK:
            tok_acc += tl.where(masked[:, None], g1, g2).to(tl.float32)
        if NEED_POS:
            pos_acc += g1.to(tl.float32) + g2.to(tl.float32)
    if NEED_POS:
        tl.store(pos_part + (k * L + p)[:, None] * C + cols[None, :], pos_acc, mask=io)
    if NEED_TOK:
        n_p = tl.num_programs(0)
        tl.store(tok_part + (k * n_p + pid_p) * C + cols, tl.sum(tok_acc, axis=0), mask=cm)


# ---------------------------------------------------------------- launchers
def _grid(rows: int, C: int):
    block_r, block_c, warps = tile(C, rows)
    return (triton.cdiv(rows, block_r), triton.cdiv(C, block_c)), block_r, block_c, warps


def mix_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B,L,C) float, mask uint8 (G,L) -> (B,L,C): out[i,p] = x[B-1-i,p] if mask[i,p] else x[i,p]."""
    B, L, C = x.shape
    out = torch.empty_like(x)
    R = B * L
    if R == 0 or C == 0:
        return out
    grid, br, bc, nw = _grid(R, C)
    _mix_kernel[grid](x, mask, out, R, L, B, C, SHARED=mask.shape[0] == 1, BLOCK_R=br, BLOCK_C=bc,
                      INT64=needs_int64(x), num_warps=nw)
    return out


def mix_tokens_backward(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """grad (B,L,C), mask uint8 (G,L) -> dx (B,L,C): a gather of at most two rows per output row."""
    B, L, C = grad.shape
    dx = torch.empty_like(grad)
    R = B * L
    if R == 0 or C == 0:
        return dx
    grid, br, bc, nw = _grid(R, C)
    _mix_bwd_kernel[grid](grad, mask, dx, R, L, B, C, SHARED=mask.shape[0] == 1, BLOCK_R=br, BLOCK_C=bc,
                          INT64=needs_int64(grad), num_warps=nw)
    return dx


def unmix_tokens(x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor,
                 pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """x (B,L,C), mask uint8 (G,L), mask_token (C,), pos_embed (L,C) or None -> (2B,L,C)."""
    B, L, C = x.shape
    out = torch.empty((2 * B, L, C), dtype=x.dtype, device=x.device)
    R = 2 * B * L
    if R == 0 or C == 0:
        return out
    grid, br, bc, nw = _grid(R, C)
    has_pos = pos_embed is not None
    _unmix_kernel[grid](x, mask, mask_token, pos_embed if has_pos else x, out, R, L, B, C,
                        SHARED=mask.shape[0] == 1, HAS_POS=has_pos, BLOCK_R=br, BLOCK_C=bc,
                        INT64=needs_int64(out), num_warps=nw)
    return out


def unmix_tokens_backward(grad: torch.Tensor, mask: torch.Tensor, need_token: bool,
                          need_pos: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad (2B,L,C), mask uint8 (G,L) -> (dx (B,L,C), dtoken (C,) f32 or empty, dpos (L,C) f32 or empty)."""
    B2, L, C = grad.shape
    B = B2 // 2
    dx = torch.empty((B, L, C), dtype=grad.dtype, device=grad.device)
    if B == 0 or L == 0 or C == 0:
        tok = torch.zeros(C, dtype=torch.float32, device=grad.device) if need_token else acc_empty(grad)
        pos = torch.zeros(L, C, dtype=torch.float32, device=grad.device) if need_pos else acc_empty(grad)
        return dx, tok, pos
    block_p, block_c, nw = tile(C, L)
    block_p = max(1, min(block_p, 2048 // block_c))  # two float32 accumulator tiles live in registers
    n_p, n_c = triton.cdiv(L, block_p), triton.cdiv(C, block_c)
    # Split the batch so a GPU has enough programs; one chunk under the interpreter.
    n_k = 1 if interpreting() or not grad.is_cuda else max(1, min(B, triton.cdiv(1024, n_p * n_c)))
    chunk = triton.next_power_of_2(triton.cdiv(B, n_k))  # a constexpr: few distinct values
    n_k = triton.cdiv(B, chunk)
    f32 = dict(dtype=torch.float32, device=grad.device)
    tok_part = torch.empty((n_k, n_p, C), **f32) if need_token else acc_empty(grad)
    pos_part = torch.empty((n_k, L, C), **f32) if need_pos else acc_empty(grad)
    _unmix_bwd_kernel[(n_p, n_c, n_k)](
        grad, mask, dx, tok_part, pos_part, L, B, C, SHARED=mask.shape[0] == 1, NEED_TOK=need_token,
        NEED_POS=need_pos, B_CHUNK=chunk, BLOCK_P=block_p, BLOCK_C=block_c, INT64=needs_int64(grad), num_warps=nw)
    # Fixed-order reductions of the partials (torch's sum is deterministic; no atomics).
    dtoken = tok_part.sum(dim=(0, 1)) if need_token else tok_part
    dpos = pos_part.sum(dim=0) if need_pos else pos_part
    return dx, dtoken, dpos
