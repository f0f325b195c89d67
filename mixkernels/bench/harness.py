"""The one measurement harness behind ``python -m mixkernels.bench`` and ``benchmarks/``.

* GPU time: CUDA events around each call, median after warm-up, the L2 cache flushed before
  every call by writing a 256 MB buffer, inputs rotated over a few copies (as
  ``triton.testing.do_bench`` does, plus the rotation).
* CPU time: ``torch.utils.benchmark.Timer.blocked_autorange``, median.
* Peak memory (GPU): ``max_memory_allocated`` during one call, minus what was allocated before
  it (the inputs): the op's working set and outputs. CPU: not measured (reported as None).
* Error: max |out - ref64| against the float64 reference for every measured case, and for
  forward+backward also max |grad - grad64| of the first differentiable input.
"""
from __future__ import annotations

import copy
import gc
import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["Case", "Provider", "Runner", "Skip", "Settings", "Prepared", "prepare", "instrument", "time_fn", "peak_mb",
           "run_case", "max_abs_err"]


class Skip(Exception):
    """A provider cannot run this case (not installed, unsupported, too slow for --quick)."""


@dataclass
class Runner:
    """What a provider hands the harness: ``fn(inputs) -> output`` plus extra autograd leaves
    (module parameters) whose gradients a forward+backward must also produce."""

    fn: Callable[[Dict[str, Any]], Any]
    params: Sequence[torch.Tensor] = ()
    note: str = ""


@dataclass
class Provider:
    name: str
    kind: str  # "mixkernels" or "peer"
    build: Callable[["Case", Dict[str, Any]], Runner]  # may raise Skip


@dataclass
class Case:
    suite: str
    name: str  # shape label, e.g. "mixmim-s1"
    dtype: torch.dtype
    mode: str  # "fwd", "fwd+bwd" or "step" (a whole training step; fn returns the loss)
    make: Callable[[torch.device, torch.dtype, torch.Generator], Dict[str, Any]]
    reference: Callable[[Dict[str, Any]], torch.Tensor]
    providers: List[Provider]
    grad: Sequence[str] = ()  # differentiable inputs; the first one's gradient is checked
    bytes_fwd: int = 0  # floor bytes (docs/DESIGN.md section 7)
    bytes_bwd: int = 0
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    params: Dict[str, Any] = field(default_factory=dict)  # shape description for the report
    unit: str = "ms"  # "ms", or "img/s" for step cases

    @property
    def floor_bytes(self) -> int:
        return self.bytes_fwd + (self.bytes_bwd if self.mode == "fwd+bwd" else 0)

    @property
    def flops(self) -> float:
        return self.flops_fwd + (self.flops_bwd if self.mode == "fwd+bwd" else 0.0)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.name}/{_dtype_name(self.dtype)}/{self.mode}"


@dataclass
class Settings:
    device: torch.device
    quick: bool = False
    rotate: int = 3  # input copies on GPU (bounded by memory)
    skip_compile: bool = False
    compile_reason: str = ""


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", torch.float64: "fp64"}.get(dt, str(dt))


# ------------------------------------------------------------------------------ timing
_L2: Dict[torch.device, torch.Tensor] = {}


def _l2_buffer(device: torch.device) -> torch.Tensor:
    if device not in _L2:
        _L2[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    return _L2[device]


def time_fn(fn: Callable[[int], Any], device: torch.device, *, flush: bool = True, quick: bool = False) -> float:
    """Median milliseconds of ``fn(i)`` (``i`` = call counter, for input rotation)."""
    if device.type == "cuda":
        warm_ms, rep_ms = (10.0, 30.0) if quick else (25.0, 100.0)
        cache = _l2_buffer(device) if flush else None
        fn(0)
        torch.cuda.synchronize(device)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(3):
            if cache is not None:
                cache.zero_()
            fn(i)
        e.record()
        torch.cuda.synchronize(device)
        est = max(s.elapsed_time(e) / 3, 1e-3)
        n_warm = max(1, min(200, int(warm_ms / est)))
        n_rep = max(5, min(1000, int(rep_ms / est)))
        for i in range(n_warm):
            fn(i)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            if cache is not None:
                cache.zero_()
            starts[i].record()
            fn(i)
            ends[i].record()
        torch.cuda.synchronize(device)
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))
    from torch.utils import benchmark

    counter = itertools.count()

    def call():
        fn(next(counter))

    call()  # warm-up
    t = benchmark.Timer(stmt="call()", globals={"call": call}).blocked_autorange(min_run_time=0.05 if quick else 0.5)
    return t.median * 1e3


def peak_mb(fn: Callable[[int], Any], device: torch.device) -> Optional[float]:
    """Extra device memory one call needs beyond what is already allocated (GPU only)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn(0)
    torch.cuda.synchronize(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if a.shape != ref.shape:
        raise RuntimeError(f"output shape {tuple(a.shape)} != reference shape {tuple(ref.shape)}")
    if a.numel() == 0:
        return 0.0
    d = (a - ref).abs()
    if not torch.isfinite(a).all():
        return math.inf
    return float(d.max())


# ------------------------------------------------------------------------------ inputs
def _to64(v):
    if isinstance(v, torch.Tensor):
        if v.is_floating_point():
            return v.detach().to(torch.float64).requires_grad_(v.requires_grad)
        return v
    if isinstance(v, torch.nn.Module):
        return copy.deepcopy(v).to(torch.float64)
    return v


def _clone(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().clone().requires_grad_(v.requires_grad)
    return v


def _input_bytes(inp: Dict[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in inp.values() if isinstance(v, torch.Tensor))


def _forward_backward(case: Case, runner: Runner, inp: Dict[str, Any], dout):
    out = runner.fn(inp)
    if case.mode != "fwd+bwd":
        return out, None
    leaves = [inp[n] for n in case.grad] + list(runner.params)
    if dout.dtype != out.dtype:  # losses return float32 for any input dtype
        dout = dout.to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
    return out, grads


def _reference(case: Case, inp: Dict[str, Any]):
    inp64 = {k: _to64(v) for k, v in inp.items()}
    with torch.enable_grad():
        out = case.reference(inp64)
        if case.mode != "fwd+bwd":
            return out.detach(), None, None
        g = torch.Generator(device=out.device).manual_seed(1234)
        dout64 = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float64) if out.dim() else torch.ones((), dtype=torch.float64, device=out.device)
        (g0,) = torch.autograd.grad(out, [inp64[case.grad[0]]], dout64)
    dout = dout64.to(case.dtype) if dout64.dim() else dout64.to(torch.float32)
    return out.detach(), g0.detach(), dout


@dataclass
class Prepared:
    """A case's inputs (plus rotated copies), float64 reference and upstream gradient."""

    case: Case
    inp: Dict[str, Any]
    copies: List[Dict[str, Any]]
    ref_out: Any
    ref_grad: Optional[torch.Tensor]
    dout: Optional[torch.Tensor]


def prepare(case: Case, settings: Settings, seed: int = 0) -> Prepared:
    dev = settings.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    inp = case.make(dev, case.dtype, gen)
    if case.mode == "step":
        ref_out, ref_grad, dout = case.reference(inp), None, None
    else:
        ref_out, ref_grad, dout = _reference(case, inp)
    n = 1
    if dev.type == "cuda" and case.mode != "step":
        n = max(1, min(settings.rotate, int(2e9 // max(1, _input_bytes(inp)))))
    copies = [inp] + [{k: _clone(v) for k, v in inp.items()} for _ in range(n - 1)]
    return Prepared(case, inp, copies, ref_out, ref_grad, dout)


def instrument(prep: Prepared, provider: Provider) -> Tuple[Callable[[int], Any], Dict[str, Any]]:
    """Build ``provider`` for the case, run it once (compiles, warms up) and check it against the
    float64 reference. Returns the timed callable ``fn(i)`` (i rotates the input copies) and
    the error metrics. Raises Skip / BackendUnavailable when the provider cannot run."""
    case, inp, copies = prep.case, prep.inp, prep.copies
    runner = provider.build(case, inp)
    m: Dict[str, Any] = {}
    if case.mode == "step":
        loss = runner.fn(inp)  # first step; its loss is checked
        m["max_err"] = abs(float(loss) - float(prep.ref_out))
    else:
        out, grads = _forward_backward(case, runner, inp, prep.dout)
        m["max_err"] = max_abs_err(out, prep.ref_out)
        if grads is not None:
            m["max_grad_err"] = max_abs_err(grads[0], prep.ref_grad)
        del out, grads
    if runner.note:
        m["note"] = runner.note
    n = len(copies)

    def fn(i):
        if case.mode == "step":
            return runner.fn(inp)
        return _forward_backward(case, runner, copies[i % n], prep.dout)

    return fn, m


def run_case(case: Case, settings: Settings, floors: Dict[str, Any], seed: int = 0,
             on_provider: Optional[Callable[[str], None]] = None) -> List[Dict[str, Any]]:
    """Measure every provider of ``case``; one result dict per provider (ok, skipped or error)."""
    from .floors import floor_seconds
    from .. import BackendUnavailable

    dev = settings.device
    results: List[Dict[str, Any]] = []
    base = {"suite": case.suite, "case": case.name, "dtype": _dtype_name(case.dtype), "mode": case.mode,
            "params": case.params, "floor_bytes": case.floor_bytes, "flops": case.flops}
    try:
        prep = prepare(case, settings, seed)
    except Exception as e:  # the case cannot be set up: a missing module (Skip) or e.g. out of memory
        status, why = ("skipped", _short(e)) if isinstance(e, Skip) else ("error", f"case setup failed: {type(e).__name__}: {_short(e)}")
        for p in case.providers:
            results.append(dict(base, provider=p.name, kind=p.kind, status=status, reason=why))
            if on_provider:
                on_provider(p.name)
        return results
    t_floor = floor_seconds(floors, case.floor_bytes, case.flops) if case.floor_bytes else None

    for p in case.providers:
        r = dict(base, provider=p.name, kind=p.kind)
        fn = None
        try:
            fn, metrics = instrument(prep, p)
            ms = time_fn(fn, dev, quick=settings.quick)
            r.update(metrics, status="ok", ms=ms)
            if case.mode == "step":
                r["img_per_s"] = case.params.get("batch", 1) / (ms * 1e-3)
            if case.floor_bytes:
                r["GBps"] = case.floor_bytes / (ms * 1e-3) / 1e9
                r["pct_floor"] = 100.0 * t_floor / (ms * 1e-3)
            r["peak_mb"] = peak_mb(fn, dev)
        except (Skip, BackendUnavailable) as e:
            r["status"], r["reason"] = "skipped", _short(e)
        except Exception as e:
            r = dict(base, provider=p.name, kind=p.kind, status="error", reason=f"{type(e).__name__}: {_short(e)}")
            if dev.type == "cuda":
                try:
                    torch.cuda.synchronize(dev)
                except Exception:  # a sticky device fault: later cases will report it too
                    pass
        finally:
            del fn
            results.append(r)
            if dev.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
            if on_provider:
                on_provider(p.name)
    _speedups(results)
    return results


def _speedups(results: List[Dict[str, Any]]) -> None:
    ok = {r["provider"]: r["ms"] for r in results if r.get("status") == "ok"}
    eager = next((ms for name, ms in ok.items() if name.endswith("eager")), None)  # "eager", "timm-eager"
    for r in results:
        if r.get("status") != "ok":
            continue
        if eager:
            r["vs_eager"] = eager / r["ms"]
        if r["kind"] == "mixkernels":
            r["speedup"] = {name: ms / r["ms"] for name, ms in ok.items()
                            if name != r["provider"] and not name.startswith("mixkernels")}


def _short(e: BaseException, n: int = 300) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."
