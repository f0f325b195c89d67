"""Backend choice: explicit, environment override, automatic fall-through with reasons."""
import os
import subprocess
import sys

import pytest
import torch

import mixkernels as mk
from mixkernels import _ext
from mixkernels.ops import _dispatch


def _checks(**reasons):
    return {b: (lambda r=r: r) for b, r in reasons.items()}


def test_automatic_order_and_fall_through():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _dispatch.select("op", cpu, _checks(cpu=None)) == "cpu"
    assert _dispatch.select("op", cpu, _checks(cpu="not built")) == "reference"
    assert _dispatch.select("op", cpu, {}) == "reference"
    # CUDA tensors: cuda (only once verified) > triton > reference.
    assert _dispatch.select("op", cuda, _checks(cuda=None, triton=None)) == "triton"
    assert _dispatch.select("op", cuda, _checks(cuda=None, triton="no")) == "reference"


def test_cuda_auto_switch(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setenv("MIXKERNELS_CUDA_AUTO", "1")
    assert _dispatch.select("op", cuda, _checks(cuda=None, triton=None)) == "cuda"
    monkeypatch.setattr(_dispatch, "CUDA_VERIFIED", frozenset({"op"}))
    monkeypatch.delenv("MIXKERNELS_CUDA_AUTO")
    assert _dispatch.select("op", cuda, _checks(cuda=None, triton=None)) == "cuda"
    assert _dispatch.select("other", cuda, _checks(cuda=None, triton=None)) == "triton"


def test_explicit_backend_raises_with_reason():
    with pytest.raises(mk.BackendUnavailable, match="backend='cpu'.*not built"):
        _dispatch.select("op", torch.device("cpu"), _checks(cpu="not built"), "cpu")
    with pytest.raises(mk.BackendUnavailable, match="no triton implementation"):
        _dispatch.select("op", torch.device("cpu"), {}, "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.select("op", torch.device("cpu"), {}, "fast")
    assert _dispatch.select("op", torch.device("cpu"), _checks(cpu=None), "reference") == "reference"


def test_environment_override(monkeypatch):
    monkeypatch.setenv("MIXKERNELS_BACKEND", "reference")
    assert _dispatch.select("op", torch.device("cpu"), _checks(cpu=None)) == "reference"
    monkeypatch.setenv("MIXKERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MIXKERNELS_BACKEND must be one of"):
        _dispatch.select("op", torch.device("cpu"), _checks(cpu=None))
    # The argument wins over the environment.
    assert _dispatch.select("op", torch.device("cpu"), _checks(cpu=None), "cpu") == "cpu"


def test_public_op_explicit_cuda_on_cpu_tensor_names_the_reason():
    x = torch.randn(2, 3, 4)
    with pytest.raises(mk.BackendUnavailable, match="mix_tokens: backend='cuda'"):
        mk.mix_tokens(x, torch.ones(3, dtype=torch.bool), backend="cuda")


def test_debug_log_says_why(tmp_path):
    code = (
        "import torch, mixkernels as mk\n"
        "x = torch.randn(2, 4, 4, 3*2*16)\n"
        "mk.window_attention(x, 2, 4)\n"
        "mk.mix_tokens(torch.randn(2, 3, 4), torch.ones(3, dtype=torch.bool))\n"
    )
    env = dict(os.environ, MIXKERNELS_LOG="debug")
    env.pop("MIXKERNELS_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "[mixkernels] window_attention: using" in res.stderr
    assert "[mixkernels] mix_tokens: using" in res.stderr


@pytest.mark.skipif(_ext.cpu_error is not None, reason="CPU extension not built")
def test_cpu_extension_is_used_for_token_ops():
    assert _ext.has_kernel("mix_tokens", "CPU")
    assert _ext.has_kernel("window_partition", "CPU")
    spec = mk.ops.OPERATORS_REGISTRY["mix_tokens"]
    assert spec.choose(None, "cpu", (torch.float32,)) == "cpu"
    assert mk.mix_tokens(torch.randn(2, 4, 3, requires_grad=True), torch.ones(4)).grad_fn.name() == "mix_tokensBackward"


def test_build_is_required_in_ci():
    """CI builds the extension: a silent pure-Python install must not pass there."""
    if os.environ.get("MIXKERNELS_REQUIRE_EXT") == "1":
        assert _ext.cpu_error is None, _ext.cpu_error


def test_cached_predicate_still_follows_the_environment(monkeypatch):
    """The per-key cache holds only what the build decides; overrides are read on every call."""
    spec = mk.ops.OPERATORS_REGISTRY["window_partition"]
    key = ("cpu", (torch.float32,), ())
    monkeypatch.delenv("MIXKERNELS_BACKEND", raising=False)
    auto = spec.choose(None, *key)
    assert auto == ("cpu" if _ext.cpu_error is None else "reference")
    monkeypatch.setenv("MIXKERNELS_BACKEND", "reference")
    assert spec.choose(None, *key) == "reference"
    monkeypatch.delenv("MIXKERNELS_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(mk.BackendUnavailable, match="Triton interpreter"):
        spec.choose("triton", *key)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert spec.choose("triton", *key) == "triton"
    assert spec.choose(None, *key) == auto
