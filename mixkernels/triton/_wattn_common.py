"""Addressing, gathers, masks and MUFU helpers of the Triton window attention (forward and backward).

Window walk (``_first_window``/``_next_window``), window-local and original token positions with
Swin's shift regions (``_lyx``/``_pos``), coordinates and exact int64 range tests, the
relative-position table gathered in the scores' register layout by inline asm (``_gather*``,
``_table_bias``), the shift/group/padding mask, the MMA wrapper and MUFU approximations, and the
launchers' relative-position table (``_rpb_table``). Re-exported
by ``window_attention`` (the backward imports them from there).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["_mm", "_gather", "_gather_rc", "_opaque", "_gather_int", "_fast", "_idx", "_first_window",
           "_next_window", "_lyx", "_pos", "_coords", "_in_range", "_coord_off", "_table_bias", "_mask", "_gather_off", "_online", "_pv_acc", "_smem_table", "_gather_smem",
           "_rpb_table"]


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
def _mm_acc(a, b, acc, F32: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` (fp32 accumulator ``acc``), with ``_mm``'s precision rules."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _gather(ptrs, ok, MASKED: tl.constexpr, ASM: tl.constexpr):
    """fp32 table gather (0 where not ``ok`` when MASKED). Inline asm on the GPU: a ``tl.load``
    gets a coalesced layout of its own and a shared-memory round trip into the MMA layout;
    the asm takes the layout of its pointer operand (the scores'), read-only cache path."""
    if ASM:
        if MASKED:
            return tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.f32 $0, 0f00000000; @p ld.global.nc.f32 $0, [$1]; }",
                "=f,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptrs], dtype=tl.float32,
                                             is_pure=True, pack=1)
    else:
        if MASKED:
            return tl.load(ptrs, mask=ok, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _gather_rc(row_ptr, col_off, ok, MASKED: tl.constexpr, ASM: tl.constexpr):
    """``row_ptr[i][col_off[j]]`` (fp32; 0 where not ``ok`` when MASKED) for a (rows, cols) tile,
    in the tile's layout: one ``IMAD.WIDE`` + one load per element (a hoisted 64-bit column
    offset would cost a two-instruction 64-bit add instead)."""
    rp, co = tl.broadcast(row_ptr[:, None], col_off[None, :])
    if ASM:
        if MASKED:
            okb = tl.broadcast_to(ok[None, :], rp.shape).to(tl.int32)
            return tl.inline_asm_elementwise(
                "{ .reg .pred p; .reg .b64 a; setp.ne.b32 p, $3, 0; mad.wide.s32 a, $2, 4, $1; "
                "mov.f32 $0, 0f00000000; @p ld.global.nc.f32 $0, [a]; }",
                "=f,l,r,r", [rp, co, okb], dtype=tl.float32, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(
                "{ .reg .b64 a; mad.wide.s32 a, $2, 4, $1; ld.global.nc.f32 $0, [a]; }",
                "=f,l,r", [rp, co], dtype=tl.float32, is_pure=True, pack=1)
    else:
        if MASKED:
            return tl.load(rp + co, mask=ok[None, :], other=0.0)
        else:
            return tl.load(rp + co)


@triton.jit
def _gather_off(ptrs, offs, ASM: tl.constexpr):
    """fp32 ``*(ptrs + offs bytes)`` (``offs`` int64, a multiple of 4), broadcast to one tile, in the
    tile's layout (``_gather``): a 64-bit add and a load per element."""
    p, o = tl.broadcast(ptrs, offs)
    if ASM:
        return tl.inline_asm_elementwise("{ .reg .b64 a; add.s64 a, $1, $2; ld.global.nc.f32 $0, [a]; }",
                                         "=f,l,l", [p, o], dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.load(p + (o >> 2))


@triton.jit
def _smem_table(tab_h, T: tl.constexpr, TP: tl.constexpr, stride=1, scale=None):
    """Copy the head's fp32 table (T entries ``stride`` apart, times ``scale`` when given: one rounding, as a
    scaled copy made beforehand; TP = next power of two <= 4096) into a static shared
    array of the program's own (``mk_wtab``, declared once per kernel: call once, outside loops) and
    return its 32-bit shared address, after a CTA barrier. ``_gather_smem`` then reads the table
    with one 32-bit add and an LDS per element, where a global gather needs a 64-bit add (two
    instructions) and an LDG. GPU only (inline asm)."""
    if TP <= 1024:
        base = tl.inline_asm_elementwise(".shared .align 16 .b8 mk_wtab[4096]; mov.u32 $0, mk_wtab;", "=r,r",
                                         [T + tl.program_id(0) * 0], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.static_assert(TP <= 4096, "_smem_table: table over 4096 entries")
        base = tl.inline_asm_elementwise(".shared .align 16 .b8 mk_wtab[16384]; mov.u32 $0, mk_wtab;", "=r,r",
                                         [T + tl.program_id(0) * 0], dtype=tl.int32, is_pure=False, pack=1)
    i = tl.arange(0, TP)
    v = tl.load(tab_h + i * stride, mask=i < T, other=0.0)
    if scale is not None:
        v = v * scale
    tl.inline_asm_elementwise("st.shared.f32 [$1], $2; mov.u32 $0, 0;", "=r,r,f", [base + 4 * i, v], dtype=tl.int32,
                              is_pure=False, pack=1)
    tl.debug_barrier()
    # the address again through an asm with side effects after the barrier: reads derived from it
    # (pure, so that the layout pass may give them the scores' layout) cannot move above the barrier
    return tl.inline_asm_elementwise("mov.u32 $0, $1;", "=r,r", [base], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _gather_smem(row_addr, col_off):
    """fp32 ``*(row_addr + col_off)`` from ``_smem_table``'s shared array (32-bit byte addresses),
    broadcast to one tile, in the tile's layout (``_gather``)."""
    r, c = tl.broadcast(row_addr, col_off)
    return tl.inline_asm_elementwise("{ .reg .b32 a; add.s32 a, $1, $2; ld.shared.f32 $0, [a]; }", "=f,r,r",
                                     [r, c], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _opaque(x, ASM: tl.constexpr):
    """``x`` through an asm move the compiler cannot see through: addresses derived from it are
    recomputed where used inside a loop instead of hoisted out of it (hoisted, per-row addresses
    stay live across the loop and spill)."""
    if ASM:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=False, pack=1)
    else:
        return x


@triton.jit
def _gather_int(ptrs, WIDE: tl.constexpr, ASM: tl.constexpr):
    """int32 (WIDE: int64) gather in the layout of ``ptrs`` (see ``_gather``)."""
    if ASM:
        if WIDE:
            return tl.inline_asm_elementwise("ld.global.nc.b64 $0, [$1];", "=l,l", [ptrs], dtype=tl.int64,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32,
                                             is_pure=True, pack=1)
    else:
        return tl.load(ptrs)


@triton.jit
def _fast(x, OP: tl.constexpr, ASM: tl.constexpr):
    """1/x (OP 0) or log2(x) (OP 1) for per-row normalization: MUFU approximations on the GPU
    (~1 ulp; the IEEE versions cost ~20 instructions), exact math under the interpreter."""
    if ASM:
        if OP == 0:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
    else:
        if OP == 0:
            return 1.0 / x
        else:
            return tl.log2(x)


@triton.jit
def _idx(x, IDX64: tl.constexpr):
    """Element offsets in int64 only when a tensor has 2**31 elements or more."""
    if IDX64:
        return x.to(tl.int64)
    else:
        return x


@triton.jit
def _first_window(w, nW, nWw):
    """Window ``w`` (row-major, batch outermost) as (w, image, window row, window col)."""
    return w, w // nW, (w % nW) // nWw, (w % nW) % nWw


@triton.jit
def _next_window(w, b, wy, wx, nWh, nWw):
    """The window after ``w`` (row-major, batch outermost) without integer division."""
    wx = wx + 1
    wrap = wx == nWw
    wx = tl.where(wrap, 0, wx)
    wy = tl.where(wrap, wy + 1, wy)
    wrap = wy == nWh
    wy = tl.where(wrap, 0, wy)
    b = tl.where(wrap, b + 1, b)
    return w + 1, b, wy, wx


@triton.jit
def _lyx(offs, N: tl.constexpr, WW: tl.constexpr):
    """Window-local (row, col); padded indices (>= N) read the last real token (rows: never
    stored; keys: masked by position)."""
    o = tl.minimum(offs, N - 1)
    return o // WW, o % WW


@triton.jit
def _pos(ly, lx, y0, x0, H, W, SH, SW, WH: tl.constexpr, WW: tl.constexpr, SHIFT: tl.constexpr):
    """Original grid position (roll(-shift) reads x[(r + s) % n]; ``(y0, x0)``: the window's
    corner on the rolled grid) and a shift-region label: Swin's 3x3 regions ``[0,H-wh)
    [H-wh,H-sh) [H-sh,H)`` (same for W) split only the last window row/column, so within a
    window the label is (last row band) * 3 * (ly >= wh-sh) + (last col band) * (lx >= ww-sw);
    the ly/lx tests are window-invariant (hoisted out of window loops)."""
    ry = y0 + ly
    rx = x0 + lx
    if SHIFT:
        y = ry + SH
        y = tl.where(y >= H, y - H, y)
        x = rx + SW
        x = tl.where(x >= W, x - W, x)
        reg = (y0 >= H - WH).to(tl.int32) * (3 * (ly >= WH - SH).to(tl.int32)) \
            + (x0 >= W - WW).to(tl.int32) * (lx >= WW - SW).to(tl.int32)
    else:
        y = ry
        x = rx
        reg = ly * 0
    return y * W + x, reg


@triton.jit
def _coords(coords, cbase, pos, ly, lx, HAS_COORDS: tl.constexpr):
    """(row, col) coordinates as int64: the token's true position, or its window-local one."""
    if HAS_COORDS:
        cy = tl.load(coords + (cbase + pos) * 2).to(tl.int64)
        cx = tl.load(coords + (cbase + pos) * 2 + 1).to(tl.int64)
    else:
        cy = ly.to(tl.int64)
        cx = lx.to(tl.int64)
    return cy, cx


@triton.jit
def _in_range(a, b, R):
    """Exact ``a - b`` of int64 and whether it lies in (-R, R) without wrapping (edge rules 1, 3)."""
    d = a - b
    ovf = ((a ^ b) & (a ^ d)) < 0
    return d, (d > -R) & (d < R) & (ovf == 0)


@triton.jit
def _coord_off(cy_m, cx_m, cy_n, cx_n, RH, RW, TS):
    """Offsets (int32) of the pairs' table entries, ((dy + RH-1)(2RW-1) + dx + RW-1) * TS, from the
    rows' and keys' int64 coordinates, for the pairs in range (elsewhere meaningless: masked). A
    difference of per-row and per-key int32 keys (one IADD per pair): wrapping int32 arithmetic is
    exact mod 2**32, and an in-range pair's offset is below T * TS < 2**31."""
    k_m = cy_m.to(tl.int32) * ((2 * RW - 1) * TS) + cx_m.to(tl.int32) * TS
    k_n = cy_n.to(tl.int32) * ((2 * RW - 1) * TS) + cx_n.to(tl.int32) * TS - ((RH - 1) * (2 * RW - 1) + RW - 1) * TS
    return k_m[:, None] - k_n[None, :]


@triton.jit
def _table_bias(tab_h, tab_m, code_n, cy_m, cx_m, cy_n, cx_n, RH, RW, HAS_COORDS: tl.constexpr, ASM: tl.constexpr):
    """Relative-position bias (log2 units) of every pair, gathered in the scores' layout."""
    if HAS_COORDS:
        _dy, iny = _in_range(cy_m[:, None], cy_n[None, :], RH)
        _dx, inx = _in_range(cx_m[:, None], cx_n[None, :], RW)
        return _gather(tab_h + _coord_off(cy_m, cx_m, cy_n, cx_n, RH, RW, 1), iny & inx, True, ASM)
    else:
        # Swin index (ly_i - ly_j + wh-1)*(2ww-1) + (lx_i - lx_j + ww-1) = code_i + c0 - code_j
        return _gather_rc(tab_m, -code_n, code_n, False, ASM)


@triton.jit
def _mask(t, reg_m, reg_n, grp_m, grp_n, col_ok, SHIFT: tl.constexpr, HAS_GROUP: tl.constexpr,
          COL_MASK: tl.constexpr):
    """-inf where the shift/group rule or key padding (COL_MASK: by position) masks the pair."""
    allowed = col_ok[None, :]
    if SHIFT:
        same = reg_m[:, None] == reg_n[None, :]
        allowed = (allowed & same) if COL_MASK else same
    if HAS_GROUP:
        same = grp_m[:, None] == grp_n[None, :]
        allowed = (allowed & same) if (COL_MASK or SHIFT) else same
    if SHIFT or HAS_GROUP or COL_MASK:
        t = tl.where(allowed, t, float("-inf"))
    return t, allowed


@triton.jit
def _online(t, m_i, l_i, acc, v, F32: tl.constexpr, UPCAST: tl.constexpr):
    """Online-softmax update of a query tile's (m, l, acc) by the masked log2 logits ``t`` of a key
    block and its V. A row with no unmasked key so far keeps max -inf and uses 0 as its reference, so
    its probabilities and rescale factor are exactly 0 (l stays 0: NaN at the end, edge rule 2)."""
    m_new = tl.maximum(m_i, tl.max(t, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(t - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, F32, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _pv_acc(p, v, acc, F32: tl.constexpr, UPCAST: tl.constexpr, TF32: tl.constexpr):
    """acc + P @ V (fp32 P and acc, V of the inputs' dtype). TF32 (16-bit V, a block of fewer than 16
    keys, where a 16-bit MMA needs K >= 16): in TF32 from fp32 P (10 mantissa bits, more than P rounded
    to 16 bits keeps; V is exact in TF32); else P rounded to V's dtype (``_mm_acc``)."""
    if TF32:
        return tl.dot(p, v.to(tl.float32), acc, input_precision="tf32")
    else:
        return _mm_acc(p.to(v.dtype), v, acc, F32, UPCAST)


# ----------------------------------------------------------------------------- launcher helpers


def _rpb_table(rpb, dummy, scale, raw):
    """The kernels' relative-position table: rpb ((T, nH) fp32) as an (nH, T) copy times ``scale`` (a
    head's row contiguous; one launch, scaled straight into the new buffer), or with ``raw`` (kernels
    that read the table in place and scale it themselves: a shared-memory copy, a bias tile gathered
    once per program) rpb itself (a no-op for a module's parameter); ``dummy`` (never read) without rpb."""
    if rpb is None:
        return dummy
    if raw:
        return rpb.contiguous()
    return torch.mul(rpb.t(), scale, out=rpb.new_empty((rpb.shape[1], rpb.shape[0])))
