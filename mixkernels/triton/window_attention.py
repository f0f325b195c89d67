"""Triton fused mask-aware (shifted) window attention: forward (backward in ``window_attention_bwd``).

Everything Swin does around the attention (roll, partition, head split, relative-position
bias gather, shift-region mask, group mask, merge, reverse roll) lives in the kernels'
addressing: a program of head ``h`` and window ``w`` computes the original (un-rolled) grid
position of each token and reads q/k/v straight out of the qkv Linear's ``(B,H,W,3C)`` output,
and writes ``(B,H,W,C)`` at the same positions. No ``N x N`` tensor is materialized.

Forward (flash-attention style, log2 domain, fp32 softmax): query rows in 64-row tiles plus
one tail tile (196 rows cost 208, not 256), two tiles per pass over the key blocks (64 or 32
keys, plus a tail block, the only one that masks padded keys), online softmax. For 16-bit inputs
without coords/attn_bias the 16-row tail tile takes a pass of its own against all keys at once,
transposed (keys along M) so that both its products are 64-row wgmma tiles on sm_90 (a 16-row
tile would be mma.sync) and its key-axis max and sum cross the warps once (``_tail_rows``). Per score
element: an MMA share, one scale+bias FMA, the table bias gathered from the head's row of an
L1-resident ``(nH, T)`` table by inline asm in the MMA's register layout (no layout
conversion), one compare+select for the shift or group mask (labels read per token; int64
labels compared at full width), max, exp2, sum. Padded query rows read a real token and are
never stored; padded keys read zeros and are masked to ``-inf`` by position. Windows of one
tile (N <= 64: Swin/MixMIM window 7, UM-MAE window 8) loop over several windows per program
with the window-invariant bias tile gathered once (without coords straight from ``rpb`` (T, nH), scaled
there; with coords read in place per window, ``_wattn_coords``: no launch for a table copy). The
grid is head-fastest: the programs of one window's heads run side by side and share its qkv rows in L2.

Windows over one tile with a group and/or shift mask and neither attn_bias nor coords (MixMIM
stages 1-3, shifted window-14 Swin) take the by-segment forward instead (``_wattn_seg``): each
window's tokens sorted by attention segment, every query tile walking only its segment's keys
(``_by_segment``; ``SEGMENTS = False`` turns it off for comparisons).

SwinV2 cosine attention (``window_attention_cosine``, the ``COSINE`` constexpr): q and k rows
L2-normalized where loaded, the head's ``exp(min(logit_scale, log 100))`` folded into the score
scale, so each score costs what it costs in the plain kernels (helpers in ``_cosine``).

Loops (for static instruction counts): ``_fwd_kernel`` ``for i in range(0, WPP)`` runs WPP
times (folded away when 1); ``_pass`` ``for n0 in range(0, N_FULL, BLOCK_N)`` runs
N // BLOCK_N times, in each of the (N // 64 + 1) // 2 passes (unrolled). The backward's are
listed in ``window_attention_bwd``. Addressing, gathers and mask helpers live in ``_wattn_common``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._cosine import _head_scale, _unit
from ._wattn_coords import _add_coord_bias
from ._wattn_seg import seg_forward
from ._wattn_common import (_coords, _fast, _first_window, _gather, _gather_int, _gather_off, _gather_rc,  # noqa: F401
                            _idx, _in_range, _lyx, _mask, _mm, _next_window, _online, _opaque, _pos, _rpb_table,
                            _table_bias)

__all__ = ["window_attention", "window_attention_backward", "window_attention_cosine",
           "window_attention_cosine_backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _rows(qkv, group, coords, tab_h, ab_h, offs_m, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW,
          N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SHIFT: tl.constexpr,
          HAS_GROUP: tl.constexpr, HAS_COORDS: tl.constexpr, IDX64: tl.constexpr, OPAQUE: tl.constexpr = False,
          ASM: tl.constexpr = False, COSINE: tl.constexpr = False):
    """A query tile: q (COSINE: normalized), labels, coords, table row pointers, attn_bias row
    pointers, token index (OPAQUE: positions through ``_opaque``, so a loop recomputes what depends on them)."""
    ly, lx = _lyx(offs_m, N, WW)
    pos, reg = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    if OPAQUE:
        pos = _opaque(pos, ASM)
    tok = _idx(b * (H * W) + pos, IDX64)
    offs_d = tl.arange(0, D)
    q = _unit(tl.load(qkv + (tok * (3 * C) + hd)[:, None] + offs_d[None, :]), COSINE)
    grp = reg
    if HAS_GROUP:
        grp = tl.load(group + gbase + pos)
    cy, cx = _coords(coords, cbase, pos, ly, lx, HAS_COORDS)
    tab_m = tab_h + (ly * (2 * WW - 1) + lx + ((WH - 1) * (2 * WW - 1) + WW - 1))
    ab_m = ab_h + tl.minimum(offs_m, N - 1) * N
    return q, reg, grp, cy, cx, tab_m, ab_m, tok


@triton.jit
def _keys(qkv, group, coords, codes, offs_n, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW, N: tl.constexpr,
          WH: tl.constexpr, WW: tl.constexpr, D: tl.constexpr, SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr,
          HAS_COORDS: tl.constexpr, COL_MASK: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr,
          COSINE: tl.constexpr = False, OFFS: tl.constexpr = False):
    """K (COSINE: normalized) and V tiles of a key block (padded keys: zeros) and the keys' per-token data. The
    keys' table codes come from the launcher's ``codes`` (a load per key instead of an integer
    division in every thread that holds the column)."""
    col_ok = offs_n < N
    ly, lx = _lyx(offs_n, N, WW)
    pos, reg = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    row = _idx(b * (H * W) + pos, IDX64) * (3 * C) + hd
    offs_d = tl.arange(0, D)
    if COL_MASK:
        k = tl.load(qkv + row[:, None] + C + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(qkv + row[:, None] + 2 * C + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    else:
        k = tl.load(qkv + row[:, None] + C + offs_d[None, :])
        v = tl.load(qkv + row[:, None] + 2 * C + offs_d[None, :])
    k = _unit(k, COSINE)
    grp = reg
    if HAS_GROUP:
        grp = tl.load(group + gbase + pos)
    cy, cx = _coords(coords, cbase, pos, ly, lx, HAS_COORDS)
    # OFFS: ``codes`` is the forward's int64 table of -4 * code (``_code_offs``)
    return k, v, col_ok, reg, grp, cy, cx, _gather_int(codes + offs_n, OFFS, ASM)


@triton.jit
def _logits(q, tab_m, ab_m, reg_m, grp_m, cy_m, cx_m, k, col_ok, reg_n, grp_n, cy_n, cx_n, code_n, offs_n,
            tab_h, qk_scale, RH, RW, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COORDS: tl.constexpr,
            SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr, COL_MASK: tl.constexpr, F32: tl.constexpr,
            UPCAST: tl.constexpr, ASM: tl.constexpr):
    """Masked logits of one (query tile, key block) in log2 units."""
    t = _mm(q, tl.trans(k), F32, UPCAST) * qk_scale
    if HAS_RPB:
        if HAS_COORDS:
            t += _table_bias(tab_h, tab_m, code_n, cy_m, cx_m, cy_n, cx_n, RH, RW, HAS_COORDS, ASM)
        else:  # code_n: -4 * code, a byte offset (``_keys`` OFFS)
            t += _gather_off(tab_m[:, None], code_n[None, :], ASM)
    if HAS_BIAS:
        t += _gather_rc(ab_m, offs_n, col_ok, COL_MASK, ASM) * 1.4426950408889634
    t, _ = _mask(t, reg_m, reg_n, grp_m, grp_n, col_ok, SHIFT, HAS_GROUP, COL_MASK)
    return t


@triton.jit
def _step(q, tab_m, ab_m, reg_m, grp_m, cy_m, cx_m, m_i, l_i, acc,
          k, v, ok, rn, gn, cyn, cxn, cn, offs_n, tab_h, qk_scale, RH, RW, COL_MASK: tl.constexpr,
          HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr,
          HAS_GROUP: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr, ASM: tl.constexpr):
    """One online-softmax step of a query tile over a key block (COL_MASK: the padded tail)."""
    t = _logits(q, tab_m, ab_m, reg_m, grp_m, cy_m, cx_m, k, ok, rn, gn, cyn, cxn, cn, offs_n, tab_h, qk_scale,
                RH, RW, HAS_RPB, HAS_BIAS, HAS_COORDS, SHIFT, HAS_GROUP, COL_MASK, F32, UPCAST, ASM)
    return _online(t, m_i, l_i, acc, v, F32, UPCAST)


@triton.jit
def _finish(out, lse, acc, m_i, l_i, offs_m, w, h, b, y0, x0, hd, C, NH, H, W, SH, SW, N: tl.constexpr,
            D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SHIFT: tl.constexpr, IDX64: tl.constexpr,
            ASM: tl.constexpr):
    """Normalize and store a query tile's rows (real rows only) and their natural-log lse. The
    rows' token positions are recomputed here rather than kept live across the key loop."""
    row_ok = offs_m < N
    ly, lx = _lyx(offs_m, N, WW)
    pos, _ = _pos(ly, lx, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    tok = _idx(b * (H * W) + pos, IDX64)
    # A real row whose every key is masked has l = 0: 0 * (1/0) = NaN, as the reference.
    o = acc * _fast(l_i, 0, ASM)[:, None]
    offs_d = tl.arange(0, D)
    tl.store(out + (tok * C + hd)[:, None] + offs_d[None, :], o.to(out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse + (w * NH + h) * N + offs_m, (m_i + _fast(l_i, 1, ASM)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _kblock(qkv, group, coords, codes, tab_h, n0, b, y0, x0, gbase, cbase, hd, qk_scale, C, H, W, SH, SW, RH, RW,
            qa, taba, aba, rega, grpa, cya, cxa, ma, la, acca, qb, tabb, abb, regb, grpb, cyb, cxb, mb, lb, accb,
            qt, tabt, abt, regt, grpt, cyt, cxt, mt, lt, acct, NT: tl.constexpr, BM_T: tl.constexpr,
            BN: tl.constexpr, COL_MASK: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr,
            WW: tl.constexpr, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
            HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
            IDX64: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr):
    """One key block (its K/V, labels and codes read once) for the pass's query tiles: tile a,
    tile b (NT == 2) and the tail tile (BM_T > 0); absent tiles' arguments are placeholders."""
    offs_n = n0 + tl.arange(0, BN)
    k, v, ok, rn, gn, cyn, cxn, cn = _keys(qkv, group, coords, codes, offs_n, b, y0, x0, gbase, cbase, hd, C, H, W,
                                           SH, SW, N, WH, WW, D, SHIFT, HAS_GROUP, HAS_COORDS, COL_MASK, IDX64, ASM,
                                           COSINE, True)
    ma, la, acca = _step(qa, taba, aba, rega, grpa, cya, cxa, ma, la, acca, k, v, ok, rn, gn, cyn, cxn, cn, offs_n,
                         tab_h, qk_scale, RH, RW, COL_MASK, HAS_RPB, HAS_BIAS, HAS_COORDS, SHIFT, HAS_GROUP, F32,
                         UPCAST, ASM)
    if NT >= 2:
        mb, lb, accb = _step(qb, tabb, abb, regb, grpb, cyb, cxb, mb, lb, accb, k, v, ok, rn, gn, cyn, cxn, cn,
                             offs_n, tab_h, qk_scale, RH, RW, COL_MASK, HAS_RPB, HAS_BIAS, HAS_COORDS, SHIFT,
                             HAS_GROUP, F32, UPCAST, ASM)
    if BM_T > 0:
        mt, lt, acct = _step(qt, tabt, abt, regt, grpt, cyt, cxt, mt, lt, acct, k, v, ok, rn, gn, cyn, cxn, cn,
                             offs_n, tab_h, qk_scale, RH, RW, COL_MASK, HAS_RPB, HAS_BIAS, HAS_COORDS, SHIFT,
                             HAS_GROUP, F32, UPCAST, ASM)
    return ma, la, acca, mb, lb, accb, mt, lt, acct


@triton.jit
def _tile(qkv, group, coords, tab_h, ab_h, offs_m, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW,
          N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, SHIFT: tl.constexpr,
          HAS_GROUP: tl.constexpr, HAS_COORDS: tl.constexpr, IDX64: tl.constexpr, COSINE: tl.constexpr):
    """A query tile's data and its empty online-softmax state (m, l, acc)."""
    q, reg, grp, cy, cx, tab_m, ab_m, _tok = _rows(qkv, group, coords, tab_h, ab_h, offs_m, b, y0, x0, gbase, cbase,
                                                   hd, C, H, W, SH, SW, N, D, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS,
                                                   IDX64, COSINE=COSINE)
    BM: tl.constexpr = offs_m.shape[0]
    return (q, tab_m, ab_m, reg, grp, cy, cx, tl.full((BM,), float("-inf"), tl.float32), tl.zeros((BM,), tl.float32),
            tl.zeros((BM, D), tl.float32))


@triton.jit
def _pass(qkv, out, lse, tab_h, ab_h, group, coords, codes, w, h, b, y0, x0, hd, qk_scale, C, NH, H, W, SH, SW,
          GG, GC, RH, RW, R0: tl.constexpr, NT: tl.constexpr, BM: tl.constexpr, BM_T: tl.constexpr,
          N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BLOCK_N: tl.constexpr,
          BN_TAIL: tl.constexpr, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
          HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
          IDX64: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr):
    """Query rows from R0: NT (1 or 2) tiles of BM rows and a tail tile of BM_T rows (0: none), all
    updated in one pass over the key blocks (BLOCK_N wide, then the BN_TAIL tail that masks
    padded keys), so each key block's K/V, labels and table codes are read once per pass."""
    gbase = (b % GG) * (H * W)
    cbase = (b % GC) * (H * W)
    offs_a = R0 + tl.arange(0, BM)
    qa, taba, aba, rega, grpa, cya, cxa, ma, la, acca = _tile(
        qkv, group, coords, tab_h, ab_h, offs_a, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW, N, D, WH, WW, SHIFT,
        HAS_GROUP, HAS_COORDS, IDX64, COSINE)
    offs_b = offs_a
    qb, tabb, abb, regb, grpb, cyb, cxb, mb, lb, accb = qa, taba, aba, rega, grpa, cya, cxa, ma, la, acca
    if NT >= 2:
        offs_b = R0 + BM + tl.arange(0, BM)
        qb, tabb, abb, regb, grpb, cyb, cxb, mb, lb, accb = _tile(
            qkv, group, coords, tab_h, ab_h, offs_b, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW, N, D, WH, WW,
            SHIFT, HAS_GROUP, HAS_COORDS, IDX64, COSINE)
    offs_t = offs_a
    qt, tabt, abt, regt, grpt, cyt, cxt, mt, lt, acct = qa, taba, aba, rega, grpa, cya, cxa, ma, la, acca
    if BM_T > 0:
        offs_t = R0 + NT * BM + tl.arange(0, BM_T)
        qt, tabt, abt, regt, grpt, cyt, cxt, mt, lt, acct = _tile(
            qkv, group, coords, tab_h, ab_h, offs_t, b, y0, x0, gbase, cbase, hd, C, H, W, SH, SW, N, D, WH, WW,
            SHIFT, HAS_GROUP, HAS_COORDS, IDX64, COSINE)
    N_FULL: tl.constexpr = (N // BLOCK_N) * BLOCK_N
    for n0 in range(0, N_FULL, BLOCK_N):
        ma, la, acca, mb, lb, accb, mt, lt, acct = _kblock(
            qkv, group, coords, codes, tab_h, n0, b, y0, x0, gbase, cbase, hd, qk_scale, C, H, W, SH, SW, RH, RW,
            qa, taba, aba, rega, grpa, cya, cxa, ma, la, acca, qb, tabb, abb, regb, grpb, cyb, cxb, mb, lb, accb,
            qt, tabt, abt, regt, grpt, cyt, cxt, mt, lt, acct, NT, BM_T, BLOCK_N, False, N, D, WH, WW, HAS_RPB,
            HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST, IDX64, ASM, COSINE)
    if BN_TAIL > 0:
        ma, la, acca, mb, lb, accb, mt, lt, acct = _kblock(
            qkv, group, coords, codes, tab_h, N_FULL, b, y0, x0, gbase, cbase, hd, qk_scale, C, H, W, SH, SW, RH, RW,
            qa, taba, aba, rega, grpa, cya, cxa, ma, la, acca, qb, tabb, abb, regb, grpb, cyb, cxb, mb, lb, accb,
            qt, tabt, abt, regt, grpt, cyt, cxt, mt, lt, acct, NT, BM_T, BN_TAIL, True, N, D, WH, WW, HAS_RPB,
            HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST, IDX64, ASM, COSINE)
    _finish(out, lse, acca, ma, la, offs_a, w, h, b, y0, x0, hd, C, NH, H, W, SH, SW, N, D, WH, WW, SHIFT, IDX64, ASM)
    if NT >= 2:
        _finish(out, lse, accb, mb, lb, offs_b, w, h, b, y0, x0, hd, C, NH, H, W, SH, SW, N, D, WH, WW, SHIFT, IDX64,
                ASM)
    if BM_T > 0:
        _finish(out, lse, acct, mt, lt, offs_t, w, h, b, y0, x0, hd, C, NH, H, W, SH, SW, N, D, WH, WW, SHIFT, IDX64,
                ASM)


@triton.jit
def _tail_rows(qkv, out, lse, tab_h, group, codes, w, h, b, y0, x0, hd, qk_scale, C, NH, H, W, SH, SW, GG,
               R0: tl.constexpr, BM_T: tl.constexpr, BS: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
               DP: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, HAS_RPB: tl.constexpr, HAS_GROUP: tl.constexpr,
               SHIFT: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr,
               COSINE: tl.constexpr):
    """The tail query tile (BM_T rows from R0) against all BS >= N keys at once (padded keys masked by
    position), plain softmax, transposed: keys along M, so both products are 64-row wgmma tiles on
    sm_90 (S^T = K Q^T; O^T = V^T P^T with V^T zero-padded to DP = 64 rows), where a 16-row tile
    would take mma.sync. The key-axis max and sum cross the warps once. 16-bit inputs, no coords,
    no attn_bias (``_one_tail``)."""
    offs_m = R0 + tl.arange(0, BM_T)
    q, _r, _g, _cy, _cx, _tm, _am, _tok = _rows(qkv, group, group, tab_h, tab_h, offs_m, b, y0, x0, (b % GG) * (H * W),
                                                0, hd, C, H, W, SH, SW, N, D, WH, WW, SHIFT, HAS_GROUP, False, IDX64,
                                                COSINE=COSINE)
    ly_m, lx_m = _lyx(offs_m, N, WW)
    offs_n = tl.arange(0, BS)
    k, _v, ok, rn, gn, _cyn, _cxn, cn = _keys(qkv, group, group, codes, offs_n, b, y0, x0, (b % GG) * (H * W), 0, hd,
                                             C, H, W, SH, SW, N, WH, WW, D, SHIFT, HAS_GROUP, False, True, IDX64, ASM,
                                             COSINE, True)
    t = _mm(k, tl.trans(q), False, UPCAST) * qk_scale  # (keys, rows)
    if HAS_RPB:  # Swin index code_i + c0 - code_j (see _table_bias), gathered in this layout
        tab_q = tab_h + (ly_m * (2 * WW - 1) + lx_m + ((WH - 1) * (2 * WW - 1) + WW - 1))
        t += _gather_off(tab_q[None, :], cn[:, None], ASM)
    t, _ = _mask(t, rn, _r, gn, _g, ok, SHIFT, HAS_GROUP, False)
    t = tl.where(ok[:, None], t, float("-inf"))
    m = tl.max(t, 0)  # an all-masked row: -inf, reference 0, p = 0, l = 0 (NaN out, edge rule 2)
    p = tl.exp2(t - tl.where(m == float("-inf"), 0.0, m)[None, :])
    l_i = tl.sum(p, 0)
    offs_d = tl.arange(0, DP)
    ly_n, lx_n = _lyx(offs_n, N, WW)
    pos_n, _ = _pos(ly_n, lx_n, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
    krow = _idx(b * (H * W) + pos_n, IDX64) * (3 * C) + hd
    vt = tl.load(qkv + krow[None, :] + 2 * C + offs_d[:, None], mask=(offs_d[:, None] < D) & ok[None, :], other=0.0)
    o = _mm(vt, p.to(vt.dtype), False, UPCAST) * _fast(l_i, 0, ASM)[None, :]  # (DP, rows); l = 0: NaN
    row_ok = offs_m < N
    tl.store(out + (_tok * C + hd)[None, :] + offs_d[:, None], o.to(out.dtype.element_ty),
             mask=(offs_d[:, None] < D) & row_ok[None, :])
    tl.store(lse + (w * NH + h) * N + offs_m, (m + _fast(l_i, 1, ASM)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _fwd_kernel(qkv, out, lse, tab, abias, group, coords, codes, ls,
                qk_scale, NH, H, W, nW, nWw, SH, SW, GG, GC, RH, RW, BNW,
                WPP: tl.constexpr, N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                SINGLE: tl.constexpr, BS: tl.constexpr,
                BLOCK_M: tl.constexpr, BM_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BN_TAIL: tl.constexpr,
                TPP: tl.constexpr, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
                HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
                IDX64: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr = False,
                ONE_TAIL: tl.constexpr = False):
    """Program (head h, chunk c): windows [c*WPP, (c+1)*WPP) of head h (head-fastest grid).
    Loop bounds are constexprs throughout (Triton 3.6's interpreter cannot take them from
    kernel arguments with numpy >= 2.4).

    Query rows in tiles of BLOCK_M and a tail tile of BM_TAIL rows, TPP (1 or 2) tiles per pass
    over the key blocks (``_pass``): the tiles of a pass share each key block's loads, and two tiles of
    state keep registers under the spill limit. A window that fits one tile (N <= BLOCK_M,
    BLOCK_N) takes the single-tile path: plain softmax, and the window-invariant bias tile
    (table without coords, attn_bias) is gathered once per program, not once per window.
    COSINE (SwinV2): q and k rows normalized where loaded, the head's scale from ``ls`` (``_cosine``).
    """
    h = tl.program_id(0)
    c = tl.program_id(1)
    if COSINE:
        qk_scale = _head_scale(ls, h) * 1.4426950408889634
    C = NH * D
    hd = h * D
    if SINGLE:  # the launcher passes rpb (T, nH) itself (``_tables``, raw): read in place
        tab_h = tab + h
    else:
        tab_h = tab + h * ((2 * RH - 1) * (2 * RW - 1))  # (nH, T) table, pre-scaled by log2e
    ab_h = abias + h * (N * N)
    N_TILES: tl.constexpr = N // BLOCK_M
    if SINGLE:
        offs_m = tl.arange(0, BS)
        offs_n = tl.arange(0, BS)
        ly_m, lx_m = _lyx(offs_m, N, WW)
        ly_n, lx_n = _lyx(offs_n, N, WW)
        col_ok = offs_n < N
        INV_BIAS: tl.constexpr = (HAS_RPB and not HAS_COORDS) or HAS_BIAS
        NAT: tl.constexpr = HAS_RPB and HAS_COORDS  # rpb unscaled (``_wattn_coords``): natural-unit logits
        inv_bias = tl.zeros((BS, BS), tl.float32)
        if HAS_RPB and not HAS_COORDS:  # rpb's column h (stride NH), scaled to log2 units here, once per program
            tab_m = tab_h + (ly_m * (2 * WW - 1) + lx_m + ((WH - 1) * (2 * WW - 1) + WW - 1)) * NH
            inv_bias += _gather(tab_m[:, None] - ((ly_n * (2 * WW - 1) + lx_n) * NH)[None, :], col_ok, False,
                                ASM) * 1.4426950408889634
        if HAS_BIAS:
            inv_bias += _gather(ab_h + tl.minimum(offs_m, N - 1)[:, None] * N + offs_n[None, :], col_ok[None, :],
                                True, ASM) * (1.0 if NAT else 1.4426950408889634)
        offs_d = tl.arange(0, D)
        w, b, wy, wx = _first_window(c * WPP, nW, nWw)
        for i in range(0, WPP):
            if w < BNW:
                y0 = wy * WH
                x0 = wx * WW
                pos_m, reg_m = _pos(ly_m, lx_m, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
                pos_n, reg_n = _pos(ly_n, lx_n, y0, x0, H, W, SH, SW, WH, WW, SHIFT)
                q = _unit(tl.load(qkv + (_idx(b * (H * W) + pos_m, IDX64) * (3 * C) + hd)[:, None] + offs_d[None, :]),
                          COSINE)
                krow = _idx(b * (H * W) + pos_n, IDX64) * (3 * C) + hd
                k = _unit(tl.load(qkv + krow[:, None] + C + offs_d[None, :], mask=col_ok[:, None], other=0.0), COSINE)
                v = tl.load(qkv + krow[:, None] + 2 * C + offs_d[None, :], mask=col_ok[:, None], other=0.0)
                t = _mm(q, tl.trans(k), F32, UPCAST) * (qk_scale * 0.6931471805599453 if NAT else qk_scale)
                if INV_BIAS:
                    t += inv_bias
                grp_m = reg_m
                grp_n = reg_n
                if HAS_GROUP:
                    grp_m = tl.load(group + (b % GG) * (H * W) + pos_m)
                    grp_n = tl.load(group + (b % GG) * (H * W) + pos_n)
                if HAS_RPB and HAS_COORDS:
                    cy_m, cx_m = _coords(coords, (b % GC) * (H * W), pos_m, ly_m, lx_m, True)
                    cy_n, cx_n = _coords(coords, (b % GC) * (H * W), pos_n, ly_n, lx_n, True)
                    t = _add_coord_bias(t, tab_h, cy_m, cx_m, cy_n, cx_n, RH, RW, NH, False, ASM)  # rpb in place
                t, _ = _mask(t, reg_m, reg_n, grp_m, grp_n, col_ok, SHIFT, HAS_GROUP, True)
                m = tl.max(t, 1)
                m = tl.where(m == float("-inf"), 0.0, m) * (1.4426950408889634 if NAT else 1.0)  # log2 units
                p = tl.exp2((t * 1.4426950408889634 if NAT else t) - m[:, None])
                l_i = tl.sum(p, 1)
                acc = _mm(p.to(v.dtype), v, F32, UPCAST)
                _finish(out, lse, acc, m, l_i, offs_m, w, h, b, y0, x0, hd, C, NH, H, W, SH, SW, N, D, WH, WW, SHIFT,
                        IDX64, ASM)
            w, b, wy, wx = _next_window(w, b, wy, wx, nW // nWw, nWw)
    else:
        # TPP 2: pairs of tiles, the tail tile joins the last pass; TPP 1: one tile per pass, the
        # tail tile in a pass of its own (the fewest live registers)
        N_PASSES: tl.constexpr = (N_TILES + TPP - 1) // TPP if N_TILES > 0 else 1
        # ONE_TAIL: the tail tile in a one-block pass of its own (``_tail_rows``)
        ONE: tl.constexpr = ONE_TAIL and BM_TAIL > 0 and BM_TAIL < 64 and N_TILES > 0  # a 64-row tail is wgmma as is
        TAIL_ALONE: tl.constexpr = TPP == 1 and BM_TAIL > 0 and N_TILES > 0 and not ONE
        LAST: tl.constexpr = N_PASSES - 1
        w, b, wy, wx = _first_window(c * WPP, nW, nWw)
        for i in range(0, WPP):
            if w < BNW:
                y0 = wy * WH
                x0 = wx * WW
                for ps in tl.static_range(N_PASSES - 1):  # full passes (TPP tiles each)
                    _pass(qkv, out, lse, tab_h, ab_h, group, coords, codes, w, h, b, y0, x0, hd, qk_scale, C, NH, H,
                          W, SH, SW, GG, GC, RH, RW, TPP * BLOCK_M * ps, TPP, BLOCK_M, 0, N, D, WH, WW, BLOCK_N,
                          BN_TAIL, HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST, IDX64, ASM, COSINE)
                # the last pass from a call site of its own: the static report tells its key loop from the
                # full passes' by source line (bodies of unequal size at one site read as unrolled copies)
                _pass(qkv, out, lse, tab_h, ab_h, group, coords, codes, w, h, b, y0, x0, hd, qk_scale, C, NH, H,
                      W, SH, SW, GG, GC, RH, RW, TPP * BLOCK_M * LAST, N_TILES - TPP * LAST if N_TILES > 0 else 0,
                      BLOCK_M, BM_TAIL if not (TAIL_ALONE or ONE) else 0, N, D, WH, WW, BLOCK_N, BN_TAIL,
                      HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST, IDX64, ASM, COSINE)
                if ONE:
                    _tail_rows(qkv, out, lse, tab_h, group, codes, w, h, b, y0, x0, hd, qk_scale, C, NH, H, W, SH, SW,
                               GG, N_TILES * BLOCK_M, BM_TAIL, BS, N, D, 64, WH, WW, HAS_RPB, HAS_GROUP, SHIFT, UPCAST,
                               IDX64, ASM, COSINE)
                if TAIL_ALONE:
                    _pass(qkv, out, lse, tab_h, ab_h, group, coords, codes, w, h, b, y0, x0, hd, qk_scale, C, NH, H,
                          W, SH, SW, GG, GC, RH, RW, N_TILES * BLOCK_M, 1, BM_TAIL, 0, N, D, WH, WW, BLOCK_N, BN_TAIL,
                          HAS_RPB, HAS_BIAS, HAS_GROUP, HAS_COORDS, SHIFT, F32, UPCAST, IDX64, ASM, COSINE)
            w, b, wy, wx = _next_window(w, b, wy, wx, nW // nWw, nWw)


# ----------------------------------------------------------------------------- launchers


def _alloc(shape, dtype, device):
    """Output allocation (uninitialized; every element is written by a kernel). Tests poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def _alloc_for():
    """The current ``_alloc`` (tests replace it to poison outputs; the backward module allocates through this)."""
    return _alloc


def _tail(n, block):
    """Size of the tail block covering ``n % block`` items (0 if none): a power of two >= 16."""
    r = n % block
    return 0 if r == 0 else max(16, triton.next_power_of_2(r))


def _fwd_config(N, D, heavy, wide):
    """(BLOCK_M, BLOCK_N, tiles per pass, num_warps, num_stages). Two 64x64 score tiles per pass
    fill ~240 registers (2 CTAs/SM) with the common masks (group or none, rpb, int32 labels,
    d <= 32); heavier specializations (shift, attn_bias, coords, int64 labels, d >= 64, fp32)
    spill there and take 32-key blocks and no software pipelining; two of shift/group/attn_bias/
    coords together, a heavy one with d >= 64, or d = 128 take one tile per pass, and the tail
    tile a pass of its own (its 16-row MMA layout next to a 64-row tile's state spills). Under
    the interpreter small tiles, so that the tile loops, both tails, one or two tiles per pass,
    several passes and the single-tile path all run in tests (at most 4 full row tiles)."""
    if _INTERPRET:
        bm = 16 if N < 80 else (32 if N < 160 else 64)
        return bm, 16, (1 if wide else 2), 1, 1
    bn = 16 if (wide and D >= 64) or (heavy and D >= 128) else (32 if heavy or D >= 64 else 64)
    return 64, bn, (1 if wide or D >= 128 else 2), 4, (1 if heavy else 2)


def _one_tail(dtype, D, attn_bias, coords):
    """Whether a tail row tile under 64 rows takes its one-block transposed pass (``_tail_rows``):
    16-bit inputs, D <= 64, no attn_bias or coords (MixMIM stages 1-3); the rest (and the
    interpreter's fp32 tests) keep the tail in the last pass, so both paths run in tests."""
    return dtype != torch.float32 and D <= 64 and attn_bias is None and coords is None


def _single(N):
    """Windows of one tile (N <= 64; under the interpreter N < 16, so both paths run in tests)."""
    return N < 16 if _INTERPRET else N <= 64


def _by_segment(N, sh, sw, attn_bias, group, coords):
    """Whether the forward takes the by-segment path (``_wattn_seg``): windows over one tile with a
    group and/or shift mask, no attn_bias, no coords, not cosine (``_forward``: its 16-bit window-16
    config spills; ``SEGMENTS`` False: never, for comparisons)."""
    return SEGMENTS and not _single(N) and (group is not None or sh > 0 or sw > 0) and attn_bias is None \
        and coords is None


SEGMENTS = True


def _windows_per_program(programs, single_tile):
    """Windows per program (a constexpr power of two: loop bounds from kernel arguments break
    Triton 3.6's interpreter with numpy >= 2.4): single-tile windows amortize the hoisted bias
    tile over several while keeping ~2k programs in flight; 2 under the interpreter so the loop
    and its guard run."""
    if _INTERPRET:
        return 2
    return min(8, _pow2_floor(programs // 2048)) if single_tile else 1


def _pow2_floor(n):
    return 1 << max(0, int(n).bit_length() - 1)


_CODES = {}


def _codes(wh, ww, device):
    """int32 table code ``ly*(2ww-1) + lx`` of every window-local key index (padded indices:
    the last real key's), cached per window shape and device (never written)."""
    key = (wh, ww, str(device))
    t = _CODES.get(key)
    if t is None:
        j = torch.arange(wh * ww + 256, device=device).clamp_(max=wh * ww - 1)
        t = _CODES[key] = ((j // ww) * (2 * ww - 1) + j % ww).to(torch.int32)
    return t


_CODE_OFFS = {}


def _code_offs(wh, ww, device):
    """The forward's key table: ``-4 * code`` (``_codes``) as int64 byte offsets, so a key's table
    offset is one 64-bit load, not a load, a negation and a 64-bit widening per key and thread."""
    key = (wh, ww, str(device))
    t = _CODE_OFFS.get(key)
    if t is None:
        t = _CODE_OFFS[key] = _codes(wh, ww, device).to(torch.int64) * -4
    return t


def _tables(rpb, attn_bias, qkv, num_heads, raw=False):
    """(nH, T) relative-position table pre-scaled by log2e (a head's row is contiguous; one launch:
    scaled straight into the contiguous buffer), or ``raw`` (single-tile windows: without coords the
    kernels gather their bias tile once per program and scale it there; with coords they read it per
    pair, ``_wattn_coords``) rpb (T, nH) itself, no launch; dummies (never read) for absent inputs."""
    return _rpb_table(rpb, qkv, _LOG2E, raw), qkv if attn_bias is None else attn_bias


def _flags(qkv, rpb, attn_bias, group, coords, sh, sw):
    return dict(HAS_RPB=rpb is not None, HAS_BIAS=attn_bias is not None, HAS_GROUP=group is not None,
                HAS_COORDS=coords is not None, SHIFT=sh > 0 or sw > 0,
                F32=qkv.dtype == torch.float32, UPCAST=_INTERPRET)


def window_attention(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale):
    """Forward (``_forward`` with a softmax scale)."""
    return _forward(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale, None)


def window_attention_cosine(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, logit_scale):
    """SwinV2 cosine-attention forward: logits normalize(q) @ normalize(k)^T * exp(min(logit_scale,
    log 100)) + biases + masks; logit_scale fp32 (nH,) contiguous. Outputs as ``_forward``."""
    return _forward(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, 1.0, logit_scale)


def _forward(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale, logit_scale):
    """Forward. qkv (B,H,W,3C) contiguous fp32/fp16/bf16, channels (3,nH,d), d in {16,32,64,128},
    N = wh*ww <= 256; rpb fp32 ((2rh-1)*(2rw-1), nH) or None; attn_bias fp32 (nH,N,N) or None;
    group int32/int64 (G,H,W), coords int32/int64 (G,H,W,2), G in {1,B}, at original positions.

    Returns (out (B,H,W,C) qkv.dtype, lse fp32 (B*nW, nH, N): natural-log row log-sum-exp per
    window of the rolled grid, row-major windows, batch outermost).
    """
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    N = wh * ww
    nWw = W // ww
    nW = (H // wh) * nWw
    out = _alloc((B, H, W, num_heads * D), qkv.dtype, qkv.device)
    lse = _alloc((B * nW, num_heads, N), torch.float32, qkv.device)
    if out.numel() == 0:
        return out, lse
    if logit_scale is None and _by_segment(N, sh, sw, attn_bias, group, coords):
        seg_forward(qkv, out, lse, rpb, num_heads, wh, ww, sh, sw, group,
                    float(scale) * _LOG2E, logit_scale, _flags(qkv, rpb, attn_bias, group, coords, sh, sw),
                    _INTERPRET, qkv.numel() >= 2**31)
        return out, lse
    masks = (sh > 0 or sw > 0) + (attn_bias is not None) + (coords is not None)
    heavy = masks > 0 or qkv.dtype == torch.float32 or (group is not None and group.dtype == torch.int64)
    wide = masks + (group is not None) >= 2 or (heavy and D >= 64)
    bm, bn, tpp, warps, stages = _fwd_config(N, D, heavy, wide)
    bnw = B * nW
    single = _single(N)
    tab, ab = _tables(rpb, attn_bias, qkv, num_heads, raw=single)
    wpp = _windows_per_program(bnw * num_heads, single)
    G = (1 if group is None else group.shape[0], 1 if coords is None else coords.shape[0])
    _fwd_kernel[(num_heads, triton.cdiv(bnw, wpp))](
        qkv, out, lse, tab, ab, qkv if group is None else group, qkv if coords is None else coords,
        _code_offs(wh, ww, qkv.device), qkv if logit_scale is None else logit_scale,
        float(scale) * _LOG2E, num_heads, H, W, nW, nWw, sh, sw, *G, rh, rw, bnw, WPP=wpp,
        N=N, D=D, WH=wh, WW=ww, SINGLE=single, BS=max(16, triton.next_power_of_2(N)),
        BLOCK_M=bm, BM_TAIL=_tail(N, bm), BLOCK_N=bn, BN_TAIL=_tail(N, bn), TPP=tpp,
        ASM=not _INTERPRET, IDX64=qkv.numel() >= 2**31, num_warps=warps, num_stages=stages,
        COSINE=logit_scale is not None, ONE_TAIL=_one_tail(qkv.dtype, D, attn_bias, coords),
        **_flags(qkv, rpb, attn_bias, group, coords, sh, sw),
    )
    return out, lse


def window_attention_backward(dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords,
                              rh, rw, scale, need_drpb, need_dbias, deterministic):
    """Backward launcher (in ``window_attention_bwd``): (dqkv, drpb, dbias)."""
    from .window_attention_bwd import window_attention_backward as bwd

    return bwd(dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale,
               need_drpb, need_dbias, deterministic)


def window_attention_cosine_backward(dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords,
                                     rh, rw, logit_scale, need_drpb, need_dbias, need_dlogit_scale, deterministic):
    """Cosine-mode backward launcher (in ``window_attention_bwd``): (dqkv, drpb, dbias, dlogit_scale
    fp32 (nH,) or empty)."""
    from .window_attention_bwd import window_attention_backward as bwd

    return bwd(dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, 1.0,
               need_drpb, need_dbias, deterministic, logit_scale, need_dlogit_scale)
