"""Triton fused mask-aware (shifted) window attention, forward and backward.

Everything Swin does around the attention (roll, partition, head split, relative-position
bias gather, shift-region mask, group mask, merge, reverse roll) lives in the kernels'
addressing: a program of window ``w`` and head ``h`` computes the original (un-rolled) grid
position of each of its tokens and reads q/k/v straight out of the qkv Linear's
``(B,H,W,3C)`` output, and writes ``(B,H,W,C)`` at the same positions. Bias and masks are
recomputed from small tables/labels per tile; no ``N x N`` tensor is materialized except
``attn_bias`` itself (an input) and its gradient.

Softmax is fp32 with masked pairs at ``-inf`` (probability exactly 0); the diagonal of a
valid row always survives, padded rows/columns (``N`` rounded up to a power of two) are
fully masked and never stored. The backward recomputes ``P`` from the saved row
log-sum-exp (flash-attention style).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["window_attention", "window_attention_backward"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mm(a, b, F32: tl.constexpr, UPCAST: tl.constexpr):
    # fp32 inputs: exact fp32 products (TF32 would break the 2x-reference rule). The
    # interpreter's dot is wrong for bf16, so it computes in fp32 there.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif F32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tokens(offs, w, nW, nWw, H, W, SH, SW, GG, GC, group, coords,
            N: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
            SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr, HAS_COORDS: tl.constexpr):
    """Per-token addressing of window ``w`` for local indices ``offs``.

    Returns (token index in the flattened (B*H*W) grid, shift region, group label, coord
    row, coord col, valid). Without coords the coords are the window-local row/col.
    """
    b = w // nW
    wi = w % nW
    valid = offs < N
    ly = offs // WW
    lx = offs % WW
    ry = (wi // nWw) * WH + ly  # position on the rolled grid
    rx = (wi % nWw) * WW + lx
    pos = ((ry + SH) % H) * W + (rx + SW) % W  # roll(-shift): rolled[r] = x[(r + s) % n]
    tok = b * (H * W) + pos
    reg = ly * 0
    if SHIFT:  # Swin's 3x3 regions [0,H-wh) [H-wh,H-sh) [H-sh,H) of the rolled grid
        reg = ((ry >= H - WH).to(tl.int32) + (ry >= H - SH).to(tl.int32)) * 3 \
            + (rx >= W - WW).to(tl.int32) + (rx >= W - SW).to(tl.int32)
    # group / coords: (G,H,W[,2]) with G in {1, B}, indexed at the original position
    grp = ly * 0
    if HAS_GROUP:
        grp = tl.load(group + (b % GG) * (H * W) + pos, mask=valid, other=0)
    cy = ly.to(tl.int64)
    cx = lx.to(tl.int64)
    if HAS_COORDS:  # int32 or int64 coords, compared in int64 (edge rule 1)
        cpos = (b % GC) * (H * W) + pos
        cy = tl.load(coords + cpos * 2, mask=valid, other=0).to(tl.int64)
        cx = tl.load(coords + cpos * 2 + 1, mask=valid, other=0).to(tl.int64)
    return tok, reg, grp, cy, cx, valid


@triton.jit
def _scores(q, k, h, offs_m, offs_n, reg_m, reg_n, grp_m, grp_n, cy_m, cy_n, cx_m, cx_n, valid_m, valid_n,
            rpb, abias, scale, NH, RH, RW,
            N: tl.constexpr, HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, SHIFT: tl.constexpr,
            HAS_GROUP: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr):
    """Masked logits ``q*scale @ k^T + table bias + attn_bias`` (fp32), the table index/in-range
    mask and the allowed (not shift/group-masked, not padding) pairs."""
    s = _mm(q, tl.trans(k), F32, UPCAST) * scale
    pair = valid_m[:, None] & valid_n[None, :]
    # Table index from exact (window-local or true) int64 coordinate differences; without
    # coords the range is the window, so every pair is in range. Out-of-range pairs, and
    # differences that wrap around int64, get no bias (edge rules 1 and 3).
    ry = cy_m[:, None] - cy_n[None, :]
    rx = cx_m[:, None] - cx_n[None, :]
    ovf = (((cy_m[:, None] ^ cy_n[None, :]) & (cy_m[:, None] ^ ry)) < 0) | \
        (((cx_m[:, None] ^ cx_n[None, :]) & (cx_m[:, None] ^ rx)) < 0)
    inr = pair & (ovf == 0) & (ry > -RH) & (ry < RH) & (rx > -RW) & (rx < RW)
    dy = tl.where(inr, ry + RH - 1, 0)
    dx = tl.where(inr, rx + RW - 1, 0)
    idx = (dy * (2 * RW - 1) + dx).to(tl.int32)
    if HAS_RPB:
        s += tl.load(rpb + idx * NH + h, mask=inr, other=0.0)
    if HAS_BIAS:
        s += tl.load(abias + (h * N + offs_m[:, None]) * N + offs_n[None, :], mask=pair, other=0.0)
    allowed = pair
    if SHIFT:
        allowed = allowed & (reg_m[:, None] == reg_n[None, :])
    if HAS_GROUP:
        allowed = allowed & (grp_m[:, None] == grp_n[None, :])
    s = tl.where(allowed, s, float("-inf"))
    return s, idx, inr, allowed


@triton.jit
def _fwd_kernel(qkv, out, lse, rpb, abias, group, coords,
                scale, NH, H, W, nW, nWw, SH, SW, GG, GC, RH, RW,
                N: tl.constexpr, N_PAD: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
                HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr):
    w = tl.program_id(0)
    h = tl.program_id(1)
    C = NH * D
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, N_PAD)
    tok_n, reg_n, grp_n, cy_n, cx_n, valid_n = _tokens(
        offs_n, w, nW, nWw, H, W, SH, SW, GG, GC, group, coords, N, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS)
    row_n = tok_n.to(tl.int64) * (3 * C) + h * D
    k = tl.load(qkv + row_n[:, None] + C + offs_d[None, :], mask=valid_n[:, None], other=0.0)
    v = tl.load(qkv + row_n[:, None] + 2 * C + offs_d[None, :], mask=valid_n[:, None], other=0.0)
    for m0 in tl.static_range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        tok_m, reg_m, grp_m, cy_m, cx_m, valid_m = _tokens(
            offs_m, w, nW, nWw, H, W, SH, SW, GG, GC, group, coords, N, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS)
        row_m = tok_m.to(tl.int64) * (3 * C) + h * D
        q = tl.load(qkv + row_m[:, None] + offs_d[None, :], mask=valid_m[:, None], other=0.0)
        s, idx, inr, allowed = _scores(q, k, h, offs_m, offs_n, reg_m, reg_n, grp_m, grp_n, cy_m, cy_n, cx_m, cx_n,
                                       valid_m, valid_n, rpb, abias, scale, NH, RH, RW,
                                       N, HAS_RPB, HAS_BIAS, SHIFT, HAS_GROUP, F32, UPCAST)
        m = tl.max(s, 1)
        # Padded rows (told apart by position, never by value) are all -inf: keep them finite.
        # A real row whose every key is masked stays -inf and gives NaN (edge rule 2).
        m = tl.where(valid_m, m, 0.0)
        p = tl.exp2((s - m[:, None]) * 1.4426950408889634)
        l = tl.sum(p, 1)
        l = tl.where(valid_m, l, 1.0)
        o = _mm(p.to(v.dtype), v, F32, UPCAST) / l[:, None]
        out_m = tok_m.to(tl.int64) * C + h * D
        tl.store(out + out_m[:, None] + offs_d[None, :], o.to(out.dtype.element_ty), mask=valid_m[:, None])
        tl.store(lse + (w * NH + h) * N + offs_m, m + tl.log(l), mask=valid_m)


@triton.jit
def _bwd_kernel(dout, qkv, out, lse, dqkv, rpb, abias, group, coords, dsum, dtab,
                scale, NH, H, W, nW, nWw, SH, SW, GG, GC, RH, RW, BNW, WPP,
                N: tl.constexpr, N_PAD: tl.constexpr, D: tl.constexpr, WH: tl.constexpr, WW: tl.constexpr,
                HAS_RPB: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GROUP: tl.constexpr,
                HAS_COORDS: tl.constexpr, SHIFT: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr,
                DSUM_MODE: tl.constexpr, TAB_MODE: tl.constexpr, BLOCK_M: tl.constexpr):
    """Program (chunk c, head h) handles windows [c*WPP, (c+1)*WPP).

    DSUM_MODE: 0 none; 1 atomics into dsum (nH,N,N); 2 this program's own slot
    dsum[c] (chunks,nH,N,N), plain read-modify-write (deterministic).
    TAB_MODE (coords only, dS gathered into the table per window): 0 none; 1 atomics into
    dtab (T,nH); 2 this program's slot dtab[c] (chunks,T,nH), fixed-order per-entry sums.
    """
    c = tl.program_id(0)
    h = tl.program_id(1)
    C = NH * D
    T = (2 * RH - 1) * (2 * RW - 1)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, N_PAD)
    for w in range(c * WPP, tl.minimum(c * WPP + WPP, BNW)):
        tok_n, reg_n, grp_n, cy_n, cx_n, valid_n = _tokens(
            offs_n, w, nW, nWw, H, W, SH, SW, GG, GC, group, coords, N, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS)
        row_n = tok_n.to(tl.int64) * (3 * C) + h * D
        k = tl.load(qkv + row_n[:, None] + C + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        v = tl.load(qkv + row_n[:, None] + 2 * C + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        dk = tl.zeros((N_PAD, D), dtype=tl.float32)
        dv = tl.zeros((N_PAD, D), dtype=tl.float32)
        for m0 in tl.static_range(0, N, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            tok_m, reg_m, grp_m, cy_m, cx_m, valid_m = _tokens(
                offs_m, w, nW, nWw, H, W, SH, SW, GG, GC, group, coords, N, WH, WW, SHIFT, HAS_GROUP, HAS_COORDS)
            row_m = tok_m.to(tl.int64) * (3 * C) + h * D
            orow_m = tok_m.to(tl.int64) * C + h * D
            q = tl.load(qkv + row_m[:, None] + offs_d[None, :], mask=valid_m[:, None], other=0.0)
            do = tl.load(dout + orow_m[:, None] + offs_d[None, :], mask=valid_m[:, None], other=0.0)
            o = tl.load(out + orow_m[:, None] + offs_d[None, :], mask=valid_m[:, None], other=0.0)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
            lse_m = tl.load(lse + (w * NH + h) * N + offs_m, mask=valid_m, other=0.0)
            s, idx, inr, allowed = _scores(q, k, h, offs_m, offs_n, reg_m, reg_n, grp_m, grp_n, cy_m, cy_n, cx_m,
                                           cx_n, valid_m, valid_n, rpb, abias, scale, NH, RH, RW,
                                           N, HAS_RPB, HAS_BIAS, SHIFT, HAS_GROUP, F32, UPCAST)
            p = tl.exp2((s - lse_m[:, None]) * 1.4426950408889634)  # masked / padded: 0 (NaN in a NaN row)
            dv += _mm(tl.trans(p.to(do.dtype)), do, F32, UPCAST)
            dp = _mm(do, tl.trans(v), F32, UPCAST)
            # d(logits): also the gradient of both biases; exactly 0 at masked pairs, even in a NaN row
            ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)
            dsl = ds.to(q.dtype)
            dq = _mm(dsl, k, F32, UPCAST) * scale
            tl.store(dqkv + row_m[:, None] + offs_d[None, :], dq.to(dqkv.dtype.element_ty), mask=valid_m[:, None])
            dk += _mm(tl.trans(dsl), q, F32, UPCAST)
            pair = valid_m[:, None] & valid_n[None, :]
            if DSUM_MODE == 1:
                tl.atomic_add(dsum + (h * N + offs_m[:, None]) * N + offs_n[None, :], ds, mask=pair)
            if DSUM_MODE == 2:
                ptr = dsum + ((c * NH + h) * N + offs_m[:, None]) * N + offs_n[None, :]
                tl.store(ptr, tl.load(ptr, mask=pair, other=0.0) + ds, mask=pair)
            if TAB_MODE == 1:
                tl.atomic_add(dtab + idx * NH + h, ds, mask=inr)
            if TAB_MODE == 2:
                # Fixed-order per-entry sums (duplicates within a tile rule out a scatter),
                # over the box of table rows/cols that this tile's unmasked pairs touch.
                live = inr & allowed
                ty = idx // (2 * RW - 1)
                tx = idx % (2 * RW - 1)
                ds_in = tl.where(live, ds, 0.0)
                for y in range(tl.min(tl.where(live, ty, 1 << 30)), tl.max(tl.where(live, ty, -1)) + 1):
                    row = live & (ty == y)
                    for x in range(tl.min(tl.where(row, tx, 1 << 30)), tl.max(tl.where(row, tx, -1)) + 1):
                        val = tl.sum(tl.sum(tl.where(row & (tx == x), ds_in, 0.0), 1), 0)
                        tptr = dtab + (c * T + y * (2 * RW - 1) + x) * NH + h
                        tl.store(tptr, tl.load(tptr) + val)
            tl.debug_barrier()  # own-slot read-modify-write: make this tile's stores visible
        tl.store(dqkv + row_n[:, None] + C + offs_d[None, :], (dk * scale).to(dqkv.dtype.element_ty),
                 mask=valid_n[:, None])
        tl.store(dqkv + row_n[:, None] + 2 * C + offs_d[None, :], dv.to(dqkv.dtype.element_ty),
                 mask=valid_n[:, None])


@triton.jit
def _sum_chunks_kernel(part, res, n_chunks, M, BLOCK: tl.constexpr):
    """res[i] = sum_c part[c, i] in chunk order (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    msk = offs < M
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(part + c * M + offs, mask=msk, other=0.0)
    tl.store(res + offs, acc, mask=msk)


@triton.jit
def _gather_table_kernel(dsum, drpb, NH, N: tl.constexpr, N_PAD: tl.constexpr, NH_PAD: tl.constexpr,
                         WH: tl.constexpr, WW: tl.constexpr):
    """drpb[t, h] = sum of dsum[h, i, j] over the pairs with Swin relative index t (fixed order)."""
    t = tl.program_id(0)
    ty = t // (2 * WW - 1)
    tx = t % (2 * WW - 1)
    offs_i = tl.arange(0, N_PAD)
    offs_h = tl.arange(0, NH_PAD)
    jy = offs_i // WW - ty + WH - 1
    jx = offs_i % WW - tx + WW - 1
    ok = (offs_i < N) & (jy >= 0) & (jy < WH) & (jx >= 0) & (jx < WW)
    j = jy * WW + jx
    vals = tl.load(dsum + (offs_h[:, None] * N + offs_i[None, :]) * N + j[None, :],
                   mask=(offs_h[:, None] < NH) & ok[None, :], other=0.0)
    tl.store(drpb + t * NH + offs_h, tl.sum(vals, 1), mask=offs_h < NH)


# ----------------------------------------------------------------------------- launchers

# Deterministic backward: about this many programs (chunks x heads), a constant so the
# summation order, hence the bits, never depends on the GPU model. Small under the
# interpreter so that tests exercise several windows per program.
_DET_PROGRAMS = 4 if _INTERPRET else 512


def _alloc(shape, dtype, device):
    """Output allocation (uninitialized; every element is written by a kernel). Tests poison it."""
    return torch.empty(shape, dtype=dtype, device=device)


def _meta(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords):
    B, H, W, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    N = wh * ww
    n_pad = max(16, triton.next_power_of_2(N))  # tl.dot needs >= 16 per dim
    dummy = qkv  # never read when the matching HAS_* flag is off
    const = dict(
        N=N, N_PAD=n_pad, D=D, WH=wh, WW=ww,
        HAS_RPB=rpb is not None, HAS_BIAS=attn_bias is not None, HAS_GROUP=group is not None,
        HAS_COORDS=coords is not None, SHIFT=sh > 0 or sw > 0,
        F32=qkv.dtype == torch.float32, UPCAST=_INTERPRET,
    )
    G = (1 if group is None else group.shape[0], 1 if coords is None else coords.shape[0])
    ptrs = tuple(dummy if t is None else t for t in (rpb, attn_bias, group, coords))
    return B, H, W, D, N, G, const, ptrs


def _block_m(n_pad, d):
    if _INTERPRET:
        return min(32, n_pad)  # > 1 row block for N > 32: the loop is exercised in tests
    return min(n_pad, 64 if n_pad * d <= 256 * 64 else 32)


def _warps(n_pad, d):
    return 1 if _INTERPRET else (8 if n_pad >= 128 or d >= 128 else 4)


def window_attention(qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale):
    """Forward. qkv (B,H,W,3C) contiguous fp32/fp16/bf16, channels (3,nH,d), d in {16,32,64,128},
    N = wh*ww <= 256; rpb fp32 ((2rh-1)*(2rw-1), nH) or None; attn_bias fp32 (nH,N,N) or None;
    group int32/int64 (G,H,W), coords int32/int64 (G,H,W,2), G in {1,B}, at original positions.

    Returns (out (B,H,W,C) qkv.dtype, lse fp32 (B*nW, nH, N): row log-sum-exp per window of
    the rolled grid, row-major windows, batch outermost).
    """
    B, H, W, D, N, G, const, (p_rpb, p_bias, p_grp, p_crd) = _meta(
        qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords)
    nWw = W // ww
    nW = (H // wh) * nWw
    out = _alloc((B, H, W, num_heads * D), qkv.dtype, qkv.device)
    lse = _alloc((B * nW, num_heads, N), torch.float32, qkv.device)
    if out.numel() == 0:
        return out, lse
    bm = _block_m(const["N_PAD"], D)
    _fwd_kernel[(B * nW, num_heads)](
        qkv, out, lse, p_rpb, p_bias, p_grp, p_crd,
        float(scale), num_heads, H, W, nW, nWw, sh, sw, *G, rh, rw,
        BLOCK_M=bm, num_warps=_warps(const["N_PAD"], D), **const,
    )
    return out, lse


def window_attention_backward(dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords,
                              rh, rw, scale, need_drpb, need_dbias, deterministic):
    """Backward. dout/out (B,H,W,C), lse from the forward; other arguments as the forward.

    Returns (dqkv (B,H,W,3C) qkv.dtype, drpb fp32 like rpb or empty, dbias fp32 (nH,N,N) or
    empty). dq/dk/dv are written straight into the qkv layout (every element exactly once).

    Bias gradients are sums of dS over all windows and images:
    * ``deterministic=False`` (fast; the op layer's default): fp32 atomics, one program per
      (window, head); the summation order, hence the last bits, varies between runs.
    * ``deterministic=True`` (the op layer passes it when
      ``torch.are_deterministic_algorithms_enabled()`` or ``MIXKERNELS_DETERMINISTIC=1``):
      each program owns a chunk of windows and accumulates into its own partial buffer,
      then a fixed-order reduction over chunks; bit-identical across runs. Costs a partial
      buffer (chunks x nH x N x N fp32, or chunks x table with coords) and some speed.
    Without coords dRPB is gathered from the window-summed dS (nH,N,N) by the Swin index;
    with coords the index depends on the window, so dS is gathered per window.
    """
    B, H, W, D, N, G, const, (p_rpb, p_bias, p_grp, p_crd) = _meta(
        qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords)
    dev = qkv.device
    nWw = W // ww
    nW = (H // wh) * nWw
    bnw = B * nW
    dqkv = _alloc(qkv.shape, qkv.dtype, dev)
    T = (2 * rh - 1) * (2 * rw - 1)
    want_dsum = need_dbias or (need_drpb and coords is None)
    want_tab = need_drpb and coords is not None
    if deterministic:
        chunks = max(1, min(bnw, -(-_DET_PROGRAMS // num_heads)))
        wpp = -(-bnw // chunks)
        chunks = -(-bnw // wpp)
    else:
        chunks, wpp = bnw, 1
    mode = 2 if deterministic else 1
    f32 = dict(dtype=torch.float32, device=dev)
    if want_dsum:
        dsum = torch.zeros(((chunks,) if deterministic else ()) + (num_heads, N, N), **f32)
    else:
        dsum = lse
    if want_tab:
        dtab = torch.zeros(((chunks,) if deterministic else ()) + (T, num_heads), **f32)
    else:
        dtab = lse
    if bnw > 0 and num_heads * D > 0:
        _bwd_kernel[(chunks, num_heads)](
            dout, qkv, out, lse, dqkv, p_rpb, p_bias, p_grp, p_crd, dsum, dtab,
            float(scale), num_heads, H, W, nW, nWw, sh, sw, *G, rh, rw, bnw, wpp,
            DSUM_MODE=mode if want_dsum else 0, TAB_MODE=mode if want_tab else 0,
            BLOCK_M=_block_m(const["N_PAD"], D), num_warps=_warps(const["N_PAD"], D), **const,
        )

    def reduce(part):
        if not deterministic:
            return part
        res = _alloc(part.shape[1:], torch.float32, dev)
        M = res.numel()
        _sum_chunks_kernel[(triton.cdiv(M, 1024),)](part, res, chunks, M, BLOCK=1024)
        return res

    dsum = reduce(dsum) if want_dsum else None
    dbias = dsum if need_dbias else torch.empty((0,), **f32)  # outputs must not alias each other
    if not need_drpb:
        drpb = torch.empty((0,), **f32)
    elif coords is not None:
        drpb = reduce(dtab)
    else:
        drpb = _alloc((T, num_heads), torch.float32, dev)
        _gather_table_kernel[(T,)](dsum, drpb, num_heads, N=N, N_PAD=const["N_PAD"],
                                   NH_PAD=triton.next_power_of_2(num_heads), WH=wh, WW=ww)
    return dqkv, drpb, dbias
