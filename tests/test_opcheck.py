"""torch.library.opcheck on every registered mixkernels op, with the arguments the public ops
actually pass: each registry sample runs forward + backward through the custom ops
(``custom_op_path``) while the calls are recorded, on a backend that runs here."""
import pytest
import torch

import mixkernels  # noqa: F401  (registers the ops)
from mixkernels.ops import OPERATORS_REGISTRY
from mixkernels.ops._kernel_op import custom_op_path, record_calls
from mixkernels.testing import devices

def _registered():
    return sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("mixkernels::"))


def _backends(spec, kw):
    """The compiled backend of the device (cpu, or cuda where built), else Triton."""
    ok = spec.backends_for(kw)
    out = [b for b in ("cpu", "cuda") if b in ok]
    return out or [b for b in ("triton",) if b in ok]


_CALLS = None


def _recorded():
    """``{custom op name: [(KernelOp, args), ...]}`` over every registry sample, device and
    backend (once per session)."""
    global _CALLS
    if _CALLS is None:
        _CALLS = {}
        for dev in devices():
            for spec in OPERATORS_REGISTRY.values():
                for kw, grads in spec.call_samples(dev):
                    for b in _backends(spec, kw):
                        with custom_op_path(), record_calls() as rec:
                            out = spec.fn(**kw, backend=b)
                            torch.autograd.grad(out, [kw[n] for n in grads], torch.randn_like(out))
                        for op, args in rec:
                            _CALLS.setdefault(op.name, []).append((op, args))
    return _CALLS


def _opcheck_args(name, args):
    # Fresh leaves (opcheck copies its inputs); backward ops are not differentiable (no double backward).
    grad = not name.endswith("_backward")
    return tuple(a.detach().requires_grad_(grad and a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)


def test_every_registered_op_is_reached_by_a_registry_sample():
    names = _registered()
    assert "mix_tokens" in names and "window_attention_backward" in names
    missing = sorted(set(names) - set(_recorded()))
    assert not missing, f"mixkernels::{missing} reached by no registry sample (add a sample to mixkernels/ops/registry.py)"


@pytest.mark.parametrize("name", _registered())
def test_opcheck(name):
    calls = _recorded().get(name)
    if not calls:
        pytest.skip(f"no compiled or Triton kernel for {name} here")
    for op, args in calls:
        torch.library.opcheck(op.op, _opcheck_args(name, args))
