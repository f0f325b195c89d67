"""Swin roll + window partition / merge + reverse roll: one pass each way."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .. import reference as ref
from . import _checks as chk
from ._dispatch import kernel
from ._kernel_op import KernelOp
from .registry import OPERATORS_REGISTRY

__all__ = ["window_partition", "window_merge"]
_FAMILY = "windows"
_PARTITION_SPEC, _MERGE_SPEC = OPERATORS_REGISTRY["window_partition"], OPERATORS_REGISTRY["window_merge"]


def _partition_impl(x: Tensor, wh: int, ww: int, sh: int, sw: int, backend: str) -> Tensor:
    return kernel(_FAMILY, "window_partition", backend)(x, wh, ww, sh, sw)


def _partition_fake(x, wh, ww, sh, sw, backend):
    B, H, W, C = x.shape
    return x.new_empty((B * (H // wh) * (W // ww), wh * ww, C))


def _merge_impl(windows: Tensor, H: int, W: int, wh: int, ww: int, sh: int, sw: int, backend: str) -> Tensor:
    return kernel(_FAMILY, "window_merge", backend)(windows, H, W, wh, ww, sh, sw)


def _merge_fake(windows, H, W, wh, ww, sh, sw, backend):
    nW = (H // wh) * (W // ww)
    return windows.new_empty((windows.shape[0] // nW, H, W, windows.shape[2]))


_PARTITION = KernelOp("window_partition", _partition_impl, _partition_fake)
_MERGE = KernelOp("window_merge", _merge_impl, _merge_fake)


# Each is the other's backward: partition and merge are inverse permutations.
def _partition_backward(ctx, grad):
    a = ctx.attrs
    return _PARTITION.grads(x=_MERGE(grad.contiguous(), ctx.H, ctx.W, a.wh, a.ww, a.sh, a.sw, a.backend))


def _keep_grid(ctx, args):
    ctx.H, ctx.W = args.x.shape[1], args.x.shape[2]


def _merge_backward(ctx, grad):
    a = ctx.attrs
    return _MERGE.grads(windows=_PARTITION(grad.contiguous(), a.wh, a.ww, a.sh, a.sw, a.backend))


_PARTITION.autograd(_partition_backward, extra=_keep_grid)
_MERGE.autograd(_merge_backward)


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
    b = _PARTITION_SPEC.choose(backend, x.device.type, (x.dtype,))
    if b == "reference":
        return ref.window_partition(x, (wh, ww), (sh, sw))
    return _PARTITION(x.contiguous(), wh, ww, sh, sw, b)


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
    b = _MERGE_SPEC.choose(backend, windows.device.type, (windows.dtype,))
    if b == "reference":
        return ref.window_merge(windows, (wh, ww), H, W, (sh, sw))
    return _MERGE(windows.contiguous(), H, W, wh, ww, sh, sw, b)
