"""Triton window-attention backward, single pass (``_bwd_kernel`` with ``SP``): one window-head per program.

Key-major ("transposed") tiles: the program holds every key of the window (BLOCK_K rows, 8
warps = two warpgroups) with dK and dV in registers, and streams the query rows in blocks of
BLOCK_Q. Per block it computes S^T = K Q^T, P^T, dP^T = V dO^T and dS^T, all (keys x queries):

* the four big products (S^T, dP^T, dV += P^T dO, dK += dS^T Q) have the keys as their M
  dimension: wgmma on sm_90 (mma.sync on sm_80), P^T and dS^T fed from registers;
* dQ of the block, dS K = (dS^T)^T K, reduces over every key: complete in the block, stored once
  (no dQ accumulator live across the loop, no atomics);
* the rows' data that the old query-major pass re-read per key block (q, dO, delta, lse, labels,
  table rows) is read once per query block of BLOCK_Q rows; the keys' once per window.

Bias gradients: dS summed over windows by relaxed atomics into ``dsum`` (nH, N, N) (the
deterministic mode takes the two-phase path). Padded keys (rows >= N) read zeros and are
masked by position; padded queries (the tail block) read a real token with lse = +inf (P = 0),
dO = 0, and are never stored.

Loops (static instruction counts): ``for m0 in range(0, Q_FULL, BLOCK_Q)`` runs N // BLOCK_Q
times (the tail block is a separate call).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .window_attention import _idx, _keys, _lyx, _mm, _pos


@triton.jit
def _gather_2d(rp, co, ok, MASKED: tl.constexpr, ASM: tl.constexpr):
    """fp32 ``rp[i, j][co[i, j]]`` (0 where not ``ok`` when MASKED) of broadcast (rows, cols)
    pointers/offsets, in their layout (the scores'): one ``IMAD.WIDE`` + one load per element."""
    if ASM:
        if MASKED:
            return tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $3, 0; mad.wide.s32 a, $2, 4, $1; "
                "mov.f32 $0, 0f00000000; @p ld.global.nc.f32 $0, [a]; }",
                "=f,l,r,r", [rp, co, ok.to(tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b64 a; mad.wide.s32 a, $2, 4, $1; ld.global.nc.f32 $0, [a]; }",
                "=f,l,r", [rp, co], dtype=tl.float32, is_pure=True, pack=1)
    else:
        if MASKED:
            return tl.load(rp + co, mask=ok, other=0.0)
        else:
            return tl.load(rp + co)


@triton.jit
def _red_2d(rp, co, val, ok, ASM: tl.constexpr):
    """``rp[i, j][co[i, j]] += val[i, j]`` where ``ok``: relaxed atomics (no fences), the address
    computed next to its use (no tile of 64-bit pointers kept live)."""
    if ASM:
        # (the value travels as its bits: Triton 3.6 rejects float and pointer operands together)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $3, 0; mad.wide.s32 a, $2, 4, $1; "
            "@p red.relaxed.gpu.global.add.f32 [a], $4; mov.b32 $0, 0; }",
            "=r,l,r,r,r", [rp, co, ok.to(tl.int32), val.to(tl.int32, bitcast=True)], dtype=tl.int32,
            is_pure=False, pack=1)
    else:
        tl.atomic_add(rp + co, val, mask=ok, sem="relaxed")


@triton.jit
def _q_block(qkv, dout, lse, dlt, dqkv, tab_h, ab_h, group, dsum_h, m0, w, h, b, y0, x0, gbase, hd, qk_scale, scale, C,
             NH, H, W, SH, SW, k, v, dk, dv, ok_k, reg_k, grp_k, code_k, offs_k,
             BQ: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
             HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr, SHIFT: tl.constexpr,
             DSUM_MODE: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr,
             ASM: tl.constexpr):
    """One query block against every key: dK/dV shares, dQ of the block (stored), dS into ``dsum``."""
    offs_q = m0 + tl.arange(0, BQ)
    q_ok = offs_q < N
    ly, lx = _lyx(offs_q, N, WW)
    pos, reg_q = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    tok = _idx(b * (H * W) + pos, IDX64)
    offs_d = tl.arange(0, D)
    qrow = (tok * (3 * C) + hd)[:, None] + offs_d[None, :]
    q = tl.load(qkv + qrow)
    do = tl.load(dout + (tok * C + hd)[:, None] + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    rows = (w * NH + h) * N + offs_q
    delta = tl.load(dlt + rows, mask=q_ok, other=0.0)
    lse2 = tl.load(lse + rows, mask=q_ok, other=float("inf")) * 1.4426950408889634
    st = _mm(k, tl.trans(q), F32, UPCAST) * qk_scale  # (keys, queries), log2 units
    if HAS_RPB:
        # Swin index (ly_i - ly_j + wh-1)*(2ww-1) + (lx_i - lx_j + ww-1) = code_i + c0 - code_j
        tab_q = tab_h + (ly * (2 * WW - 1) + lx + ((WH - 1) * (2 * WW - 1) + WW - 1))
        rp, co = tl.broadcast(tab_q[None, :], -code_k[:, None])
        st += _gather_2d(rp, co, co, False, ASM)
    if HAS_BIAS:
        rp, co = tl.broadcast((ab_h + tl.minimum(offs_q, N - 1) * N)[None, :], offs_k[:, None])
        okb = tl.broadcast_to(ok_k[:, None], rp.shape)
        st += _gather_2d(rp, co, okb, True, ASM) * 1.4426950408889634
    allowed = ok_k[:, None]
    if SHIFT:
        allowed = allowed & (reg_k[:, None] == reg_q[None, :])
    if HAS_GROUP:
        grp_q = tl.load(group + gbase + pos)
        allowed = allowed & (grp_k[:, None] == grp_q[None, :])
    st = tl.where(allowed, st, float("-inf"))
    pt = tl.exp2(st - lse2[None, :])  # masked: 0; padded queries (lse +inf): 0; a fully masked row: NaN
    dpt = _mm(v, tl.trans(do), F32, UPCAST)
    dst = tl.where(allowed, pt * (dpt - delta[None, :]), 0.0)  # exactly 0 at masked pairs (even in a NaN row)
    dv += _mm(pt.to(do.dtype), do, F32, UPCAST)
    dsl = dst.to(q.dtype)
    dk += _mm(dsl, q, F32, UPCAST)
    if h < NH:  # always: a region of its own keeps Triton from giving this dot the chained dots' warp
        # layout (all 8 warps along its 16-32 rows: 2-4x duplicated mma.sync work)
        dq = _mm(tl.trans(dsl), k, F32, UPCAST)
        tl.store(dqkv + qrow, (dq * scale).to(dqkv.dtype.element_ty), mask=q_ok[:, None])
    if DSUM_MODE == 1:
        rp, co = tl.broadcast((dsum_h + offs_q * N)[None, :], offs_k[:, None])
        _red_2d(rp, co, dst, ok_k[:, None] & q_ok[None, :], ASM)
    return dk, dv


@triton.jit
def _sp_window(qkv, dout, lse, dlt, dqkv, tab_h, ab_h, group, codes, dsum_h, w, h, b, y0, x0, gbase, hd, qk_scale,
               scale, C, NH, H, W, SH, SW, BLOCK_K: tl.constexpr, BLOCK_Q: tl.constexpr, BQ_TAIL: tl.constexpr,
               N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, HAS_RPB: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr, SHIFT: tl.constexpr, DSUM_MODE: tl.constexpr,
               F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr):
    """One window-head: every key in one tile, query blocks streamed; dK, dV stored at the end.
    ``dlt`` must hold the rows' delta = rowsum(dO * O)."""
    offs_k = tl.arange(0, BLOCK_K)
    k, v, ok_k, reg_k, grp_k, _cy, _cx, code_k = _keys(
        qkv, group, qkv, codes, offs_k, b, y0, x0, gbase, gbase, hd, C, H, W, SH, SW, N, WH, WW, D, SHIFT,
        HAS_GROUP, False, True, IDX64, ASM)
    dk = tl.zeros((BLOCK_K, D), tl.float32)
    dv = tl.zeros((BLOCK_K, D), tl.float32)
    Q_FULL: tl.constexpr = (N // BLOCK_Q) * BLOCK_Q
    for m0 in range(0, Q_FULL, BLOCK_Q):
        dk, dv = _q_block(qkv, dout, lse, dlt, dqkv, tab_h, ab_h, group, dsum_h, m0, w, h, b, y0, x0, gbase, hd,
                          qk_scale, scale, C, NH, H, W, SH, SW, k, v, dk, dv, ok_k, reg_k, grp_k, code_k, offs_k,
                          BLOCK_Q, N, D, WH, WW, HAS_RPB, HAS_BIAS, HAS_GROUP, SHIFT, DSUM_MODE, F32, UPCAST, IDX64,
                          ASM)
    if BQ_TAIL > 0:
        dk, dv = _q_block(qkv, dout, lse, dlt, dqkv, tab_h, ab_h, group, dsum_h, Q_FULL, w, h, b, y0, x0, gbase, hd,
                          qk_scale, scale, C, NH, H, W, SH, SW, k, v, dk, dv, ok_k, reg_k, grp_k, code_k, offs_k,
                          BQ_TAIL, N, D, WH, WW, HAS_RPB, HAS_BIAS, HAS_GROUP, SHIFT, DSUM_MODE, F32, UPCAST, IDX64,
                          ASM)
    ly, lx = _lyx(offs_k, N, WW)
    pos, _r = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    krow = (_idx(b * (H * W) + pos, IDX64) * (3 * C) + hd)[:, None] + tl.arange(0, D)[None, :]
    tl.store(dqkv + krow + C, (dk * scale).to(dqkv.dtype.element_ty), mask=ok_k[:, None])
    tl.store(dqkv + krow + 2 * C, dv.to(dqkv.dtype.element_ty), mask=ok_k[:, None])
