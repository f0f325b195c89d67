"""Triton window-attention forward by attention segment: masked work skipped (``window_attention``'s
path for windows over one tile with a group and/or shift mask, no attn_bias, no coords).

A window's tokens fall into segments (same shift region AND same group label): a pair attends only
inside its segment. A pre-kernel sorts each window's tokens stably by segment (labels compared at
full width; ``_seg_prep``, one launch of ceil(N/PREP_ROWS) programs a window: the tables are per
window and label map, not per image and head), so that the live
pairs form diagonal blocks, and cuts every segment into query tiles of BLOCK_M rows, its last rows in
a tile of BLOCK_M/2 when they fit one. A program (head h, window w) walks its window's full tiles,
then its half tiles (``_seg_tile``); a tile's rows all lie in one segment ``[lo, hi)`` of the sorted
order and walk only its keys: full BLOCK_N blocks without any mask (WIDE: two at a time, ``while n0 +
2 * BLOCK_N <= a1``, then the odd one, ``while n0 < a1``), then the segment's last partial block with
the key mask ``lo <= n < hi`` (``while n0 < c2``: 0 or 1 trips; TAIL: only when more than BLOCK_N/2
keys are left, else a masked BLOCK_N/2 block, ``while n0 < c3``, or with QUARTER for at most
BLOCK_N/4 keys a masked BLOCK_N/4 block, ``while n0 < c1``; its P @ V in TF32 with K = BLOCK_N/4, or
where the Triton backend has no such dot (PADQ) a 16-bit one over 2 * BLOCK_N/4 keys, P and V padded
with zeros). Rows past the segment end (next
segment's or padding) are computed and never stored.

Softmax against a fixed per-row reference (``_seg_tile``): a probe of the segment's first BLOCK_N/4
keys gives each row a reference near its largest logit, and every step adds p = exp2(logit -
reference) to l and p @ V to acc with no running max and no rescale (an online softmax's max, alpha
and 32 rescale multiplies per step). A tile whose stored rows' sums of p leave [LMIN, LMAX] (a key
far above the probe's, NaN/Inf, rows with no finite probe key) walks again (``while go``, at most
twice) from its rows' true maxima (a max-only pass, ``while n1 < c1``): p <= 1 there, as online.

q/k/v are read through the sorted positions, the table bias by each token's window-local code (on
the GPU from a copy of the head's table in shared memory: a 32-bit add and an LDS per element),
out/lse stored at the original positions (the backward's contract is unchanged; 16-bit out as column
pairs straight from the MMA's registers, ``_store_pairs``).

NaN/Inf in V (edge rule 2): the reference multiplies every masked key's V by 0, so a non-finite V
element reaches every row of the window. A program checks the head's V first (``_wattn_vcheck``; one
read of the window's V, one op per 32-bit word on the GPU, ~3% of a program's instructions; fp16 only
for windows of more than one segment); if any element is not finite or (bf16/fp32) has |v| >= 2**96, every tile
walks all the window's keys with the segment mask (the masked loops from 0 to N), exactly as the
all-pairs kernel, and from its rows' true maxima (p <= 1: exact for |v| < 2**120, SEMANTICS rule 5;
the probe's reference lets p reach 2**32).

Loops (static rules in ``static_rules``, trip counts from ``wattn_workload.seg_walk``): the full and
the half tiles of a window, a tile's walk (once; a second only after a failed reference, never at the
model's inputs) and max pass (0), the unmasked key blocks of a tile (per tile size; double and single
with WIDE), the masked blocks (0 or 1 each; all blocks of the window only for a head whose V holds
NaN/Inf).
"""
from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl

from ._cosine import _head_scale, _unit
from ._wattn_common import (_fast, _gather_off, _gather_smem, _idx, _mm, _mm_acc, _pos, _pv_acc, _rpb_table,
                            _smem_table)
from ._rows import stream_tickets
from ._wattn_vcheck import _v_check


@triton.jit
def _ref0(m, ASM: tl.constexpr):
    """A row's reference from its largest logit ``m``: 0 for -inf (GPU: an asm with side effects, so that it stays
    in the max pass's loop instead of sinking below it, where it would count as the tile's work)."""
    if ASM:
        return tl.inline_asm_elementwise("{ .reg .pred p; setp.eq.f32 p, $1, 0fFF800000; selp.f32 $0, 0f00000000, "
                                         "$1, p; }", "=f,f", [m], dtype=tl.float32, is_pure=False, pack=1)
    else:
        return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _store_pairs(out, row_off, o, row_ok, D: tl.constexpr, ASM: tl.constexpr):
    """``out[row_off + c] = o[:, c]`` (16-bit ``out``, rows where ``row_ok``) as 32-bit words of two adjacent
    columns; on the GPU a convert-and-store asm per word in o's own register layout (the MMA's: a thread's
    words are pairs it holds), where a ``tl.store`` reaches a coalesced layout through shared memory."""
    lo, hi = tl.split(tl.reshape(o, (o.shape[0], D // 2, 2)))
    words = out.to(tl.pointer_type(tl.int32), bitcast=True) + (row_off // 2)[:, None] + tl.arange(0, D // 2)[None, :]
    ok = tl.broadcast_to(row_ok[:, None], lo.shape).to(tl.int32)
    if ASM:  # (the address as int64 and the values as raw words: Triton 3.6 rejects pointer and float asm operands)
        a, x, y = words.to(tl.int64), lo.to(tl.int32, bitcast=True), hi.to(tl.int32, bitcast=True)
        if out.dtype.element_ty.is_fp16():
            tl.inline_asm_elementwise("{ .reg .pred p; .reg .b32 w; setp.ne.b32 p, $4, 0; cvt.rn.f16x2.f32 w, $3, $2; "
                                      "@p st.global.b32 [$1], w; mov.b32 $0, 0; }", "=r,l,r,r,r", [a, x, y, ok],
                                      dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise("{ .reg .pred p; .reg .b32 w; setp.ne.b32 p, $4, 0; cvt.rn.bf16x2.f32 w, $3, $2; "
                                      "@p st.global.b32 [$1], w; mov.b32 $0, 0; }", "=r,l,r,r,r", [a, x, y, ok],
                                      dtype=tl.int32, is_pure=False, pack=1)
    else:
        ty = out.dtype.element_ty
        w = (lo.to(ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF) | \
            (hi.to(ty).to(tl.int16, bitcast=True).to(tl.int32) << 16)
        tl.store(words, w, mask=ok != 0)


@triton.jit
def _seg_bias(tab_m, scode, offs_n, ASM: tl.constexpr, SMEM: tl.constexpr):
    """Table bias of the tile's rows (``tab_m``: row's table address, code_i + c0) and the keys at sorted
    positions ``offs_n`` (``scode``: -4 code_j): from the shared copy (SMEM) or the global table."""
    if SMEM:  # int32 codes: after the layout change a 64-key step reads its 16 in 4 LDS.128 (int64: 16 LDS)
        return _gather_smem(tab_m[:, None], tl.load(scode + offs_n)[None, :])
    else:
        return _gather_off(tab_m[:, None], tl.load(scode + offs_n).to(tl.int64)[None, :], ASM)


@triton.jit
def _seg_scores(q, tab_m, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N: tl.constexpr, D: tl.constexpr,
                BN: tl.constexpr, MASK: tl.constexpr, HAS_RPB: tl.constexpr, F32: tl.constexpr,
                UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr,
                UNSCALED: tl.constexpr, SMEM: tl.constexpr, CLAMP: tl.constexpr):
    """Log2 logits of the tile's rows and the BN keys at sorted position n0 (UNSCALED: in units of
    1/qk_scale; MASK: -inf outside ``[lo, hi)``; CLAMP: keys past N, or (no MASK) past hi, read the key
    before), the keys' K row
    addresses and positions."""
    offs_n = n0 + tl.arange(0, BN)
    jn = offs_n
    if CLAMP:  # unmasked blocks end at a segment's full blocks (<= N): no clamp
        jn = tl.minimum(offs_n, N - 1) if MASK else tl.minimum(offs_n, hi - 1)
    # head base (uniform) + the thread's channels (loop-invariant) + the key's row: one wide multiply-add a row
    kv = (qkv + hd + C + tl.arange(0, D))[None, :] + (_idx(hw + tl.load(mrow + jn), IDX64) * (3 * C))[:, None]
    if COSINE:
        kt = tl.trans(_unit(tl.load(kv), COSINE))
    else:  # K^T straight from memory: a 16-bit B operand without a shared-memory transposition per chunk
        kt = tl.load(tl.trans(kv))
    if UNSCALED:  # logits in units of 1/qk_scale: the table bias (divided by it) is the MMA's accumulator
        if HAS_RPB:  # Swin index code_i + c0 - code_j; scode: -4 code_j, bytes (padded: no clamp)
            t = _mm_acc(q, kt, _seg_bias(tab_m, scode, offs_n, ASM, SMEM), F32, UPCAST)
        else:
            t = _mm(q, kt, F32, UPCAST)
    else:
        t = _mm(q, kt, F32, UPCAST) * qk_scale
        if HAS_RPB:
            t += _seg_bias(tab_m, scode, offs_n, ASM, SMEM)
    if MASK:
        t = tl.where(((offs_n >= lo) & (offs_n < hi))[None, :], t, float("-inf"))
    return t, kv, offs_n


@triton.jit
def _seg_max(q, tab_m, m_i, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N: tl.constexpr, D: tl.constexpr,
             BN: tl.constexpr, HAS_RPB: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
             IDX64: tl.constexpr, ASM: tl.constexpr, COSINE: tl.constexpr, UNSCALED: tl.constexpr,
             SMEM: tl.constexpr, MASK: tl.constexpr):
    """``m_i`` raised to the rows' largest logit over the BN keys at n0 (MASK: of those in ``[lo, hi)``;
    keys past N, or with no MASK past hi, read the key before)."""
    t, _kv, _n = _seg_scores(q, tab_m, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N, D, BN, MASK, HAS_RPB,
                             F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, True)
    return tl.maximum(m_i, tl.max(t, 1))


@triton.jit
def _seg_step(q, tab_m, ms, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale,
              N: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, HAS_RPB: tl.constexpr,
              F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr,
              COSINE: tl.constexpr, UNSCALED: tl.constexpr, SMEM: tl.constexpr, PAD: tl.constexpr):
    """One softmax step of a query tile over the key block at sorted position n0 against the rows' fixed
    reference ``ms`` (log2 units, times qk_scale when UNSCALED): p = exp2(logit - ms), l += sum p,
    acc += p @ V; no running max, no rescale (``_seg_tile`` checks the result). MASK: keys outside
    ``[lo, hi)`` get -inf; keys past N read V as zeros. PAD (16-bit inputs, a block of fewer than 16
    keys, for a Triton without 32-bit K = 8 dots): P @ V as a 16-bit MMA over 2 * BN keys, P and V
    padded with zeros: the MMA of 2 * BN keys, the logits, exponentials and row sums of BN."""
    t, kv, offs_n = _seg_scores(q, tab_m, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N, D, BN, MASK,
                                HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, MASK)
    if MASK:
        v = tl.load(kv + C, mask=(offs_n < N)[:, None], other=0.0)
    else:
        v = tl.load(kv + C)
    if UNSCALED:  # one FMA per element
        p = tl.exp2(t * qk_scale - ms[:, None])
    else:
        p = tl.exp2(t - ms[:, None])
    l_i = l_i + tl.sum(p, 1)
    if PAD:  # [p | 0] @ [v; 0] (no early return here: Triton 3.6 still builds the code after one)
        p = tl.reshape(tl.permute(tl.join(p, tl.zeros_like(p)), (0, 2, 1)), (p.shape[0], 2 * BN))
        v = tl.reshape(tl.permute(tl.join(v, tl.zeros_like(v)), (2, 0, 1)), (2 * BN, D))
    TF32: tl.constexpr = BN < 16 and not (F32 or UPCAST or PAD)  # a 16-bit MMA needs K >= 16 (``_pv_acc``)
    return l_i, _pv_acc(p, v, acc, F32, UPCAST, TF32)


@triton.jit
def _seg_tile(BLOCK_M: tl.constexpr, qkv, out, lse, tab_h, mrow, scode, t, bad, w, h, hw, hd, C, NH, qk_scale,
              N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_RPB: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr,
              ASM: tl.constexpr, COSINE: tl.constexpr, UNSCALED: tl.constexpr, SMEM: tl.constexpr,
              TAIL: tl.constexpr, WIDE: tl.constexpr, QUARTER: tl.constexpr, PADQ: tl.constexpr,
              PAIRS: tl.constexpr):
    """Query tile t of the window (BLOCK_M rows from its first row, all in one segment): its walk, then
    its segment's rows stored at their original positions."""
    offs_d = tl.arange(0, D)
    r0 = tl.load(mrow + 2 * N + t)
    lo = tl.load(mrow + 3 * N + t)
    hi = tl.load(mrow + 4 * N + t)
    offs_m = r0 + tl.arange(0, BLOCK_M)
    jm = tl.minimum(offs_m, N - 1)
    tok = _idx(hw + tl.load(mrow + jm), IDX64)
    q = _unit(tl.load(qkv + (tok * (3 * C) + hd)[:, None] + offs_d[None, :]), COSINE)
    j = tl.load(mrow + N + jm)
    code = j + (j // WW) * (WW - 1) + ((WH - 1) * (2 * WW - 1) + WW - 1)  # code_i + c0
    if SMEM:  # tab_h: the shared copy's 32-bit address
        tab_m = tab_h + 4 * code
    else:
        tab_m = tab_h + code
    # The rows' reference: their largest Q K^T over the segment's first BLOCK_N/4 keys (a probe: no bias,
    # mask, exp or P @ V; fp16: keys past the segment read its last; bf16, fp32: the next sorted keys); every
    # step then adds p = exp2(logit - reference) without a running max or rescale. Kept when every
    # stored row's sum of p lies in [LMIN, LMAX]: LMAX keeps p within fp16, and |acc| <= LMAX max|V| finite
    # for |V| < 2**96 (a window whose V holds more, ``bad``, starts from a reference of +inf: l = 0, the walk
    # from the maxima, p <= 1: finite for |V| < 2**120, as an online softmax); LMIN bounds underflow: bf16
    # and fp32, p >= 2**-32 / N far above their subnormals; fp16 (P @ V in fp16: p below 2**-14 round to
    # multiples of 2**-24), l >= N 2**-12 (N <= 2048; 1/2 above), so those p add at most N 2**-25 / l max|V|
    # <= 2**-13 max|V| to a row, half what normal p's rounding can. Otherwise (a later key more than
    # log2(LMAX) above the reference, a row's keys all far below it, NaN/Inf, rows whose keys are all -inf)
    # the tile walks again from its rows' true maxima (a max-only pass over its keys): p <= 1 as online.
    # bad (V holds NaN/Inf or |v| >= 2**96): a reference of +inf, p = 0, l = 0 < LMIN: the walk from the maxima
    FP16: tl.constexpr = q.dtype.is_fp16()
    m_i = _seg_max(q, tab_m, tl.where(bad, float("inf"), tl.full((BLOCK_M,), float("-inf"), tl.float32)), qkv,
                   mrow, scode, hw, lo, lo, hi if FP16 else N,
                   hd, C, qk_scale, N, D, BLOCK_N // 4, False, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, False)
    LMAX: tl.constexpr = 32768.0 if FP16 else 4294967296.0  # 2**15 | 2**32
    LMIN: tl.constexpr = min(N / 4096.0, 0.5) if FP16 else 2.3283064365386963e-10  # N 2**-12 | 2**-32
    row_ok = offs_m < hi
    # unmasked full blocks of the segment (none when V is not finite); then the masked blocks:
    # the segment's last partial block, or (V not finite) every block of the window
    a1 = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    a0 = tl.where(bad, a1, lo)
    c1 = tl.where(bad, N, hi)
    c2 = c1
    c3 = c1
    if TAIL:
        c2 = c1 - BLOCK_N // 2
    if QUARTER:
        c3 = c1 - BLOCK_N // 4
    # the first walk's reference: the probe's (a stored row without a finite one fails the check: l is inf or NaN)
    mref = m_i
    ms = tl.zeros((BLOCK_M,), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    it = lo * 0
    go = it == 0
    # (while loops: Triton 3.6's interpreter cannot take range() bounds from loaded values)
    while go:  # the walk: once, twice only when the probe's reference fails a row
        ms = mref
        if UNSCALED:
            ms = ms * qk_scale
        n0 = a0
        if WIDE:
            while n0 + 2 * BLOCK_N <= a1:  # unmasked key blocks, two at a time
                l_i, acc = _seg_step(q, tab_m, ms, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N, D,
                                     2 * BLOCK_N, False, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM,
                                     False)
                n0 += 2 * BLOCK_N
        while n0 < a1:  # unmasked key blocks (WIDE: the last odd one)
            l_i, acc = _seg_step(q, tab_m, ms, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N, D,
                                 BLOCK_N, False, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, False)
            n0 += BLOCK_N
        n0 = tl.where(bad, 0, a1)
        while n0 < c2:  # masked key blocks (TAIL: while more than half a block is left)
            l_i, acc = _seg_step(q, tab_m, ms, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N, D,
                                 BLOCK_N, True, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, False)
            n0 += BLOCK_N
        if TAIL:
            while n0 < c3:  # the last <= BLOCK_N/2 keys in a half block (QUARTER: > BLOCK_N/4; 0 or 1 trips)
                l_i, acc = _seg_step(q, tab_m, ms, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N, D,
                                     BLOCK_N // 2, True, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM,
                                     False)
                n0 += BLOCK_N
        if QUARTER:
            while n0 < c1:  # the last <= BLOCK_N/4 keys in a quarter block (0 or 1 trips)
                l_i, acc = _seg_step(q, tab_m, ms, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, qk_scale, N, D,
                                     BLOCK_N // 4, True, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM,
                                     PADQ)
                n0 += BLOCK_N
        fine = (l_i >= LMIN) & (l_i <= LMAX)  # False for NaN
        fail = (row_ok & (fine.to(tl.int32) == 0)).to(tl.int32)
        # reduced as a flat (BLOCK_M x 8) broadcast, which spans the whole warp: one REDUX on Triton 3.6 too (the
        # rows alone: three shuffle steps there, each with a fallback for a diverged warp)
        go = (tl.max(tl.reshape(tl.broadcast_to(fail[:, None], (BLOCK_M, 8)), [BLOCK_M * 8]), 0) > 0) & (it == 0)
        # the max pass only after a failed walk (no trip otherwise; in the loop, not under an ``if``: its setup
        # is then the loop's, counted with its trips), from -inf: the probe's reference can lie above the rows'
        # true maxima
        n1s = tl.where(bad, 0, lo)
        n1 = tl.where(go, n1s, c1)
        while n1 < c1:  # max pass: the rows' largest logits over the tile's keys (only after a failed walk)
            m_i = _seg_max(q, tab_m, tl.where(n1 == n1s, float("-inf"), m_i), qkv, mrow, scode, hw, n1, lo, hi, hd,
                           C, qk_scale, N, D, BLOCK_N, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, True)
            mref = _ref0(m_i, ASM)  # no unmasked key: p = 0, l = 0, NaN (edge rule 2)
            # l and acc restart from 0 for the second walk: reset here (>= 1 trip: lo < hi) by a select the
            # compiler cannot fold (n1 >= 0), so that the walk starts from the loop's l and acc, not from
            # constants: constant zeros are re-made on each key loop's entry edge (18 CS2R a tile)
            l_i = tl.where(n1 < 0, l_i, 0.0)
            acc = tl.where(n1 < 0, acc, 0.0)
            n1 += BLOCK_N
        it += 1
    # store the segment's rows only (l = 0: NaN, edge rule 2)
    o = acc * _fast(l_i, 0, ASM)[:, None]
    if PAIRS and out.dtype.element_ty.primitive_bitwidth == 16:
        _store_pairs(out, tok * C + hd, o, row_ok, D, ASM)
    else:
        tl.store(out + (tok * C + hd)[:, None] + offs_d[None, :], o.to(out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse + (w * NH + h) * N + j, (ms + _fast(l_i, 1, ASM)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _seg_kernel(qkv, out, lse, tab, meta, ninfo, scode, ls, qk_scale, NH: tl.constexpr, H, W, nW, GG, tab_scale,
                N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RPB: tl.constexpr,
                F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr,
                COSINE: tl.constexpr, VBITS: tl.constexpr, UNSCALED: tl.constexpr, SMEM: tl.constexpr = False,
                TP: tl.constexpr = 1024, TAIL: tl.constexpr = False, WIDE: tl.constexpr = False,
                VCHECK: tl.constexpr = True, QUARTER: tl.constexpr = False, PADQ: tl.constexpr = False,
                PAIRS: tl.constexpr = False):
    """Program (head h, window w), head-fastest (NH constexpr: a key's K and V at immediate offsets from one
    row address). meta (GG*nW, 5, N) int32 per window: sorted tokens'
    grid positions, their window-local indices, and the tiles' first row, segment start, segment
    end; ninfo (GG*nW, 3): BLOCK_M-row tiles, segments, BLOCK_M/2-row tiles; scode (GG*nW, N +
    BLOCK_N) int32: -4 * table code of the sorted keys (0 past N). tab: with SMEM the module's (T, nH)
    rel-pos table itself, scaled by ``tab_scale`` into the shared copy (no scaled copy launched); else the
    (nH, T) table already scaled."""
    h = tl.program_id(0)
    w = tl.program_id(1)
    if COSINE:
        qk_scale = _head_scale(ls, h) * 1.4426950408889634
    C = NH * D
    hd = h * D
    b = w // nW
    wl = w % nW
    hw = b * (H * W)
    gw = (b % GG) * nW + wl
    mrow = meta + gw * (5 * N)
    scode = scode + gw * (N + BLOCK_N)
    T: tl.constexpr = (2 * WH - 1) * (2 * WW - 1)
    if SMEM:  # the head's table in shared memory (TP: T rounded to a power of two): 32-bit addresses, LDS
        tab_h = _smem_table(tab + h, T, TP, NH, tab_scale)
    else:
        tab_h = tab + h * T  # (nH, T) table, pre-scaled
    nseg = tl.load(ninfo + 3 * gw + 1)
    bad = nseg < 0  # False
    if VCHECK & ((nseg > 1) | (VBITS != 1)):  # fp16 with one segment: NaN/Inf reach every row by the walk
        bad = _v_check(qkv, mrow, hw, hd, C, N, BS, D, IDX64, VBITS, ASM)
    nbig = tl.load(ninfo + 3 * gw)
    nsmall = tl.load(ninfo + 3 * gw + 2)
    t = nbig * 0
    while t < nbig:  # BLOCK_M-row tiles
        _seg_tile(BLOCK_M, qkv, out, lse, tab_h, mrow, scode, t, bad, w, h, hw, hd, C, NH, qk_scale, N, D, WH,
                  WW, BLOCK_N, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, TAIL, WIDE, QUARTER,
                  PADQ, PAIRS)
        t += 1
    while t < nbig + nsmall:  # a segment's last rows when they fit half a tile
        _seg_tile(BLOCK_M // 2, qkv, out, lse, tab_h, mrow, scode, t, bad, w, h, hw, hd, C, NH, qk_scale, N, D,
                  WH, WW, BLOCK_N, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED, SMEM, TAIL, WIDE, QUARTER,
                  PADQ, PAIRS)
        t += 1


@triton.jit
def _seg_key(group, gbase, t, wy, wx, H, W, SH, SW, N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
             SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr):
    """Tokens t of window (wy, wx): grid position, window-local index, shift region, group label (full width)."""
    j = tl.minimum(t, N - 1)
    ly = j // WW
    lx = j % WW
    pos, reg = _pos(ly, lx, wy * WH, wx * WW, H, W, SH, SW, WH, WW, SHIFT)
    lab = reg
    if HAS_GROUP:
        lab = tl.load(group + gbase + pos)
    return pos, j, reg, lab


@triton.jit
def _seg_prep(group, meta, ninfo, scode, scratch, count, nW, nWw, H, W, SH, SW, N: tl.constexpr, WH: tl.constexpr,
              WW: tl.constexpr, BS: tl.constexpr, CH: tl.constexpr, RC: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr):
    """The tables of ``_seg_kernel`` for window gw of label map g = gw // nW, RC tokens per program
    (program (gw, c): tokens c*RC ...): a token's sorted position is the number of tokens with a smaller
    (region, label) key plus those with an equal key and a smaller index (stable), counted pairwise
    against all the window's tokens in chunks of CH; its segment is [lo, lo + count). Tiles start every
    BM rows of a segment (a half tile when at most BM/2 rows are left): per sorted position (through
    ``scratch``) the full tiles, then the half tiles, in order, listed by the window's last program to
    finish (``count``: one counter per window, 0 at the launch; an acq_rel atomic after a CTA barrier
    publishes the program's stores; the last program stores 0 back, so the launcher keeps the counters
    between launches and zeroes them only once, ``_counters``)."""
    gw = tl.program_id(0)
    wl = gw % nW
    wy = wl // nWw
    wx = wl % nWw
    gbase = (gw // nW) * (H * W)
    a = tl.program_id(1) * RC + tl.arange(0, RC)
    pos, j, reg, lab = _seg_key(group, gbase, a, wy, wx, H, W, SH, SW, N, WH, WW, SHIFT, HAS_GROUP)
    lo = tl.zeros((RC,), tl.int32)
    cnt = tl.zeros((RC,), tl.int32)
    before = tl.zeros((RC,), tl.int32)
    for c0 in tl.static_range(0, BS, CH):
        b = c0 + tl.arange(0, CH)
        _p, _j, rb, lb = _seg_key(group, gbase, b, wy, wx, H, W, SH, SW, N, WH, WW, SHIFT, HAS_GROUP)
        vb = (b < N)[None, :]
        same_r = rb[None, :] == reg[:, None]
        eq = same_r & (lb[None, :] == lab[:, None]) & vb
        lt = ((rb[None, :] < reg[:, None]) | (same_r & (lb[None, :] < lab[:, None]))) & vb
        lo += tl.sum(lt.to(tl.int32), 1)
        cnt += tl.sum(eq.to(tl.int32), 1)
        before += tl.sum((eq & (b[None, :] < a[:, None])).to(tl.int32), 1)
    valid = a < N
    rank = lo + before
    m = meta + gw * (5 * N)
    tl.store(m + rank, pos, mask=valid)
    tl.store(m + N + rank, j, mask=valid)
    sc = scode + gw * (N + BN)
    tl.store(sc + rank, (j // WW * (2 * WW - 1) + j % WW) * -4, mask=valid)
    kb = tl.arange(0, BN)  # keys past N (masked): any valid offset; the first program writes them
    tl.store(sc + N + kb, tl.zeros((BN,), tl.int32), mask=kb < BN * (tl.program_id(1) == 0).to(tl.int32))
    first = valid & (before % BM == 0)
    small = first & (cnt - before <= BM // 2)
    kind = tl.where(first, tl.where(small, 2, 1), 0)
    scr = scratch + gw * (3 * BS)
    tl.store(scr + rank, kind, mask=valid)
    tl.store(scr + BS + rank, lo, mask=valid)
    tl.store(scr + 2 * BS + rank, lo + cnt, mask=valid)
    tl.debug_barrier()
    done = tl.atomic_add(count + gw, 1, sem="acq_rel")
    if done == tl.num_programs(1) - 1:  # every program of the window has stored its ranks
        tl.debug_barrier()
        _seg_list(m, ninfo + 3 * gw, scr, N, BS)
        tl.store(count + gw, 0)  # every other program's add is done: the counter is 0 for the next launch


@triton.jit
def _seg_list(m, info, scr, N: tl.constexpr, BS: tl.constexpr):
    """``_seg_prep``'s tile lists of one window from the per-rank tile kinds (0 none, 1 full tile starts
    here, 2 half tile) and segment bounds in ``scr`` (read through L2: other programs wrote them); a
    segment starts at the sorted positions that equal their segment's start."""
    a = tl.arange(0, BS)
    valid = a < N
    kr = tl.load(scr + a, mask=valid, other=0, cache_modifier=".cg")
    lo = tl.load(scr + BS + a, mask=valid, other=-1, cache_modifier=".cg")
    big_r = (kr == 1).to(tl.int32)
    small_r = (kr == 2).to(tl.int32)
    nbig = tl.sum(big_r, 0)
    nsmall = tl.sum(small_r, 0)
    cb = tl.cumsum(big_r, 0)
    cs = tl.cumsum(small_r, 0)
    # rank a's entry: its tile's index, or (no tile starts at a) the next entry past the tiles, which get 0:
    # a permutation of [0, N), so the stores write every entry (meta is not zeroed beforehand)
    tid = tl.where(kr == 1, cb - 1, tl.where(kr == 2, nbig + cs - 1, nbig + nsmall + a - cb - cs))
    live = kr > 0
    tl.store(m + 2 * N + tid, tl.where(live, a, 0), mask=valid)
    tl.store(m + 3 * N + tid, tl.where(live, lo, 0), mask=valid)
    tl.store(m + 4 * N + tid, tl.load(scr + 2 * BS + a, mask=live, other=0, cache_modifier=".cg"), mask=valid)
    tl.store(info, nbig)
    tl.store(info + 1, tl.sum((lo == a).to(tl.int32), 0))
    tl.store(info + 2, nsmall)


# ----------------------------------------------------------------------------- launchers

_LOG2E = 1.4426950408889634


# unmasked key blocks two at a time (16-bit inputs): halves the per-block share of the rescale, alpha and
# row-reduction shuffles; 239 registers at d 32 (8 one-warp CTAs/SM, was 12): see seg_config
WIDE = True
# a segment's last <= BLOCK_N/4 keys in a quarter block (8 keys; P @ V in TF32 for 16-bit inputs, ``_pv_acc``)
QUARTER = True
# the quarter block's P @ V over 2 * 8 keys, P and V padded with zeros (``_seg_step``'s PAD): always where the
# Triton backend takes no 32-bit dot with K = 8 (``_tf32_k8``); True: here too (mixmim-b-s1 bf16 static, Triton
# 3.9: 196.0 us vs TF32's 194.5, the half block's 198.2)
PADQ = False
# 16-bit outputs stored as words of two columns in the MMA's layout (``_store_pairs``), not through shared memory
PAIRS = True


@functools.lru_cache(maxsize=None)
def _tf32_k8() -> bool:
    """Whether this Triton's NVIDIA backend takes 32-bit dots with K = 8, which the quarter block's TF32
    P @ V is (Triton 3.9: K >= 8 for 32-bit types; 3.6, the GPU machine's: K >= 16 for every non-8-bit
    type, so the quarter block's P @ V takes 16 keys there, padded with zeros: PADQ)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import min_dot_size

        f32 = types.SimpleNamespace(scalar=types.SimpleNamespace(primitive_bitwidth=32))
        return min_dot_size(GPUTarget("cuda", 90, 32))(f32, f32)[2] <= 8
    except Exception:  # another backend layout: the padded quarter block, which every version compiles
        return False
PREP_ROWS = 16  # tokens per ``_seg_prep`` program (all the window's keys each): ceil(N/16) programs a window


def seg_config(N, D, dtype, interpret):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): one warp per program (mma.sync), tiles of 32 rows and
    a segment's last rows in a 16-row tile when they fit one, 32-key blocks. A segment of s tokens
    costs its tiles' rows x ceil(s/BN) * BN keys: at MixMIM-B stage 1 (segments of 28..168 tokens)
    rows rounded to 16 walk 74% of the window's 196^2 pairs, 64-row wgmma tiles 91% (static
    estimates before ``_online_scaled``: 32/16-row tiles 257 us, 16-row 280, 32-row 274, 64-row 320;
    64-key blocks 351; with it 250). Session 4 (mixmim-b-s1 bf16 static estimates): the table in shared
    memory 249.7 us; a segment's last <= BN/2 keys in a half block (TAIL) 236.9; ``_seg_prep`` over
    13 programs a window 232.8; unmasked blocks two at a time (WIDE, 16-bit inputs) 220.6, at 239
    registers: 8 one-warp CTAs/SM, the model's threshold for full issue (unverified on a GPU: set
    ``WIDE = False`` if it measures slower); then (from 214.0) int32 key codes, four keys per shared
    load, 212.8; no key clamp in unmasked blocks 212.5. Tried and dropped (no gain under ptxas's
    register-allocation noise of +-7 instructions per 64-key step): a V check over exactly N rows
    (power-of-two row blocks), a one-compare (unsigned) segment mask. No
    software pipelining: a walk is 3-4 blocks, and a pipelined loop's peeled prologue costs more
    issue than it hides with 12+ one-warp programs per SM (estimate 280 vs 297 us at 16 rows;
    unverified on a GPU). Session 5 (from 212.5): a segment's last <= BN/4 keys in a quarter block
    (QUARTER; P @ V in TF32, which the model counts at the 16-bit rate though sm_90 runs TF32 mma.sync
    at half of it: ~+0.8 us) 208.0; K^T loaded straight (no per-chunk shared-memory transposition)
    206.2; the fixed per-row reference from a probe (no running max or rescale) 194.9; the probe
    without the bias and the key mask for bf16/fp32 193.2 (unverified on a GPU; a real model whose rows
    often have a key more than 32 log2 units above the probe's keys pays a second walk there). Tried
    and dropped: per-lane partial row sums (a (BLOCK_M, 4) l, reduced once: the steps lose their 8
    shuffles but the check and the end gain more, 195.7), a float max for the walk's retry flag
    (196.3). Session 6: the V check also flags |v| >= 2**96 for every bf16/fp32 window (exact for
    |v| < 2**120; bf16 max/min chains over the 8-row blocks that hold rows < N) 194.2; Triton 3.6 (no
    32-bit K = 8 dot): the quarter block with a zero-padded 16-key P @ V (PADQ) 197.0 there (the half
    block: 199.1). Tried and dropped: the walk's zeroing only before the first walk and in the retry
    (196.4: ptxas still zeroes twice and adds moves), zeros through an asm move (202.3), one max/min
    tree over the whole V (no VHMNMX fusion, 194.9; 16/32-row blocks likewise). Session 7 (side work
    priced: 196.5 with ``seg_prepare``'s 2 us memset; Triton 3.6 199.2): no memset (``_seg_prep``'s
    counters kept between launches, meta's tails written) 194.5; l and acc zeroed once a tile (the second
    walk's reset in the max pass: as constants they were re-made at the double block loop's entry, 18
    CS2R a tile) 193.6; the max pass's setup inside its loop, the first walk from the probe's reference
    as it is 193.1 (3.6: 196.2); the retry flag reduced over the whole warp (3.6 then emits REDUX too,
    not three shuffles with diverged-warp fallbacks) 193.1 (3.6: 194.6); 16-bit outputs stored as column
    pairs in the MMA's layout (``_store_pairs``; 16 STG.32 a 32-row tile for 4 STG.128 through shared
    memory: unverified on a GPU, set ``PAIRS = False`` if it measures slower) 192.7 (3.6: 193.9). Tried
    and dropped: ``max.NaN.xorsign.abs.bf16x2`` for the V check (one op a word, but no 3-input VHMNMX
    fusion: as many ops as the two chains). fp16's probe without the table bias (LMIN 1/2 -> N 2**-12):
    fp16 194.8 -> 193.7 (3.6: 196.5 -> 195.4; unverified on a GPU: a real model whose probe keys' bias lies
    > 4.4 log2 units below its rows' best pays a second walk); its V check over blocks of 8 rows < N (one FMA
    chain) 193.5 (195.3); no key mask, keys past the segment clamped to its last 193.2 (194.6). Under the interpreter 32/16 x 16, so
    that segments of several tiles and blocks and both tile sizes run in tests."""
    if interpret:
        return 32, 16, 1, 1
    f32 = dtype == torch.float32
    return 32, (16 if D >= 128 or (f32 and D >= 64) else 32), 1, 1


def _counters(GW, device):
    """``_seg_prep``'s per-window counters: ``_rows.stream_tickets`` (zeroed once per (device, stream), left
    at 0 by every launch: the window's last program stores 0 back), or while a CUDA graph is captured a
    fresh zeroed buffer (one memset in the graph)."""
    c = stream_tickets(device, GW)
    return torch.zeros(GW, dtype=torch.int32, device=device) if c is None else c


def _empty(shape, dtype, device):
    """``seg_prepare``'s table allocation (uninitialized: ``_seg_prep`` writes every element). Tests poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def seg_prepare(H, W, wh, ww, sh, sw, group, bm, bn, device):
    """``_seg_prep``'s tables for G = group.shape[0] (or 1) label maps x nW windows: meta (G*nW, 5, N)
    int32 [grid position, window-local index of each sorted token; tiles' first row, segment start,
    segment end: full tiles, then half tiles (entries past them: 0)], ninfo (G*nW, 3) int32 [full tiles,
    segments, half tiles], scode (G*nW, N + bn) int32: -4 * table code of
    each sorted key (keys past N: 0). One launch, no memset (the counters persist, ``_counters``)."""
    N, nWw = wh * ww, W // ww
    nW = (H // wh) * nWw
    GW = (1 if group is None else group.shape[0]) * nW
    BS = triton.next_power_of_2(N)
    meta = _empty((GW, 5, N), torch.int32, device)
    ninfo = _empty((GW, 3), torch.int32, device)
    scode = _empty((GW, N + bn), torch.int32, device)
    scratch = torch.empty((GW, 3, BS), dtype=torch.int32, device=device)
    rc = min(BS, PREP_ROWS)
    _seg_prep[(GW, triton.cdiv(N, rc))](meta if group is None else group, meta, ninfo, scode, scratch,
                                        _counters(GW, device), nW, nWw, H, W, sh, sw, N=N, WH=wh, WW=ww, BS=BS,
                                        CH=min(BS, 32), RC=rc, BM=bm, BN=bn, SHIFT=sh > 0 or sw > 0,
                                        HAS_GROUP=group is not None, num_warps=4)
    return meta, ninfo, scode


def seg_forward(qkv, out, lse, rpb, num_heads, wh, ww, sh, sw, group, qk_scale, logit_scale, flags, interpret,
                idx64):
    """Launch ``_seg_prep`` and ``_seg_kernel`` (rpb: fp32 ((2wh-1)*(2ww-1), nH) or None; qk_scale: the
    softmax scale times log2e; flags: ``window_attention._flags``)."""
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    N = wh * ww
    nWw = W // ww
    nW = (H // wh) * nWw
    bm, bn, warps, stages = seg_config(N, D, qkv.dtype, interpret)
    ntab = (2 * wh - 1) * (2 * ww - 1)
    meta, ninfo, scode = seg_prepare(H, W, wh, ww, sh, sw, group, bm, bn, qkv.device)
    # logits in units of 1/qk_scale (``_seg_step``: one FMA per exponent) for a plain softmax scale in a safe range
    unscaled = logit_scale is None and 2.0 ** -20 <= qk_scale <= 2.0 ** 20
    # the table pre-scaled by log2e, or (unscaled) in units of 1/qk_scale: in the kernel's shared copy (SMEM,
    # read from rpb in place: no launch), else an (nH, T) copy in one launch
    tab_scale = _LOG2E / qk_scale if unscaled else _LOG2E
    smem = not interpret and flags["HAS_RPB"] and ntab <= 4096
    tab = _rpb_table(rpb, qkv, tab_scale, smem)
    _seg_kernel[(num_heads, B * nW)](
        qkv, out, lse, tab, meta, ninfo, scode, qkv if logit_scale is None else logit_scale, qk_scale, num_heads,
        H, W, nW, 1 if group is None else group.shape[0], tab_scale, N=N, D=D, WH=wh, WW=ww,
        BS=triton.next_power_of_2(N), BLOCK_M=bm, BLOCK_N=bn, HAS_RPB=flags["HAS_RPB"],
        F32=flags["F32"], UPCAST=flags["UPCAST"], IDX64=idx64, ASM=not interpret,
        COSINE=logit_scale is not None, VBITS={torch.bfloat16: 0, torch.float16: 1}.get(qkv.dtype, 2),
        UNSCALED=unscaled, SMEM=smem,
        TP=triton.next_power_of_2(ntab), TAIL=bn >= 32 or interpret, QUARTER=QUARTER and (bn >= 32 or interpret),
        PADQ=PADQ or not _tf32_k8(), PAIRS=PAIRS,
        WIDE=WIDE and (interpret or qkv.dtype != torch.float32),  # fp32: a 64-key block spills
        num_warps=warps, num_stages=stages)
