"""Loading of the compiled extensions, with the reason when one is missing.

``import mixkernels`` never fails because of an extension: the ops fall back to other
backends and ``python -m mixkernels.info`` reports why a backend is off.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch

__all__ = ["cpu_error", "cuda_error", "has_kernel", "require", "build_info"]

_INSTALL_HINT = (
    "build it with `pip install --no-build-isolation .` in the mixkernels checkout "
    "(against the torch you run)"
)


def _load(name: str) -> Optional[str]:
    try:
        importlib.import_module(f"mixkernels.{name}")
        return None
    except Exception as e:  # ImportError, undefined symbols from a torch mismatch, ...
        return f"mixkernels.{name} failed to load ({type(e).__name__}: {e}); {_INSTALL_HINT}"


cpu_error: Optional[str] = _load("_C")
if cpu_error is not None:
    cuda_error: Optional[str] = "needs mixkernels._C, which did not load"
elif torch.version.cuda is None:
    cuda_error = "this torch was built without CUDA"
else:
    cuda_error = _load("_C_cuda")
    if cuda_error is not None and "No module named" in cuda_error:
        cuda_error = "mixkernels._C_cuda was not built (no nvcc, or MIXKERNELS_SKIP_CUDA=1 at build time)"

_KERNELS: Dict[tuple, bool] = {}


@torch.compiler.assume_constant_result  # dynamo cannot trace the dispatcher query; the answer is fixed
def has_kernel(name: str, key: str) -> bool:
    """Whether ``mixkernels_C::name`` has a kernel for dispatch key ``"CPU"`` or ``"CUDA"``."""
    hit = _KERNELS.get((name, key))
    if hit is None:
        hit = cpu_error is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"mixkernels_C::{name}", key)
        _KERNELS[(name, key)] = hit
    return hit


def require(name: str):
    """The compiled kernel-level op, or an error saying how to get it."""
    if cpu_error is not None:
        raise RuntimeError(f"compiled kernel mixkernels_C::{name} unavailable: {cpu_error}")
    return getattr(torch.ops.mixkernels_C, name)


def build_info() -> Dict[str, object]:
    try:
        from . import _build_info as b

        return {k: getattr(b, k) for k in dir(b) if not k.startswith("_")}
    except ImportError:
        return {}
