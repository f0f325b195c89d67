"""Launch geometry shared by the Triton row-gather kernels (mixing, windows, uniform).

Every token op moves whole rows of ``C`` channels. A program copies a ``BLOCK_R x BLOCK_C``
tile: ``BLOCK_C`` is a power of two covering ``C`` (up to 256 elements, masked for any ``C``)
and ``BLOCK_R`` fills the tile to ~4096 elements, so each thread issues 16-byte accesses when
``C`` allows it (Triton specializes ``C % 16 == 0``).
"""
from __future__ import annotations

import os
import threading
from typing import Dict, Optional, Tuple

import torch
import triton

__all__ = ["tile", "needs_int64", "interpreting", "acc_empty", "stream_tickets"]

_TILE_ELEMS = 4096
_MAX_BLOCK_C = 256


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def tile(C: int, rows: int):
    """(BLOCK_R, BLOCK_C, num_warps) for rows of C channels."""
    block_c = min(triton.next_power_of_2(max(C, 1)), _MAX_BLOCK_C)
    block_r = max(1, min(_TILE_ELEMS // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c, 4


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether element offsets into any of these tensors can reach 2**31."""
    return any(t is not None and t.numel() >= 2**31 - 1 for t in tensors)


def acc_empty(ref: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=ref.device)


_TICKETS: Dict[Tuple[str, int], torch.Tensor] = {}
_TICKETS_LOCK = threading.Lock()


def stream_tickets(like, n: int) -> Optional[torch.Tensor]:
    """``n`` zeroed int32 ticket counters for a single-launch reduction (the last program of a group
    reduces the group's partials and sets its counter back to zero), on ``like``'s device (``like``: a
    tensor or a device; every user on a stream shares the buffer, each leaving it zero): one buffer
    per (device, stream), kept for the process (launches on a stream run in order, and each leaves its
    counters zero); it grows (a fresh zeroed buffer, once) when a launch needs more. None while the
    stream is being captured into a CUDA graph (a replay could run beside an eager call sharing the
    buffer): the caller then reduces in a second launch with the same code, hence the same bits."""
    device = like.device if isinstance(like, torch.Tensor) else torch.device(like)
    stream = 0
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return None
        stream = torch.cuda.current_stream(device).cuda_stream
    key = (str(device), stream)
    with _TICKETS_LOCK:
        t = _TICKETS.get(key)
        if t is None or t.numel() < n:
            t = torch.zeros(max(n, 64), dtype=torch.int32, device=device)
            _TICKETS[key] = t
        return t
