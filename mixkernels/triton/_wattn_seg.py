"""Triton window-attention forward by attention segment: masked work skipped (``window_attention``'s
path for windows over one tile with a group and/or shift mask, no attn_bias, no coords).

A window's tokens fall into segments (same shift region AND same group label): a pair attends only
inside its segment. The launcher sorts each window's tokens stably by segment (torch ops on the
window-invariant data: positions, labels at full width, regions; ``seg_tables``), so that the live
pairs form diagonal blocks, and cuts every segment into query tiles of BLOCK_M rows, its last rows in
a tile of BLOCK_M/2 when they fit one. A program (head h, window w) walks its window's full tiles,
then its half tiles (``_seg_tile``); a tile's rows all lie in one segment ``[lo, hi)`` of the sorted
order and walk only its keys: full BLOCK_N blocks without any mask (``for n0 in range(a0, a1,
BLOCK_N)``), then the segment's last partial block with the key mask ``lo <= n < hi`` (``for n0 in
range(c0, c1, BLOCK_N)``: 0 or 1 trips). Rows past the segment end
(next segment's or padding) are computed and never stored. q/k/v are read through the sorted
positions, the table bias by each token's window-local code, out/lse stored at the original
positions (the backward's contract is unchanged).

NaN/Inf in V (edge rule 2): the reference multiplies every masked key's V by 0, so a non-finite V
element reaches every row of the window. A program whose window has more than one segment checks
the head's V first (one read of the window's V, ~4% of a program's instructions); if any element is
not finite, every tile walks all the window's keys with the segment mask (the masked loop from 0 to
N), exactly as the all-pairs kernel.

Loops (static rules in ``static_rules``, trip counts from ``wattn_workload.seg_walk``): the full and
the half tiles of a window, the unmasked key blocks of a tile (per tile size), the masked block (0 or
1; all blocks of the window only for a head whose V holds NaN/Inf).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._cosine import _head_scale, _unit
from ._wattn_common import _fast, _gather_off, _idx, _mm, _online


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _v_nonfinite(qkv, mrow, hw, hd, C, N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, IDX64: tl.constexpr,
                 VBITS: tl.constexpr):
    """Whether the head's V of the window holds NaN/Inf, on the raw bits in 32-bit words (two 16-bit
    or one fp32 element each): adding one exponent LSB to the exponent field carries into the
    element's top bit exactly when the exponent is all ones; the words are OR-reduced. Rows through
    the window's sorted grid positions (``mrow``). VBITS: 0 bf16, 1 fp16, 2 fp32."""
    pos = tl.load(mrow + tl.minimum(tl.arange(0, BS), N - 1))
    PER: tl.constexpr = 1 if VBITS == 2 else 2  # elements per word
    row = (_idx(hw + pos, IDX64) * (3 * C) + hd + 2 * C) // PER
    words = tl.load(qkv.to(tl.pointer_type(tl.int32), bitcast=True) + row[:, None] + tl.arange(0, D // PER)[None, :])
    if VBITS == 2:
        EMM: tl.constexpr = 0x7F800000
        ONE: tl.constexpr = 0x00800000
        TOP: tl.constexpr = -0x80000000
    elif VBITS == 1:
        EMM: tl.constexpr = 0x7C007C00
        ONE: tl.constexpr = 0x04000400
        TOP: tl.constexpr = -0x7FFF8000  # 0x80008000
    else:
        EMM: tl.constexpr = 0x7F807F80
        ONE: tl.constexpr = 0x00800080
        TOP: tl.constexpr = -0x7FFF8000
    acc = tl.reduce(tl.reduce((words & EMM) + ONE, 1, _or), 0, _or)
    return (acc & TOP) != 0


@triton.jit
def _mm_acc(a, b, c, F32: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b + c`` (fp32 accumulator ``c``), with ``_mm``'s precision rules."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), c, input_precision="ieee")
    elif F32:
        return tl.dot(a, b, c, input_precision="ieee")
    else:
        return tl.dot(a, b, c)


@triton.jit
def _online_scaled(t, m_i, l_i, acc, v, sc, F32: tl.constexpr, UPCAST: tl.constexpr):
    """``_online`` for logits ``t`` in units of 1/sc (sc > 0: the max is the same; m kept in those units):
    exponents ``t * sc - m * sc``, one FMA per element, where scaled logits take a multiply-add for the
    scale and the bias and a subtraction."""
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new) * sc
    alpha = tl.exp2(m_i * sc - m_ref)
    p = tl.exp2(t * sc - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, F32, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _seg_step(q, tab_m, m_i, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, tab_h, qk_scale,
              N: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MASK: tl.constexpr, HAS_RPB: tl.constexpr,
              F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr,
              COSINE: tl.constexpr, UNSCALED: tl.constexpr):
    """One online-softmax step of a query tile over the key block at sorted position n0 (MASK: keys
    outside ``[lo, hi)`` get -inf; keys past N read V as zeros; UNSCALED: ``_online_scaled``)."""
    offs_n = n0 + tl.arange(0, BN)
    jn = tl.minimum(offs_n, N - 1)
    row = _idx(hw + tl.load(mrow + jn), IDX64) * (3 * C) + hd
    offs_d = tl.arange(0, D)
    k = _unit(tl.load(qkv + row[:, None] + C + offs_d[None, :]), COSINE)
    if MASK:
        v = tl.load(qkv + row[:, None] + 2 * C + offs_d[None, :], mask=(offs_n < N)[:, None], other=0.0)
    else:
        v = tl.load(qkv + row[:, None] + 2 * C + offs_d[None, :])
    if UNSCALED:  # logits in units of 1/qk_scale: the table bias (divided by it) is the MMA's accumulator
        if HAS_RPB:  # Swin index code_i + c0 - code_j; scode: -4 code_j, bytes (padded: no clamp)
            t = _mm_acc(q, tl.trans(k), _gather_off(tab_m[:, None], tl.load(scode + offs_n)[None, :], ASM), F32,
                        UPCAST)
        else:
            t = _mm(q, tl.trans(k), F32, UPCAST)
    else:
        t = _mm(q, tl.trans(k), F32, UPCAST) * qk_scale
        if HAS_RPB:
            t += _gather_off(tab_m[:, None], tl.load(scode + offs_n)[None, :], ASM)
    if MASK:
        t = tl.where(((offs_n >= lo) & (offs_n < hi))[None, :], t, float("-inf"))
    if UNSCALED:
        return _online_scaled(t, m_i, l_i, acc, v, qk_scale, F32, UPCAST)
    else:
        return _online(t, m_i, l_i, acc, v, F32, UPCAST)


@triton.jit
def _seg_tile(BLOCK_M: tl.constexpr, qkv, out, lse, tab_h, mrow, scode, t, bad, w, h, hw, hd, C, NH, qk_scale,
              N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_RPB: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr,
              ASM: tl.constexpr, COSINE: tl.constexpr, UNSCALED: tl.constexpr):
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
    tab_m = tab_h + (j + (j // WW) * (WW - 1) + ((WH - 1) * (2 * WW - 1) + WW - 1))  # code_i + c0
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    # unmasked full blocks of the segment (none when V is not finite); then the masked blocks:
    # the segment's last partial block, or (V not finite) every block of the window
    a1 = lo + ((hi - lo) // BLOCK_N) * BLOCK_N
    a0 = tl.where(bad, a1, lo)
    for n0 in range(a0, a1, BLOCK_N):
        m_i, l_i, acc = _seg_step(q, tab_m, m_i, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, tab_h,
                                  qk_scale, N, D, BLOCK_N, False, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE,
                                  UNSCALED)
    c0 = tl.where(bad, 0, a1)
    c1 = tl.where(bad, N, hi)
    for n0 in range(c0, c1, BLOCK_N):
        m_i, l_i, acc = _seg_step(q, tab_m, m_i, l_i, acc, qkv, mrow, scode, hw, n0, lo, hi, hd, C, tab_h,
                                  qk_scale, N, D, BLOCK_N, True, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE,
                                  UNSCALED)
    # store the segment's rows only (l = 0: NaN, edge rule 2)
    row_ok = offs_m < hi
    o = acc * _fast(l_i, 0, ASM)[:, None]
    tl.store(out + (tok * C + hd)[:, None] + offs_d[None, :], o.to(out.dtype.element_ty), mask=row_ok[:, None])
    if UNSCALED:
        m_i = m_i * qk_scale
    tl.store(lse + (w * NH + h) * N + j, (m_i + _fast(l_i, 1, ASM)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _seg_kernel(qkv, out, lse, tab, meta, ninfo, scode, ls, qk_scale, NH, H, W, nW, GG,
                N: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr, BS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RPB: tl.constexpr,
                F32: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr, ASM: tl.constexpr,
                COSINE: tl.constexpr, VBITS: tl.constexpr, UNSCALED: tl.constexpr, VCHECK: tl.constexpr = True):
    """Program (head h, window w), head-fastest. meta (GG*nW, 5, N) int32 per window: sorted tokens'
    grid positions, their window-local indices, and the tiles' first row, segment start, segment
    end; ninfo (GG*nW, 3): BLOCK_M-row tiles, segments, BLOCK_M/2-row tiles; scode (GG*nW, N +
    BLOCK_N) int64: -4 * table code of the sorted keys (the last one repeated past N)."""
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
    tab_h = tab + h * ((2 * WH - 1) * (2 * WW - 1))  # (nH, T) table, pre-scaled by log2e
    nseg = tl.load(ninfo + 3 * gw + 1)
    bad = nseg < 0  # False
    if (nseg > 1) & VCHECK:
        bad = _v_nonfinite(qkv, mrow, hw, hd, C, N, BS, D, IDX64, VBITS)
    nbig = tl.load(ninfo + 3 * gw)
    nsmall = tl.load(ninfo + 3 * gw + 2)
    for t in range(0, nbig):  # BLOCK_M-row tiles
        _seg_tile(BLOCK_M, qkv, out, lse, tab_h, mrow, scode, t, bad, w, h, hw, hd, C, NH, qk_scale, N, D, WH,
                  WW, BLOCK_N, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED)
    for t in range(nbig, nbig + nsmall):  # a segment's last rows when they fit half a tile
        _seg_tile(BLOCK_M // 2, qkv, out, lse, tab_h, mrow, scode, t, bad, w, h, hw, hd, C, NH, qk_scale, N, D,
                  WH, WW, BLOCK_N, HAS_RPB, F32, UPCAST, IDX64, ASM, COSINE, UNSCALED)


# ----------------------------------------------------------------------------- launchers


def seg_config(N, D, dtype, interpret):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): one warp per program (mma.sync), tiles of 32 rows and
    a segment's last rows in a 16-row tile when they fit one, 32-key blocks. A segment of s tokens
    costs its tiles' rows x ceil(s/BN) * BN keys: at MixMIM-B stage 1 (segments of 28..168 tokens)
    rows rounded to 16 walk 74% of the window's 196^2 pairs, 64-row wgmma tiles 91% (static
    estimates before ``_online_scaled``: 32/16-row tiles 257 us, 16-row 280, 32-row 274, 64-row 320;
    64-key blocks 351; with it 250). No
    software pipelining: a walk is 3-4 blocks, and a pipelined loop's peeled prologue costs more
    issue than it hides with 12+ one-warp programs per SM (estimate 280 vs 297 us at 16 rows;
    unverified on a GPU). Under the interpreter 32/16 x 16, so that segments of several tiles and
    blocks and both tile sizes run in tests."""
    if interpret:
        return 32, 16, 1, 1
    f32 = dtype == torch.float32
    return 32, (16 if D >= 128 or (f32 and D >= 64) else 32), 1, 1


def seg_tables(H, W, wh, ww, sh, sw, group, bm, device):
    """Per window (and per label map: G = group.shape[0] or 1), the tokens sorted stably by segment
    (shift region, then group label, compared at full width) and the segments cut into tiles of
    ``bm`` rows, a segment's last rows in a tile of ``bm // 2`` when they fit one. Returns meta
    (G*nW, 5, N) int32 [grid position, window-local index of each sorted token; tiles' first row,
    segment start, segment end: full tiles, then half tiles (entries past them: 0)], ninfo (G*nW, 3)
    int32 [full tiles, segments, half tiles], and the sorted tokens' window-local indices (G*nW, N)
    int64."""
    N, nWh, nWw = wh * ww, H // wh, W // ww
    ar = torch.arange(N, device=device)
    ly, lx = ar // ww, ar % ww
    wy = torch.arange(nWh, device=device).repeat_interleave(nWw)
    wx = torch.arange(nWw, device=device).repeat(nWh)
    y = (wy[:, None] * wh + ly[None, :] + sh) % H
    x = (wx[:, None] * ww + lx[None, :] + sw) % W
    pos = (y * W + x)[None]  # (1, nW, N)
    keys = []  # least significant first: the label, then the region
    if group is not None:
        keys.append(group.reshape(group.shape[0], H * W)[:, pos[0]])  # (G, nW, N), full width
    if sh > 0 or sw > 0:
        reg = (wy[:, None] * wh >= H - wh) * (3 * (ly >= wh - sh))[None, :] \
            + (wx[:, None] * ww >= W - ww) * (lx >= ww - sw)[None, :]
        keys.append(reg[None])
    G = keys[0].shape[0] if keys else 1
    idx = ar.expand(G, nWh * nWw, N)
    for k in keys:
        k = k.expand(G, -1, -1)
        idx = idx.gather(-1, torch.argsort(k.gather(-1, idx), dim=-1, stable=True))
    new = torch.zeros(idx.shape, dtype=torch.bool, device=device)
    new[..., 0] = True
    for k in keys:
        ks = k.expand(G, -1, -1).gather(-1, idx)
        new[..., 1:] |= ks[..., 1:] != ks[..., :-1]
    lo = torch.cummax(torch.where(new, ar, 0), dim=-1).values
    end = torch.ones_like(new)
    end[..., :-1] = new[..., 1:]
    hi = torch.cummin(torch.where(end, ar + 1, N).flip(-1), dim=-1).values.flip(-1)
    # tiles start every bm rows of a segment; a start with at most bm/2 rows left is a half tile
    first = (ar - lo) % bm == 0
    small = first & (hi - ar <= bm // 2)
    kind = torch.where(first & ~small, 0, torch.where(small, 1, 2)).to(torch.int8)
    order = torch.argsort(kind, dim=-1, stable=True)  # full tiles, then half tiles, in row order
    nbig, nsmall = (first & ~small).sum(-1), small.sum(-1)
    live = ar < (nbig + nsmall)[..., None]
    tr0 = torch.where(live, order, 0)
    meta = torch.stack([pos.expand(G, -1, -1).gather(-1, idx), idx, tr0, torch.where(live, lo.gather(-1, tr0), 0),
                        torch.where(live, hi.gather(-1, tr0), 0)], dim=-2)
    ninfo = torch.stack([nbig, new.sum(-1), nsmall], dim=-1)
    return (meta.reshape(G * nWh * nWw, 5, N).to(torch.int32).contiguous(),
            ninfo.reshape(G * nWh * nWw, 3).to(torch.int32).contiguous(), idx.reshape(G * nWh * nWw, N))


def seg_forward(qkv, out, lse, tab, num_heads, wh, ww, sh, sw, group, qk_scale, logit_scale, flags, codes,
                interpret, idx64):
    """Launch ``_seg_kernel`` (flags: ``window_attention._flags``; codes: ``window_attention._codes``)."""
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    N = wh * ww
    nWw = W // ww
    nW = (H // wh) * nWw
    bm, bn, warps, stages = seg_config(N, D, qkv.dtype, interpret)
    meta, ninfo, idx = seg_tables(H, W, wh, ww, sh, sw, group, bm, qkv.device)
    idx = torch.cat([idx, idx[:, -1:].expand(-1, bn)], 1)  # keys past N: the last one (scores masked)
    scode = (codes[idx].to(torch.int64) * -4).contiguous()  # -4 * table code of each sorted key (bytes)
    # logits in units of 1/qk_scale (``_online_scaled``) for a plain softmax scale in a safe range
    unscaled = logit_scale is None and 2.0 ** -20 <= qk_scale <= 2.0 ** 20
    if unscaled and flags["HAS_RPB"]:
        tab = tab / qk_scale
    _seg_kernel[(num_heads, B * nW)](
        qkv, out, lse, tab, meta, ninfo, scode, qkv if logit_scale is None else logit_scale, qk_scale, num_heads,
        H, W, nW, 1 if group is None else group.shape[0], N=N, D=D, WH=wh, WW=ww,
        BS=triton.next_power_of_2(N), BLOCK_M=bm, BLOCK_N=bn, HAS_RPB=flags["HAS_RPB"],
        F32=flags["F32"], UPCAST=flags["UPCAST"], IDX64=idx64, ASM=not interpret,
        COSINE=logit_scale is not None, VBITS={torch.bfloat16: 0, torch.float16: 1}.get(qkv.dtype, 2),
        UNSCALED=unscaled,
        num_warps=warps, num_stages=stages)
