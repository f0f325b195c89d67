"""Mask-aware (shifted) window attention: validation, backend choice, autograd, registration."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import acc_dtype, kernel
from ._kernel_op import KernelOp
from .limits import KERNEL_HEAD_DIMS, KERNEL_MAX_WINDOW_TOKENS
from .registry import OPERATORS_REGISTRY

__all__ = ["window_attention", "KERNEL_HEAD_DIMS", "KERNEL_MAX_WINDOW_TOKENS"]
_FAMILY = "window_attention"
_SPEC = OPERATORS_REGISTRY["window_attention"]
_INTS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# group/coords dtypes the kernels read as they are; others are converted to int32.
_LABEL_DTYPES = (torch.int32, torch.int64)  # compared exactly at their width (docs/SEMANTICS.md)
# The registry variant of SwinV2's cosine attention (kernel-level ops window_attention_cosine[_backward]).
_COSINE = "cosine"


def _checks(qkv: Tensor, d: int, N: int, cosine: bool = False):
    """``{backend: predicate}`` for a call on ``qkv`` with head dim ``d`` and ``N`` tokens per window
    (the registry's predicate; tests/test_window_attention.py asks it which backends run here)."""
    key = (qkv.device.type, (qkv.dtype,), (d, N, _COSINE if cosine else None))
    return {b: (lambda b=b: _SPEC.reason(b, *key)) for b in _SPEC.dtypes}


# The kernel-level op: (out (B,H,W,C) qkv.dtype, lse acc (B*nW, nH, N)); the fake derives both here.
def _out_meta(qkv: Tensor, num_heads: int, wh: int, ww: int) -> tuple:
    B, H, W, C3 = qkv.shape
    nW = (H // wh) * (W // ww)
    return (B, H, W, C3 // 3), (B * nW, num_heads, wh * ww)


# Kernel-level ops: window_attention(..., scale) and, in cosine mode, window_attention_cosine(...,
# logit_scale) with the same layout otherwise; the custom op takes both and calls the one in use.
# logit_scale comes last, with a default, so the argument positions of the other modes stay as they were.
def _wattn_impl(
    qkv: Tensor, num_heads: int, wh: int, ww: int, sh: int, sw: int,
    rpb: Optional[Tensor], attn_bias: Optional[Tensor], group: Optional[Tensor], coords: Optional[Tensor],
    rh: int, rw: int, scale: float, deterministic: bool, backend: str, logit_scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    if logit_scale is None:
        return kernel(_FAMILY, "window_attention", backend)(
            qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale)
    return kernel(_FAMILY, "window_attention_cosine", backend)(
        qkv, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, logit_scale)


def _wattn_fake(qkv, num_heads, wh, ww, *rest):
    out_shape, lse_shape = _out_meta(qkv, num_heads, wh, ww)
    return qkv.new_empty(out_shape), qkv.new_empty(lse_shape, dtype=acc_dtype(qkv.dtype))


def _wattn_bwd_impl(
    dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, wh: int, ww: int, sh: int, sw: int,
    rpb: Optional[Tensor], attn_bias: Optional[Tensor], group: Optional[Tensor], coords: Optional[Tensor],
    rh: int, rw: int, scale: float, need_drpb: bool, need_dbias: bool, deterministic: bool, backend: str,
    logit_scale: Optional[Tensor] = None, need_dlogit_scale: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if logit_scale is None:
        dqkv, drpb, dbias = kernel(_FAMILY, "window_attention_backward", backend)(
            dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale,
            need_drpb, need_dbias, deterministic,
        )
        return dqkv, drpb, dbias, lse.new_empty((0,))
    return kernel(_FAMILY, "window_attention_cosine_backward", backend)(
        dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, logit_scale,
        need_drpb, need_dbias, need_dlogit_scale, deterministic,
    )


def _wattn_bwd_fake(dout, qkv, out, lse, num_heads, wh, ww, sh, sw, rpb, attn_bias, group, coords, rh, rw, scale,
                    need_drpb, need_dbias, deterministic, backend, logit_scale=None, need_dlogit_scale=False):
    acc = dict(dtype=acc_dtype(qkv.dtype))
    drpb = qkv.new_empty(tuple(rpb.shape) if need_drpb else (0,), **acc)
    dbias = qkv.new_empty(tuple(attn_bias.shape) if need_dbias else (0,), **acc)
    dls = qkv.new_empty((num_heads,) if need_dlogit_scale else (0,), **acc)
    return torch.empty_like(qkv), drpb, dbias, dls


_WATTN = KernelOp("window_attention", _wattn_impl, _wattn_fake, outputs=("out", "lse"))
_WATTN_BWD = KernelOp("window_attention_backward", _wattn_bwd_impl, _wattn_bwd_fake,
                      outputs=("dqkv", "drpb", "dbias", "dlogit_scale"))


def _wattn_backward(ctx, dout, _dlse):
    s, a = _WATTN.saved(ctx), ctx.attrs
    need_drpb = _WATTN.needs(ctx, "rpb")  # False when rpb is None
    need_dbias = _WATTN.needs(ctx, "attn_bias")
    need_dls = _WATTN.needs(ctx, "logit_scale")
    dqkv, drpb, dbias, dls = _WATTN_BWD.call(
        dout=dout.contiguous(), **s._asdict(), **a._asdict(), need_drpb=need_drpb, need_dbias=need_dbias,
        need_dlogit_scale=need_dls)
    return _WATTN.grads(qkv=dqkv, rpb=drpb if need_drpb else None, attn_bias=dbias if need_dbias else None,
                        logit_scale=dls if need_dls else None)


_WATTN.autograd(_wattn_backward, save=("qkv", "out", "lse", "rpb", "attn_bias", "group", "coords", "logit_scale"),
                non_differentiable=("lse",))


def _per_position(name: str, t: Optional[Tensor], B: int, H: int, W: int, qkv: Tensor, tail: tuple) -> Optional[Tensor]:
    if t is None:
        return None
    chk.tensor(name, t, dtypes=_INTS)
    chk.same_device(name, t, qkv, "qkv")
    shape = tuple(t.shape)
    if shape not in ((H, W) + tail, (B, H, W) + tail):
        raise ValueError(f"{name} must have shape {(H, W) + tail} or {(B, H, W) + tail}, got {shape}")
    return t


def _labels(t: Tensor, ndim: int) -> Tensor:
    """group (G,H,W) / coords (G,H,W,2) in a dtype the kernels read."""
    t = t if t.dtype in _LABEL_DTYPES else t.to(torch.int32)
    return t if t.dim() == ndim else t.unsqueeze(0)


def _deterministic(flag: Optional[bool]) -> bool:
    if flag is not None:
        return bool(flag)
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("MIXKERNELS_DETERMINISTIC") == "1"


def window_attention(
    qkv: Tensor,
    num_heads: int,
    window_size,
    *,
    shift_size=0,
    rel_pos_bias: Optional[Tensor] = None,
    attn_bias: Optional[Tensor] = None,
    group: Optional[Tensor] = None,
    coords: Optional[Tensor] = None,
    coord_range=None,
    scale: Optional[float] = None,
    logit_scale: Optional[Tensor] = None,
    deterministic: Optional[bool] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Fused mask-aware (shifted) window attention on the un-partitioned qkv tensor.

    Computes ``roll(-shift) -> partition -> softmax(q*scale @ k^T + rel_pos_bias + attn_bias
    + masks) @ v -> merge -> roll(+shift)`` exactly as timm/torchvision Swin, with masked
    pairs at probability 0.

    Args:
        qkv: ``(B, H, W, 3C)`` output of the qkv Linear, channels ``(3, nH, d)``;
            fp16/bf16/fp32 (fp64 on the cpu and reference backends).
        num_heads: ``nH``.
        window_size: ``wh`` or ``(wh, ww)``, dividing ``H`` and ``W``.
        shift_size: Swin cyclic shift ``sh`` or ``(sh, sw)``, smaller than the window.
        rel_pos_bias: ``((2Rh-1)*(2Rw-1), nH)`` table; ``R`` is the window or ``coord_range``.
        attn_bias: dense ``(nH, N, N)`` bias (e.g. SwinV2 CPB output).
        group: ``(H, W)`` or ``(B, H, W)`` int/bool labels at original positions; a pair
            attends only within one label (MixMIM: ``group = mask``).
        coords: ``(H, W, 2)`` or ``(B, H, W, 2)`` int true (row, col) of each token;
            the table is then indexed by coordinate differences within ``coord_range``.
        coord_range: ``(Rh, Rw)``; required with ``coords``.
            Edge inputs (docs/SEMANTICS.md): labels and coords compare exactly at full
            width, out-of-range coordinate differences add no bias, a row with every key
            masked (``-inf`` biases) is NaN.
        scale: default ``d ** -0.5``; not with ``logit_scale``.
        logit_scale: SwinV2 cosine attention: ``(nH,)`` or ``(nH, 1, 1)`` learned log scale
            per head (timm/torchvision store ``(nH, 1, 1)``). Logits are then
            ``normalize(q) @ normalize(k)^T * exp(min(logit_scale, log(100)))`` (q and k
            L2-normalized per head with ``F.normalize``'s eps, inside the kernel), before the
            biases and masks; the gradient to ``logit_scale`` is zero where the clamp is active.
            The continuous position bias ``16*sigmoid(cpb_mlp(table))`` goes in as
            ``rel_pos_bias`` (the table) or ``attn_bias``.
        deterministic: bit-reproducible bias gradients (default: follows
            ``torch.are_deterministic_algorithms_enabled()`` or ``MIXKERNELS_DETERMINISTIC=1``).
        backend: ``None`` (automatic), ``"cuda"``, ``"triton"``, ``"cpu"``, ``"reference"``.
    Returns:
        ``(B, H, W, C)`` in ``qkv.dtype``, ready for the output projection.
    """
    chk.tensor("qkv", qkv, ndim=(4,), floating=True)
    nh = chk.positive_int("num_heads", num_heads)
    B, H, W, C3 = qkv.shape
    if C3 % (3 * nh):
        raise ValueError(f"qkv's last dim must be 3*num_heads*head_dim (num_heads={nh}), got {C3}")
    d = C3 // (3 * nh)
    wh, ww, sh, sw = chk.window_geometry(window_size, shift_size, H, W)
    N = wh * ww
    if coords is not None:
        if coord_range is None:
            raise ValueError("coord_range (Rh, Rw) is required with coords, got None")
        rh, rw = chk.pair("coord_range", coord_range)
    else:
        rh, rw = wh, ww
    if rel_pos_bias is not None:
        chk.tensor("rel_pos_bias", rel_pos_bias, ndim=(2,), floating=True)
        chk.same_device("rel_pos_bias", rel_pos_bias, qkv, "qkv")
        want = ((2 * rh - 1) * (2 * rw - 1), nh)
        if tuple(rel_pos_bias.shape) != want:
            raise ValueError(f"rel_pos_bias must have shape {want}, got {tuple(rel_pos_bias.shape)}")
    if attn_bias is not None:
        chk.tensor("attn_bias", attn_bias, ndim=(3,), floating=True)
        chk.same_device("attn_bias", attn_bias, qkv, "qkv")
        if tuple(attn_bias.shape) != (nh, N, N):
            raise ValueError(f"attn_bias must have shape {(nh, N, N)}, got {tuple(attn_bias.shape)}")
    _per_position("group", group, B, H, W, qkv, ())
    _per_position("coords", coords, B, H, W, qkv, (2,))
    if logit_scale is not None:
        chk.tensor("logit_scale", logit_scale, floating=True)
        chk.same_device("logit_scale", logit_scale, qkv, "qkv")
        if tuple(logit_scale.shape) not in ((nh,), (nh, 1, 1)):
            raise ValueError(f"logit_scale must have shape {(nh,)} or {(nh, 1, 1)}, got {tuple(logit_scale.shape)}")
        if scale is not None:
            raise ValueError(f"scale must be None with logit_scale (cosine attention has no softmax scale), got {scale!r}")
        scale = 1.0
    elif scale is None:
        scale = d ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")

    b = _SPEC.choose(backend, qkv.device.type, (qkv.dtype,), (d, N, None if logit_scale is None else _COSINE))
    if b == "reference":
        return ref.window_attention(
            qkv, nh, (wh, ww), shift_size=(sh, sw), rel_pos_bias=rel_pos_bias, attn_bias=attn_bias,
            group=group, coords=coords, coord_range=(rh, rw), scale=float(scale), logit_scale=logit_scale,
        )
    acc = acc_dtype(qkv.dtype)
    ls = None if logit_scale is None else logit_scale.to(acc).reshape(nh).contiguous()
    rpb = None if rel_pos_bias is None else rel_pos_bias.to(acc).contiguous()
    ab = None if attn_bias is None else attn_bias.to(acc).contiguous()
    g = None if group is None else _labels(group, 3).contiguous()
    c = None if coords is None else _labels(coords, 4).contiguous()
    out, _ = _WATTN(qkv.contiguous(), nh, wh, ww, sh, sw, rpb, ab, g, c, rh, rw, float(scale),
                    _deterministic(deterministic), b, ls)
    return out
