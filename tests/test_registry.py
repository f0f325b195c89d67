"""The op registry: it covers the public API, its two call paths agree bit for bit, its edge
inputs match the reference, and each kernel limit agrees with its C++ twin."""
import inspect

import pytest
import torch

import mixkernels as mk
from mixkernels import _ext
from mixkernels.ops import OPERATORS_REGISTRY, limits
from mixkernels.ops._dispatch import _triton_launcher_error
from mixkernels.ops._kernel_op import custom_op_path, record_calls
from mixkernels.testing import assert_close_2x, devices

SPECS = list(OPERATORS_REGISTRY.values())
IDS = [s.name for s in SPECS]
_NOT_OPS = {"BACKENDS", "BackendUnavailable", "reference", "uniform_masks"}


def test_registry_covers_the_public_ops():
    public = {n for n in mk.__all__ if n not in _NOT_OPS}
    assert set(OPERATORS_REGISTRY) == public


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_entry_is_consistent(spec):
    assert spec.fn is getattr(mk, spec.name)
    params = inspect.signature(spec.fn).parameters
    assert "backend" in params
    assert set(inspect.signature(spec.reference).parameters) <= set(params), "reference arguments must be the op's"
    assert set(spec.grads) <= set(params)
    assert spec.samples(torch.device("cpu"), torch.float32) and spec.edges(torch.device("cpu"), torch.float32) is not None
    for k in spec.kernels:  # every kernel-level op the entry names exists for each backend it declares
        if "triton" in spec.dtypes:
            assert not _triton_launcher_error(spec.family, k), _triton_launcher_error(spec.family, k)
        if "cpu" in spec.dtypes and _ext.cpu_error is None:
            assert _ext.has_kernel(k, "CPU"), f"mixkernels_C::{k} has no CPU kernel"


def _run(spec, kw, backend, grads, dout=None):
    out = spec.fn(**kw, backend=backend)
    if dout is None:
        dout = torch.randn_like(out)
    return out, torch.autograd.grad(out, [kw[n] for n in grads], dout), dout


def _graph_names(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn.name() not in seen:
            seen.add(fn.name())
            todo += [f for f, _ in fn.next_functions]
    return seen


def _cases():
    for dev in devices():
        for spec in SPECS:
            for i, (kw, grads) in enumerate(spec.call_samples(dev)):
                for b in spec.backends_for(kw):
                    yield pytest.param(spec, dev, i, b, id=f"{spec.name}-{dev}-{i}-{b}")


@pytest.mark.parametrize("spec,device,i,backend", list(_cases()))
def test_eager_and_custom_op_paths_agree_bitwise(spec, device, i, backend):
    """Both entries into an op run the same impl: forward and every gradient are identical."""
    kw, grads = spec.call_samples(device)[i]
    with record_calls() as rec:
        out, g, dout = _run(spec, kw, backend, grads)
    fwd = rec[0][0].name
    assert f"{fwd}Backward" in _graph_names(out), "eager calls must use the lean autograd.Function"
    with custom_op_path():
        out2, g2, _ = _run(spec, kw, backend, grads, dout)
    assert f"{fwd}Backward" not in _graph_names(out2)
    assert torch.equal(out, out2)
    for n, a, b in zip(grads, g, g2):
        assert torch.equal(a, b), f"d{n} differs between the eager and the custom-op path"


def _leaves(kw, dtype=None):
    """Fresh leaves (float tensors cast to ``dtype`` when given), other arguments as they are."""
    def cp(v):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            return v
        return v.detach().to(dtype or v.dtype).requires_grad_(v.requires_grad)
    return {k: cp(v) for k, v in kw.items()}


def _ref(spec, kw, grads, dtype, dout):
    kw = _leaves(kw, dtype)
    out = spec.run_reference(kw)
    if dout is None:
        dout = torch.randn_like(out, dtype=torch.float64)
    g = torch.autograd.grad(out, [kw[n] for n in grads], dout.to(out.dtype)) if grads and out.numel() else ()
    return out, g, dout


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_samples_and_edges_match_the_reference(spec, device):
    """Every registry sample and edge input, fp32 and fp64, forward and every gradient, on each
    backend here, by flash-attn's rule against the float64 reference."""
    for dtype in (torch.float32, torch.float64):
        calls = [("sample", kw) for kw in spec.samples(torch.device(device), dtype)]
        calls += spec.edges(torch.device(device), dtype)
        for name, kw in calls:
            grads = [n for n in spec.grads if isinstance(kw.get(n), torch.Tensor) and kw[n].requires_grad]
            ref64, g64, dout = _ref(spec, kw, grads, torch.float64, None)
            same, gsame, _ = _ref(spec, kw, grads, None, dout) if dtype != torch.float64 else (None, [None] * len(g64), 0)
            for b in spec.backends_for(kw):  # (no float64 on the GPU backends: not in their dtypes)
                what = f"{spec.name} {name} {dtype} backend={b}"
                leaves = _leaves(kw)
                out = spec.fn(**leaves, backend=b)
                assert_close_2x(out, ref64, same, name=what)
                if g64:
                    g = torch.autograd.grad(out, [leaves[n] for n in grads], dout.to(out.dtype))
                    for n, a, r, r1 in zip(grads, g, g64, gsame):
                        assert_close_2x(a, r, r1, name=f"{what} d{n}")


@pytest.mark.skipif(_ext.cpu_error is not None, reason="CPU extension not built")
def test_limits_agree_with_the_cpp_header():
    for name, value in limits.LIMITS.items():
        assert tuple(torch.ops.mixkernels_C.limits(name)) == value, name
    with pytest.raises(ValueError, match="limits: name must be one of"):
        torch.ops.mixkernels_C.limits("bogus")


def test_probe_reports_the_dispatch_key_without_running():
    spec = OPERATORS_REGISTRY["window_attention"]
    kw = spec.samples(torch.device("cpu"), torch.bfloat16)[0]
    assert spec.dispatch_key(kw) == ("cpu", (torch.bfloat16,), (16, 16, None))
    status = spec.status(*spec.dispatch_key(kw))
    assert status["reference"] == "ok" and set(status) == {"cuda", "triton", "cpu", "reference"}
    cosine = next(k for k in spec.samples(torch.device("cpu"), torch.float32) if "logit_scale" in k)
    assert spec.dispatch_key(cosine)[2][-1] == "cosine"  # the variant is part of the key


@pytest.mark.parametrize("spec", [s for s in SPECS if s.variants], ids=[s.name for s in SPECS if s.variants])
def test_variant_kernels_exist_or_are_reported(spec):
    """A variant's kernel-level ops are registered on CPU; a backend without them says so by name."""
    for name, kernels in spec.variants.items():
        if _ext.cpu_error is None:
            assert all(_ext.has_kernel(k, "CPU") for k in kernels), kernels
        why = spec.reason("triton", "cuda", (torch.float16,), (16, 16, name))
        if why and any(_triton_launcher_error(spec.family, k) for k in kernels):
            assert f"{name} mode not implemented" in why, why
