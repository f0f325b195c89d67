"""The ``overhead`` suite: what a public op costs per call over the kernel-level op it ends in.

For every registered op: its first registry sample (tiny inputs, grads required, grad mode
on), called through the public op with the automatic backend, against the kernel-level op
(``torch.ops.mixkernels_C.*`` or the Triton launcher) called with exactly the arguments the
public op passed it (recorded once). One torch thread; the time is this thread's CPU time
(``time.thread_time``: robust on a shared machine) per call, the median over blocks of calls.
On CUDA it is host time per call (launch overhead), the device synchronized between blocks.
Target (issue #14): <= 20 us on CPU for every op.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch

from ..ops import _dispatch
from ..ops.registry import OPERATORS_REGISTRY

__all__ = ["measure", "table", "TARGET_US"]

TARGET_US = 20.0


@contextlib.contextmanager
def _recording_kernels(spec, backend: str) -> Iterator[List[Tuple[Callable, tuple]]]:
    """Record the kernel-level calls ``spec`` makes on ``backend`` (wraps the kernel lookup cache)."""
    calls: List[Tuple[Callable, tuple]] = []
    saved = dict(_dispatch._KERNELS)
    for k in spec.kernels + tuple(k for ks in spec.variants.values() for k in ks):
        try:
            real = _dispatch.kernel(spec.family, k, backend)
        except (AttributeError, RuntimeError):  # a variant this backend does not have
            continue

        def rec(*args, _real=real):
            calls.append((_real, args))
            return _real(*args)

        _dispatch._KERNELS[(spec.family, k, backend)] = rec
    try:
        yield calls
    finally:
        _dispatch._KERNELS.clear()
        _dispatch._KERNELS.update(saved)


def _time_us(fn: Callable[[], Any], device: torch.device, calls: int, blocks: int) -> float:
    cuda = device.type == "cuda"
    clock = time.perf_counter_ns if cuda else time.thread_time_ns
    for _ in range(max(20, calls // 5)):  # warm-up: caches, lazy imports, allocator
        fn()
    per_call = []
    for _ in range(blocks):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = clock()
        for _ in range(calls):
            fn()
        per_call.append((clock() - t0) / calls / 1e3)
    if cuda:
        torch.cuda.synchronize(device)
    return statistics.median(per_call)


def _calls(device: torch.device) -> Iterator[Tuple[Any, str, Dict[str, Any]]]:
    """``(spec, row name, kwargs)``: each op's first sample, and the first sample of each of its variants."""
    for spec in OPERATORS_REGISTRY.values():
        samples = spec.samples(device, torch.float32)
        yield spec, spec.name, samples[0]
        for variant in spec.variants:
            kw = next((k for k in samples if spec.dispatch_key(k)[2][-1] == variant), None)
            if kw is not None:
                yield spec, f"{spec.name} ({variant})", kw


def measure(device: torch.device, quick: bool = False) -> List[Dict[str, Any]]:
    """One row per registered op: ``public_us``, ``kernel_us``, ``overhead_us`` (or a skip reason)."""
    calls, blocks = (100, 9) if quick else (200, 25)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: List[Dict[str, Any]] = []
    try:
        for spec, name, kw in _calls(device):
            key = spec.dispatch_key(kw)
            backend = _dispatch.choose(spec.name, key[0], spec.reason, None, *key)
            row: Dict[str, Any] = {"op": name, "backend": backend}
            rows.append(row)
            if backend == "reference":
                row["skipped"] = "no kernel-level op runs here (automatic choice: reference)"
                continue
            if backend == "triton" and device.type == "cpu":
                row["skipped"] = "the Triton interpreter is not a per-call cost"
                continue
            with torch.enable_grad():
                with _recording_kernels(spec, backend) as rec:
                    spec.fn(**kw)
                kfn, kargs = rec[0]
                row["public_us"] = _time_us(lambda: spec.fn(**kw), device, calls, blocks)
                row["kernel_us"] = _time_us(lambda: kfn(*kargs), device, calls, blocks)
            row["overhead_us"] = row["public_us"] - row["kernel_us"]
    finally:
        torch.set_num_threads(threads)
    return rows


def table(rows: List[Dict[str, Any]], device: torch.device) -> str:
    what = "CPU time of the calling thread" if device.type == "cpu" else "host time"
    lines = [f"per-call overhead on {device.type} ({what}, 1 thread, tiny inputs, forward with grad recording, "
             f"median per call)", "",
             "| op | backend | public us | kernel-level us | overhead us |", "|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['op']} | {r['backend']} | - | - | skipped: {r['skipped']} |")
        else:
            lines.append(f"| {r['op']} | {r['backend']} | {r['public_us']:.1f} | {r['kernel_us']:.1f} | "
                         f"{r['overhead_us']:.1f} |")
    done = [r["overhead_us"] for r in rows if "overhead_us" in r]
    if done:
        worst = max(done)
        verdict = "within" if worst <= TARGET_US else "OVER"
        lines += ["", f"max overhead {worst:.1f} us: {verdict} the {TARGET_US:.0f} us target"]
    return "\n".join(lines)
