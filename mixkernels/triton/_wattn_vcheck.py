"""The V check of the Triton by-segment forward (``_wattn_seg``): whether a head's V in a window holds
NaN/Inf or (bf16/fp32) an element with |v| >= 2**96, read once per program on raw 32-bit words (GPU:
packed max/min chains, a sum of magnitudes or packed FMAs in inline asm; interpreter: exponent-field
arithmetic). Its result sends every tile of the program on the all-keys walk from the rows' true maxima
(edge rule 2, SEMANTICS rule 5; see ``_wattn_seg``).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._wattn_common import _idx


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _nan0(x, y, VBITS: tl.constexpr):
    """x * 0 + y on raw 32-bit words holding two bf16 (VBITS 0), two fp16 (1) or one fp32 (2), per element:
    NaN where x is NaN/Inf or y is NaN, y (Inf included) otherwise. GPU only."""
    if VBITS == 2:
        return tl.inline_asm_elementwise("fma.rn.f32 $0, $1, 0f00000000, $2;", "=r,r,r", [x, y], dtype=tl.int32,
                                         is_pure=True, pack=1)
    elif VBITS == 1:
        return tl.inline_asm_elementwise("{ .reg .b32 z; mov.b32 z, 0; fma.rn.f16x2 $0, $1, z, $2; }", "=r,r,r",
                                         [x, y], dtype=tl.int32, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("{ .reg .b32 z; mov.b32 z, 0; fma.rn.bf16x2 $0, $1, z, $2; }", "=r,r,r",
                                         [x, y], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _nan_h2(a, b):
    return _nan0(a, b, 1)


@triton.jit
def _mxmn(amx, amn, bmx, bmn):
    """(max, min) of two bf16x2 words' (max, min), NaN-propagating. GPU only."""
    mx = tl.inline_asm_elementwise("max.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [amx, bmx], dtype=tl.int32,
                                   is_pure=True, pack=1)
    mn = tl.inline_asm_elementwise("min.NaN.bf16x2 $0, $1, $2;", "=r,r,r", [amn, bmn], dtype=tl.int32,
                                   is_pure=True, pack=1)
    return mx, mn


@triton.jit
def _abs_add(a, b):
    """|a| + |b| on fp32 held as int32 words (one FADD with both operands' |.|): NaN stays NaN. GPU only."""
    return tl.inline_asm_elementwise("{ .reg .f32 x, y; abs.f32 x, $1; abs.f32 y, $2; add.f32 $0, x, y; }",
                                     "=r,r,r", [a, b], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _v_words(qkv, mrow, hw, hd, C, r0, R: tl.constexpr, N: tl.constexpr, D: tl.constexpr, IDX64: tl.constexpr,
             PER: tl.constexpr):
    """The 32-bit words (PER elements each) of the head's V in the R sorted rows from r0 (past N: the
    last row), (R, D // PER)."""
    pos = tl.load(mrow + tl.minimum(r0 + tl.arange(0, R), N - 1))
    rows = (qkv + (_idx(hw + pos, IDX64) * (3 * C) + hd + 2 * C)).to(tl.pointer_type(tl.int32), bitcast=True)
    return tl.load(rows[:, None] + tl.arange(0, D // PER)[None, :])


@triton.jit
def _v_check(qkv, mrow, hw, hd, C, N: tl.constexpr, BS: tl.constexpr, D: tl.constexpr, IDX64: tl.constexpr,
             VBITS: tl.constexpr, ASM: tl.constexpr):
    """Whether the head's V of the window holds NaN/Inf or (bf16/fp32; fp16 cannot) an element with
    |v| >= 2**96 (GPU fp32: the sum of |v| reaching 2**96, so also some with |v| >= 2**83, for which the
    walk from the maxima is as exact), on 32-bit words (two 16-bit or one fp32 element each). GPU, one
    op per word: bf16, the words' NaN-propagating max and min elementwise over blocks of 8 rows (chains
    that sm_90 fuses into 3-input VHMNMX, two words an op each), reduced, then the larger magnitude's
    bits against 2**96 (NaN/Inf lie above); fp32, the sum of |v| (FADD |a|, |b|); fp16, x * 0 + y (one
    packed FMA) chained over the same blocks: NaN for any NaN/Inf, +-0 otherwise. Interpreter: on the raw bits, adding 33 (fp16: 1)
    exponent LSBs to the exponent field carries into the element's top bit exactly when the exponent
    is >= 127 + 96 (fp16: all ones). Rows through the window's sorted grid positions (``mrow``).
    VBITS: 0 bf16, 1 fp16, 2 fp32."""
    PER: tl.constexpr = 1 if VBITS == 2 else 2  # elements per word
    if ASM and VBITS != 2:
        R: tl.constexpr = 8
        mx = _v_words(qkv, mrow, hw, hd, C, 0, R, N, D, IDX64, PER)
        mn = mx
        for r0 in tl.static_range(R, (N + R - 1) // R * R, R):  # the blocks that hold rows < N
            w = _v_words(qkv, mrow, hw, hd, C, r0, R, N, D, IDX64, PER)
            if VBITS == 0:
                mx, mn = _mxmn(mx, mn, w, w)
            else:
                mx = _nan0(w, mx, 1)
        if VBITS == 1:
            return (_nan0(tl.reduce(tl.reshape(mx, [R * (D // 2)]), 0, _nan_h2), 0, 1) & 0x7FFF7FFF) != 0
        mx, mn = tl.reduce((tl.reshape(mx, [R * (D // 2)]), tl.reshape(mn, [R * (D // 2)])), 0, _mxmn)
        m = tl.maximum(tl.maximum(mx & 0x7FFF, (mx >> 16) & 0x7FFF), tl.maximum(mn & 0x7FFF, (mn >> 16) & 0x7FFF))
        return m >= 0x6F80
    words = _v_words(qkv, mrow, hw, hd, C, 0, BS, N, D, IDX64, PER)
    if ASM:
        flat = tl.reshape(words, [BS * (D // PER)])  # one reduction
        if VBITS == 2:
            return (tl.reduce(flat, 0, _abs_add) & 0x7FFFFFFF) >= 0x6F800000
        return (_nan0(tl.reduce(flat, 0, _nan_h2), 0, 1) & 0x7FFF7FFF) != 0
    if VBITS == 2:
        EMM: tl.constexpr = 0x7F800000
        ONE: tl.constexpr = 0x10800000  # 33 << 23
        TOP: tl.constexpr = -0x80000000
    elif VBITS == 1:
        EMM: tl.constexpr = 0x7C007C00
        ONE: tl.constexpr = 0x04000400
        TOP: tl.constexpr = -0x7FFF8000  # 0x80008000
    else:
        EMM: tl.constexpr = 0x7F807F80
        ONE: tl.constexpr = 0x10801080  # 33 << 7 in each half
        TOP: tl.constexpr = -0x7FFF8000
    acc = tl.reduce(tl.reduce((words & EMM) + ONE, 1, _or), 0, _or)
    return (acc & TOP) != 0
