"""Backend choice shared by every op family.

Each op family hands :func:`select` one predicate per backend; a predicate returns ``None``
when that backend can run the call, or the reason it cannot (NATTEN-style: the same text
drives dispatch and the error message). The choice is made before any autograd node is
recorded, so forward and backward always run on the same backend.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import Callable, Dict, Iterable, Optional

import torch

from .. import _ext

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "select",
    "compiled_reason",
    "triton_reason",
    "kernel",
    "acc_dtype",
    "cuda_auto_enabled",
    "choose",
    "NOT_IMPLEMENTED",
]

BACKENDS = ("cuda", "triton", "cpu", "reference")
_log = logging.getLogger("mixkernels")
if os.environ.get("MIXKERNELS_LOG", "").lower() == "debug":
    _log.setLevel(logging.DEBUG)
    if not _log.handlers:
        _h = logging.StreamHandler()
        _h.setFormatter(logging.Formatter("[mixkernels] %(message)s"))
        _log.addHandler(_h)

# CUDA kernels that have passed the full test suite on a GPU. Automatic choice picks the
# `cuda` backend only for these (or for all with MIXKERNELS_CUDA_AUTO=1); until then Triton
# is the default on CUDA tensors. Explicit backend="cuda" always works where it is built.
CUDA_VERIFIED: frozenset = frozenset()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this call."""


def cuda_auto_enabled(op: str) -> bool:
    return op in CUDA_VERIFIED or os.environ.get("MIXKERNELS_CUDA_AUTO") == "1"


def _triton_error() -> Optional[str]:
    global _TRITON_ERROR
    if _TRITON_ERROR is None:
        try:
            import triton  # noqa: F401  (importability is the check)

            _TRITON_ERROR = ""
        except Exception as e:  # pragma: no cover - depends on the install
            _TRITON_ERROR = f"triton is not importable ({e})"
    return _TRITON_ERROR or None


_TRITON_ERROR: Optional[str] = None
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def compiled_reason(backend: str, name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype] = _FLOATS) -> Optional[str]:
    """Why compiled ``backend`` ("cpu"/"cuda") cannot run ``mixkernels_C::name`` on ``t``, or None."""
    if t.device.type != backend:
        return f"needs {backend} tensors, got {t.device.type}"
    key = "CPU" if backend == "cpu" else "CUDA"
    err = _ext.cpu_error if backend == "cpu" else _ext.cuda_error
    if err is not None:
        return err
    if not _ext.has_kernel(name, key):
        return f"no {key} kernel registered for {name}"
    if t.dtype not in tuple(dtypes):
        return f"dtype {t.dtype} not supported (supports {', '.join(str(d) for d in dtypes)})"
    return None


def triton_reason(family: str, name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype] = _FLOATS) -> Optional[str]:
    """Why the Triton launcher ``mixkernels.triton.<family>.<name>`` cannot run on ``t``, or None."""
    err = _triton_error()
    if err:
        return err
    if t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    if t.device.type not in ("cpu", "cuda"):
        return f"device {t.device.type!r} not supported"
    if t.dtype not in tuple(dtypes):
        return f"dtype {t.dtype} not supported (supports {', '.join(str(d) for d in dtypes)})"
    return _triton_launcher_error(family, name) or None


@torch.compiler.assume_constant_result  # Dynamo cannot trace the import; the answer is fixed per process
def _triton_launcher_error(family: str, name: str) -> str:
    try:
        mod = importlib.import_module(f"mixkernels.triton.{family}")
    except Exception as e:
        return f"mixkernels.triton.{family} failed to import ({type(e).__name__}: {e})"
    if not hasattr(mod, name):
        return f"no Triton kernel for {name}"
    return ""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / reduced-gradient dtype of the kernels: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_KERNELS: Dict[tuple, Callable] = {}


def kernel(family: str, name: str, backend: str) -> Callable:
    """The kernel-level callable of ``backend`` (same signature for every backend), looked up once."""
    key = (family, name, backend)
    fn = _KERNELS.get(key)
    if fn is None:
        if backend in ("cpu", "cuda"):
            fn = _ext.require(name)
        elif backend == "triton":
            fn = getattr(importlib.import_module(f"mixkernels.triton.{family}"), name)
        else:
            raise ValueError(f"no kernel-level op for backend {backend!r}")
        _KERNELS[key] = fn
    return fn


def _requested(backend: Optional[str]) -> Optional[str]:
    b = backend if backend is not None else os.environ.get("MIXKERNELS_BACKEND") or None
    if b is not None and b not in BACKENDS:
        src = "backend" if backend is not None else "MIXKERNELS_BACKEND"
        raise ValueError(f"{src} must be one of {BACKENDS}, got {b!r}")
    return b


def _debug(msg: str, *args) -> None:
    # Dynamo cannot trace logger calls; the choice is the same at trace time, so stay quiet there.
    if not torch.compiler.is_compiling() and _log.isEnabledFor(logging.DEBUG):
        _log.debug(msg, *args)


NOT_IMPLEMENTED = object()  # a reason function's answer for a backend the op does not have


def select(
    op: str,
    device: torch.device,
    checks: Dict[str, Callable[[], Optional[str]]],
    backend: Optional[str] = None,
) -> str:
    """Pick the backend for one call of ``op``.

    ``checks`` maps a backend name to a predicate (missing = not implemented for ``op``).
    Explicit ``backend`` (or ``MIXKERNELS_BACKEND``) must be able to run, else
    :class:`BackendUnavailable` with the reason. Automatic order: CUDA tensors
    cuda > triton > reference, CPU tensors cpu > reference.
    """

    def reason(b: str):
        check = checks.get(b)
        return NOT_IMPLEMENTED if check is None else check()

    return choose(op, device.type, reason, backend)


def choose(op: str, device_type: str, reason: Callable[..., object], backend: Optional[str] = None, *args) -> str:
    """:func:`select` with one ``reason(backend, *args)`` function: ``None`` (can run), the
    reason it cannot, or :data:`NOT_IMPLEMENTED`. The op registry calls this with cached
    reasons on every call, so the common case (automatic, no override) is kept short."""
    want = _requested(backend) if backend is not None or os.environ.get("MIXKERNELS_BACKEND") else None
    if want is not None:
        if want == "reference":
            return want
        why = reason(want, *args)
        if why is NOT_IMPLEMENTED:
            why = f"{op} has no {want} implementation"
        if why:
            raise BackendUnavailable(f"{op}: backend={want!r} cannot run this call: {why}")
        return want
    for b in (("cuda", "triton") if device_type == "cuda" else ("cpu",)):
        if b == "cuda" and not cuda_auto_enabled(op):
            # An unverified CUDA kernel is never chosen automatically, whatever its predicate says.
            why = "not implemented" if reason(b, *args) is NOT_IMPLEMENTED else \
                "not verified on a GPU yet (set MIXKERNELS_CUDA_AUTO=1 or pass backend='cuda')"
        else:
            why = reason(b, *args)
            if why is NOT_IMPLEMENTED:
                why = "not implemented"
        if not why:
            _debug("%s: using %s", op, b)
            return b
        _debug("%s: skipping %s: %s", op, b, why)
    _debug("%s: using reference", op)
    return "reference"
