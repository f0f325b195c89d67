"""Triton fused window attention: backward (forward and the shared helpers in ``window_attention``;
the backward's tiles in ``_wattn_bwd_tiles`` and ``_wattn_bwd_sp``).

P is recomputed from the forward's row log-sum-exp, ``dS = P * (dP - delta)`` with
``delta = rowsum(dO * O)`` computed in the kernel (no pre-pass: O is read once instead of dO
twice), ``dS`` is exactly 0 at pairs the shift/group rule masks (even in a NaN row).

* Windows that fit one tile (N <= 64: Swin/MixMIM window 7, UM-MAE window 8): a program owns
  a head and a chunk of windows; per window one tile gives dQ, dK, dV directly, and dS is
  summed over the chunk in registers, stored once per program, then summed over programs in a
  fixed order: bias gradients are deterministic at no cost (the ``deterministic`` flag is moot).
* Larger windows with d = 32 (MixMIM stages 1-3: 196 tokens), not deterministic, no coords, no
  cosine: the single pass (``_wattn_bwd_sp``), key-major tiles, every product but the tail's dQ a
  wgmma on sm_90. A program owns a head and a run of windows (as many as give the fewest
  window-heads on the busiest SM: ``_sp_stride``); per window, key tiles of 128 one after another,
  each with its dK, dV in registers, stream the query blocks (64, and a tail block of 16); dQ is
  summed over the tiles in the program's fp32 slot and stored once. The bias gradient goes to a
  padded key-major ``dsum`` (nH, NK, NQ) by relaxed atomics. Batch-shared group labels (no shift)
  are folded into the bias tile (one per head and window position, -inf where labels differ),
  built by one launch before the kernel (``_sp_bias_kernel``, which also zeroes ``dsum``).
* Other larger windows: a program owns a (window, head); phase 1 walks the key blocks and, for
  each, all query tiles (dK, dV of the block complete, and the bias gradient), phase 2 walks the
  query tiles and, for each, all key blocks (dQ complete): S and P are computed twice instead of
  keeping dQ of every tile live (registers) or accumulating it in memory. The bias gradient (dS
  summed over windows) goes to ``dsum`` (nH, N, N) with relaxed atomics (no fences;
  non-deterministic order), or, ``deterministic=True``, to a per-program slot with plain
  read-modify-writes and a fixed-order sum over programs.
* With coords the table index depends on the window: relaxed atomics into the table, or
  (deterministic) fixed-order per-entry sums over each tile's index box (slow; correct).
Padded query rows compute on a real token with lse = +inf (P = 0), dO = O = 0, and are never
stored or accumulated; padded keys are zeros masked by position.
* Cosine mode (SwinV2, ``COSINE``): dQ and dK of the normalized rows (times the head scale)
  are mapped back through the normalization where stored, and the logit-scale gradient per
  head is summed like the bias gradients (single tile: P and delta recomputed from the whole
  row, in-register sums, fixed-order slots; larger windows: the two phases, never the single
  pass, with sums of dS * (s - rowmean_P(s)) that no rounding of lse or O shifts).

Loops (for static instruction counts): ``_bwd_kernel`` ``for i in range(0, WPP)`` (WPP times;
folded away when 1, the two-phase case); phase A ``for m0 in range(0, M_FULL, BLOCK_M)``
(N // BLOCK_M) around ``_p2_tile``'s ``for n0 in range(0, N_FULL, BLOCK_N)`` (N // BLOCK_N,
also once more for the tail query tile); phase B ``for n0 in range(0, NB_FULL, BLOCK_NB)``
(N // BLOCK_NB) around ``_p1_block``'s ``for m0 in range(0, M_FULL, BLOCK_M)`` (N // BLOCK_M,
also once more for the tail key block); the single pass's ``for kt in range(0, KT)`` around
``for m0 in range(0, Q_FULL, BLOCK_Q)`` (N // BLOCK_N). The deterministic coords sums
(``while`` loops over each tile's index box) depend on the data.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cosine import _head_scale, _store_unit_grad, dlogit_scale
from ._wattn_bwd_sp import _sp_window
from ._wattn_coords import _add_coord_bias
from ._wattn_bwd_tiles import _bias_grads, _bwd_rows, _p1_block, _p2_tile, _probs, _t_bias
from .window_attention import (_INTERPRET, _LOG2E, _alloc_for, _codes, _first_window, _flags, _idx, _keys, _lyx, _mm,
                               _next_window, _pos, _single, _tables, _tail)

__all__ = ["window_attention_backward"]


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _bwd_kernel(dout, qkv, out, lse, dlt, dqkv, tab, abias, group, coords, codes, dsum, dtab, ls, dls, dqs,
                qk_scale, scale, NH, H, W, nW, nWw, SH, SW, GG, GC, RH, RW, BNW, STRIDE, W0,
                WPP: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                SINGLE: tl.constexpr, BS: tl.constexpr,
                BLOCK_M: tl.constexpr, BM_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BN_TAIL: tl.constexpr,
                BLOCK_NB: tl.constexpr, BNB_TAIL: tl.constexpr, SP: tl.constexpr, RELOAD: tl.constexpr,
                HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
                HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, DSUM_MODE: tl.constexpr, TAB_MODE: tl.constexpr,
                F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr,
                COSINE: tl.constexpr = False, DLS_MODE: tl.constexpr = 0, KT: tl.constexpr = 1,
                SP_TB: tl.constexpr = 0):
    """Program (head h, chunk c): windows c*STRIDE + W0 + [0, WPP) of head h (WPP == STRIDE, W0 == 0
    when the program loops over its chunk; WPP == 1 when the launcher loops, one launch per W0).

    DSUM_MODE (dS summed over windows, (nH,N,N), for attn_bias and the table without coords):
    0 none; 1 relaxed atomics into dsum; 2 read-modify-write of this program's slot dsum[c]
    (chunks,nH,N,N); 3 (single tile) summed in registers, one store into dsum[c].
    TAB_MODE (table with coords, in drpb's (T,nH) layout): 0 none; 1 relaxed atomics into dtab
    (drpb itself); 2 this program's slot dtab[c] (chunks,T,nH), fixed-order per-entry sums.
    COSINE (SwinV2, ``_cosine``): ``scale`` becomes the head scale (dQ, dK w.r.t. the normalized
    rows), mapped through the normalization where stored. DLS_MODE (logit-scale gradient partials):
    0 none; 1 relaxed atomics into dls (nH,); 2 read-modify-write of dls[c] (chunks, nH); 3 (single
    tile) summed in registers, one store into dls[c]. Multi-tile cosine runs the two phases (no SP).
    """
    h = tl.program_id(0)
    c = tl.program_id(1)
    if COSINE:
        scale = _head_scale(ls, h)
        qk_scale = scale * 1.4426950408889634
    C = NH * D
    hd = h * D
    T = (2 * RH - 1) * (2 * RW - 1)
    if SINGLE:  # the launcher passes rpb (T, nH) itself (``_tables``, raw): read in place
        tab_h = tab + h
    else:
        tab_h = tab + h * T
    ab_h = abias + h * (N * N)
    slot = c if (DSUM_MODE == 2 or DSUM_MODE == 3) else 0
    dsum_h = dsum + (slot * NH + h) * (N * N)
    dtab_h = dtab + (c if TAB_MODE == 2 else 0) * (T * NH) + h  # (T, nH), drpb's layout: stride NH
    w, b, wy, wx = _first_window(c * STRIDE + W0, nW, nWw)
    if SINGLE:
        # Single tile (one query tile, one key block): the window-invariant bias tile once per program.
        offs_m = tl.arange(0, BS)
        offs_n = tl.arange(0, BS)
        ly_n, lx_n = _lyx(offs_n, N, WW)
        col_ok = offs_n < N
        row_ok = offs_m < N
        HAS_T_BIAS: tl.constexpr = (HAS_RPB and not HAS_COORDS) or HAS_BIAS
        code_n = ly_n * (2 * WW - 1) + lx_n
        ly_m, lx_m = _lyx(offs_m, N, WW)
        ab_m = ab_h + tl.minimum(offs_m, N - 1) * N
        # (tab_m: rows of rpb's column h (stride NH), read here only without coords; _t_bias takes its shape)
        tab_m = tab_h + (ly_m * (2 * WW - 1) + lx_m + ((WH - 1) * (2 * WW - 1) + WW - 1)) * NH
        inv_bias = _t_bias(tab_h, tab_m, code_n, lx_m, lx_m, lx_n, lx_n, ab_m, offs_n, col_ok, RH, RW,
                           False, HAS_BIAS, False, True, ASM)
        if HAS_RPB and not HAS_COORDS:  # rpb's column h, scaled to log2 units here, once per program
            inv_bias += _t_bias(tab_h, tab_m, code_n * NH, lx_m, lx_m, lx_n, lx_n, ab_m, offs_n, col_ok, RH,
                                RW, True, False, False, True, ASM) * 1.4426950408889634
        dsum_acc = tl.zeros((BS, BS), tl.float32)
        dls_rows = tl.zeros((BS,), tl.float32)
        offs_d = tl.arange(0, D)
        for i in range(0, WPP):
            if w < BNW:
                y0, x0, gbase, cbase = wy * WH, wx * WW, (b % GG) * (H * W), (b % GC) * (H * W)
                q, do, delta, lse2, reg_m, grp_m, cy_m, cx_m, _tm, _am, tok, _ro = _bwd_rows(
                    qkv, dout, out, lse, lse, group, coords, tab_h, ab_h, offs_m, w, h, b, y0, x0, gbase, cbase, hd,
                    C, NH, H, W, SH, SW, N, D, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS, 3 if COSINE else 0, IDX64,
                    COSINE=COSINE)
                k, v, _ok, reg_n, grp_n, cy_n, cx_n, _cn = _keys(
                    qkv, group, coords, codes, offs_n, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW, N, WH, WW, D,
                    SHIFT, HAS_GROUP, HAS_COORDS, True, IDX64, ASM, COSINE)
                tb = inv_bias
                if HAS_RPB and HAS_COORDS:
                    tb = _add_coord_bias(tb, tab_h, cy_m, cx_m, cy_n, cx_n, RH, RW, NH, True, ASM)  # rpb in place
                p, ds, _qk = _probs(q, k, v, do, delta, lse2, tb, reg_m, reg_n, grp_m, grp_n, col_ok, qk_scale,
                                    HAS_RPB or HAS_BIAS, SHIFT, HAS_GROUP, True, F32, UPCAST, COSINE)
                if COSINE:
                    # dS into the bias sum and dV out first: fewer tiles live next to the projections.
                    # rowsum(dS) = 0 here (EXACT): the logit-scale gradient is sum_i <q_hat_i, dq_hat_i>.
                    if DSUM_MODE == 3:
                        dsum_acc += ds
                    pos_n, _r = _pos(ly_n, lx_n, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
                    krow = _idx(b * (H * W) + pos_n, IDX64) * (3 * C) + hd
                    tl.store(dqkv + krow[:, None] + 2 * C + offs_d[None, :],
                             _mm(tl.trans(p.to(do.dtype)), do, F32, UPCAST).to(dqkv.dtype.element_ty),
                             mask=col_ok[:, None])
                    dsl = ds.to(q.dtype)
                    dot = _store_unit_grad(dqkv, qkv, (tok * (3 * C) + hd)[:, None] + offs_d[None, :],
                                           _mm(dsl, k, F32, UPCAST) * scale, row_ok[:, None])
                    if DLS_MODE == 3:
                        dls_rows += tl.where(row_ok, dot, 0.0)
                    _store_unit_grad(dqkv, qkv, krow[:, None] + C + offs_d[None, :],
                                     _mm(tl.trans(dsl), q, F32, UPCAST) * scale, col_ok[:, None])
                else:
                    dv = _mm(tl.trans(p.to(do.dtype)), do, F32, UPCAST)
                    dsl = ds.to(q.dtype)
                    dq = _mm(dsl, k, F32, UPCAST)
                    dk = _mm(tl.trans(dsl), q, F32, UPCAST)
                    tl.store(dqkv + (tok * (3 * C) + hd)[:, None] + offs_d[None, :],
                             (dq * scale).to(dqkv.dtype.element_ty), mask=row_ok[:, None])
                    pos_n, _r = _pos(ly_n, lx_n, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
                    krow = _idx(b * (H * W) + pos_n, IDX64) * (3 * C) + hd
                    tl.store(dqkv + krow[:, None] + C + offs_d[None, :], (dk * scale).to(dqkv.dtype.element_ty),
                             mask=col_ok[:, None])
                    tl.store(dqkv + krow[:, None] + 2 * C + offs_d[None, :], dv.to(dqkv.dtype.element_ty),
                             mask=col_ok[:, None])
                    if DSUM_MODE == 3:
                        dsum_acc += ds  # padded rows/cols: never stored
                _bias_grads(ds, offs_m, offs_n, row_ok, col_ok, cy_m, cx_m, cy_n, cx_n, dsum_h, dtab_h, RH, RW, NH,
                            N, 0 if DSUM_MODE == 3 else DSUM_MODE, TAB_MODE, ASM)
            w, b, wy, wx = _next_window(w, b, wy, wx, nW // nWw, nWw)
        if DSUM_MODE == 3:
            tl.store(dsum_h + offs_m[:, None] * N + offs_n[None, :], dsum_acc,
                     mask=row_ok[:, None] & col_ok[None, :])
        if DLS_MODE == 3:
            tl.store(dls + c * NH + h, tl.sum(dls_rows, 0))
    elif SP:
        # Single pass (SP, ``_wattn_bwd_sp``): KT key tiles of BLOCK_M keys (8 warps) one after another,
        # dK/dV of a tile in registers, query blocks of BLOCK_N streamed. ``tab``: the launcher's
        # (nH, NK, NQ) bias tile (NQ the padded query count, NK = KT * BLOCK_M); this program's slots:
        # the rows' records in ``dlt`` (NQ x 4 words, then -delta of the NQ rows, twice), fp32 dQ partials in ``dqs``
        # (NQ x D).
        NQ: tl.constexpr = (N // BLOCK_N) * BLOCK_N + BN_TAIL
        NK: tl.constexpr = KT * BLOCK_M
        slot = c * NH + h
        for i in range(0, WPP):
            if w < BNW:
                y0, x0, gbase = wy * WH, wx * WW, (b % GG) * (H * W)
                _sp_window(qkv, dout, out, lse, dlt + slot * (NQ * 6), dqkv, dqs + slot * (NQ * D), tab,
                           group, dsum, w, wy * nWw + wx, h, b, y0, x0, gbase, hd, qk_scale, scale, C, NH, H, W, SH,
                           SW, BLOCK_M, KT, BLOCK_N, BN_TAIL, N, D, WH, WW, SP_TB, HAS_GROUP, SHIFT,
                           DSUM_MODE, F32, UPCAST, IDX64, ASM)
                tl.debug_barrier()  # the next window's records and partials overwrite this one's
            w, b, wy, wx = _next_window(w, b, wy, wx, nW // nWw, nWw)
    else:
        N_FULL: tl.constexpr = (N // BLOCK_N) * BLOCK_N
        M_FULL: tl.constexpr = (N // BLOCK_M) * BLOCK_M
        for i in range(0, WPP):
            if w < BNW:
                y0, x0, gbase, cbase = wy * WH, wx * WW, (b % GG) * (H * W), (b % GC) * (H * W)
                # phase A: dQ per query tile (and delta, kept for phase B)
                dls_w = qk_scale * 0.0
                for m0 in range(0, M_FULL, BLOCK_M):
                    r = _p2_tile(qkv, dout, out, lse, dlt, dqkv, tab_h, ab_h, group, coords, codes, m0, w, h, b, y0,
                                 x0, gbase, cbase, hd, qk_scale, scale, C, NH, H, W, SH, SW, RH, RW, BLOCK_M, N, D, WH,
                                 WW, BLOCK_N, BN_TAIL, HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST,
                                 IDX64, RELOAD, ASM, COSINE)
                    if COSINE:
                        dls_w += r
                if BM_TAIL > 0:
                    r = _p2_tile(qkv, dout, out, lse, dlt, dqkv, tab_h, ab_h, group, coords, codes, M_FULL, w, h, b,
                                 y0, x0, gbase, cbase, hd, qk_scale, scale, C, NH, H, W, SH, SW, RH, RW, BM_TAIL, N, D,
                                 WH, WW, BLOCK_N, BN_TAIL, HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST,
                                 IDX64, RELOAD, ASM, COSINE)
                    if COSINE:
                        dls_w += r
                if DLS_MODE == 1:
                    tl.atomic_add(dls + h, dls_w, sem="relaxed")
                if DLS_MODE == 2:  # this program's slot: every thread reads before one writes
                    old = tl.load(dls + c * NH + h)
                    tl.debug_barrier()
                    tl.store(dls + c * NH + h, old + dls_w)
                tl.debug_barrier()  # delta stored by other threads of this program
                # phase B: dK, dV per key block, bias gradients
                NB_FULL: tl.constexpr = (N // BLOCK_NB) * BLOCK_NB
                for n0 in range(0, NB_FULL, BLOCK_NB):
                    _p1_block(qkv, dout, out, lse, dlt, dqkv, tab_h, ab_h, group, coords, codes, dsum_h, dtab_h, n0, w,
                              h, b, y0, x0, gbase, cbase, hd, qk_scale, scale, C, NH, H, W, SH, SW, RH, RW, BLOCK_NB,
                              False, N, D, WH, WW, BLOCK_M, BM_TAIL, HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT,
                              DSUM_MODE, TAB_MODE, F32, UPCAST, IDX64, ASM, COSINE)
                if BNB_TAIL > 0:
                    _p1_block(qkv, dout, out, lse, dlt, dqkv, tab_h, ab_h, group, coords, codes, dsum_h, dtab_h,
                              NB_FULL, w, h, b, y0, x0, gbase, cbase, hd, qk_scale, scale, C, NH, H, W, SH, SW, RH, RW,
                              BNB_TAIL, True, N, D, WH, WW, BLOCK_M, BM_TAIL, HAS_RPB, HAS_BIAS, HAS_GROUP,
                              HAS_COORDS, SHIFT, DSUM_MODE, TAB_MODE, F32, UPCAST, IDX64, ASM, COSINE)
            w, b, wy, wx = _next_window(w, b, wy, wx, nW // nWw, nWw)


@triton.jit
def _sum_chunks_kernel(part, res, M, n_chunks: tl.constexpr, BLOCK: tl.constexpr, U: tl.constexpr):
    """res[i] = sum_c part[c, i] in chunk order (deterministic); U (divides n_chunks) chunks per step,
    their loads in flight together (one chunk's alone leaves the few programs latency-bound)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < M
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, n_chunks, U):
        for u in tl.static_range(U):
            acc += tl.load(part + (c + u) * M + offs, mask=msk, other=0.0)
    tl.store(res + offs, acc, mask=msk)


@triton.jit
def _gather_table_kernel(dsum, drpb, NH, HS: tl.constexpr, SI: tl.constexpr, SJ: tl.constexpr, N: tl.constexpr,
                         N_PAD: tl.constexpr, NH_PAD: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr):
    """drpb[t, h] = sum of dsum[h, i, j] over the pairs with Swin relative index t (fixed order);
    ``dsum`` strides: HS (head), SI (query), SJ (key) (the single pass's is key-major and padded)."""
    t = tl.program_id(0)
    ty = t // (2 * WW - 1)
    tx = t % (2 * WW - 1)
    offs_h = tl.arange(0, NH_PAD)
    # many heads: the queries in chunks of CH summed elementwise, then one reduction across the chunk's
    # lanes (a reduction over all N_PAD queries at once costs a shuffle tree per head row held)
    CH: tl.constexpr = 32 if NH_PAD >= 16 and N_PAD > 32 else N_PAD
    acc = tl.zeros((NH_PAD, CH), tl.float32)
    for c in tl.static_range(N_PAD // CH):
        offs_i = c * CH + tl.arange(0, CH)
        jy = offs_i // WW - ty + WH - 1
        jx = offs_i % WW - tx + WW - 1
        ok = (offs_i < N) & (jy >= 0) & (jy < WH) & (jx >= 0) & (jx < WW)
        j = jy * WW + jx
        vals = tl.load(dsum + offs_h[:, None] * HS + offs_i[None, :] * SI + j[None, :] * SJ,
                       mask=(offs_h[:, None] < NH) & ok[None, :], other=0.0)
        if c == 0:
            acc = vals
        else:
            acc += vals
    tl.store(drpb + t * NH + offs_h, tl.sum(acc, 1), mask=offs_h < NH)


@triton.jit
def _sp_bias_kernel(rpb, abias, group, tile, dsum, inv_scale, NH, W, nWw, N: tl.constexpr, WH: tl.constexpr,
                    WW: tl.constexpr, NK: tl.constexpr, NQ: tl.constexpr, BK: tl.constexpr, BQ: tl.constexpr,
                    HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, LABELS: tl.constexpr, ZERO: tl.constexpr):
    """The single pass's bias tile (``_bias_tile``'s spec) in one launch. Program (p, key block kb):
    tile p = w * NH + h (LABELS: per window position w) or h, keys [kb * BK, +BK), every query.
    [p, key j, query i] = (rpb[Swin index(i, j), h] + abias[h, i, j]) * inv_scale (fp32 1 / scale), 0 at
    padded queries, -inf at padded keys and (LABELS) where the labels of i and j (batch-shared
    ``group`` (1, H, W) at window position w, compared at full width) differ. ZERO: the programs of
    w = 0 also zero the same block of the bias-gradient sums ``dsum`` (nH, NK, NQ) (their atomics'
    target: no memset of its own)."""
    p = tl.program_id(0)
    h = p % NH
    offs_k = tl.program_id(1) * BK + tl.arange(0, BK)
    offs_q = tl.arange(0, BQ)
    kin = offs_k < N
    qin = offs_q < N
    both = kin[:, None] & qin[None, :]
    lyk = offs_k // WW
    lxk = offs_k % WW
    lyq = offs_q // WW
    lxq = offs_q % WW
    val = tl.zeros((BK, BQ), tl.float32)
    if HAS_RPB:  # table row (y_i - y_j + WH - 1) * (2WW - 1) + x_i - x_j + WW - 1; rpb (T, nH) read in place
        row = rpb + h + ((WH - 1) * (2 * WW - 1) + WW - 1 - (lyk * (2 * WW - 1) + lxk)) * NH  # per key
        val = tl.load(row[:, None] + ((lyq * (2 * WW - 1) + lxq) * NH)[None, :], mask=both, other=0.0)
    if HAS_BIAS:
        val += tl.load(abias + h * (N * N) + offs_q[None, :] * N + offs_k[:, None], mask=both, other=0.0)
    val = val * inv_scale  # (a product: IEEE division costs ~10 instructions and an RCP per element)
    if LABELS:
        w = p // NH
        wy = w // nWw
        wx = w % nWw
        gk = tl.load(group + (wy * WH + lyk) * W + wx * WW + lxk, mask=kin)
        gq = tl.load(group + (wy * WH + lyq) * W + wx * WW + lxq, mask=qin)
        val = tl.where((gk[:, None] == gq[None, :]) | (offs_q >= N)[None, :], val, float("-inf"))
    val = tl.where(kin[:, None], val, float("-inf"))
    inb = (offs_k < NK)[:, None] & (offs_q < NQ)[None, :]
    blk = offs_k[:, None] * NQ + offs_q[None, :]
    tl.store(tile + p * (NK * NQ) + blk, val, mask=inb)
    if ZERO:
        if p < NH:
            tl.store(dsum + h * (NK * NQ) + blk, tl.zeros((BK, BQ), tl.float32), mask=inb)


# ----------------------------------------------------------------------------- launchers

# Deterministic multi-tile backward and every single-tile backward: about this many programs
# (chunks x heads), a function of the shape only, so that the summation order, hence the bits,
# never depends on the GPU. Small under the interpreter so that tests run several windows per
# program.
_PROGRAMS = 2 if _INTERPRET else 1024
# Single pass: at most this many windows per program (a program's scratch slots, its rows' records
# and fp32 dQ sums, are reused by its windows; fewer programs, less scratch). One program per SM is
# resident (~240 registers x 256 threads), so the windows per program are chosen for the fewest
# window-heads on the busiest SM (``_sp_stride``), on an SM count of the GPU's (H100/H200: 132).
_SP_WPP = 2 if _INTERPRET else 64
_SUM_BLOCK, _SUM_WARPS = 512, 8  # 2 fp32 per thread, U chunks' loads in flight
_SP_SMS = 132


def _sp_stride(bnw, num_heads, device):
    """Windows per program of the single pass: the one with the fewest window-heads per SM when its
    ceil(bnw / stride) x num_heads programs run one at a time per SM (the largest on ties: fewer
    programs, fewer per-program prologues). MixMIM-B stage 1 (2048 windows, 4 heads): 63 (132
    programs, 63 window-heads per SM, where 16 gave 4 x 16)."""
    if _INTERPRET:
        return _SP_WPP
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else _SP_SMS
    best, best_t = 1, None
    for s in range(1, min(_SP_WPP, bnw) + 1):
        t = -(-(-(-bnw // s) * num_heads) // sms) * s
        if best_t is None or t <= best_t:
            best, best_t = s, t
    return best


def _maxnreg(sp):
    """An explicit register cap for the single pass: at the same 255, ptxas allocates under a cap
    without the few cold spills it leaves when uncapped (measured, Triton 3.9's ptxas)."""
    return {"maxnreg": 255} if sp and not _INTERPRET else {}


def _bwd_config(N, D, single, no_sp, f32):
    """(BLOCK_M, BLOCK_N, BLOCK_N of phase B, num_warps, num_stages, single pass).

    Windows larger than one tile with d = 32 (MixMIM stages 1-3) take the single pass (``_wattn_bwd_sp``):
    key tiles of BLOCK_M = 128 keys (8 warps, a warpgroup per 64 keys: every product's M is a
    warpgroup's 64 rows, so all five are wgmma on sm_90), query blocks of BLOCK_N = 64 (dQ's M; 32
    scores per thread next to dK, dV: 247 registers, no spills) and a tail block of 16 (196 rows cost
    208; its dQ an mma.sync of M = 16: half the rate for 16 of 208 rows, where a wgmma over a 64-row
    padded K^T cost a load and registers per tile, 384 against 545 instructions per tile outside the
    query loop). Other head dims, coords (exact int64 index math), cosine, the
    deterministic mode (``no_sp``) and, on the GPU, fp32 inputs (exact fp32 products are FMA loops,
    far too wide for those tiles; the interpreter runs fp32 through the single pass too, so that its
    tests check it in exact arithmetic) take the two phases: phase B keeps dK and dV of its key block
    live across every query tile, so its blocks are narrow (16 keys); d >= 64 halves the query
    tiles and re-reads them per key block in phase A (RELOAD). A single tile with d >= 64 (dQ, dK,
    dV all live) takes 8 warps: the backward has no row reductions, so splitting its columns
    across warps is free. The interpreter's tiles exercise every loop and tail (single pass:
    query blocks of 32 and tails of 16 or 32, 16-key tiles)."""
    if _INTERPRET:
        sp = not single and D == 32 and not no_sp
        return 16, (32 if sp else 16), 16, 1, 1, sp
    if single:
        return 64, 32, 16, (8 if D >= 64 else 4), 1, False
    if D == 32 and not no_sp and not f32:
        return 128, 64, 16, 8, 1, True
    return (32, 16, 16, 4, 1, False) if D >= 64 else (64, 32, 16, 4, 1, False)


def _bias_tile(rpb, attn_bias, group, wh, ww, nh, nk, nq, scale, qkv, dsum):
    """The single pass's bias: (nH, NK, NQ) fp32, [h, key j, query i] = (table[Swin index(i, j), h] +
    attn_bias[h, i, j]) * fp32(1 / scale) (the kernel scales it with the scores); padded keys -inf (masked by
    position), padded queries 0; a dummy (never read) without bias. ``group`` (1, H, W) (labels shared
    by the batch, no shift) or None: then (nW * nH, NK, NQ), one tile per window position with -inf
    where the labels differ (the kernel's scores need no select there). One launch
    (``_sp_bias_kernel``), which also zeroes ``dsum`` (nH, NK, NQ) unless None; inputs contiguous."""
    if rpb is None and attn_bias is None and group is None:
        return qkv
    _, H, W, _ = qkv.shape
    nw = (H // wh) * (W // ww) if group is not None else 1
    tile = torch.empty((nw * nh, nk, nq), dtype=torch.float32, device=qkv.device)
    bk = 32 if nk % 32 == 0 else 16  # nk: a multiple of the key tile (16 or 128); 32 rows amortize the columns
    _sp_bias_kernel[(nw * nh, nk // bk)](
        qkv if rpb is None else rpb.contiguous(), qkv if attn_bias is None else attn_bias,
        qkv if group is None else group, tile, tile if dsum is None else dsum, 1.0 / float(scale), nh, W, W // ww,
        N=wh * ww, WH=wh, WW=ww, NK=nk, NQ=nq, BK=bk, BQ=triton.next_power_of_2(nq), HAS_RPB=rpb is not None,
        HAS_BIAS=attn_bias is not None, LABELS=group is not None, ZERO=dsum is not None, num_warps=4)
    return tile


def window_attention_backward(dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords,
                              rh, rw, scale, need_drpb, need_dbias, deterministic, logit_scale=None, need_dls=False):
    """Backward. dout/out (B,H,W,C), lse from the forward; other arguments as the forward.

    Returns (dqkv (B,H,W,3C) qkv.dtype, drpb fp32 like rpb or empty, dbias fp32 (nH,N,N) or
    empty). dq/dk/dv are written straight into the qkv layout (every element exactly once).
    Bias gradients are sums of dS over all windows and images; see the module docstring for
    which are deterministic (all of them with ``deterministic=True``; the single-tile ones always).
    Cosine mode (``logit_scale`` fp32 (nH,) given; ``scale`` unused): a fourth output, the
    logit-scale gradient fp32 (nH,) (empty unless ``need_dls``), deterministic like the bias ones.
    """
    alloc = _alloc_for()
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    N = wh * ww
    dev = qkv.device
    nWw = W // ww
    nW = (H // wh) * nWw
    bnw = B * nW
    dqkv = alloc(qkv.shape, qkv.dtype, dev)
    T = (2 * rh - 1) * (2 * rw - 1)
    want_dsum = need_dbias or (need_drpb and coords is None)
    want_tab = need_drpb and coords is not None
    # The deterministic coords table sums (box loops) need the narrow tiles of the two-phase
    # path: on one 64x64 tile they exceed the register file.
    single = _single(N) and not (want_tab and deterministic)
    cosine = logit_scale is not None
    no_sp = deterministic or coords is not None or cosine or scale == 0  # (scale: the bias tile is over it)
    bm, bn, bnb, warps, stages, sp = _bwd_config(N, D, single, no_sp, qkv.dtype == torch.float32)
    kt = triton.cdiv(N, bm) if sp else 1
    # single pass: the bias tile per head (1), or per head and window position with the group mask in it
    # (2: labels shared by the batch, no shift), or none (0)
    sp_tb = 0 if not sp else (2 if group is not None and group.shape[0] == 1 and sh == 0 and sw == 0 else
                              (1 if rpb is not None or attn_bias is not None else 0))
    if sp:  # windows per program (a constexpr): the fewest window-heads on the busiest SM
        stride = _sp_stride(bnw, num_heads, dev)
        chunks = -(-bnw // stride)
    elif single or deterministic:
        chunks = max(1, min(bnw, -(-_PROGRAMS // num_heads)))
        stride = triton.next_power_of_2(-(-bnw // chunks))  # few distinct loop counts (constexprs)
        chunks = -(-bnw // stride)
    else:
        chunks, stride = bnw, 1
    # The in-kernel window loop (single tile, in-register dS sums) adds live ranges that the
    # multi-tile kernel cannot afford; there the launcher loops instead, one launch per window of
    # every chunk (stream order keeps each program's partial sums in a fixed order).
    outer = stride > 1 and not single and not sp
    dsum_mode = 0 if not want_dsum else (3 if single else (2 if deterministic else 1))
    tab_mode = 0 if not want_tab else (2 if deterministic else 1)
    f32 = dict(dtype=torch.float32, device=dev)
    per_chunk = dsum_mode in (2, 3)
    nq = (N // bn) * bn + _tail(N, bn)  # the single pass's padded query count
    # the single pass's dS sums: (nH, NK, NQ) key-major, padded rows and columns written unmasked
    dpad = (kt * bm, nq) if sp else (N, N)
    run = bnw > 0 and num_heads * D > 0
    # the single pass's bias-tile launch zeroes dsum (its atomics' target) when it runs
    zero_in_tile = sp and run and sp_tb != 0 and dsum_mode == 1
    if want_dsum:
        shape = ((chunks,) if per_chunk else ()) + (num_heads,) + dpad
        dsum = alloc(shape, torch.float32, dev) if dsum_mode == 3 or zero_in_tile else torch.zeros(shape, **f32)
    else:
        dsum = lse
    # the coords table gradient in drpb's (T, nH) layout: atomics (mode 1) or slots (2) summed into drpb, no transpose
    dtab = torch.zeros(((chunks,) if tab_mode == 2 else ()) + (T, num_heads), **f32) if want_tab else lse
    dls_mode = 0 if not (cosine and need_dls) else (3 if single else (2 if deterministic else 1))
    dls = torch.zeros(((chunks,) if dls_mode in (2, 3) else ()) + (num_heads,), **f32) if dls_mode else lse
    if run:
        if sp:
            tab, ab = _bias_tile(rpb, attn_bias, group if sp_tb == 2 else None, wh, ww, num_heads, kt * bm, nq,
                                 float(scale), qkv, dsum if zero_in_tile else None), qkv
        else:
            tab, ab = _tables(rpb, attn_bias, qkv, num_heads, raw=single)
        G = (1 if group is None else group.shape[0], 1 if coords is None else coords.shape[0])
        if sp:  # per program: the rows' records (lse, delta, code, label)
            dlt = torch.empty((chunks * num_heads, nq * 6), **f32)
        else:  # delta = rowsum(dO * O), phase A -> phase B
            dlt = lse if single else torch.empty_like(lse)
        dqs = torch.empty((chunks * num_heads, nq, D), **f32) if sp else lse
        for w0 in range(stride if outer else 1):
            _bwd_kernel[(num_heads, chunks)](
                dout, qkv, out, lse, dlt, dqkv, tab, ab, qkv if group is None else group,
                qkv if coords is None else coords, _codes(wh, ww, dev), dsum, dtab,
                qkv if logit_scale is None else logit_scale, dls, dqs, float(scale) * _LOG2E, float(scale), num_heads,
                H, W, nW, nWw, sh, sw, *G, rh, rw, bnw, stride, w0,
                WPP=1 if outer else stride, N=N, D=D, WH=wh, WW=ww, SINGLE=single,
                BS=max(16, triton.next_power_of_2(N)), BLOCK_M=bm, BM_TAIL=_tail(N, bm), BLOCK_N=bn,
                BN_TAIL=_tail(N, bn), BLOCK_NB=bnb, BNB_TAIL=_tail(N, bnb), SP=sp, RELOAD=D >= 64,
                DSUM_MODE=dsum_mode, KT=kt, SP_TB=sp_tb,
                TAB_MODE=tab_mode, COSINE=cosine, DLS_MODE=dls_mode,
                ASM=not _INTERPRET, IDX64=qkv.numel() >= 2**31, num_warps=warps, num_stages=stages,
                **_flags(qkv, rpb, attn_bias, group, coords, sh, sw), **_maxnreg(sp),
            )

    def reduce(part, per):
        if not per:
            return part
        res = alloc(part.shape[1:], torch.float32, dev)
        M = res.numel()
        if M:
            u = next(u for u in (8, 4, 2, 1) if chunks % u == 0)
            _sum_chunks_kernel[(triton.cdiv(M, _SUM_BLOCK),)](part, res, M, n_chunks=chunks, BLOCK=_SUM_BLOCK, U=u,
                                                             num_warps=_SUM_WARPS)
        return res

    dsum = reduce(dsum, per_chunk) if want_dsum else None
    dsum_t = dsum.transpose(1, 2) if sp and want_dsum else dsum  # (nH, queries, keys)
    if need_dbias:  # (outputs must not alias each other)
        dbias = dsum if not sp else dsum_t[:, :N, :N].contiguous()
    else:
        dbias = torch.empty((0,), **f32)
    if not need_drpb:
        drpb = torch.empty((0,), **f32)
    elif coords is not None:
        drpb = reduce(dtab, tab_mode == 2)
    else:
        drpb = alloc((T, num_heads), torch.float32, dev)
        _gather_table_kernel[(T,)](dsum, drpb, num_heads, dsum.stride(0), dsum_t.stride(1), dsum_t.stride(2), N=N,
                                   N_PAD=triton.next_power_of_2(N),
                                   NH_PAD=triton.next_power_of_2(num_heads), WH=wh, WW=ww)
    if not cosine:
        return dqkv, drpb, dbias
    return dqkv, drpb, dbias, dlogit_scale(dls, logit_scale, alloc) if dls_mode else torch.empty((0,), **f32)
