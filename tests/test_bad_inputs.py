"""Bad input raises ValueError/TypeError naming the argument and what it got, on every public op.

The cases live with each op's registry entry (``bad`` in mixkernels/ops/registry.py)."""
import pytest
import torch

from mixkernels import _ext

from mixkernels.ops import OPERATORS_REGISTRY

CASES = [(spec, bad) for spec in OPERATORS_REGISTRY.values() for bad in spec.bad()]


def test_every_op_has_bad_inputs():
    for spec in OPERATORS_REGISTRY.values():
        assert spec.bad(), f"{spec.name} declares no bad inputs"


@pytest.mark.parametrize("spec,bad", CASES, ids=[b.id for _, b in CASES])
def test_bad_input(spec, bad):
    with pytest.raises(bad.exc) as info:
        spec.fn(**bad.kwargs)
    assert bad.msg in str(info.value), f"message {str(info.value)!r} lacks {bad.msg!r}"


# Kernel-level ops are callable directly: bad input raises there too, in the same style
# ("<op>: <argument> must ..., got ...", csrc/include/mixkernels/checks.h), never crashes.
_C = torch.ops.mixkernels_C if _ext.cpu_error is None else None
KERNEL_CASES = [
    ("k-partition-grid", lambda: _C.window_partition(torch.randn(1, 6, 6, 2), 4, 4, 0, 0), ValueError,
     "window_partition: window (wh, ww) must tile a non-empty grid (6, 6), got (4, 4)"),
    ("k-merge-shape", lambda: _C.window_merge(torch.randn(3, 16, 2), 8, 8, 4, 4, 0, 0), ValueError,
     "window_merge: windows must have shape (B*4, 16, C), got [3, 16, 2]"),
    ("k-mix-mask-dtype", lambda: _C.mix_tokens(torch.randn(2, 4, 3), torch.ones(1, 4, dtype=torch.int32)), TypeError,
     "mix_tokens: mask must have dtype Byte, got Int"),
    ("k-mix-noncontiguous", lambda: _C.mix_tokens(torch.randn(2, 3, 4).transpose(1, 2), torch.ones(1, 4, dtype=torch.uint8)),
     ValueError, "mix_tokens: x must be a contiguous (B,L,C) tensor"),
    ("k-scatter-keep", lambda: _C.uniform_scatter(torch.randn(1, 4, 4, 2), torch.zeros(1, 1, 1, dtype=torch.uint8), 2),
     ValueError, "uniform_scatter: keep must have shape [1, 2, 2], got [1, 1, 1]"),
    ("k-sample-unit", lambda: _C.uniform_sample(torch.randn(1, 6, 6, 2), torch.zeros(1, 1, 1, dtype=torch.uint8), 2, None, None),
     ValueError, "uniform_sample: unit must be positive with 2*unit dividing the grid (6, 6), got 2"),
    ("k-loss-mask", lambda: _C.mixmim_loss(torch.randn(4, 4, 48), torch.randn(2, 3, 8, 8), torch.ones(1, 5, dtype=torch.uint8),
                                            4, True, 1e-6), ValueError, "mixmim_loss: mask must have shape (1 or 2, 4), got [1, 5]"),
    ("k-loss-idx", lambda: _C.masked_recon_loss(torch.randn(2, 4, 48), torch.randn(2, 3, 8, 8), torch.zeros(2, 4, dtype=torch.int32),
                                                 4, True, 1e-6), TypeError, "masked_recon_loss: patch_idx must have dtype Long"),
    ("k-wattn-rpb", lambda: _C.window_attention(torch.randn(1, 4, 4, 6), 1, 4, 4, 0, 0, torch.randn(49, 1, dtype=torch.float64),
                                                 None, None, None, 4, 4, 1.0), TypeError,
     "window_attention: rpb must have dtype Float, got Double"),
    ("k-wattn-lse", lambda: _C.window_attention_backward(
        torch.randn(1, 4, 4, 2), torch.randn(1, 4, 4, 6), torch.randn(1, 4, 4, 2), torch.randn(3), 1, 4, 4, 0, 0,
        None, None, None, None, 4, 4, 1.0, False, False, False), ValueError, "window_attention_backward: lse must be contiguous"),
]


@pytest.mark.skipif(_C is None, reason="CPU extension not built")
@pytest.mark.parametrize("call,exc,msg", [c[1:] for c in KERNEL_CASES], ids=[c[0] for c in KERNEL_CASES])
def test_bad_kernel_level_input(call, exc, msg):
    with pytest.raises(exc) as info:
        call()
    assert msg in str(info.value), f"message {str(info.value)!r} lacks {msg!r}"
