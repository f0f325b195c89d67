"""Triton window-attention backward: the tile helpers of ``_bwd_kernel`` (``window_attention_bwd``)
that the single-tile path and the two phases share, and the two phases' tiles.

* ``_bwd_rows`` / ``_probs`` / ``_t_bias``: a query tile's data, P and dS of a (query, key) tile,
  the tile's bias; ``_red_rc`` / ``_bias_grads``: dS into the bias-gradient buffers.
* Phase 1 (``_p1_block`` over ``_p1_tile``): a key block's dK, dV over every query tile, and the
  bias gradients; phase 2 (``_p2_tile`` over ``_dq_block``): a query tile's dQ over every key block.

Loops (static instruction counts): ``_p2_tile``'s ``for n0 in range(0, N_FULL, BLOCK_N)`` runs
N // BLOCK_N times, ``_p1_block``'s ``for m0 in range(0, M_FULL, BLOCK_M)`` N // BLOCK_M times (tails
are separate calls); the deterministic coords sums' ``while`` loops depend on the data.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._cosine import _store_unit_grad
from ._wattn_coords import _coord_off
from .window_attention import (_gather_rc, _idx, _in_range, _keys, _lyx, _mask, _mm, _pos, _rows, _table_bias)


@triton.jit
def _bwd_rows(qkv, dout, out, lse, dlt, group, coords, tab_h, ab_h, offs_m, w, h, b, y0, x0, gbase, cbase, hd, C,
              NH, H, W, SH, SW, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
              SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr, HAS_COORDS: tl.constexpr, DELTA: tl.constexpr,
              IDX64: tl.constexpr, OPAQUE: tl.constexpr = False, ASM: tl.constexpr = False,
              COSINE: tl.constexpr = False):
    """A query tile: q (COSINE: normalized), dO, delta = rowsum(dO * O), lse (log2 units; +inf on
    padded rows), and the rows' labels/coords/table row pointers (padded rows read a real token).
    DELTA: 0 compute delta; 1 compute and store it in ``dlt`` (lse's layout); 2 load it from ``dlt``;
    3 none (``_probs`` EXACT computes it)."""
    row_ok = offs_m < N
    q, reg, grp, cy, cx, tab_m, ab_m, tok = _rows(qkv, group, coords, tab_h, ab_h, offs_m, b, y0, x0, gbase, cbase,
                                                  hd, C, H, W, SH, SW, N, D, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS,
                                                  IDX64, OPAQUE, ASM, COSINE)
    orow = (tok * C + hd)[:, None] + tl.arange(0, D)[None, :]
    do = tl.load(dout + orow, mask=row_ok[:, None], other=0.0)
    rows = (w * NH + h) * N + offs_m
    if DELTA == 2:
        delta = tl.load(dlt + rows, mask=row_ok, other=0.0)
    elif DELTA == 3:
        delta = tl.zeros((offs_m.shape[0],), tl.float32)
    else:
        o = tl.load(out + orow, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        if DELTA == 1:
            tl.store(dlt + rows, delta, mask=row_ok)
    lse2 = tl.load(lse + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    return q, do, delta, lse2, reg, grp, cy, cx, tab_m, ab_m, tok, row_ok


@triton.jit
def _probs(q, k, v, do, delta, lse2, t_bias, reg_m, reg_n, grp_m, grp_n, col_ok, qk_scale,
           HAS_T_BIAS: tl.constexpr, SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr, COL_MASK: tl.constexpr,
           F32: tl.constexpr, UPCAST: tl.constexpr, EXACT: tl.constexpr = False):
    """P, dS and q @ k^T of a tile (``t_bias``: the table/attn bias in log2 units); dS is exactly 0
    at masked pairs. EXACT (cosine mode, whole rows in the tile): P recomputed as the forward's
    softmax and delta = rowsum(P * dP) from it (as autograd and the CPU kernel): with logits up to
    ~116, P from the rounded lse and delta from the rounded O would leave rowsum(dS) != 0, which the
    logit-scale gradient multiplies by the logits; padded rows have dO = 0, hence dS = dV share = 0."""
    qk = _mm(q, tl.trans(k), F32, UPCAST)
    t = qk * qk_scale
    if HAS_T_BIAS:
        t += t_bias
    t, allowed = _mask(t, reg_m, reg_n, grp_m, grp_n, col_ok, SHIFT, HAS_GROUP, COL_MASK)
    if EXACT:
        m = tl.max(t, 1)
        m = tl.where(m == float("-inf"), 0.0, m)  # a fully masked row: 0 * (1/0) = NaN, as the reference
        p = tl.exp2(t - m[:, None])
        p = p * (1.0 / tl.sum(p, 1))[:, None]
        dp = _mm(do, tl.trans(v), F32, UPCAST)
        delta = tl.sum(p * dp, 1)
    else:
        p = tl.exp2(t - lse2[:, None])  # masked: 0; padded rows (lse +inf): 0; a fully masked row: NaN
        dp = _mm(do, tl.trans(v), F32, UPCAST)
    ds = p * (dp - delta[:, None])
    if SHIFT or HAS_GROUP or COL_MASK:
        ds = tl.where(allowed, ds, 0.0)
    return p, ds, qk


@triton.jit
def _t_bias(tab_h, tab_m, code_n, cy_m, cx_m, cy_n, cx_n, ab_m, offs_n, col_ok, RH, RW, HAS_RPB: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_COORDS: tl.constexpr, COL_MASK: tl.constexpr, ASM: tl.constexpr):
    """Table bias + attn_bias of a tile in log2 units (0 when absent: the caller skips the add)."""
    tb = tl.zeros((tab_m.shape[0], offs_n.shape[0]), tl.float32)
    if HAS_RPB:
        tb = _table_bias(tab_h, tab_m, code_n, cy_m, cx_m, cy_n, cx_n, RH, RW, HAS_COORDS, ASM)
    if HAS_BIAS:
        tb += _gather_rc(ab_m, offs_n, col_ok, COL_MASK, ASM) * 1.4426950408889634
    return tb


@triton.jit
def _red_rc(row_ptr, col_off, val, ok, RMW: tl.constexpr, ASM: tl.constexpr):
    """``row_ptr[i][col_off[j]] += val[i, j]`` where ``ok``: relaxed atomic (no fences), or
    (RMW) a plain read-modify-write of memory this program owns. Inline asm computes each
    address next to its use, so no tile of 64-bit pointers is kept live."""
    rp, co = tl.broadcast(row_ptr[:, None], col_off[None, :])
    if ASM:
        # (the value travels as its bits: Triton 3.6 rejects float and pointer operands together)
        bits = val.to(tl.int32, bitcast=True)
        if RMW:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b64 a; .reg .f32 x; setp.ne.b32 p, $3, 0; mad.wide.s32 a, $2, 4, $1; "
                "@p ld.global.f32 x, [a]; @p add.f32 x, x, $4; @p st.global.f32 [a], x; mov.b32 $0, 0; }",
                "=r,l,r,r,r", [rp, co, ok.to(tl.int32), bits], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $3, 0; mad.wide.s32 a, $2, 4, $1; "
                "@p red.relaxed.gpu.global.add.f32 [a], $4; mov.b32 $0, 0; }",
                "=r,l,r,r,r", [rp, co, ok.to(tl.int32), bits], dtype=tl.int32, is_pure=False, pack=1)
    else:
        if RMW:
            tl.store(rp + co, tl.load(rp + co, mask=ok, other=0.0) + val, mask=ok)
        else:
            tl.atomic_add(rp + co, val, mask=ok, sem="relaxed")


@triton.jit
def _bias_grads(ds, offs_m, offs_n, row_ok, col_ok, cy_m, cx_m, cy_n, cx_n, dsum_h, dtab_h, RH, RW, TS,
                N: tl.constexpr, DSUM_MODE: tl.constexpr, TAB_MODE: tl.constexpr, ASM: tl.constexpr):
    """dS of a tile into the bias-gradient buffers (modes: see ``_bwd_kernel``); ``dtab_h``'s entries
    at stride TS (the table gradient in rpb's (T, nH) layout: TS = nH)."""
    pair = row_ok[:, None] & col_ok[None, :]
    if DSUM_MODE == 1 or DSUM_MODE == 2:
        # RMW (mode 2): each element of a tile shape is read and written by the same thread (one
        # asm does both), and a window touches it once: no barrier needed between windows.
        _red_rc(dsum_h + offs_m * N, offs_n, ds, pair, DSUM_MODE == 2, ASM)
    if TAB_MODE != 0:
        dy, iny = _in_range(cy_m[:, None], cy_n[None, :], RH)
        dx, inx = _in_range(cx_m[:, None], cx_n[None, :], RW)
        inr = iny & inx & pair
        if TAB_MODE == 1:
            tl.atomic_add(dtab_h + _coord_off(cy_m, cx_m, cy_n, cx_n, RH, RW, TS), ds, mask=inr, sem="relaxed")
        if TAB_MODE == 2:
            ty = tl.where(inr, dy + (RH - 1), 0).to(tl.int32)
            tx = tl.where(inr, dx + (RW - 1), 0).to(tl.int32)
            # Fixed-order per-entry sums (duplicates within a tile rule out a scatter), over the box
            # of table rows/cols that this tile's in-range pairs touch. Slow; deterministic.
            ds_in = tl.where(inr, ds, 0.0)
            # (while loops: data-dependent bounds; Triton 3.6's interpreter cannot take range()
            # bounds from tensors)
            y = tl.min(tl.where(inr, ty, 1 << 30))
            y_end = tl.max(tl.where(inr, ty, -1))
            while y <= y_end:
                in_y = inr & (ty == y)
                x = tl.min(tl.where(in_y, tx, 1 << 30))
                x_end = tl.max(tl.where(in_y, tx, -1))
                while x <= x_end:
                    val = tl.sum(tl.sum(tl.where(in_y & (tx == x), ds_in, 0.0), 1), 0)
                    tptr = dtab_h + (y * (2 * RW - 1) + x) * TS
                    tl.store(tptr, tl.load(tptr) + val)
                    x += 1
                y += 1
            tl.debug_barrier()


@triton.jit
def _p1_tile(qkv, dout, out, lse, dlt, tab_h, ab_h, group, coords, dsum_h, dtab_h, m0, w, h, b, y0, x0, gbase, cbase,
             hd, qk_scale, C, NH, H, W, SH, SW, RH, RW, k, v, dk, dv, offs_n, col_ok, reg_n, grp_n, cy_n, cx_n,
             code_n, BM: tl.constexpr, COL_MASK: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr,
             WW: tl.constexpr, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
             HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, DSUM_MODE: tl.constexpr, TAB_MODE: tl.constexpr,
             F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr):
    """Phase 1, one (query tile, key block): dK/dV updates and the tile's bias gradient."""
    offs_m = m0 + tl.arange(0, BM)
    q, do, delta, lse2, reg_m, grp_m, cy_m, cx_m, tab_m, ab_m, tok, row_ok = _bwd_rows(
        qkv, dout, out, lse, dlt, group, coords, tab_h, ab_h, offs_m, w, h, b, y0, x0, gbase, cbase, hd, C, NH, H, W,
        SH, SW, N, D, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS, 2, IDX64, COSINE=COSINE)
    tb = _t_bias(tab_h, tab_m, code_n, cy_m, cx_m, cy_n, cx_n, ab_m, offs_n, col_ok, RH, RW, HAS_RPB, HAS_BIAS,
                 HAS_COORDS, COL_MASK, ASM)
    p, ds, qk = _probs(q, k, v, do, delta, lse2, tb, reg_m, reg_n, grp_m, grp_n, col_ok, qk_scale, HAS_RPB or HAS_BIAS,
                       SHIFT, HAS_GROUP, COL_MASK, F32, UPCAST)
    dv += _mm(tl.trans(p.to(do.dtype)), do, F32, UPCAST)
    dk += _mm(tl.trans(ds.to(q.dtype)), q, F32, UPCAST)
    _bias_grads(ds, offs_m, offs_n, row_ok, col_ok, cy_m, cx_m, cy_n, cx_n, dsum_h, dtab_h, RH, RW, NH, N,
                DSUM_MODE, TAB_MODE, ASM)
    return dk, dv


@triton.jit
def _p1_block(qkv, dout, out, lse, dlt, dqkv, tab_h, ab_h, group, coords, codes, dsum_h, dtab_h, n0, w, h, b, y0, x0,
              gbase, cbase, hd, qk_scale, scale, C, NH, H, W, SH, SW, RH, RW,
              BN: tl.constexpr, COL_MASK: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr,
              WW: tl.constexpr, BLOCK_M: tl.constexpr, BM_TAIL: tl.constexpr, HAS_RPB: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr, HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr,
              DSUM_MODE: tl.constexpr, TAB_MODE: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
              IDX64: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr):
    """Phase 1, one key block: dK and dV over every query tile (stored), and the bias gradient."""
    offs_n = n0 + tl.arange(0, BN)
    k, v, col_ok, reg_n, grp_n, cy_n, cx_n, code_n = _keys(
        qkv, group, coords, codes, offs_n, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW, N, WH, WW, D, SHIFT,
        HAS_GROUP, HAS_COORDS, COL_MASK, IDX64, ASM, COSINE)
    dk = tl.zeros((BN, D), tl.float32)
    dv = tl.zeros((BN, D), tl.float32)
    M_FULL: tl.constexpr = (N // BLOCK_M) * BLOCK_M
    for m0 in range(0, M_FULL, BLOCK_M):
        dk, dv = _p1_tile(qkv, dout, out, lse, dlt, tab_h, ab_h, group, coords, dsum_h, dtab_h, m0, w, h, b, y0, x0,
                          gbase, cbase, hd, qk_scale, C, NH, H, W, SH, SW, RH, RW, k, v, dk, dv, offs_n, col_ok,
                          reg_n, grp_n, cy_n, cx_n, code_n, BLOCK_M, COL_MASK, N, D, WH, WW, HAS_RPB, HAS_BIAS,
                          HAS_GROUP, HAS_COORDS, SHIFT, DSUM_MODE, TAB_MODE, F32, UPCAST, IDX64, ASM, COSINE)
    if BM_TAIL > 0:
        dk, dv = _p1_tile(qkv, dout, out, lse, dlt, tab_h, ab_h, group, coords, dsum_h, dtab_h, M_FULL, w, h, b, y0, x0,
                          gbase, cbase, hd, qk_scale, C, NH, H, W, SH, SW, RH, RW, k, v, dk, dv, offs_n, col_ok,
                          reg_n, grp_n, cy_n, cx_n, code_n, BM_TAIL, COL_MASK, N, D, WH, WW, HAS_RPB, HAS_BIAS,
                          HAS_GROUP, HAS_COORDS, SHIFT, DSUM_MODE, TAB_MODE, F32, UPCAST, IDX64, ASM, COSINE)
    ly, lx = _lyx(offs_n, N, WW)
    pos, _r = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    krow = _idx(b * (H * W) + pos, IDX64) * (3 * C) + hd
    offs_d = tl.arange(0, D)
    if COSINE:
        _store_unit_grad(dqkv, qkv, krow[:, None] + C + offs_d[None, :], dk * scale, col_ok[:, None])
    else:
        tl.store(dqkv + krow[:, None] + C + offs_d[None, :], (dk * scale).to(dqkv.dtype.element_ty),
                 mask=col_ok[:, None])
    tl.store(dqkv + krow[:, None] + 2 * C + offs_d[None, :], dv.to(dqkv.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_block(qkv, dout, out, lse, dlt, group, coords, codes, tab_h, ab_h, n0, w, h, b, y0, x0, gbase, cbase, hd,
              qk_scale, C, NH, H, W, SH, SW, RH, RW, offs_m, q, do, delta, lse2, reg_m, grp_m, cy_m, cx_m, tab_m, ab_m,
              BN: tl.constexpr, COL_MASK: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr,
              WW: tl.constexpr, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
              HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
              IDX64: tl.constexpr, RELOAD: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr):
    """Phase A, one key block of a query tile: its dS @ K (dQ's share, unscaled) and, COSINE, the
    rows' sums of dS and of P * (q @ k^T) (for the logit-scale gradient). RELOAD: the
    tile's rows are re-read here (opaque positions) instead of held across the key loop."""
    if RELOAD:
        q, do, delta, lse2, reg_m, grp_m, cy_m, cx_m, tab_m, ab_m, _tok, _ok = _bwd_rows(
            qkv, dout, out, lse, dlt, group, coords, tab_h, ab_h, offs_m, w, h, b, y0, x0, gbase, cbase, hd, C, NH,
            H, W, SH, SW, N, D, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS, 2, IDX64, True, ASM, COSINE)
    offs_n = n0 + tl.arange(0, BN)
    k, v, col_ok, reg_n, grp_n, cy_n, cx_n, code_n = _keys(
        qkv, group, coords, codes, offs_n, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW, N, WH, WW, D, SHIFT,
        HAS_GROUP, HAS_COORDS, COL_MASK, IDX64, ASM, COSINE)
    tb = _t_bias(tab_h, tab_m, code_n, cy_m, cx_m, cy_n, cx_n, ab_m, offs_n, col_ok, RH, RW, HAS_RPB, HAS_BIAS,
                 HAS_COORDS, COL_MASK, ASM)
    p, ds, qk = _probs(q, k, v, do, delta, lse2, tb, reg_m, reg_n, grp_m, grp_n, col_ok, qk_scale, HAS_RPB or HAS_BIAS,
                       SHIFT, HAS_GROUP, COL_MASK, F32, UPCAST)
    dq = _mm(ds.to(k.dtype), k, F32, UPCAST)
    if COSINE:
        return dq, tl.sum(ds, 1), tl.sum(p * qk, 1)
    else:
        return dq, delta, delta


@triton.jit
def _p2_tile(qkv, dout, out, lse, dlt, dqkv, tab_h, ab_h, group, coords, codes, m0, w, h, b, y0, x0, gbase, cbase, hd,
             qk_scale, scale, C, NH, H, W, SH, SW, RH, RW,
             BM: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
             BLOCK_N: tl.constexpr, BN_TAIL: tl.constexpr, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr,
             HAS_GROUP: tl.constexpr, HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, F32: tl.constexpr,
             UPCAST: tl.constexpr, IDX64: tl.constexpr, RELOAD: tl.constexpr, ASM: tl.constexpr,
             COSINE: tl.constexpr):
    """Phase A, one query tile: dQ over every key block (and the rows' delta, kept for phase B).
    COSINE: returns the tile's share of the logit-scale gradient, sum_ij dS_ij (s_ij - sbar_i) with
    s = q' @ k'^T (q' times the head scale) and sbar_i = sum_j P_ij s_ij: independent of any error
    in delta or lse (both make dS off by a multiple of P in a row), as the CUDA kernel."""
    offs_m = m0 + tl.arange(0, BM)
    q, do, delta, lse2, reg_m, grp_m, cy_m, cx_m, tab_m, ab_m, tok, row_ok = _bwd_rows(
        qkv, dout, out, lse, dlt, group, coords, tab_h, ab_h, offs_m, w, h, b, y0, x0, gbase, cbase, hd, C, NH, H, W,
        SH, SW, N, D, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS, 1, IDX64, COSINE=COSINE)
    dq = tl.zeros((BM, D), tl.float32)
    z = tl.zeros((BM,), tl.float32)
    sb = tl.zeros((BM,), tl.float32)
    N_FULL: tl.constexpr = (N // BLOCK_N) * BLOCK_N
    for n0 in range(0, N_FULL, BLOCK_N):
        dq_, z_, sb_ = _dq_block(
            qkv, dout, out, lse, dlt, group, coords, codes, tab_h, ab_h, n0, w, h, b, y0, x0, gbase, cbase, hd,
            qk_scale, C, NH, H, W, SH, SW, RH, RW, offs_m, q, do, delta, lse2, reg_m, grp_m, cy_m, cx_m, tab_m, ab_m,
            BLOCK_N, False, N, D, WH, WW, HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST, IDX64, RELOAD,
            ASM, COSINE)
        dq += dq_
        if COSINE:
            z += z_
            sb += sb_
    if BN_TAIL > 0:
        dq_, z_, sb_ = _dq_block(
            qkv, dout, out, lse, dlt, group, coords, codes, tab_h, ab_h, N_FULL, w, h, b, y0, x0, gbase, cbase, hd,
            qk_scale, C, NH, H, W, SH, SW, RH, RW, offs_m, q, do, delta, lse2, reg_m, grp_m, cy_m, cx_m, tab_m, ab_m,
            BN_TAIL, True, N, D, WH, WW, HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST, IDX64, RELOAD,
            ASM, COSINE)
        dq += dq_
        if COSINE:
            z += z_
            sb += sb_
    offs_d = tl.arange(0, D)
    if COSINE:  # scale: the head scale; <q_hat, dq_hat> per row = sum_j dS_ij s_ij
        dot = _store_unit_grad(dqkv, qkv, (tok * (3 * C) + hd)[:, None] + offs_d[None, :], dq * scale,
                               row_ok[:, None])
        return tl.sum(tl.where(row_ok, dot - z * (scale * sb), 0.0), 0)
    else:
        tl.store(dqkv + (tok * (3 * C) + hd)[:, None] + offs_d[None, :], (dq * scale).to(dqkv.dtype.element_ty),
                 mask=row_ok[:, None])
        return 0.0
