"""Launch geometry shared by the Triton row-gather kernels (mixing, windows, uniform).

Every token op moves whole rows of ``C`` channels. A program copies a ``BLOCK_R x BLOCK_C``
tile: ``BLOCK_C`` is a power of two covering ``C`` (up to 256 elements, masked for any ``C``)
and ``BLOCK_R`` fills the tile to ~4096 elements, so each thread issues 16-byte accesses when
``C`` allows it (Triton specializes ``C % 16 == 0``).
"""
from __future__ import annotations

import os

import torch
import triton

__all__ = ["tile", "needs_int64", "interpreting", "acc_empty"]

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
