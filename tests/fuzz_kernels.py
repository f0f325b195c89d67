"""Fuzzer for the kernel-level ops ``torch.ops.mixkernels_C.*`` (schemas: csrc/ops.cpp; their
kernel-level spec and call generators: tests/fuzz_kernels_spec.py, fuzz_kernels_spec_v2.py).

Run as a script (tests/test_fuzz_kernels.py starts it in a subprocess, so a crash fails the
test instead of killing pytest; scripts/sanitize_cpu.sh and scripts/fuzz_cuda_sanitizer.sh run
it under ASan/UBSan and compute-sanitizer):

    python tests/fuzz_kernels.py --device cpu --budget 60 [--seed S] [--case I] [--verbose]

Every case is drawn from ``(seed, case)`` alone and printed before it runs, so the last line
of a crashed run names the input to replay with ``--seed S --case I``. A case is a well-formed
call (half the time) or one with 1-2 mutations: a tensor made non-contiguous, cast to another
dtype, given another rank or size, emptied, dropped or added (optional tensors), an integer
argument or an index tensor set to an out-of-range value. The kernel-level spec (the
``_ref_*`` functions of fuzz_kernels_spec.py, built on ``mixkernels.reference``) decides:

* a call that breaks the schema's contract must raise a clear error (RuntimeError/ValueError/
  TypeError/IndexError with a message), never crash or return;
* a well-formed call must match the spec (values, shapes, dtypes, NaN positions), within the
  project's error rule (``mixkernels.testing``): per output, ``max|out - spec64| <= 2 *
  max|spec_low - spec64| + atol * max(1, max|spec64|)``, where ``spec_low`` is the spec computed
  in the lowest precision among the float inputs and ``atol`` that dtype's slack;
* a non-contiguous input may be rejected (the schemas ask for contiguous inputs) or handled.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
import warnings
from typing import Any, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fuzz_kernels_spec import (  # noqa: E402
    BF16, F16, F32, F64, FLOATS, OPS, Invalid, Lenient, StickyCudaError, _NoKeyNaN, _rand,
    _Shape, computing_in,
)
from fuzz_kernels_spec_v2 import OPS_V2  # noqa: E402  (cosine attention, SimMIM loss)

from mixkernels.testing import max_error, tolerance  # noqa: E402

DTYPES = FLOATS + (torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool)
# Every kernel-level op but `limits` (tests/test_fuzz_kernels.py checks that against csrc/ops.cpp).
# Adding ops changes which op a (seed, case) draws: replays of older runs pass --ops.
OPS = {**OPS, **OPS_V2}
HUGE = (2**31 - 1, 2**31, 2**32 + 1, 2**62, -(2**31), -1, 0)


# ---------------------------------------------------------------- mutations
def _mutate_tensor(rng, t: torch.Tensor) -> Tuple[torch.Tensor, str]:
    kind = rng.choice(("noncontig", "dtype", "rank", "size", "empty", "expand"))
    if kind == "noncontig" and t.numel() > 1:
        return torch.stack([t, t], -1)[..., 0], "non-contiguous"
    if kind == "dtype":
        dt = rng.choice([d for d in DTYPES if d != t.dtype])
        return t.to(dt), f"dtype {dt}"
    if kind == "rank":
        if t.dim() and rng.random() < 0.5:
            return t.reshape(-1) if rng.random() < 0.5 else t[0] if t.shape[0] else t.reshape(-1), "rank down"
        return t.unsqueeze(rng.randrange(t.dim() + 1)), "rank up"
    if kind == "size" and t.dim():
        d = rng.randrange(t.dim())
        if t.shape[d] and rng.random() < 0.5:
            return t.narrow(d, 0, t.shape[d] - 1).contiguous(), f"dim {d} - 1"
        return torch.cat([t, t.narrow(d, 0, min(1, t.shape[d]))], d) if t.shape[d] else t, f"dim {d} + 1"
    if kind == "expand" and t.dim() and t.shape[0] == 1:
        return t.expand(3, *t.shape[1:]), "stride-0 batch"
    return t.new_empty((0,)), "empty"


def _mutate_value(rng, v: Any) -> Tuple[Any, str]:
    if isinstance(v, bool):
        return (not v), "flag flipped"
    if isinstance(v, int):
        nv = rng.choice((0, -1, v + 1, v - 1, 2 * v) + HUGE)
        # within int64: the schema's int (torch's argument parser rejects a wider Python int before any
        # kernel); a second mutation of 2**62 doubled lands on int64's largest value instead
        nv = max(-(2**63), min(2**63 - 1, nv))
        return nv, f"int {nv}"
    if isinstance(v, float):
        nv = rng.choice((float("nan"), float("inf"), -0.0, 1e30))
        return nv, f"float {nv}"
    if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.numel():
        t = v.clone()
        flat = t.view(-1)
        i = rng.randrange(flat.numel())
        info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
        choices = (-1, 4, 255, 2**31 - 1, -(2**31), 2**40) if info is None or info.bits > 8 else (4, 7, 255, -1)
        val = rng.choice(choices)
        if info is not None:
            val = max(info.min, min(info.max, val))
        flat[i] = val
        return t, f"value {val} at {i}"
    return v, "unchanged"


def make_case(seed: int, case: int, ops=None):
    """(op name, args, description, mutated) drawn from (seed, case) (and the op subset) only."""
    rng = random.Random(seed * 1_000_003 + case)
    name = rng.choice(sorted(ops or OPS))
    gen, _, index_args = OPS[name]
    args = gen(rng)
    what = []
    if rng.random() < 0.5:
        for _ in range(rng.choice((1, 1, 2))):
            i = rng.randrange(len(args))
            a = args[i]
            if isinstance(a, torch.Tensor) and (i not in index_args or rng.random() < 0.5):
                args[i], w = _mutate_tensor(rng, a)
            elif a is None:
                args[i], w = _rand(rng, (rng.choice((0, 1, 3)),) * rng.choice((1, 2)), rng.choice(DTYPES)), "added"
            elif isinstance(a, torch.Tensor) and rng.random() < 0.2:
                args[i], w = None, "dropped"
            else:
                args[i], w = _mutate_value(rng, a)
            what.append(f"arg {i}: {w}")
    return name, args, "; ".join(what) or "well-formed", bool(what)


# ---------------------------------------------------------------- checking
_CLEAR = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)


def _describe(args) -> str:
    def one(a):
        if isinstance(a, torch.Tensor):
            return f"T{tuple(a.shape)}:{str(a.dtype)[6:]}{'' if a.is_contiguous() else ':nc'}"
        return repr(a)
    return "(" + ", ".join(one(a) for a in args) + ")"


def _low(dtypes):
    """The lowest-precision float dtype among the inputs: the spec recomputed in it bounds the error."""
    for d in (BF16, F16, F32):
        if d in dtypes:
            return d
    return F64


def _bound(w64, wlow, atol) -> Tuple[float, float]:
    """(bound, base) of the rule ``max|out - w64| <= 2 * max|wlow - w64| + atol * max(1, max|w64|)``
    over the finite values of w64 (base: over those where wlow is finite too, e.g. not a float16
    overflow; wlow None for float64: base 0)."""
    fin = torch.isfinite(w64)
    scale = max(1.0, float(w64[fin].abs().max()))  # atol is stated for O(1) values
    base = 0.0
    if wlow is not None:
        both = fin & torch.isfinite(wlow)
        base = max_error(wlow[both], w64[both])
    return 2 * base + atol * scale, base


def _compare(got, want, want_low, atol) -> Optional[str]:
    if not isinstance(got, (tuple, list)):
        got = (got,)
    if len(got) != len(want):
        return f"{len(got)} outputs, spec {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            return f"output {k}: {tuple(g.shape)} {g.dtype}, spec {tuple(w.shape)} {w.dtype}"
        wl = None if want_low is None else want_low[k]
        if isinstance(w, _Shape) or isinstance(wl, _Shape) or not g.numel():  # wl: a borderline case
            continue
        gd = g.detach().cpu().double()
        wd = (w.t if isinstance(w, _NoKeyNaN) else w).detach().double()
        if isinstance(w, _NoKeyNaN):  # a row with no attendable key: NaN or -inf
            gd, wd = (t.masked_fill(t == float("-inf"), float("nan")) for t in (gd, wd))
            wl = None if wl is None else wl.t
        wl = None if wl is None else wl.detach().double()
        if not torch.equal(gd.isnan(), wd.isnan()):
            return f"output {k}: NaN positions differ ({int(gd.isnan().sum())} here, {int(wd.isnan().sum())} in the spec)"
        fin = torch.isfinite(wd)
        if not torch.equal(gd[~fin & ~wd.isnan()], wd[~fin & ~wd.isnan()]):
            return f"output {k}: Inf values differ"
        if not fin.any():
            continue
        bound, base = _bound(wd, wl, atol)
        err = max_error(gd[fin], wd[fin])
        if err > bound:
            return f"output {k}: max error {err:.3e} beyond 2 * {base:.3e} (spec's own error) + atol {atol:.1e} x scale"
    return None


def run_case(seed: int, case: int, device: str, verbose: bool, ops=None) -> Tuple[str, Optional[str]]:
    """(op name, None if the case passed else what went wrong)."""
    if verbose:
        print(f"seed {seed} case {case}", flush=True)  # generating may call a kernel too
    name, args, what, _ = make_case(seed, case, ops)
    desc = f"seed {seed} case {case}: {name}{_describe(args)} [{what}]"
    if verbose:
        print(desc, flush=True)
    return name, _check(name, args, desc, device)


def _check(name, args, desc, device) -> Optional[str]:
    _, spec, _ = OPS[name]
    try:
        want = spec(*args)
        verdict = "match"
    except Invalid as e:
        want, verdict = None, f"raise ({e})"
    except Lenient:
        want, verdict = None, "raise or match"
    if verdict == "match" and device == "cuda":
        # The CUDA kernels support fewer shapes/dtypes (no float64, fused head dims only) and say
        # so with an error; under compute-sanitizer the point is memory safety of what they accept.
        verdict = "raise or match"
    if verdict == "raise or match":  # compute what a kernel that handles it must return
        try:
            want = spec(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
        except (Invalid, Lenient):
            verdict = "raise"
    dev_args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    try:
        got = getattr(torch.ops.mixkernels_C, name)(*dev_args)
        if device == "cuda":
            torch.cuda.synchronize()
    except _CLEAR as e:
        msg = str(e).strip()
        if "CUDA error" in msg or "illegal memory access" in msg or "device-side assert" in msg:
            raise StickyCudaError(f"{desc}\n  {msg.splitlines()[0]}") from None  # the context is gone: stop
        if not msg or "INTERNAL ASSERT" in msg:
            return f"{desc}\n  unclear error: {type(e).__name__}: {msg[:300]!r}"
        if verdict == "match":
            return f"{desc}\n  raised on a well-formed call: {type(e).__name__}: {msg.splitlines()[0][:300]}"
        return None
    except Exception as e:  # noqa: BLE001
        return f"{desc}\n  raised {type(e).__name__} (not a clear error type): {e}"
    if verdict.startswith("raise") and verdict != "raise or match":
        return f"{desc}\n  returned, but the call breaks the contract: must {verdict}"
    low = _low({a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype.is_floating_point})
    want_low = None
    if low != F64:  # the spec's own error in the inputs' lowest precision
        with computing_in(low):
            want_low = spec(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
    bad = _compare(got, want, want_low, tolerance(low))
    return None if bad is None else f"{desc}\n  {bad}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of fuzzing")
    ap.add_argument("--max-cases", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=None, help="default: random, printed")
    ap.add_argument("--case", type=int, default=None, help="replay one case")
    ap.add_argument("--verbose", action="store_true", help="print every case before it runs")
    ap.add_argument("--ops", default=None, help="regex: fuzz only the ops whose name matches (replay needs the same)")
    a = ap.parse_args(argv)
    import re

    warnings.filterwarnings("ignore", message=r"var\(\): degrees of freedom")  # the spec on empty patches

    ops = sorted(n for n in OPS if a.ops is None or re.search(a.ops, n))
    if not ops:
        ap.error(f"--ops {a.ops!r} matches no op of {sorted(OPS)}")
    import mixkernels  # noqa: F401  (loads the extension and registers the kernels)
    from mixkernels import _ext

    if a.device == "cpu" and _ext.cpu_error:
        print(f"fuzz: no CPU extension: {_ext.cpu_error}")
        return 2
    if a.device == "cuda" and (not torch.cuda.is_available() or _ext.cuda_error):
        print(f"fuzz: no CUDA extension/device: {_ext.cuda_error}")
        return 2
    key = "CPU" if a.device == "cpu" else "CUDA"
    missing = [n for n in ops if not _ext.has_kernel(n, key)]
    if missing:
        print(f"fuzz: no {key} kernel for {missing}: not fuzzed")
        ops = [n for n in ops if n not in missing]
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
    sel = "" if a.ops is None else f" --ops {a.ops!r}"
    print(f"fuzz: device {a.device} seed {seed} budget {a.budget:.0f} s (replay: --seed {seed}{sel} --case N)",
          flush=True)
    cases = [a.case] if a.case is not None else range(a.max_cases)
    t0, n, failures, per_op = time.monotonic(), 0, [], {}
    for case in cases:
        if a.case is None and time.monotonic() - t0 > a.budget:
            break
        try:
            name, err = run_case(seed, case, a.device, a.verbose or a.case is not None, ops)
        except StickyCudaError as e:
            print(f"FAIL {e}", flush=True)
            failures.append(str(e))
            break
        except Exception:  # a bug in the fuzzer itself
            name, err = "?", f"seed {seed} case {case}: fuzzer error\n{traceback.format_exc()}"
        n += 1
        per_op[name] = per_op.get(name, 0) + 1
        if err:
            failures.append(err)
            print("FAIL " + err, flush=True)
            if len(failures) >= 20:
                break
    dt = time.monotonic() - t0
    print(f"fuzz: {n} cases in {dt:.1f} s, {len(failures)} failures; per op: "
          + ", ".join(f"{k} {v}" for k, v in sorted(per_op.items())), flush=True)
    if failures:
        print(f"fuzz: FAILED (seed {seed}); replay a case with --seed {seed}{sel} --case N", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
