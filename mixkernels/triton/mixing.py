"""Triton kernels for MixMIM mixing (mix_tokens) and the dual decoder's un-mixing (unmix_tokens).

Layouts follow csrc/ops.cpp: x (B,L,C) contiguous, mask uint8 (G,L) with G in {1,B},
mask_token (C,) and pos_embed (L,C) in x.dtype. Reduced gradients are float32, summed
deterministically: per-program partials, then a fixed-order sum by the last program of each column
block (a ticket counter; no atomics on data), or by a second launch of the same code.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._rows import acc_empty, needs_int64, stream_tickets, tile

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
def _unmix_bwd_kernel(g, mask, dx, tok_part, pos_part, dtok, dpos, tickets, L, B, C, SHARED: tl.constexpr,
                      NEED_TOK: tl.constexpr, NEED_POS: tl.constexpr, CHUNKS: tl.constexpr, B_TILE: tl.constexpr,
                      N_TILES: tl.constexpr, R_TILE: tl.constexpr, TOK_TILES: tl.constexpr, POS_TILES: tl.constexpr,
                      BLOCK_C: tl.constexpr, TICKETS: tl.constexpr, INT64: tl.constexpr):
    # Program (p, c, k): position p, columns of block c, images [k*N_TILES*B_TILE, ...) that are < B,
    # B_TILE at a time (the rows of the tile). dx[b,p] = g[B+b,p] if mask else g[b,p]; float32 sums
    # tok += mask ? g[b,p] : g[B+b,p], pos += g[b,p] + g[B+b,p], summed over the tile's rows at the end:
    # tok_part[k*L + p] and pos_part[k*L + p] (dpos[p] itself when CHUNKS == 1). With TICKETS the last
    # program of column block c to finish (L * CHUNKS of them) reduces the block's partials.
    # Trip counts are constexprs: Triton 3.6's interpreter cannot take loop bounds from kernel
    # arguments with numpy >= 2.4 (int() of a 1-element array).
    p = tl.program_id(0)
    c = tl.program_id(1)
    k = tl.program_id(2)
    lane = tl.arange(0, B_TILE)
    if INT64:
        lane = lane.to(tl.int64)
    cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    cm = cols < C
    tok_acc = tl.zeros((B_TILE, BLOCK_C), dtype=tl.float32)
    pos_acc = tl.zeros((B_TILE, BLOCK_C), dtype=tl.float32)
    for t in range(0, N_TILES):
        b = (k * N_TILES + t) * B_TILE + lane
        bm = b < B
        live = bm[:, None] & cm[None, :]
        if SHARED:
            masked = tl.load(mask + p + lane * 0) != 0
        else:
            masked = tl.load(mask + b * L + p, mask=bm, other=0) != 0
        r1 = b * L + p
        r2 = r1 + B * L
        g1 = tl.load(g + r1[:, None] * C + cols[None, :], mask=live, other=0.0)
        g2 = tl.load(g + r2[:, None] * C + cols[None, :], mask=live, other=0.0)
        tl.store(dx + r1[:, None] * C + cols[None, :], tl.where(masked[:, None], g2, g1), mask=live)
        if NEED_TOK:
            tok_acc += tl.where(masked[:, None], g1, g2).to(tl.float32)
        if NEED_POS:
            pos_acc += g1.to(tl.float32) + g2.to(tl.float32)
    row = k * L + p
    if INT64:
        row = row.to(tl.int64)
    if NEED_TOK:
        tl.store(tok_part + row * C + cols, tl.sum(tok_acc, axis=0), mask=cm)
    if NEED_POS:
        if CHUNKS == 1:
            tl.store(dpos + row * C + cols, tl.sum(pos_acc, axis=0), mask=cm)
        else:
            tl.store(pos_part + row * C + cols, tl.sum(pos_acc, axis=0), mask=cm)
    if TICKETS:
        tl.debug_barrier()  # every thread's partial stores precede the ticket (acq_rel: released)
        done = tl.atomic_add(tickets + c, 1, sem="acq_rel")
        if done == L * CHUNKS - 1:  # the other programs of block c have published their partials
            tl.atomic_xchg(tickets + c, 0, sem="relaxed")  # every ticket is taken: ready for the next launch
            tl.debug_barrier()
            _unmix_reduce(tok_part, pos_part, dtok, dpos, c, L, C, NEED_TOK, NEED_POS, CHUNKS, R_TILE, TOK_TILES,
                          POS_TILES, BLOCK_C, INT64)


@triton.jit
def _unmix_reduce(tok_part, pos_part, dtok, dpos, c, L, C, NEED_TOK: tl.constexpr, NEED_POS: tl.constexpr,
                  CHUNKS: tl.constexpr, R_TILE: tl.constexpr, TOK_TILES: tl.constexpr, POS_TILES: tl.constexpr,
                  BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    """Column block c of dtoken (the CHUNKS*L partial rows, R_TILE at a time, then the tile's rows) and,
    with CHUNKS > 1, of dpos (chunks in order): a fixed order, whichever program runs it. The partials
    are read through L2 (.cg): other programs wrote them."""
    cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_C), BLOCK_C)
    cm = cols < C
    r = tl.arange(0, R_TILE)
    if INT64:
        r = r.to(tl.int64)
    if NEED_TOK:
        acc = tl.zeros((R_TILE, BLOCK_C), dtype=tl.float32)
        for t in range(0, TOK_TILES):
            rows = t * R_TILE + r
            io = (rows < CHUNKS * L)[:, None] & cm[None, :]
            acc += tl.load(tok_part + rows[:, None] * C + cols[None, :], mask=io, other=0.0, cache_modifier=".cg")
        tl.store(dtok + cols, tl.sum(acc, axis=0), mask=cm)
    if NEED_POS and CHUNKS > 1:
        for t in range(0, POS_TILES):
            ps = t * R_TILE + r
            io = (ps < L)[:, None] & cm[None, :]
            acc = tl.zeros((R_TILE, BLOCK_C), dtype=tl.float32)
            for k in range(0, CHUNKS):
                acc += tl.load(pos_part + (k * L + ps)[:, None] * C + cols[None, :], mask=io, other=0.0,
                               cache_modifier=".cg")
            tl.store(dpos + ps[:, None] * C + cols[None, :], acc, mask=io)


@triton.jit
def _unmix_reduce_kernel(tok_part, pos_part, dtok, dpos, L, C, NEED_TOK: tl.constexpr, NEED_POS: tl.constexpr,
                         CHUNKS: tl.constexpr, R_TILE: tl.constexpr, TOK_TILES: tl.constexpr,
                         POS_TILES: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr):
    # The reduction without tickets (CUDA graph capture): program = column block, the same code.
    _unmix_reduce(tok_part, pos_part, dtok, dpos, tl.program_id(0), L, C, NEED_TOK, NEED_POS, CHUNKS, R_TILE,
                  TOK_TILES, POS_TILES, BLOCK_C, INT64)


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


# Unmix backward geometry: a column block is 128 B of a row (whole lines), the tile B_TILE images x
# BLOCK_C columns (~4096 elements), and the batch split into chunks until there are ~264 programs (two
# per SM of an H200). A fixed target, not the device's SM count, and the same under the interpreter: the
# summation order, hence the result bits, is the same everywhere.
_UNMIX_PROGRAMS = 264


def _unmix_plan(B: int, L: int, C: int, es: int):
    block_c = min(triton.next_power_of_2(C), max(1, 128 // es))
    n_c = triton.cdiv(C, block_c)
    chunk = triton.next_power_of_2(triton.cdiv(B, triton.cdiv(_UNMIX_PROGRAMS, L * n_c)))
    b_tile = min(chunk, max(1, 4096 // block_c))
    chunks = triton.cdiv(B, chunk)
    r_tile = max(1, min(4096 // block_c, triton.next_power_of_2(chunks * L)))
    return block_c, n_c, chunks, b_tile, chunk // b_tile, r_tile


def unmix_tokens_backward(grad: torch.Tensor, mask: torch.Tensor, need_token: bool,
                          need_pos: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad (2B,L,C), mask uint8 (G,L) -> (dx (B,L,C), dtoken (C,) f32 or empty, dpos (L,C) f32 or empty).
    One launch (the reductions by each column block's last program, through ``stream_tickets``), or two
    while a CUDA graph is being captured; the same bits either way."""
    B2, L, C = grad.shape
    B = B2 // 2
    dx = torch.empty((B, L, C), dtype=grad.dtype, device=grad.device)
    if B == 0 or L == 0 or C == 0:
        tok = torch.zeros(C, dtype=torch.float32, device=grad.device) if need_token else acc_empty(grad)
        pos = torch.zeros(L, C, dtype=torch.float32, device=grad.device) if need_pos else acc_empty(grad)
        return dx, tok, pos
    block_c, n_c, chunks, b_tile, n_tiles, r_tile = _unmix_plan(B, L, C, grad.element_size())
    f32 = dict(dtype=torch.float32, device=grad.device)
    dtoken = torch.empty(C, **f32) if need_token else acc_empty(grad)
    dpos = torch.empty((L, C), **f32) if need_pos else acc_empty(grad)
    tok_part = torch.empty((chunks, L, C), **f32) if need_token else dtoken
    pos_part = torch.empty((chunks, L, C), **f32) if need_pos and chunks > 1 else dpos
    reduce = need_token or (need_pos and chunks > 1)
    tickets = stream_tickets(grad, n_c) if reduce else None
    geo = dict(NEED_TOK=need_token, NEED_POS=need_pos, CHUNKS=chunks, R_TILE=r_tile,
               TOK_TILES=triton.cdiv(chunks * L, r_tile), POS_TILES=triton.cdiv(L, r_tile), BLOCK_C=block_c,
               INT64=needs_int64(grad, tok_part, pos_part))
    _unmix_bwd_kernel[(L, n_c, chunks)](
        grad, mask, dx, tok_part, pos_part, dtoken, dpos, tickets if tickets is not None else dtoken, L, B, C,
        SHARED=mask.shape[0] == 1, B_TILE=b_tile, N_TILES=n_tiles, TICKETS=tickets is not None, num_warps=4, **geo)
    if reduce and tickets is None:
        _unmix_reduce_kernel[(n_c,)](tok_part, pos_part, dtoken, dpos, L, C, num_warps=4, **geo)
    return dx, dtoken, dpos
