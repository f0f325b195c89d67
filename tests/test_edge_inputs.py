"""One edge-input table through every public op on every backend (docs/SEMANTICS.md).

Each case builds its inputs on the CPU; every backend runs the public op (forward and the
gradient of every float input) and must give what ``backend="reference"`` gives on the CPU:
the same shape and dtype, the same NaN and +-Inf positions, finite values within flash-attn's
2x rule against the float64 reference; or, when the reference raises, the same exception
type. A backend that cannot run a call (``BackendUnavailable``, e.g. float64 on Triton) is
skipped for that case. Interpreter programs are slow: every case is a few windows/rows.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import pytest
import torch

import mixkernels as mk
from mixkernels.testing import tolerance

I64_MAX, I64_MIN = 2**63 - 1, -(2**63)
I32_MAX, I32_MIN = 2**31 - 1, -(2**31)
F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

BACKENDS = [
    pytest.param("cpu", "cpu", id="cpu"),
    pytest.param("triton", "cpu", id="triton_interp"),
    pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.gpu),
    pytest.param("triton", "cuda", id="triton_cuda", marks=pytest.mark.gpu),
    pytest.param("reference", "cuda", id="reference_cuda", marks=pytest.mark.gpu),
]


@dataclass
class Case:
    id: str
    op: str
    build: Callable[[torch.Generator], Dict[str, object]]  # keyword arguments of the public op
    grads: Tuple[str, ...] = ()  # float inputs to differentiate
    views: Dict[str, Callable] = field(default_factory=dict)  # applied after requires_grad (non-contiguous, stride 0)


def _nc(t):
    """Same values, non-contiguous, differentiable (every other element of a wider tensor)."""
    return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]


def _nc_t(t):
    """Non-contiguous by a transpose of the last two dims, then back."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


# ---------------------------------------------------------------- window attention
NH, D = 2, 16


def _wa(g, B=2, H=8, W=4, win=4, nh=NH, d=D, dtype=F32, rpb=True, bias=False, shift=0, group=None,
        coords=None, coord_range=None, scale=None, logit_scale=None):
    wh, ww = (win, win) if isinstance(win, int) else win
    kw = dict(qkv=torch.randn(B, H, W, 3 * nh * d, generator=g, dtype=F64).to(dtype), num_heads=nh,
              window_size=(wh, ww), shift_size=shift)
    R = (wh, ww) if coord_range is None else coord_range
    if rpb:
        kw["rel_pos_bias"] = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), nh, generator=g)
    if bias:
        kw["attn_bias"] = torch.randn(nh, wh * ww, wh * ww, generator=g)
    if group is not None:
        kw["group"] = group
    if coords is not None:
        kw["coords"], kw["coord_range"] = coords, R
    if scale is not None:
        kw["scale"] = scale
    if logit_scale is not None:  # SwinV2 cosine mode: a list of per-head values, or True for random ones
        ls = torch.rand(nh, 1, 1, generator=g) * 4 if logit_scale is True else torch.tensor(logit_scale).reshape(nh, 1, 1)
        kw["logit_scale"] = ls.to(torch.float32)
    return kw


def _labels(g, shape, values, dtype=torch.int64):
    """Random labels drawn from ``values`` (exact: the tensor is built in int64 then cast)."""
    idx = torch.randint(0, len(values), shape, generator=g)
    return torch.tensor(values, dtype=torch.int64)[idx].to(dtype)


def _coords(g, B, H, W, lo, hi, dtype=torch.int64):
    return torch.randint(lo, hi, (B, H, W, 2), generator=g, dtype=torch.int64).to(dtype)


def _masked_row_bias(g, n=16, rows=((0, 3), (1, 10))):
    b = torch.randn(NH, n, n, generator=g)
    for h, i in rows:
        b[h, i, :] = float("-inf")
    return b


def _with(kw, **upd):
    kw = dict(kw)
    for k, v in upd.items():
        kw[k] = v(kw) if callable(v) else v
    return kw


def _poke(name, index, value):
    """Build-time edit: set ``kw[name][index] = value`` (NaN/Inf injection)."""
    def f(kw):
        t = kw[name].clone()
        t[index] = value
        return t
    return f


WA = "window_attention"
WA_GRADS = ("qkv", "rel_pos_bias", "attn_bias")
WA_COS_GRADS = WA_GRADS + ("logit_scale",)


def _wa_case(cid, build, grads=WA_GRADS, views=None):
    return Case(cid, WA, build, grads, views or {})


def _cos(g, **kw):
    """A cosine-mode (SwinV2) call: q and k normalized, per-head learned logit scale."""
    return _wa(g, logit_scale=kw.pop("logit_scale", True), **kw)


def _zero_vecs(*at):
    """Zero whole q/k head vectors at ``(b, y, x, first channel)``: F.normalize's eps branch (gradient 1/eps)."""
    def f(kw):
        t = kw["qkv"].clone()
        for b, y, x, off in at:
            t[b, y, x, off:off + D] = 0
        return t
    return f


def _mix_huge_group(g):
    # Labels equal modulo 2**32 (and in the low 32 bits): int32 truncation would merge them.
    return _labels(g, (2, 8, 4), [0, 2**32, -1, 2**32 - 1, 5 + 2**40])


WA_CASES = [
    _wa_case("wa_empty_batch", lambda g: _wa(g, B=0, bias=True)),
    _wa_case("wa_one_window", lambda g: _wa(g, B=1, H=4, W=4, bias=True)),
    _wa_case("wa_window_1x1", lambda g: _wa(g, H=2, W=2, win=1, bias=True)),
    _wa_case("wa_window_2x3_shift", lambda g: _wa(g, H=4, W=6, win=(2, 3), shift=(1, 2), bias=True)),
    _wa_case("wa_all_masked_rows", lambda g: _wa(g, bias=False) | dict(attn_bias=_masked_row_bias(g))),
    _wa_case("wa_all_masked_rows_group_shift", lambda g: _wa(
        g, shift=2, group=torch.randint(0, 2, (2, 8, 4), generator=g)) | dict(attn_bias=_masked_row_bias(g))),
    _wa_case("wa_neg_inf_pairs", lambda g: _with(_wa(g, bias=True), attn_bias=_poke(
        "attn_bias", (slice(None), slice(0, 16, 3), slice(1, 16, 2)), float("-inf")))),
    _wa_case("wa_rpb_neg_inf_center", lambda g: _with(_wa(g), rel_pos_bias=_poke("rel_pos_bias", (24, 0), float("-inf")))),
    _wa_case("wa_rpb_pos_inf", lambda g: _with(_wa(g), rel_pos_bias=_poke("rel_pos_bias", (3, 1), float("inf")))),
    _wa_case("wa_bias_nan", lambda g: _with(_wa(g, bias=True), attn_bias=_poke("attn_bias", (1, 5, 7), float("nan")))),
    _wa_case("wa_q_nan", lambda g: _with(_wa(g), qkv=_poke("qkv", (0, 1, 2, 3), float("nan")))),
    _wa_case("wa_k_inf", lambda g: _with(_wa(g), qkv=_poke("qkv", (1, 5, 0, 32 + 17), float("inf")))),
    _wa_case("wa_v_nan", lambda g: _with(_wa(g), qkv=_poke("qkv", (0, 6, 3, 64 + 2), float("nan")))),
    _wa_case("wa_v_nan_group", lambda g: _with(_wa(g, group=torch.randint(0, 2, (8, 4), generator=g)),
                                               qkv=_poke("qkv", (1, 2, 1, 64 + 20), float("nan")))),
    _wa_case("wa_group_bool", lambda g: _wa(g, group=torch.randint(0, 2, (8, 4), generator=g).bool())),
    _wa_case("wa_group_uint8", lambda g: _wa(g, group=_labels(g, (2, 8, 4), [0, 255, 1], torch.uint8))),
    _wa_case("wa_group_int8", lambda g: _wa(g, group=_labels(g, (8, 4), [-128, 127, 0], torch.int8))),
    _wa_case("wa_group_int16", lambda g: _wa(g, group=_labels(g, (2, 8, 4), [-32768, 32767], torch.int16))),
    _wa_case("wa_group_int32_extremes", lambda g: _wa(g, group=_labels(g, (2, 8, 4), [I32_MIN, I32_MAX, 0], torch.int32))),
    _wa_case("wa_group_int64_huge", lambda g: _wa(g, shift=(1, 2), group=_mix_huge_group(g))),
    _wa_case("wa_group_int64_extremes", lambda g: _wa(g, group=_labels(g, (8, 4), [I64_MIN, I64_MAX, 0, -1]))),
    _wa_case("wa_group_all_distinct", lambda g: _wa(g, group=torch.arange(32).reshape(8, 4))),
    _wa_case("wa_coords_out_of_range", lambda g: _wa(g, coords=_coords(g, 2, 8, 4, -3, 9), coord_range=(3, 3))),
    _wa_case("wa_coords_out_of_range_shift_bias", lambda g: _wa(
        g, shift=(2, 1), bias=True, coords=_coords(g, 1, 8, 4, 0, 12)[0], coord_range=(4, 2))),
    _wa_case("wa_coords_no_rpb", lambda g: _wa(g, rpb=False, coords=_coords(g, 2, 8, 4, -50, 50), coord_range=(2, 2))),
    _wa_case("wa_coords_int64_huge", lambda g: _wa(
        g, coords=_coords(g, 2, 8, 4, 0, 3) + _labels(g, (2, 8, 4, 2), [0, 2**32, -(2**32)]), coord_range=(3, 3))),
    _wa_case("wa_coords_int64_extremes", lambda g: _wa(
        g, coords=_labels(g, (2, 8, 4, 2), [I64_MIN, I64_MAX, 0, 1, -1, I64_MIN + 1]), coord_range=(2, 2))),
    _wa_case("wa_coords_int32_extremes", lambda g: _wa(
        g, coords=_labels(g, (2, 8, 4, 2), [I32_MIN, I32_MAX, 0, 1, -1], torch.int32), coord_range=(2, 2))),
    _wa_case("wa_coords_int16", lambda g: _wa(g, coords=_coords(g, 2, 8, 4, -5, 5, torch.int16), coord_range=(5, 5))),
    _wa_case("wa_noncontiguous", lambda g: _wa(g, bias=True, group=torch.randint(0, 3, (2, 8, 8), generator=g)[:, :, ::2],
                                               coords=_coords(g, 2, 8, 4, 0, 6).transpose(1, 2).contiguous().transpose(1, 2),
                                               coord_range=(6, 6)),
             views=dict(qkv=_nc, rel_pos_bias=_nc_t, attn_bias=_nc_t)),
    _wa_case("wa_stride0", lambda g: _with(_wa(g, B=1, bias=True), group=torch.randint(0, 2, (1, 8, 4), generator=g).expand(3, 8, 4),
                                           rel_pos_bias=lambda kw: kw["rel_pos_bias"][:, :1],
                                           attn_bias=lambda kw: kw["attn_bias"][:1]),
             views=dict(qkv=lambda t: t.expand(3, -1, -1, -1), rel_pos_bias=lambda t: t.expand(-1, NH),
                        attn_bias=lambda t: t.expand(NH, -1, -1))),
    _wa_case("wa_f16", lambda g: _wa(g, dtype=F16, bias=True, shift=1, group=torch.randint(0, 2, (2, 8, 4), generator=g))),
    _wa_case("wa_bf16", lambda g: _wa(g, dtype=BF16, coords=_coords(g, 2, 8, 4, 0, 7), coord_range=(4, 4))),
    _wa_case("wa_f64", lambda g: _wa(g, dtype=F64, bias=True)),
    _wa_case("wa_scale_zero", lambda g: _wa(g, scale=0.0, group=torch.randint(0, 2, (8, 4), generator=g))),
    _wa_case("wa_scale_negative", lambda g: _wa(g, scale=-0.7, bias=True)),
    _wa_case("wa_coords_without_range", lambda g: _wa(g) | dict(coords=torch.zeros(8, 4, 2, dtype=torch.long))),
    _wa_case("wa_group_float", lambda g: _wa(g, group=torch.zeros(8, 4))),
    # cosine mode (SwinV2): the same rules, plus the logit-scale clamp and the normalization's eps
    _wa_case("cos_basic_shift_bias", lambda g: _cos(g, shift=(2, 1), bias=True), WA_COS_GRADS),
    _wa_case("cos_empty_batch", lambda g: _cos(g, B=0, bias=True), WA_COS_GRADS),
    _wa_case("cos_all_masked_rows", lambda g: _cos(g, shift=2, group=torch.randint(0, 2, (2, 8, 4), generator=g))
             | dict(attn_bias=_masked_row_bias(g)), WA_COS_GRADS),
    _wa_case("cos_group_int64_huge", lambda g: _cos(g, shift=(1, 2), group=_mix_huge_group(g)), WA_COS_GRADS),
    _wa_case("cos_coords_int64_extremes", lambda g: _cos(
        g, coords=_labels(g, (2, 8, 4, 2), [I64_MIN, I64_MAX, 0, 1, -1, I64_MIN + 1]), coord_range=(2, 2)), WA_COS_GRADS),
    _wa_case("cos_coords_out_of_range", lambda g: _cos(g, coords=_coords(g, 2, 8, 4, -3, 9, torch.int32),
                                                       coord_range=(3, 3)), WA_COS_GRADS),
    # log(100) exactly (gradient passes), above it (clamped: gradient 0), -inf (scale 0), large negative
    _wa_case("cos_logit_scale_clamp", lambda g: _cos(g, nh=4, d=8, logit_scale=[math.log(100), 5.0, float("-inf"), -30.0]),
             WA_COS_GRADS),
    _wa_case("cos_logit_scale_nan", lambda g: _cos(g, logit_scale=[float("nan"), 1.0]), WA_COS_GRADS),
    # zero q (head 0) and k (head 0 and 1) vectors: channels (3, nH, d), so q0 = [0, D), k0 = [2D, 3D), k1 = [3D, 4D)
    _wa_case("cos_zero_q_and_k", lambda g: _with(_cos(g, bias=True), qkv=_zero_vecs(
        (0, 1, 2, 0), (0, 1, 2, 2 * D), (1, 5, 3, 3 * D))), WA_COS_GRADS),
    _wa_case("cos_k_inf", lambda g: _with(_cos(g), qkv=_poke("qkv", (1, 5, 0, 32 + 17), float("inf"))), WA_COS_GRADS),
    _wa_case("cos_v_nan_group", lambda g: _with(_cos(g, group=torch.randint(0, 2, (8, 4), generator=g)),
                                                qkv=_poke("qkv", (1, 2, 1, 64 + 20), float("nan"))), WA_COS_GRADS),
    _wa_case("cos_noncontiguous", lambda g: _cos(g, bias=True, coords=_coords(g, 2, 8, 4, 0, 6), coord_range=(6, 6)),
             WA_COS_GRADS, views=dict(qkv=_nc, rel_pos_bias=_nc_t, attn_bias=_nc_t, logit_scale=_nc)),
    _wa_case("cos_stride0", lambda g: _with(_cos(g, B=1, bias=True), logit_scale=lambda kw: kw["logit_scale"][:1]),
             WA_COS_GRADS, views=dict(qkv=lambda t: t.expand(3, -1, -1, -1), logit_scale=lambda t: t.expand(NH, 1, 1))),
    _wa_case("cos_f16", lambda g: _cos(g, dtype=F16, bias=True, shift=1, group=torch.randint(0, 2, (2, 8, 4), generator=g)),
             WA_COS_GRADS),
    _wa_case("cos_bf16_logit_scale_1d", lambda g: _with(_cos(g, dtype=BF16, coords=_coords(g, 2, 8, 4, 0, 7), coord_range=(4, 4)),
                                                        logit_scale=lambda kw: kw["logit_scale"].reshape(NH)), WA_COS_GRADS),
    _wa_case("cos_f64", lambda g: _with(_cos(g, dtype=F64, bias=True), logit_scale=lambda kw: kw["logit_scale"].double()),
             WA_COS_GRADS),
    _wa_case("cos_with_scale_rejected", lambda g: _cos(g, scale=0.5), WA_COS_GRADS),
    _wa_case("cos_logit_scale_bad_shape", lambda g: _with(_cos(g), logit_scale=lambda kw: kw["logit_scale"].reshape(1, NH)),
             WA_COS_GRADS),
]

# ---------------------------------------------------------------- token ops
def _x(g, *shape, dtype=F32):
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _mask(g, *shape, dtype=torch.bool):
    return torch.randint(0, 2, shape, generator=g).to(dtype)


def _nan_at(t, index, value=float("nan")):
    t = t.clone()
    t[index] = value
    return t


MIX_CASES = [
    Case("mix_empty_batch", "mix_tokens", lambda g: dict(x=_x(g, 0, 5, 3), mask=_mask(g, 5)), ("x",)),
    Case("mix_empty_tokens", "mix_tokens", lambda g: dict(x=_x(g, 2, 0, 3), mask=_mask(g, 2, 0)), ("x",)),
    Case("mix_empty_channels", "mix_tokens", lambda g: dict(x=_x(g, 2, 5, 0), mask=_mask(g, 5)), ("x",)),
    Case("mix_batch_1", "mix_tokens", lambda g: dict(x=_x(g, 1, 5, 3), mask=_mask(g, 1, 5)), ("x",)),
    Case("mix_4d_mask_L", "mix_tokens", lambda g: dict(x=_x(g, 2, 3, 4, 5), mask=_mask(g, 12)), ("x",)),
    Case("mix_4d_mask_BL", "mix_tokens", lambda g: dict(x=_x(g, 2, 3, 4, 5), mask=_mask(g, 2, 12)), ("x",)),
    Case("mix_4d_mask_HW", "mix_tokens", lambda g: dict(x=_x(g, 2, 3, 4, 5), mask=_mask(g, 3, 4)), ("x",)),
    Case("mix_3d_mask_HW_rejected", "mix_tokens", lambda g: dict(x=_x(g, 2, 12, 5), mask=_mask(g, 3, 4))),
    Case("mix_mask_values", "mix_tokens", lambda g: dict(
        x=_x(g, 3, 6, 4), mask=torch.tensor([0.0, 0.5, -1.0, float("nan"), float("inf"), 0.0])), ("x",)),
    Case("mix_mask_int64_big", "mix_tokens", lambda g: dict(x=_x(g, 2, 4, 3), mask=torch.tensor([0, 2**40, -1, 256])), ("x",)),
    Case("mix_mask_uint8", "mix_tokens", lambda g: dict(x=_x(g, 2, 4, 3), mask=torch.tensor([0, 255, 1, 0], dtype=torch.uint8)), ("x",)),
    Case("mix_nan_inf", "mix_tokens", lambda g: dict(x=_nan_at(_nan_at(_x(g, 4, 5, 3), (0, 1, 2)), (3, 4, 0), float("-inf")),
                                                     mask=_mask(g, 4, 5)), ("x",)),
    Case("mix_noncontiguous", "mix_tokens", lambda g: dict(x=_x(g, 3, 5, 4), mask=_mask(g, 3, 10)[:, ::2]), ("x",),
         dict(x=_nc)),
    Case("mix_stride0", "mix_tokens", lambda g: dict(x=_x(g, 1, 5, 1), mask=_mask(g, 1, 5).expand(3, 5)), ("x",),
         dict(x=lambda t: t.expand(3, 5, 4))),
    Case("mix_f16", "mix_tokens", lambda g: dict(x=_x(g, 3, 5, 4, dtype=F16), mask=_mask(g, 5)), ("x",)),
    Case("mix_bf16_4d", "mix_tokens", lambda g: dict(x=_x(g, 2, 2, 3, 4, dtype=BF16), mask=_mask(g, 2, 2, 3)), ("x",)),
    Case("mix_f64", "mix_tokens", lambda g: dict(x=_x(g, 3, 5, 4, dtype=F64), mask=_mask(g, 3, 5)), ("x",)),
    Case("unmix_empty_batch", "unmix_tokens", lambda g: dict(x=_x(g, 0, 5, 3), mask=_mask(g, 5), mask_token=_x(g, 3),
                                                             pos_embed=_x(g, 1, 5, 3)), ("x", "mask_token", "pos_embed")),
    Case("unmix_mask_BL", "unmix_tokens", lambda g: dict(x=_x(g, 2, 5, 3), mask=_mask(g, 2, 5, dtype=torch.float16),
                                                         mask_token=_x(g, 1, 1, 3)), ("x", "mask_token")),
    Case("unmix_pos_shapes", "unmix_tokens", lambda g: dict(x=_x(g, 2, 5, 3), mask=_mask(g, 5), mask_token=_x(g, 3),
                                                            pos_embed=_x(g, 3)), ("x", "mask_token", "pos_embed")),
    Case("unmix_pos_L_C", "unmix_tokens", lambda g: dict(x=_x(g, 2, 5, 3), mask=_mask(g, 5), mask_token=_x(g, 3),
                                                         pos_embed=_x(g, 5, 3)), ("x", "mask_token", "pos_embed")),
    # A select: NaN/Inf of the operand that is not taken must not leak (docs/SEMANTICS.md).
    Case("unmix_nan_token_and_x", "unmix_tokens", lambda g: dict(
        x=_nan_at(_nan_at(_x(g, 2, 4, 3), (0, 1, 0), float("inf")), (1, 2, 1)),
        mask=torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]]), mask_token=_nan_at(_x(g, 3), 2),
        pos_embed=_nan_at(_x(g, 1, 4, 3), (0, 3, 2), float("-inf"))), ("x", "mask_token", "pos_embed")),
    Case("unmix_noncontiguous_stride0", "unmix_tokens", lambda g: dict(
        x=_x(g, 2, 5, 3), mask=_mask(g, 1, 5).expand(2, 5), mask_token=_x(g, 3), pos_embed=_x(g, 1, 1, 3)),
        ("x", "mask_token", "pos_embed"), dict(x=_nc, mask_token=_nc, pos_embed=lambda t: t.expand(1, 5, 3))),
    Case("unmix_f16", "unmix_tokens", lambda g: dict(x=_x(g, 2, 5, 4, dtype=F16), mask=_mask(g, 5),
                                                     mask_token=_x(g, 4), pos_embed=_x(g, 1, 5, 4, dtype=BF16)),
         ("x", "mask_token", "pos_embed")),
]

WIN_CASES = [
    Case("part_empty_batch", "window_partition", lambda g: dict(x=_x(g, 0, 4, 6, 3), window_size=2, shift_size=1), ("x",)),
    Case("part_empty_channels", "window_partition", lambda g: dict(x=_x(g, 2, 4, 6, 0), window_size=(2, 3)), ("x",)),
    Case("part_nan_noncontig_shift", "window_partition", lambda g: dict(
        x=_nan_at(_x(g, 2, 4, 6, 3), (1, 3, 5, 2)), window_size=(2, 3), shift_size=(1, 2)), ("x",), dict(x=_nc)),
    Case("part_stride0_f16", "window_partition", lambda g: dict(x=_x(g, 1, 4, 1, 3, dtype=F16), window_size=2,
                                                                shift_size=1), ("x",), dict(x=lambda t: t.expand(2, 4, 6, 3))),
    Case("part_window_1", "window_partition", lambda g: dict(x=_x(g, 2, 3, 2, 5, dtype=F64), window_size=1), ("x",)),
    Case("merge_empty_batch", "window_merge", lambda g: dict(windows=_x(g, 0, 4, 3), window_size=2, H=4, W=6,
                                                             shift_size=1), ("windows",)),
    Case("merge_empty_channels", "window_merge", lambda g: dict(windows=_x(g, 12, 4, 0), window_size=2, H=4, W=6,
                                                                shift_size=(1, 1)), ("windows",)),
    Case("merge_nan_noncontig", "window_merge", lambda g: dict(windows=_nan_at(_x(g, 12, 4, 3), (5, 2, 1)), window_size=2,
                                                               H=4, W=6, shift_size=(1, 0)), ("windows",), dict(windows=_nc)),
    Case("merge_stride0_bf16", "window_merge", lambda g: dict(windows=_x(g, 1, 6, 3, dtype=BF16), window_size=(2, 3), H=4, W=6),
         ("windows",), dict(windows=lambda t: t.expand(8, 6, 3))),
    Case("merge_bad_count", "window_merge", lambda g: dict(windows=_x(g, 5, 4, 3), window_size=2, H=4, W=6)),
]


def _keep(g, B, hc, wc, dtype=torch.int64):
    return torch.randint(0, 4, (B, hc, wc), generator=g).to(dtype)


UNI_CASES = [
    Case("us_empty_batch", "uniform_sample", lambda g: dict(x=_x(g, 0, 4, 4, 3), keep=_keep(g, 0, 2, 2), unit=1,
                                                            mask_token=_x(g, 3), secondary=_mask(g, 0, 2, 2)),
         ("x", "mask_token")),
    Case("us_keep_dtypes", "uniform_sample", lambda g: dict(x=_x(g, 2, 8, 4, 3), keep=_keep(g, 2, 2, 1, torch.int8),
                                                            unit=2), ("x",)),
    Case("us_keep_out_of_range", "uniform_sample", lambda g: dict(x=_x(g, 1, 4, 4, 3), keep=torch.full((1, 2, 2), 4), unit=1)),
    Case("us_keep_negative", "uniform_sample", lambda g: dict(x=_x(g, 1, 4, 4, 3), keep=torch.full((1, 2, 2), -1, dtype=torch.int8),
                                                              unit=1)),
    Case("us_secondary_all", "uniform_sample", lambda g: dict(x=_x(g, 2, 4, 4, 3), keep=_keep(g, 2, 2, 2, torch.uint8), unit=1,
                                                              mask_token=_nan_at(_x(g, 3), 1),
                                                              secondary=torch.ones(2, 2, 2, dtype=torch.int32)),
         ("x", "mask_token")),
    Case("us_secondary_nan_x", "uniform_sample", lambda g: dict(
        x=_nan_at(_nan_at(_x(g, 2, 4, 4, 3), (0, 0, 0, 0)), (1, 3, 3, 2), float("inf")), keep=_keep(g, 2, 2, 2), unit=1,
        mask_token=_x(g, 3), secondary=_mask(g, 2, 2, 2)), ("x", "mask_token")),
    Case("us_token_without_secondary", "uniform_sample", lambda g: dict(x=_x(g, 2, 4, 4, 3), keep=_keep(g, 2, 2, 2), unit=1,
                                                                        mask_token=_x(g, 3)), ("x", "mask_token")),
    Case("us_noncontig_stride0", "uniform_sample", lambda g: dict(
        x=_x(g, 2, 4, 4, 3), keep=_keep(g, 1, 2, 2, torch.int16).expand(2, 2, 2), unit=1, mask_token=_x(g, 1),
        secondary=_mask(g, 2, 2, 4)[:, :, ::2]), ("x", "mask_token"), dict(x=_nc, mask_token=lambda t: t.expand(3))),
    Case("us_f16", "uniform_sample", lambda g: dict(x=_x(g, 2, 4, 8, 3, dtype=F16), keep=_keep(g, 2, 1, 2), unit=2,
                                                    mask_token=_x(g, 3, dtype=F16), secondary=_mask(g, 2, 1, 2)),
         ("x", "mask_token")),
    Case("usc_empty_batch", "uniform_scatter", lambda g: dict(compact=_x(g, 0, 2, 2, 3), keep=_keep(g, 0, 2, 2), unit=1),
         ("compact",)),
    Case("usc_nan_noncontig", "uniform_scatter", lambda g: dict(
        compact=_nan_at(_x(g, 2, 2, 4, 3), (1, 1, 3, 0)), keep=_keep(g, 2, 1, 2, torch.int32), unit=2),
        ("compact",), dict(compact=_nc)),
    Case("usc_keep_out_of_range", "uniform_scatter", lambda g: dict(compact=_x(g, 1, 2, 2, 3), keep=torch.full((1, 2, 2), 7),
                                                                    unit=1)),
    Case("usc_bf16_stride0", "uniform_scatter", lambda g: dict(compact=_x(g, 1, 2, 2, 1, dtype=BF16), keep=_keep(g, 2, 2, 2),
                                                               unit=1), ("compact",),
         dict(compact=lambda t: t.expand(2, 2, 2, 5))),
]


def _imgs(g, B, H=8, W=8, dtype=F32):
    return _x(g, B, 3, H, W, dtype=dtype)


def _pred(g, n, L, p, dtype=F32):
    return _x(g, n, L, p * p * 3, dtype=dtype)


def _flat_patch_imgs(g, B=2, H=8, W=8, p=4):
    imgs = _imgs(g, B, H, W)
    imgs[0, :, :p, :p] = 0.25  # one constant patch: zero variance
    return imgs


def _half_tied(g):
    """pred equal to the images in the right half (sign(0): gradient 0 at ties), random in the left half."""
    pred = _imgs(_gen("sm_tied"), 2)
    pred[..., :4] = _imgs(g, 2, 8, 4)
    return pred


LOSS_CASES = [
    Case("mm_empty_batch_mean", "mixmim_loss", lambda g: dict(pred=_pred(g, 0, 4, 4), imgs=_imgs(g, 0), mask=_mask(g, 4),
                                                              patch_size=4), ("pred",)),
    Case("mm_empty_batch_per_image", "mixmim_loss", lambda g: dict(pred=_pred(g, 0, 4, 4), imgs=_imgs(g, 0), mask=_mask(g, 4),
                                                                   patch_size=4, reduction="per_image"), ("pred",)),
    Case("mm_flat_patch_eps0", "mixmim_loss", lambda g: dict(pred=_pred(g, 4, 4, 4), imgs=_flat_patch_imgs(g),
                                                             mask=_mask(g, 2, 4), patch_size=4, eps=0.0, reduction="none"),
         ("pred",)),
    Case("mm_flat_patch_eps", "mixmim_loss", lambda g: dict(pred=_pred(g, 4, 4, 4), imgs=_flat_patch_imgs(g),
                                                            mask=_mask(g, 4), patch_size=4), ("pred",)),
    # NaN in the pred row a patch does not use must not leak (a select, docs/SEMANTICS.md).
    Case("mm_nan_unused_pred", "mixmim_loss", lambda g: dict(
        pred=_nan_at(_nan_at(_pred(g, 4, 4, 4), (0, 0, 5)), (3, 1, 2), float("inf")),
        mask=torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1]]), imgs=_imgs(g, 2), patch_size=4, reduction="none"), ("pred",)),
    Case("mm_nan_img", "mixmim_loss", lambda g: dict(pred=_pred(g, 4, 4, 4), imgs=_nan_at(_imgs(g, 2), (1, 2, 7, 7)),
                                                     mask=_mask(g, 4), patch_size=4, reduction="per_image"), ("pred",)),
    Case("mm_inf_img_no_norm", "mixmim_loss", lambda g: dict(pred=_pred(g, 4, 4, 4), imgs=_nan_at(_imgs(g, 2), (0, 0, 0, 0), float("inf")),
                                                             mask=_mask(g, 4), patch_size=4, norm_pix=False, reduction="none"),
         ("pred",)),
    Case("mm_mask_all_and_float", "mixmim_loss", lambda g: dict(pred=_pred(g, 4, 4, 4), imgs=_imgs(g, 2),
                                                                mask=torch.tensor([[1.0, 2.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]),
                                                                patch_size=4, reduction="none"), ("pred",)),
    Case("mm_patch_1", "mixmim_loss", lambda g: dict(pred=_pred(g, 2, 6, 1), imgs=_imgs(g, 1, 2, 3), mask=_mask(g, 6),
                                                     patch_size=1, reduction="none"), ("pred",)),
    Case("mm_one_patch", "mixmim_loss", lambda g: dict(pred=_pred(g, 2, 1, 8), imgs=_imgs(g, 1), mask=_mask(g, 1),
                                                       patch_size=8), ("pred",)),
    Case("mm_noncontig_stride0_mixed_dtypes", "mixmim_loss", lambda g: dict(
        pred=_pred(g, 4, 4, 2, dtype=BF16), imgs=_imgs(g, 1, 4, 4, dtype=F16), mask=_mask(g, 1, 4).expand(2, 4), patch_size=2),
        ("pred",), dict(pred=_nc, imgs=lambda t: t.expand(2, 3, 4, 4))),
    Case("mm_f64", "mixmim_loss", lambda g: dict(pred=_pred(g, 4, 4, 4, dtype=F64), imgs=_imgs(g, 2, dtype=F64), mask=_mask(g, 2, 4),
                                                 patch_size=4, reduction="per_image"), ("pred",)),
    Case("ml_empty_batch", "masked_recon_loss", lambda g: dict(pred=_pred(g, 0, 4, 4), imgs=_imgs(g, 0), mask=_mask(g, 4),
                                                               patch_size=4), ("pred",)),
    Case("ml_compact_empty_batch", "masked_recon_loss", lambda g: dict(pred=_pred(g, 0, 2, 4), imgs=_imgs(g, 0),
                                                                       mask=torch.tensor([0, 1, 1, 0]), patch_size=4,
                                                                       reduction="none"), ("pred",)),
    Case("wa_empty_batch_coords_group", "window_attention", lambda g: _wa(
        g, B=0, coords=torch.zeros(0, 8, 4, 2, dtype=torch.long), group=torch.zeros(0, 8, 4, dtype=torch.long),
        coord_range=(3, 3)), WA_GRADS),
    Case("ml_nothing_masked", "masked_recon_loss", lambda g: dict(pred=_pred(g, 2, 4, 4), imgs=_imgs(g, 2),
                                                                  mask=torch.zeros(4), patch_size=4), ("pred",)),
    Case("ml_nothing_masked_compact", "masked_recon_loss", lambda g: dict(pred=_pred(g, 2, 0, 4), imgs=_imgs(g, 2),
                                                                          mask=torch.zeros(2, 4), patch_size=4,
                                                                          reduction="per_image"), ("pred",)),
    Case("ml_nan_unmasked_pred", "masked_recon_loss", lambda g: dict(
        pred=_nan_at(_nan_at(_pred(g, 2, 4, 4), (0, 0, 1)), (1, 2, 0), float("inf")),
        imgs=_flat_patch_imgs(g), mask=torch.tensor([[0, 1, 1, 0], [1, 1, 0, 1]]), patch_size=4, eps=0.0,
        reduction="none"), ("pred",)),
    Case("ml_nan_unmasked_pred_mean", "masked_recon_loss", lambda g: dict(
        pred=_nan_at(_pred(g, 2, 4, 4), (0, 0, 1)), imgs=_flat_patch_imgs(g),
        mask=torch.tensor([0, 1, 1, 1]), patch_size=4, eps=0.0), ("pred",)),
    Case("ml_compact_nan_img", "masked_recon_loss", lambda g: dict(
        pred=_pred(g, 2, 2, 4), imgs=_nan_at(_imgs(g, 2), (0, 1, 5, 1)),
        mask=torch.tensor([[0, 1, 1, 0], [1, 0, 0, 1]]), patch_size=4, reduction="none"), ("pred",)),
    # SimMIM: full-resolution pred (B, C, H, W); the patch mask selects (NaN/Inf outside it never leak)
    Case("sm_empty_batch", "simmim_loss", lambda g: dict(pred=_imgs(g, 0), imgs=_imgs(g, 0), mask=_mask(g, 2, 2),
                                                         patch_size=4), ("pred",)),
    Case("sm_nothing_masked_per_image", "simmim_loss", lambda g: dict(
        pred=_imgs(g, 2), imgs=_imgs(g, 2), mask=torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0]]), patch_size=4,
        reduction="per_image"), ("pred",)),
    Case("sm_nothing_masked_mean", "simmim_loss", lambda g: dict(pred=_imgs(g, 2), imgs=_imgs(g, 2), mask=torch.zeros(2, 2),
                                                                 patch_size=4), ("pred",)),
    Case("sm_nan_inf_unmasked", "simmim_loss", lambda g: dict(
        pred=_nan_at(_nan_at(_imgs(g, 2), (0, 1, 0, 1)), (1, 2, 7, 0), float("inf")),
        imgs=_nan_at(_imgs(g, 2), (1, 0, 0, 5), float("-inf")), mask=torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]]),
        patch_size=4, reduction="none"), ("pred",)),
    Case("sm_nan_masked_img", "simmim_loss", lambda g: dict(pred=_imgs(g, 2), imgs=_nan_at(_imgs(g, 2), (1, 2, 3, 6)),
                                                            mask=torch.ones(2, 4), patch_size=4, reduction="per_image"),
         ("pred",)),
    Case("sm_ties_and_float_mask", "simmim_loss", lambda g: dict(
        pred=_half_tied(g), imgs=_imgs(_gen("sm_tied"), 2), mask=torch.tensor([[1.0, 0.5, -1.0, 0.0], [0.0, 2.0, 0.0, 0.0]]), patch_size=4,
        reduction="none"), ("pred",)),
    Case("sm_patch_1_odd", "simmim_loss", lambda g: dict(pred=_imgs(g, 2, 3, 5), imgs=_imgs(g, 2, 3, 5),
                                                         mask=_mask(g, 2, 15), patch_size=1), ("pred",)),
    Case("sm_one_patch", "simmim_loss", lambda g: dict(pred=_imgs(g, 1, 8, 8), imgs=_imgs(g, 1, 8, 8), mask=torch.ones(1),
                                                       patch_size=8, reduction="per_image"), ("pred",)),
    Case("sm_noncontig_stride0_mixed_dtypes", "simmim_loss", lambda g: dict(
        pred=_imgs(g, 2, 4, 4, dtype=BF16), imgs=_imgs(g, 1, 4, 4, dtype=F16), mask=torch.tensor([[[1, 0], [1, 1]]]).expand(2, 2, 2),
        patch_size=2), ("pred",), dict(pred=_nc, imgs=lambda t: t.expand(2, 3, 4, 4))),
    Case("sm_f16", "simmim_loss", lambda g: dict(pred=_imgs(g, 2, dtype=F16), imgs=_imgs(g, 2), mask=_mask(g, 4, 4),
                                                 patch_size=2), ("pred",)),
    Case("sm_f64", "simmim_loss", lambda g: dict(pred=_imgs(g, 2, dtype=F64), imgs=_imgs(g, 2, dtype=F64), mask=_mask(g, 2, 4),
                                                 patch_size=4, reduction="per_image"), ("pred",)),
    Case("sm_bad_patch", "simmim_loss", lambda g: dict(pred=_imgs(g, 2), imgs=_imgs(g, 2), mask=_mask(g, 4), patch_size=3)),
    Case("sm_bad_mask_shape", "simmim_loss", lambda g: dict(pred=_imgs(g, 2), imgs=_imgs(g, 2), mask=_mask(g, 3, 4),
                                                            patch_size=4)),
    Case("ml_noncontig_f16", "masked_recon_loss", lambda g: dict(pred=_pred(g, 2, 4, 4, dtype=F16), imgs=_imgs(g, 2),
                                                                 mask=_mask(g, 2, 8)[:, ::2], patch_size=4,
                                                                 reduction="per_image"), ("pred",),
         dict(pred=_nc, imgs=_nc)),
]

CASES = WA_CASES + MIX_CASES + WIN_CASES + UNI_CASES + LOSS_CASES


# ---------------------------------------------------------------- runner
def _gen(cid: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(cid.encode()))


def _execute(case: Case, backend: str, device: str, f64: bool = False):
    """Run the public op; {"out": ..., "d<name>": ...} on the CPU, or the exception raised."""
    kw = case.build(_gen(case.id))
    leaves = {}
    for k, v in list(kw.items()):
        if not isinstance(v, torch.Tensor):
            continue
        v = v.to(device)
        if f64 and v.is_floating_point():
            v = v.double()
        if k in case.grads:
            v = v.detach().requires_grad_()
            leaves[k] = v
        kw[k] = case.views[k](v) if k in case.views else v
    try:
        out = getattr(mk, case.op)(**kw, backend=backend)
        res = {"out": out}
        if leaves and out.requires_grad:
            g = _gen(case.id + "/dout")
            dout = torch.randn(out.shape, generator=g, dtype=F64).to(device=device, dtype=out.dtype)
            grads = torch.autograd.grad(out, list(leaves.values()), dout, allow_unused=True)
            res.update({f"d{k}": gr for k, gr in zip(leaves, grads) if gr is not None})
    except Exception as e:  # compared by type with the reference
        return e
    return {k: v.detach().cpu() for k, v in res.items()}


_TRUTH: Dict[str, tuple] = {}


def _truth(case: Case):
    if case.id not in _TRUTH:
        _TRUTH[case.id] = (_execute(case, "reference", "cpu"), _execute(case, "reference", "cpu", f64=True))
    return _TRUTH[case.id]


def _positions(mask: torch.Tensor, limit: int = 6):
    return [tuple(i) for i in mask.nonzero().tolist()[:limit]]


def assert_same(name: str, got: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor) -> None:
    """Same shape/dtype, same NaN and +-Inf positions, finite values by the 2x rule."""
    assert got.shape == same.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(same.shape)}"
    assert got.dtype == same.dtype, f"{name}: dtype {got.dtype} != reference {same.dtype}"
    g, s, r = got.double(), same.double(), ref64.double()
    for what, fn in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")), ("-Inf", lambda t: t == float("-inf"))):
        dg, ds = fn(g), fn(s)
        assert torch.equal(dg, ds), (f"{name}: {what} positions differ: only here {_positions(dg & ~ds)}, "
                                     f"only in the reference {_positions(ds & ~dg)}")
    fin = torch.isfinite(s) & torch.isfinite(r)
    if fin.any():
        err = (g[fin] - r[fin]).abs().max().item()
        base = (s[fin] - r[fin]).abs().max().item()
        atol = tolerance(got.dtype) * (1 if name in ("out", "dqkv", "dx") else 8)
        assert err <= 2 * base + atol, f"{name}: max error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_edge_input(case, backend, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    same, ref64 = _truth(case)
    got = _execute(case, backend, device)
    if isinstance(got, mk.BackendUnavailable) and not isinstance(same, Exception):
        pytest.skip(str(got))
    if isinstance(same, Exception):
        assert isinstance(got, Exception), f"reference raised {type(same).__name__}: {same}; {backend} returned a result"
        assert type(got) is type(same), f"{backend} raised {type(got).__name__}: {got}; reference {type(same).__name__}: {same}"
        return
    if isinstance(got, Exception):
        raise AssertionError(f"{backend} raised {type(got).__name__}: {got}; the reference returned a result") from got
    assert set(got) == set(same), f"outputs/gradients {sorted(got)} != reference {sorted(same)}"
    for k in same:
        assert_same(k, got[k], same[k], ref64[k])


def test_table_covers_every_public_op():
    ops = {"window_attention", "mix_tokens", "unmix_tokens", "window_partition", "window_merge",
           "uniform_sample", "uniform_scatter", "mixmim_loss", "masked_recon_loss", "simmim_loss"}
    assert ops == {c.op for c in CASES}
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_uniform_keep_low_bits_on_cuda(backend):
    """On CUDA tensors keep is not range-checked (a device sync); every backend reads keep & 3."""
    g = _gen("keep_bits")
    x, c = _x(g, 2, 4, 8, 3).cuda(), _x(g, 2, 2, 4, 3).cuda()
    keep = torch.randint(0, 256, (2, 1, 2), generator=g).to(torch.uint8).cuda()
    try:
        got = (mk.uniform_sample(x, keep, 2, backend=backend), mk.uniform_scatter(c, keep, 2, backend=backend))
    except mk.BackendUnavailable as e:
        pytest.skip(str(e))
    want = (mk.uniform_sample(x.cpu(), keep.cpu() & 3, 2), mk.uniform_scatter(c.cpu(), keep.cpu() & 3, 2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
