"""Triton window-attention backward, single pass (``_bwd_kernel`` with ``SP``): d = 32, windows larger
than one tile (MixMIM stages 1-3), not deterministic, no coords, no cosine.

Key-major ("transposed") tiles: per window, key tiles of BLOCK_K (128: 8 warps, a warpgroup per 64
keys) one after another, each with its dK and dV in registers, stream the query rows in blocks of
BLOCK_Q (64) and a tail block (16 for 196 rows). Per block: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T,
all (keys x queries), and

* every product but one is a wgmma on sm_90 (mma.sync on sm_80): S^T, dP^T, dV += P^T dO, dK += dS^T Q
  have a key tile as M (P^T, dS^T fed from registers), dQ = dS K the 64-query block (its sum the
  product's accumulator, read and written in that layout); the tail's dQ (M = 16) is an mma.sync.
  dQ of the tiles is summed in the program's fp32 slot ``dqs`` (each element read and written by one
  thread) and stored once per window;
* the head's bias (table + attn_bias over the score scale: ``_bias_tile``) is read as a key-major
  (NK, NQ) tile straight into the S^T product's accumulator (64-bit loads, each thread's addresses
  one base plus constants), and dS^T goes to a key-major padded ``dsum`` by relaxed atomics
  (no fences); padded rows and columns of both are never read, so neither is masked. With group
  labels shared by the batch and no shift, the tile is per head and window position and holds -inf
  where the labels differ: the scores need no select (dS keeps its select: exactly 0 at masked pairs);
* dP^T - delta is one product: its accumulator starts at -delta of each query column (two copies
  per window, one for each of a thread's two rows of a column), loaded like the bias;
* the query rows' -lse and labels come from per-window records (``_row_info``: one 16-byte
  load per row, instead of integer divisions and loads for each of the 16 query columns a thread
  holds).

Padded keys (rows >= N) read zeros and get a -inf bias (or a mask without bias); padded queries
read a real token with lse = +inf (P = 0), dO = 0, and are never stored. A program runs WPP windows
(its scratch slots: records and dQ sums, reused per window).

Loops (static instruction counts): ``for kt in range(0, KT)`` (KT = cdiv(N, BLOCK_K)) around
``for m0 in range(0, Q_FULL, BLOCK_Q)`` (N // BLOCK_Q; the tail block is a separate call).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._wattn_common import _mm_acc, _opaque
from .window_attention import _idx, _keys, _lyx, _mm, _pos


@triton.jit
def _load_pairs(ptrs, ASM: tl.constexpr, RO: tl.constexpr = True):
    """fp32 ``*ptrs`` in the layout of ``ptrs`` (the scores' or a product's accumulator): on the GPU one
    64-bit load per pair of a thread's adjacent columns (their addresses adjacent, the first 8-byte
    aligned), no layout conversion through shared memory. RO: read-only data (the non-coherent path);
    else data this kernel writes (a plain ``ld.global``; pure for the compiler all the same, so that the
    layout pass gives it its consumer's layout: the caller keeps the order, its addresses varying in the
    loop whose barrier follows the stores)."""
    if ASM:
        if RO:
            return tl.inline_asm_elementwise("ld.global.nc.v2.f32 {$0, $1}, [$2];", "=f,=f,l,l", [ptrs],
                                             dtype=tl.float32, is_pure=True, pack=2)
        else:
            return tl.inline_asm_elementwise("ld.global.v2.f32 {$0, $1}, [$2];", "=f,=f,l,l", [ptrs],
                                             dtype=tl.float32, is_pure=True, pack=2)
    else:
        return tl.load(ptrs)


@triton.jit
def _store_pairs(ptrs, val, ASM: tl.constexpr):
    """``*ptrs = val`` (fp32) in the layout of ``val``: on the GPU one 64-bit store per pair of a thread's
    adjacent columns (``_load_pairs``), no layout conversion through shared memory."""
    if ASM:
        tl.inline_asm_elementwise("st.global.v2.f32 [$2], {$4, $5}; mov.b32 $0, 0; mov.b32 $1, 0;",
                                  "=r,=r,l,l,r,r", [ptrs, val.to(tl.int32, bitcast=True)], dtype=tl.int32,
                                  is_pure=False, pack=2)
    else:
        tl.store(ptrs, val)


@triton.jit
def _red_pairs(ptrs, val, ASM: tl.constexpr):
    """``*ptrs += val`` by relaxed atomics (no fences) in the layout of ``ptrs``: on the GPU two 32-bit
    ``red`` per pair of a thread's adjacent columns, the second address the first's + 4 (one register
    pair for both; the 64-bit vector ``red`` needs sm_90, and sm_80 must compile too)."""
    if ASM:
        tl.inline_asm_elementwise(
            "red.relaxed.gpu.global.add.f32 [$2], $4; red.relaxed.gpu.global.add.f32 [$2+4], $5; "
            "mov.b32 $0, 0; mov.b32 $1, 0;", "=r,=r,l,l,r,r",
            [ptrs, val.to(tl.int32, bitcast=True)], dtype=tl.int32, is_pure=False, pack=2)
    else:
        tl.atomic_add(ptrs, val, sem="relaxed")


@triton.jit
def _record(rec, ASM: tl.constexpr):
    """A row's ``_row_info`` record (-lse2, a spare word as fp32; labels as int32): one 16-byte load on the GPU
    (a plain ``ld.global``: the records are written earlier in this kernel)."""
    if ASM:
        a, b, c, d = tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [rec],
                                               dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=False,
                                               pack=1)
        return a.to(tl.float32, bitcast=True), b.to(tl.float32, bitcast=True), c, d
    else:
        return (tl.load(rec), tl.load(rec + 1), tl.load(rec + 2).to(tl.int32, bitcast=True),
                tl.load(rec + 3).to(tl.int32, bitcast=True))


@triton.jit
def _row_info(dout, out, lse, rin, dqs, group, offs, w, h, b, y0, x0, gbase, hd, C, NH, H, W, SH, SW,
              NQ: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
              SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr, IDX64: tl.constexpr):
    """Per query row ``offs`` of the window (padded ones included) a record of four 32-bit words in
    ``rin``: -lse in log2 units (-inf on padded rows), a spare word, the shift-region label, the int32
    group label; and -delta = -rowsum(dO * O) (0 on padded rows) at ``rin + 4 NQ + row`` and again at
    ``rin + 5 NQ + row`` (``_q_keys``: a thread's two rows of a column read different copies). The query
    blocks read a row's record with one 16-byte load (converted to the scores' column layout: a thread
    holds 16 query columns) instead of recomputing positions (integer divisions) and loading per column.
    Also zeroes the rows' dQ sums in ``dqs``."""
    ok = offs < N
    ly, lx = _lyx(offs, N, WW)
    pos, reg = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    orow = (_idx(b * (H * W) + pos, IDX64) * C + hd)[:, None] + tl.arange(0, D)[None, :]
    do = tl.load(dout + orow, mask=ok[:, None], other=0.0)
    o = tl.load(out + orow, mask=ok[:, None], other=0.0)
    tl.store(dqs + offs[:, None] * D + tl.arange(0, D)[None, :], tl.zeros((offs.shape[0], D), tl.float32))
    rec = rin + offs * 4
    tl.store(rec, tl.load(lse + (w * NH + h) * N + offs, mask=ok, other=float("inf")) * -1.4426950408889634)
    nd = -tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(rin + NQ * 4 + offs, nd)
    tl.store(rin + NQ * 5 + offs, nd)
    if SHIFT:
        tl.store(rec + 2, reg.to(tl.float32, bitcast=True))
    if HAS_GROUP:
        if group.dtype.element_ty != tl.int64:
            tl.store(rec + 3, tl.load(group + gbase + pos).to(tl.float32, bitcast=True))


@triton.jit
def _store_dq(dqkv, dqs, offs, b, y0, x0, hd, scale, C, H, W, SH, SW, N: tl.constexpr, D: tl.constexpr,
              WH: tl.constexpr, WW: tl.constexpr, SHIFT: tl.constexpr, IDX64: tl.constexpr):
    """dQ of the query rows ``offs`` (their fp32 sums in ``dqs``) into ``dqkv``; padded rows not stored."""
    ly, lx = _lyx(offs, N, WW)
    pos, _r = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    offs_d = tl.arange(0, D)
    dq = tl.load(dqs + offs[:, None] * D + offs_d[None, :])
    tl.store(dqkv + (_idx(b * (H * W) + pos, IDX64) * (3 * C) + hd)[:, None] + offs_d[None, :],
             (dq * scale).to(dqkv.dtype.element_ty), mask=(offs < N)[:, None])


@triton.jit
def _q_keys(q, do, rin, grp64, offs_q, k, v, dk, dv, ok_k, reg_k, grp_k, offs_k, bt_h, dsum_h, dq_part, qk_scale,
            NQ: tl.constexpr, NK: tl.constexpr, HAS_TB: tl.constexpr, HAS_GROUP: tl.constexpr, SHIFT: tl.constexpr,
            G64: tl.constexpr, TAIL: tl.constexpr, DSUM_MODE: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
            ASM: tl.constexpr):
    """One query block against one key tile, all (keys x queries): the tile's dK/dV updates, its share
    of the block's dQ (unscaled, added to its fp32 sum at ``dq_part`` in place), and dS into ``dsum``."""
    if HAS_TB:
        # the head's bias tile (launcher: table + attn_bias over the score scale, key-major, padded) is
        # the product's accumulator: each thread's addresses are one base plus constants, pairs of
        # queries adjacent, loaded straight into the accumulator's registers
        st = _mm_acc(k, tl.trans(q), _load_pairs(bt_h + offs_k[:, None] * NQ + offs_q[None, :], ASM), F32, UPCAST)
    else:
        st = _mm(k, tl.trans(q), F32, UPCAST)
    # the rows' records read here, next to their use (fewer registers live across the products)
    nlse2, _spare, reg_q, grp_q = _record(rin + offs_q * 4, ASM)
    if G64:
        grp_q = grp64
    st = tl.fma(st, qk_scale, nlse2[None, :])  # log2 units, minus the row's lse
    # HAS_TB: 0 no bias tile; 1 the head's; 2 the head's per window position, with -inf at the pairs the
    # group rule masks (labels shared by the batch, no shift: ``_bias_tile``), so that only dS is masked here.
    # Padded keys: -inf rows of the bias tile (HAS_TB), else masked here; their dS only reaches dQ times
    # their zero K rows, and the padded rows of ``dsum``.
    if SHIFT or HAS_GROUP or not HAS_TB:
        allowed = ok_k[:, None]
        if SHIFT:
            allowed = (reg_k[:, None] == reg_q[None, :]) if HAS_TB else (allowed & (reg_k[:, None] == reg_q[None, :]))
        if HAS_GROUP:
            same = grp_k[:, None] == grp_q[None, :]
            allowed = (allowed & same) if (SHIFT or not HAS_TB) else same
        if HAS_TB != 2:  # (2: the tile holds -inf at the pairs the group rule masks)
            st = tl.where(allowed, st, float("-inf"))
    pt = tl.exp2(st)  # masked: 0; padded queries (lse +inf): 0; a fully masked row: NaN
    # dP^T - delta in one product: its accumulator starts at -delta of each query column (``_row_info``),
    # read in the accumulator's layout (one 8-byte load per pair of a thread's adjacent columns; its rows
    # r and r + 8 from the two copies: one load each, where loads of one address are merged and copied)
    nd = rin + NQ * 4 + ((offs_k // 8) % 2)[:, None] * NQ + offs_q[None, :]
    dst = pt * _mm_acc(v, tl.trans(do), _load_pairs(nd, ASM, False), F32, UPCAST)
    if SHIFT or HAS_GROUP:
        dst = tl.where(allowed, dst, 0.0)  # exactly 0 at pairs the shift/group rule masks (even in a NaN row)
    dv += _mm(pt.to(do.dtype), do, F32, UPCAST)
    dsl = dst.to(q.dtype)
    dk += _mm(dsl, q, F32, UPCAST)
    if TAIL:
        # (M = 16 queries: an mma.sync, half the rate for 16 of 208 rows, where a wgmma over a 64-row padded
        # K^T cost a load and registers per tile; its sum updated by the caller, plain loads and stores)
        dq = _mm(tl.trans(dsl), k, F32, UPCAST)
    else:
        # the block's dQ sum (this program's scratch, (BQ, D) at ``dq_part``) is the product's accumulator,
        # read and written in its register layout (each element by one thread, pairs of d adjacent): no
        # layout conversion through shared memory and no barriers
        dq = _mm_acc(tl.trans(dsl), k, _load_pairs(dq_part, ASM, False), F32, UPCAST)
        _store_pairs(dq_part, dq, ASM)
    if DSUM_MODE == 1:
        # dS sums key-major like the bias tile; their padded rows and columns take the padded pairs
        _red_pairs(dsum_h + offs_k[:, None] * NQ + offs_q[None, :], dst, ASM)
    return dk, dv, dq


@triton.jit
def _q_block(qkv, dout, rin, dqkv, dqs, bt_h, group, dsum_h, m0, b, y0, x0, gbase, hd, qk_scale, scale, C, H, W, SH,
             SW, k, v, dk, dv, ok_k, reg_k, grp_k, offs_k, BQ: tl.constexpr, TAIL: tl.constexpr,
             N: tl.constexpr, NQ: tl.constexpr, NK: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
             HAS_TB: tl.constexpr, HAS_GROUP: tl.constexpr, SHIFT: tl.constexpr, DSUM_MODE: tl.constexpr,
             F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr):
    """One query block against a key tile: dK/dV updates, dS into ``dsum``, the tile's dQ share added to
    the sum in ``dqs`` (fp32, this program's slot).
    The rows' lse, delta and labels come from their ``_row_info`` records."""
    offs_q = m0 + tl.arange(0, BQ)
    q_ok = offs_q < N  # TAIL: the only block with padded queries (masks on the rest fold away)
    ly, lx = _lyx(offs_q, N, WW)
    pos, _r = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    G64: tl.constexpr = HAS_GROUP and group.dtype.element_ty == tl.int64
    grp64 = pos
    if G64:  # (int64 labels: compared at full width, read per column)
        grp64 = tl.load(group + gbase + pos)
    tok = _idx(b * (H * W) + pos, IDX64)
    offs_d = tl.arange(0, D)
    qrow = (tok * (3 * C) + hd)[:, None] + offs_d[None, :]
    q = tl.load(qkv + qrow)
    if TAIL:
        do = tl.load(dout + (tok * C + hd)[:, None] + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    else:
        do = tl.load(dout + (tok * C + hd)[:, None] + offs_d[None, :])
    part = dqs + offs_q[:, None] * D + offs_d[None, :]  # the rows' dQ sums (padded queries have rows too)
    dk, dv, dq = _q_keys(q, do, rin, grp64, offs_q, k, v, dk, dv, ok_k, reg_k, grp_k, offs_k, bt_h, dsum_h, part,
                         qk_scale, NQ, NK, HAS_TB, HAS_GROUP, SHIFT, G64, TAIL, DSUM_MODE, F32, UPCAST, ASM)
    if TAIL:  # (full blocks: updated in _q_keys)
        tl.store(part, tl.load(part) + dq)
    return dk, dv


@triton.jit
def _store_kv(dqkv, dk, dv, offs_k, ok, b, y0, x0, hd, scale, C, H, W, SH, SW, N: tl.constexpr, WH: tl.constexpr,
              WW: tl.constexpr, D: tl.constexpr, SHIFT: tl.constexpr, IDX64: tl.constexpr):
    """dK (times ``scale``) and dV of the key tile ``offs_k`` into ``dqkv``; padded keys not stored."""
    ly, lx = _lyx(offs_k, N, WW)
    pos, _r = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    krow = (_idx(b * (H * W) + pos, IDX64) * (3 * C) + hd)[:, None] + tl.arange(0, D)[None, :]
    tl.store(dqkv + krow + C, (dk * scale).to(dqkv.dtype.element_ty), mask=ok[:, None])
    tl.store(dqkv + krow + 2 * C, dv.to(dqkv.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _sp_window(qkv, dout, out, lse, rin, dqkv, dqs, bt, group, dsum, w, wpos, h, b, y0, x0, gbase, hd, qk_scale, scale,
               C, NH, H, W, SH, SW, BLOCK_K: tl.constexpr, KT: tl.constexpr, BLOCK_Q: tl.constexpr,
               BQ_TAIL: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
               HAS_TB: tl.constexpr, HAS_GROUP: tl.constexpr, SHIFT: tl.constexpr, DSUM_MODE: tl.constexpr,
               F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr):
    """One window-head: KT key tiles of BLOCK_K one after another, each with its dK, dV in registers
    (stored after its pass over the query blocks); dQ summed over the tiles in ``dqs``, stored at the end.
    ``rin``: this program's slot for the rows' records (``_row_info``); ``bt`` the bias tiles, ``dsum``
    the dS sums (both (nH, NK, NQ), key-major)."""
    Q_FULL: tl.constexpr = (N // BLOCK_Q) * BLOCK_Q
    NQ: tl.constexpr = Q_FULL + BQ_TAIL
    NK: tl.constexpr = KT * BLOCK_K
    for r in tl.static_range(Q_FULL // BLOCK_Q):  # (the tail block has a size of its own)
        _row_info(dout, out, lse, rin, dqs, group, r * BLOCK_Q + tl.arange(0, BLOCK_Q), w, h, b, y0, x0, gbase, hd,
                  C, NH, H, W, SH, SW, NQ, N, D, WH, WW, SHIFT, HAS_GROUP, IDX64)
    if BQ_TAIL > 0:
        _row_info(dout, out, lse, rin, dqs, group, Q_FULL + tl.arange(0, BQ_TAIL), w, h, b, y0, x0, gbase, hd, C, NH,
                  H, W, SH, SW, NQ, N, D, WH, WW, SHIFT, HAS_GROUP, IDX64)
    # (a loop, not unrolled: one copy of the tile's code, so one set of hoisted addresses)
    for kt in range(0, KT):
        tl.debug_barrier()  # records, and the previous tile's dQ partials, stored by other threads
        bt_t = bt + ((wpos * NH if HAS_TB == 2 else 0) + h) * (NK * NQ)
        dsum_t = dsum + h * (NK * NQ)
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k, v, ok_k, reg_k, grp_k, _cy, _cx, _code = _keys(
            qkv, group, qkv, qkv, offs_k, b, y0, x0, gbase, gbase, hd, C, H, W, SH, SW, N, WH, WW, D, SHIFT,
            HAS_GROUP, False, True, IDX64, False)
        dk = tl.zeros((BLOCK_K, D), tl.float32)
        dv = tl.zeros((BLOCK_K, D), tl.float32)
        for m0 in range(0, Q_FULL, BLOCK_Q):
            dk, dv = _q_block(qkv, dout, rin, dqkv, dqs, bt_t, group, dsum_t, m0, b, y0, x0, gbase, hd, qk_scale,
                              scale, C, H, W, SH, SW, k, v, dk, dv, ok_k, reg_k, grp_k, offs_k, BLOCK_Q, False,
                              N, NQ, NK, D, WH, WW, HAS_TB, HAS_GROUP, SHIFT, DSUM_MODE, F32, UPCAST,
                              IDX64, ASM)
        if BQ_TAIL > 0:
            # (the tail's -delta addresses through an asm with side effects: invariant, its pure loads would
            # be hoisted out of this loop, above the barrier that orders them after _row_info)
            dk, dv = _q_block(qkv, dout, rin + _opaque(kt * 0, ASM), dqkv, dqs, bt_t, group, dsum_t, Q_FULL, b, y0,
                              x0, gbase, hd, qk_scale,
                              scale, C, H, W, SH, SW, k, v, dk, dv, ok_k, reg_k, grp_k, offs_k, BQ_TAIL, True,
                              N, NQ, NK, D, WH, WW, HAS_TB, HAS_GROUP, SHIFT, DSUM_MODE, F32, UPCAST,
                              IDX64, ASM)
        _store_kv(dqkv, dk, dv, offs_k, ok_k, b, y0, x0, hd, scale, C, H, W, SH, SW, N, WH, WW, D, SHIFT, IDX64)
    tl.debug_barrier()  # dQ sums stored by other threads
    for r in tl.static_range(Q_FULL // BLOCK_Q):
        _store_dq(dqkv, dqs, r * BLOCK_Q + tl.arange(0, BLOCK_Q), b, y0, x0, hd, scale, C, H, W, SH, SW, N, D, WH, WW,
                  SHIFT, IDX64)
    if BQ_TAIL > 0:
        _store_dq(dqkv, dqs, Q_FULL + tl.arange(0, BQ_TAIL), b, y0, x0, hd, scale, C, H, W, SH, SW, N, D, WH, WW,
                  SHIFT, IDX64)
