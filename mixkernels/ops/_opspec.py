"""What one registry entry declares (:class:`OpSpec`) and the backend predicate built from it.

An entry states, once: the public name and family, the kernel-level ops it ends in, the
dtypes each backend takes, an optional op-specific limit, and example calls (samples, edge
inputs, bad inputs, benchmark shapes) as keyword dicts of the public op's arguments.
``python -m mixkernels.info``, tests/test_opcheck.py, tests/test_bad_inputs.py,
tests/test_registry.py and the ``ops``/``overhead`` benchmark suites iterate the entries.

The predicate is NATTEN-style: :meth:`OpSpec.reason` returns ``None`` or the reason a backend
cannot run a call, and the same text is the dispatch decision, the ``BackendUnavailable``
message, the ``MIXKERNELS_LOG=debug`` line and the info report. It depends only on
``(backend, device type, dtypes, flags)``, so it is computed once per key and cached.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from .. import _ext
from . import _dispatch
from ._dispatch import NOT_IMPLEMENTED

__all__ = ["OpSpec", "BenchShape", "Bad", "Probed", "probe"]

Kwargs = Dict[str, Any]


@dataclass
class BenchShape:
    """One benchmark shape of an op: ``make(device, dtype, generator)`` returns the public op's
    arguments by name; floor bytes per docs/DESIGN.md section 7."""

    name: str
    make: Callable[[torch.device, torch.dtype, torch.Generator], Kwargs]
    bytes_fwd: int
    bytes_bwd: int
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Bad:
    """A bad call: the exception type and a fragment its message must contain."""

    id: str
    kwargs: Kwargs
    exc: type
    msg: str


class Probed(Exception):
    """Raised by :meth:`OpSpec.choose` inside :func:`probe`: the call's dispatch key."""

    def __init__(self, spec: "OpSpec", device_type: str, dtypes: tuple, flags: tuple):
        super().__init__(spec.name)
        self.spec, self.device_type, self.dtypes, self.flags = spec, device_type, dtypes, flags


_PROBE = False


@contextlib.contextmanager
def probe() -> Iterator[None]:
    """Inside, a public op validates its arguments and raises :class:`Probed` instead of running."""
    global _PROBE
    old, _PROBE = _PROBE, True
    try:
        yield
    finally:
        _PROBE = old


def _has_kernel(name: str, key: str) -> bool:
    """``_ext.has_kernel``, False (not an error) for a schema a stale build of the extension lacks."""
    try:
        return _ext.has_kernel(name, key)
    except RuntimeError:
        return False


def _dtype_reason(dtypes: tuple, supported: Tuple[torch.dtype, ...]) -> Optional[str]:
    for dt in dtypes:
        if dt not in supported:
            return f"dtype {dt} not supported (supports {', '.join(str(d) for d in supported)})"
    return None


@dataclass
class OpSpec:
    """One public op. ``dtypes`` maps each backend the op has to the dtypes it accepts for the
    tensors the op checks (``choose(..., dtypes=...)``); ``limit(backend, *flags)`` adds an
    op-specific reason (head dim, window size, patch size) checked before the rest."""

    name: str
    family: str
    kernels: Tuple[str, ...]  # kernel-level ops, forward first (mixkernels_C::<k>, triton.<family>.<k>)
    grads: Tuple[str, ...]  # differentiable arguments of the public op
    dtypes: Mapping[str, Tuple[torch.dtype, ...]]
    samples: Callable[[torch.device, torch.dtype], List[Kwargs]]
    edges: Callable[[torch.device, torch.dtype], List[Tuple[str, Kwargs]]]
    bad: Callable[[], List[Bad]]
    bench: Optional[Callable[[int, bool, torch.dtype], List[BenchShape]]]  # (batch, tiny, dtype) -> shapes
    limit: Optional[Callable[..., Optional[str]]] = None
    # Variants of the op served by other kernel-level ops, e.g. {"cosine": (fwd, bwd)} for SwinV2's
    # cosine window attention. An op with variants passes the variant name (or None) as its last
    # flag; a backend runs a variant only if it registers the variant's kernels.
    variants: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    doc: str = ""
    _cache: Dict[tuple, Any] = field(default_factory=dict, repr=False)

    @property
    def fn(self) -> Callable:
        """The public function ``mixkernels.<name>`` (from ``mixkernels/ops/<family>.py``)."""
        return getattr(importlib.import_module(f"mixkernels.ops.{self.family}"), self.name)

    @property
    def reference(self) -> Callable:
        """The executable spec ``mixkernels.reference.<name>`` (same argument names)."""
        return getattr(importlib.import_module("mixkernels.reference"), self.name)

    def run_reference(self, kwargs: Kwargs):
        """The reference on a call's arguments (those it has: no ``backend``/``deterministic``)."""
        params = inspect.signature(self.reference).parameters
        return self.reference(**{k: v for k, v in kwargs.items() if k in params})

    def kernel_names(self, backend: str, variant: Optional[str] = None) -> Tuple[str, ...]:
        """Fully qualified kernel-level ops of ``backend`` (the naming rule of docs/ARCHITECTURE.md)."""
        kernels = self.kernels if variant is None else self.variants[variant]
        if backend == "triton":
            return tuple(f"mixkernels.triton.{self.family}.{k}" for k in kernels)
        return tuple(f"mixkernels_C::{k}" for k in kernels)

    def _kernels_for(self, flags: tuple) -> Tuple[str, ...]:
        variant = flags[-1] if self.variants and flags else None
        return self.kernels if variant is None else self.variants[variant]

    def _variant_note(self, flags: tuple, why: str) -> str:
        """``why`` a kernel is missing, naming the variant when the call is one (``"cosine mode: ..."``)."""
        variant = flags[-1] if self.variants and flags else None
        return f"{variant} mode not implemented ({why})" if why and variant is not None else why

    # ------------------------------------------------------------------ predicate
    def reason(self, backend: str, device_type: str, dtypes: tuple, flags: tuple = ()):
        """``None`` if ``backend`` can run the call, else why (or ``NOT_IMPLEMENTED``)."""
        if backend not in self.dtypes:
            return NOT_IMPLEMENTED
        if backend == "triton":  # process-wide, and the interpreter switch is read per call
            why = self.limit(backend, *flags) if self.limit is not None else None
            if why:
                return why
            err = _dispatch._triton_error()
            if err:
                return err
            if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
                return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if torch.compiler.is_compiling():  # no cache mutation (and no guards on it) while tracing
            return self._reason(backend, device_type, dtypes, flags)
        key = (backend, device_type, dtypes, flags)
        try:
            return self._cache[key]
        except KeyError:
            why = self._cache[key] = self._reason(backend, device_type, dtypes, flags)
            return why

    def _reason(self, backend: str, device_type: str, dtypes: tuple, flags: tuple) -> Optional[str]:
        # Order of the checks (so of the reason given): limit, build, device, kernels, dtype.
        why = self.limit(backend, *flags) if self.limit is not None else None
        if why:
            return why
        supported = self.dtypes[backend]
        if backend == "triton":
            if device_type not in ("cpu", "cuda"):
                return f"device {device_type!r} not supported"
            why = _dtype_reason(dtypes, supported)
            for k in self._kernels_for(flags):
                why = why or self._variant_note(flags, _dispatch._triton_launcher_error(self.family, k)) or None
            return why
        if device_type != backend:
            return f"needs {backend} tensors, got {device_type}"
        err = _ext.cpu_error if backend == "cpu" else _ext.cuda_error
        if err is not None:
            return err
        key = "CPU" if backend == "cpu" else "CUDA"
        for k in self._kernels_for(flags):
            if not _has_kernel(k, key):
                return self._variant_note(flags, f"no {key} kernel registered for {k}")
        return _dtype_reason(dtypes, supported)

    def choose(self, backend: Optional[str], device_type: str, dtypes: tuple, flags: tuple = ()) -> str:
        """The backend for one call (explicit, ``MIXKERNELS_BACKEND``, or automatic)."""
        if _PROBE:
            raise Probed(self, device_type, dtypes, flags)
        return _dispatch.choose(self.name, device_type, self.reason, backend, device_type, dtypes, flags)

    def status(self, device_type: str, dtypes: tuple, flags: tuple = ()) -> Dict[str, str]:
        """``{backend: "ok" | reason}`` for the info report."""
        out = {}
        for b in ("cuda", "triton", "cpu"):
            why = self.reason(b, device_type, dtypes, flags)
            if why is NOT_IMPLEMENTED:
                why = "not implemented"
            elif not why and b == "cuda" and not _dispatch.cuda_auto_enabled(self.name):
                why = "ok (explicit only: not verified on a GPU yet)"
            out[b] = why or "ok"
        out["reference"] = "ok"
        return out

    def dispatch_key(self, kwargs: Kwargs) -> Tuple[str, tuple, tuple]:
        """``(device type, dtypes, flags)`` the public op computes for this call (it stops there)."""
        with probe():
            try:
                self.fn(**kwargs)
            except Probed as p:
                return p.device_type, p.dtypes, p.flags
        raise AssertionError(f"{self.name} returned without choosing a backend")

    def backends_for(self, kwargs: Kwargs) -> List[str]:
        """The backends that can run this call here (``reference`` always can)."""
        key = self.dispatch_key(kwargs)
        return [b for b in ("cuda", "triton", "cpu") if self.reason(b, *key) is None]

    def call_samples(self, device, dtype=torch.float32) -> List[Tuple[Kwargs, Sequence[str]]]:
        """Each sample with the names of its arguments that require grad."""
        out = []
        for kw in self.samples(torch.device(device), dtype):
            out.append((kw, [n for n in self.grads if isinstance(kw.get(n), torch.Tensor) and kw[n].requires_grad]))
        return out
