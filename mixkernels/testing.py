"""Test and benchmark helpers: flash-attn's error rule, poisoning, non-contiguous views."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["assert_close_2x", "max_error", "noncontiguous", "tolerance", "devices"]

# Absolute slack per dtype, on top of twice the same-dtype reference error.
_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance(dtype: torch.dtype) -> float:
    return _ATOL[dtype]


def max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.detach().double() - ref.detach().double()).abs().max().item() if out.numel() else 0.0


def assert_close_2x(
    out: torch.Tensor,
    ref64: torch.Tensor,
    ref_same: Optional[torch.Tensor],
    *,
    atol: Optional[float] = None,
    name: str = "output",
) -> None:
    """flash-attn's rule: ``|out - ref64| <= 2 * |ref_same - ref64| + atol`` (max over elements).

    ``ref64`` is the reference in float64; ``ref_same`` the reference run in ``out``'s dtype
    (None when out is float64: the rule is then ``|out - ref64| <= atol``).
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    if atol is None:
        atol = tolerance(out.dtype)
    o = out.detach().double()
    r = ref64.detach().double()
    assert torch.isfinite(o).all() == torch.isfinite(r).all(), f"{name}: non-finite values differ from reference"
    err = (o - r).abs().max().item() if o.numel() else 0.0
    base = max_error(ref_same, r) if ref_same is not None else 0.0
    assert err <= 2 * base + atol, f"{name}: max error {err:.3e} > 2 * {base:.3e} + {atol:.1e}"


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other element of a wider tensor)."""
    wide = torch.empty(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    return view.requires_grad_(t.requires_grad) if t.is_leaf else view


def devices():
    """Devices to test on: cpu always, cuda when present."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out
