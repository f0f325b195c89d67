"""``python -m mixkernels.bench``: the benchmark suite.

    python -m mixkernels.bench [--suite ops|attention|block|model|overhead|all] [--quick]
        [--device cpu|cuda] [--dtype bf16|fp32|all] [--out DIR]
        [--compare OLD.json [--fail-on-regression PCT]] [--time-budget S] [--no-compile]
        [--cases REGEX] [--providers LIST]
    python -m mixkernels.bench --static [--out DIR] [--compare OLD_static.json] [--check] ...
        (static sm_90 report without a GPU; --static --help for its options)
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import time
from typing import Any, Dict, List

import torch

from . import cases as _cases
from . import overhead as _overhead
from . import report
from .floors import measure_floors
from .harness import Settings, _dtype_name, run_case

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m mixkernels.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all",
                   help="ops, attention, block, model, overhead, all, or a comma list (default all)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, few repetitions")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--dtype", default=None, help="bf16, fp32, fp16, all, or a comma list (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--out", default=None, help="write bench.json, bench.md and <suite>.png here")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="print the change against an earlier run")
    p.add_argument("--fail-on-regression", type=float, default=None, metavar="PCT",
                   help="with --compare: exit 1 if a mixkernels case got slower by more than PCT percent")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="start no new case after S seconds (the rest is reported as skipped)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--cases", default=None, metavar="REGEX",
                   help="only cases whose suite/name/dtype/mode key matches REGEX (re.search)")
    p.add_argument("--providers", default=None, metavar="LIST",
                   help="only these providers, comma-separated (e.g. mixkernels-triton,eager,sdpa,flex)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


class _Progress:
    """tqdm when installed, else a plain counter on stderr."""

    def __init__(self, total: int):
        self.total, self.n = total, 0
        try:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="meas", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.tty = sys.stderr.isatty()

    def update(self, label: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_description_str(label[:60], refresh=False)
            self.bar.update(1)
        elif self.tty:
            sys.stderr.write(f"\r\033[K[{self.n}/{self.total}] {label[:100]}")
            sys.stderr.flush()
        else:
            print(f"[{self.n}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")


def _on_sigterm(signum, frame):  # `timeout` sends SIGTERM: finish the reports with what is done
    raise KeyboardInterrupt


def _select(cases, pattern, providers):
    """The cases whose key matches ``pattern``, each keeping only the named ``providers``."""
    import re

    keep = None if providers is None else {p.strip() for p in providers.split(",") if p.strip()}
    out = []
    for c in cases:
        if pattern is not None and not re.search(pattern, c.key):
            continue
        if keep is not None:
            c.providers = [p for p in c.providers if p.name in keep]
        if c.providers:
            out.append(c)
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--static" in argv:  # its own options (mixkernels/bench/static.py)
        from .static import main as static_main

        return static_main([a for a in argv if a != "--static"])
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    suites = _cases.SUITES + ("overhead",) if args.suite == "all" else tuple(s.strip() for s in args.suite.split(","))
    for s in suites:
        if s not in _cases.SUITES + ("overhead",):
            print(f"error: unknown suite {s!r} (choose from {', '.join(_cases.SUITES)}, overhead, all)", file=sys.stderr)
            return 2
    if "overhead" in suites:  # its own table (public vs kernel-level us per call), not timed cases
        suites = tuple(s for s in suites if s != "overhead")
        over = _overhead.measure(device, quick=args.quick)
        print(_overhead.table(over, device), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            report.write_json(os.path.join(args.out, "overhead.json"), {"device": str(device), "rows": over})
        if not suites:
            return 0
        print()
    dspec = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    names = ["bf16", "fp32"] if dspec == "all" else [d.strip() for d in dspec.split(",")]
    if any(n not in _DTYPES for n in names):
        print(f"error: --dtype must be among {', '.join(_DTYPES)} or all, got {dspec!r}", file=sys.stderr)
        return 2
    dtypes = [_DTYPES[n] for n in names]
    notes: List[str] = []
    settings = Settings(device=device, quick=args.quick)
    if args.no_compile:
        settings.skip_compile, settings.compile_reason = True, "torch.compile peers disabled (--no-compile)"
    elif args.quick and device.type == "cpu":
        settings.skip_compile = True
        settings.compile_reason = "torch.compile peers skipped in --quick on CPU (compiling takes minutes here); run without --quick"
    if settings.skip_compile:
        notes.append(settings.compile_reason)
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        notes.append("TRITON_INTERPRET=1: the Triton backend is not measured (interpreter)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    env = report.environment(device)
    print(f"mixkernels bench on {env.get('gpu') or 'CPU'} | torch {env['torch']} | CUDA {env['cuda']} | "
          f"triton {env['triton']} | commit {env['git_commit']}", flush=True)
    for n in notes:
        print(f"note: {n}", flush=True)
    floors = measure_floors(device, quick=args.quick)
    print(f"floors: copy {floors['copy_GBps']:.1f} GB/s, matmul {floors['matmul_TFLOPs']:.2f} TFLOP/s "
          f"({floors['matmul_dtype']})", flush=True)

    all_cases = _select(_cases.build_cases(suites, settings, dtypes), args.cases, args.providers)
    cmd = "python -m mixkernels.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    doc: Dict[str, Any] = {
        "schema": report.SCHEMA, "env": env, "floors": floors, "notes": notes, "complete": False,
        "args": {"command": cmd, "suites": list(suites), "dtypes": names, "quick": args.quick, "device": str(device)},
        "results": [],
    }
    json_path = os.path.join(args.out, "bench.json") if args.out else None
    progress = _Progress(sum(len(c.providers) for c in all_cases))
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.monotonic()
    try:
        for case in all_cases:
            label = f"{case.suite} {case.name} {_dtype_name(case.dtype)} {case.mode}"
            if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
                for p in case.providers:
                    doc["results"].append({"suite": case.suite, "case": case.name, "dtype": _dtype_name(case.dtype),
                                           "mode": case.mode, "provider": p.name, "kind": p.kind, "status": "skipped",
                                           "reason": f"time budget of {args.time_budget:.0f} s exhausted"})
                    progress.update(f"{label}: {p.name} (time budget)")
                continue
            doc["results"] += run_case(case, settings, floors, seed=args.seed,
                                       on_provider=lambda name, _l=label: progress.update(f"{_l}: {name}"))
            if json_path:
                report.write_json(json_path, doc)
        doc["complete"] = True
    except KeyboardInterrupt:
        notes.append("interrupted: the results below are partial")
        print("\ninterrupted: writing partial results", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_handler)
        progress.close()

    res = doc["results"]
    print()
    print(report.table(res))
    print(report.summary(res))
    if args.out:
        title = f"mixkernels bench, {env.get('gpu') or 'CPU'}, torch {env['torch']}, commit {str(env['git_commit'])[:12]}"
        plots = report.write_plots(args.out, res, title)
        report.write_json(json_path, doc)
        report.write_markdown(os.path.join(args.out, "bench.md"), doc, plots)
        print(f"wrote {json_path}, {os.path.join(args.out, 'bench.md')} and {len(plots)} plot(s)")
    return compare_with(res, args.compare, args.fail_on_regression) if args.compare else 0


def compare_with(results, old_path: str, fail_pct=None) -> int:
    """Print the per-case change against ``old_path``; 1 if a mixkernels case regressed by more
    than ``fail_pct`` percent (or broke), else 0."""
    old = report.load(old_path)
    text, bad = report.compare(results, old["results"], fail_pct)
    print(f"\n== compare with {old_path} ({old['env'].get('gpu') or 'CPU'}, commit {old['env'].get('git_commit')})")
    print(text)
    if bad and fail_pct is not None:
        print(f"{len(bad)} regression(s) beyond {fail_pct}%: " + ", ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
