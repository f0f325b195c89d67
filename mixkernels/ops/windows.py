"""Swin roll + window partition / merge + reverse roll: one pass each way."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import compiled_reason, kernel, select, triton_reason

__all__ = ["window_partition", "window_merge"]
_FAMILY = "windows"


def _checks(name: str, t: Tensor):
    return {
        "cpu": lambda: compiled_reason("cpu", name, t, chk.FLOATS),
        "cuda": lambda: compiled_reason("cuda", name, t),
        "triton": lambda: triton_reason(_FAMILY, name, t),
    }


@torch.library.custom_op("mixkernels::window_partition", mutates_args=())
def _partition(x: Tensor, wh: int, ww: int, sh: int, sw: int, backend: str) -> Tensor:
    return kernel(_FAMILY, "window_partition", backend)(x, wh, ww, sh, sw)


@_partition.register_fake
def _(x, wh, ww, sh, sw, backend):
    B, H, W, C = x.shape
    return x.new_empty((B * (H // wh) * (W // ww), wh * ww, C))


@torch.library.custom_op("mixkernels::window_merge", mutates_args=())
def _merge(windows: Tensor, H: int, W: int, wh: int, ww: int, sh: int, sw: int, backend: str) -> Tensor:
    return kernel(_FAMILY, "window_merge", backend)(windows, H, W, wh, ww, sh, sw)


@_merge.register_fake
def _(windows, H, W, wh, ww, sh, sw, backend):
    nW = (H // wh) * (W // ww)
    return windows.new_empty((windows.shape[0] // nW, H, W, windows.shape[2]))


# Each is the other's backward: partition and merge are inverse permutations.
def _partition_setup(ctx, inputs, output):
    x, ctx.wh, ctx.ww, ctx.sh, ctx.sw, ctx.backend = inputs
    ctx.H, ctx.W = x.shape[1], x.shape[2]


def _partition_backward(ctx, grad):
    dx = _merge(grad.contiguous(), ctx.H, ctx.W, ctx.wh, ctx.ww, ctx.sh, ctx.sw, ctx.backend)
    return dx, None, None, None, None, None


def _merge_setup(ctx, inputs, output):
    _, _, _, ctx.wh, ctx.ww, ctx.sh, ctx.sw, ctx.backend = inputs


def _merge_backward(ctx, grad):
    dw = _partition(grad.contiguous(), ctx.wh, ctx.ww, ctx.sh, ctx.sw, ctx.backend)
    return dw, None, None, None, None, None, None, None


_partition.register_autograd(_partition_backward, setup_context=_partition_setup)
_merge.register_autograd(_merge_backward, setup_context=_merge_setup)


def window_partition(x: Tensor, window_size, shift_size=0, *, backend: Optional[str] = None) -> Tensor:
    """``roll(x, -shift)`` then Swin's window partition, fused.

    Args:
        x: ``(B, H, W, C)``; ``window_size`` must divide ``H`` and ``W``.
    Returns:
        ``(B*nW, wh*ww, C)``: windows row-major, batch outermost.
    """
    chk.tensor("x", x, ndim=(4,), floating=True)
    B, H, W, C = x.shape
    wh, ww, sh, sw = chk.window_geometry(window_size, shift_size, H, W)
    b = select("window_partition", x.device, _checks("window_partition", x), backend)
    if b == "reference":
        return ref.window_partition(x, (wh, ww), (sh, sw))
    return _partition(x.contiguous(), wh, ww, sh, sw, b)


def window_merge(windows: Tensor, window_size, H: int, W: int, shift_size=0, *, backend: Optional[str] = None) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, N, C)`` -> ``(B, H, W, C)``."""
    chk.tensor("windows", windows, ndim=(3,), floating=True)
    chk.positive_int("H", H)
    chk.positive_int("W", W)
    wh, ww, sh, sw = chk.window_geometry(window_size, shift_size, H, W)
    nW = (H // wh) * (W // ww)
    if windows.shape[1] != wh * ww or windows.shape[0] % nW:
        raise ValueError(
            f"windows must have shape (B*{nW}, {wh * ww}, C) for H={H}, W={W}, window {(wh, ww)}, got {tuple(windows.shape)}"
        )
    b = select("window_merge", windows.device, _checks("window_merge", windows), backend)
    if b == "reference":
        return ref.window_merge(windows, (wh, ww), H, W, (sh, sw))
    return _merge(windows.contiguous(), H, W, wh, ww, sh, sw, b)
