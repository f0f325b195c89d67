"""GPU-check results: the summary of a ``scripts/gpu_check.sh`` run, and its import into the repo.

    python -m mixkernels.bench.results import OUT [--dest benchmarks/results] [--readme README.md]
    python mixkernels/bench/results.py summarize WORK OUT     # gpu_check.sh, after every step

``summarize`` reads the run's work folder (meta.json, env.json, steps.jsonl, bench-*/bench.json,
static.json) and OUT/tests.jsonl, and rewrites OUT/summary.json, report.md, bench.json and
plots.tar. ``import`` copies a returned OUT into ``benchmarks/results/<date>-<gpu>/`` (bench.md
and the PNGs included), refreshes the README's results table between its markers and prints
the op families whose CUDA tests all passed (candidates for ``CUDA_VERIFIED``).
Standard library only at module level: gpu_check.sh runs it by path, without importing torch.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import io
import json
import os
import re
import shutil
import sys
import tarfile
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

SCHEMA = "mixkernels-gpu-check/1"
OPS = OrderedDict([("window_attention", "window_attention"), ("mix_tokens", "mixing"), ("unmix_tokens", "mixing"),
                   ("window_partition", "windows"), ("window_merge", "windows"), ("uniform_sample", "uniform"),
                   ("uniform_scatter", "uniform"), ("mixmim_loss", "losses"), ("masked_recon_loss", "losses")])
FAMILIES = list(OrderedDict.fromkeys(OPS.values()))
BACKENDS = ("cuda", "triton", "cpu", "reference")
DTYPES = ("bf16", "fp16", "fp32")
_DTYPE = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "f16": "fp16", "half": "fp16",
          "fp32": "fp32", "float32": "fp32", "f32": "fp32", "fp64": "fp64", "float64": "fp64", "f64": "fp64"}
MARK_BEGIN, MARK_END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
HEADLINE_TEST = "test_gpu_headline.py"


# ------------------------------------------------------------------------------ small io
def _read_json(path: str, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def _read_jsonl(path: str) -> List[Dict[str, Any]]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut by a kill
                    pass
    except OSError:
        pass
    return out


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ tests
def classify(nodeid: str) -> Tuple[Tuple[str, ...], Optional[str], Optional[str], Optional[str]]:
    """``(families, backend, dtype, headline op)`` of a test id (best effort outside the headline file)."""
    path, _, name = nodeid.partition("::")
    fname = os.path.basename(path)
    func, _, params = name.partition("[")
    params = params.rstrip("]")
    if fname == HEADLINE_TEST and params:
        parts = params.split("-")
        op = parts[0]
        return (OPS.get(op, "other"),), parts[-2], parts[-1], op
    tokens = [t for t in re.split(r"[-_\[\]/,=. ]+", params.lower()) if t]
    backend = next((t for t in tokens if t in BACKENDS), None)
    if backend is None and ("cuda" in func or fname == "test_window_attention_cuda.py"):
        backend = "cuda"
    dtype = next((_DTYPE[t] for t in tokens if t in _DTYPE), None)
    if fname.startswith("test_window_attention"):
        fams: Tuple[str, ...] = ("window_attention",)
    elif fname == "test_losses.py":
        fams = ("losses",)
    elif fname == "test_token_ops.py":
        f = func.lower()
        fams = (("mixing",) if "mix" in f else ("windows",) if "window" in f else ("uniform",) if "uniform" in f
                else ("mixing", "windows", "uniform"))
    else:
        fams = ("other",)
    return fams, backend, dtype, None


def _final_tests(records: Iterable[Dict[str, Any]]) -> "OrderedDict[str, Dict[str, Any]]":
    """One record per test id; a test run twice (e.g. by the rest-of-suite step) keeps the worse outcome."""
    rank = {"failed": 3, "error": 3, "passed": 1, "skipped": 0}
    out: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
    for r in records:
        if "nodeid" not in r:
            continue
        old = out.get(r["nodeid"])
        if old is None or rank.get(r["outcome"], 2) >= rank.get(old["outcome"], 2):
            out[r["nodeid"]] = r
    return out


def _cell(outcomes: List[str]) -> str:
    if not outcomes:
        return "not run"
    if any(o in ("failed", "error") for o in outcomes):
        return "FAIL"
    if all(o == "skipped" for o in outcomes):
        return "skip"
    return "pass" if all(o == "passed" for o in outcomes) else "pass (some skipped)"


def test_summary(records: List[Dict[str, Any]], cuda_step_ok: bool) -> Dict[str, Any]:
    tests = _final_tests(records)
    counts = {k: 0 for k in ("passed", "failed", "error", "skipped")}
    headline: Dict[Tuple[str, str, str], List[str]] = {}
    fam_counts: Dict[str, Dict[str, Dict[str, int]]] = {}
    suite_bad: Dict[str, int] = {}  # family -> failing CUDA tests outside the op-level headline cases
    for r in tests.values():
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        fams, backend, dtype, op = classify(r["nodeid"])
        if op is not None:
            headline.setdefault((op, backend, dtype), []).append(r["outcome"])
        elif backend == "cuda" and r["outcome"] in ("failed", "error"):
            for fam in fams:
                suite_bad[fam] = suite_bad.get(fam, 0) + 1
        for fam in fams:
            c = fam_counts.setdefault(fam, {}).setdefault(backend or "any", {k: 0 for k in counts})
            c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    ops = OrderedDict()
    for op in OPS:
        ops[op] = {b: {d: _cell(headline.get((op, b, d), [])) for d in DTYPES}
                   for b in sorted({k[1] for k in headline if k[0] == op}, key=BACKENDS.index)}
    matrix = OrderedDict()
    for fam in FAMILIES:
        members = [op for op, f in OPS.items() if f == fam]
        bks = sorted({b for op in members for b in ops[op]}, key=BACKENDS.index)
        matrix[fam] = {b: {d: _cell([o for op in members for o in headline.get((op, b, d), [])]) for d in DTYPES}
                       for b in bks}
    verified, not_verified = [], {}
    for op, fam in OPS.items():
        cells = [ops[op].get("cuda", {}).get(d, "not run") for d in DTYPES]
        if not cuda_step_ok:
            not_verified[op] = "the CUDA test step did not finish"
        elif any(c != "pass" for c in cells):
            not_verified[op] = "headline CUDA tests: " + ", ".join(f"{d} {c}" for d, c in zip(DTYPES, cells))
        elif suite_bad.get(fam):
            not_verified[op] = f"{suite_bad[fam]} failing CUDA test(s) of the {fam} family"
        else:
            verified.append(op)
    failures = [{"nodeid": r["nodeid"], "step": r.get("step", ""), "message": r.get("message", "")}
                for r in tests.values() if r["outcome"] in ("failed", "error")]
    return {"counts": counts, "total": len(tests), "matrix": matrix, "ops": ops, "families": fam_counts,
            "cuda_verified": verified, "cuda_not_verified": not_verified, "failures": failures}


# ------------------------------------------------------------------------------ benchmarks
def merge_bench(work: str) -> Optional[Dict[str, Any]]:
    """Every ``bench-<run>/bench.json`` of the work folder in one document (results tagged with the run)."""
    docs = []
    for path in sorted(glob.glob(os.path.join(work, "bench-*", "bench.json")), key=os.path.getmtime):
        d = _read_json(path)
        if d and d.get("results") is not None:
            docs.append((os.path.basename(os.path.dirname(path))[len("bench-"):], d))
    if not docs:
        return None
    first = docs[0][1]
    merged = {"schema": first.get("schema"), "env": first.get("env", {}), "floors": first.get("floors", {}),
              "notes": [], "complete": all(d.get("complete") for _, d in docs),
              "args": {"command": " ; ".join(d.get("args", {}).get("command", "") for _, d in docs)},
              "runs": [{"run": n, "args": d.get("args"), "complete": d.get("complete"), "floors": d.get("floors")}
                       for n, d in docs], "results": []}
    for name, d in docs:
        merged["notes"] += [f"[{name}] {n}" for n in d.get("notes", [])]
        merged["results"] += [dict(r, run=name) for r in d["results"]]
    return merged


def headline(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each measured mixkernels result with its speedup over every peer measured for the same case:
    peers timed in the same run (process) first, then peers only another run of the check timed."""
    ok = [r for r in results if r.get("status") == "ok" and r.get("ms")]
    by_case: Dict[Tuple, List[Dict[str, Any]]] = {}
    for r in ok:
        by_case.setdefault((r["suite"], r["case"], r["dtype"], r["mode"]), []).append(r)
    rows = []
    for key, rs in by_case.items():
        for r in rs:
            if r.get("kind") != "mixkernels":
                continue
            peers: Dict[str, Dict[str, Any]] = {}
            for q in sorted((q for q in rs if q.get("kind") != "mixkernels"), key=lambda q: q.get("run") == r.get("run")):
                peers[q["provider"]] = q  # same-run peers sort last and win
            rows.append({"suite": key[0], "case": key[1], "dtype": key[2], "mode": key[3], "provider": r["provider"],
                         "run": r.get("run"), "ms": r["ms"], "pct_floor": r.get("pct_floor"), "GBps": r.get("GBps"),
                         "peak_mb": r.get("peak_mb"), "img_per_s": r.get("img_per_s"), "max_err": r.get("max_err"),
                         "speedup": {p: q["ms"] / r["ms"] for p, q in peers.items()},
                         "peer_peak_mb": {p: q.get("peak_mb") for p, q in peers.items() if q.get("peak_mb") is not None}})
    return rows


def plots_tar(work: str) -> Optional[bytes]:
    pngs = sorted(glob.glob(os.path.join(work, "bench-*", "*.png")))
    if not pngs:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in pngs:
            tar.add(p, arcname=f"{os.path.basename(os.path.dirname(p))[len('bench-'):]}-{os.path.basename(p)}")
    return buf.getvalue()


# ------------------------------------------------------------------------------ static estimates
_SIZES = {"t", "s", "l", "h"}  # model sizes other than -B in static labels (swin-t-s1-shift, ummae-t)


def _shape_tokens(label: str) -> set:
    # "mixmim-b-s1" (static) ~ "mixmim-s1" (bench: the MixMIM-B / Swin-B shapes)
    return {t for t in re.split(r"[-_:/ ]+", label.lower()) if t and t not in ("b", "base")}


def static_vs_measured(static: Dict[str, Any], results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each static record (backend/kernel/shape/dtype/est_us) beside the measured time of the same
    kernel at the same shape label: forward = the fwd case, backward = fwd+bwd minus fwd (same run).
    Measured times are whole op calls (launch and glue included); the benchmarks are -B models, so a
    static label naming another size (swin-t-..., ummae-t) has no measured partner."""
    ms = {}
    for r in results:
        if r.get("status") == "ok" and r.get("kind") == "mixkernels":
            op, _, shape = r["case"].partition(":") if ":" in r["case"] else (r["suite"], None, r["case"])
            ms[(r["provider"].replace("mixkernels-", ""), op, r["dtype"], r["mode"], r["case"])] = (r["ms"], shape)
    out = []
    for rec in static.get("records", []):
        kernel, backend, dtype = str(rec.get("kernel", "")), rec.get("backend"), rec.get("dtype")
        bwd = bool(re.search(r"(_bwd|_backward)$", kernel))
        op = re.sub(r"(_fwd|_bwd|_backward)$", "", kernel)
        op = "attention" if op == "window_attention" else op
        want = _shape_tokens(str(rec.get("shape", "")))
        meas = None
        for (b, o, d, mode, case), (t, shape) in ms.items():
            have = _shape_tokens(shape)
            if b != backend or o != op or d != dtype or mode != "fwd" or (want & _SIZES) - have \
                    or not (have <= want or want <= have):
                continue
            if bwd:
                both = ms.get((b, o, d, "fwd+bwd", case))
                t = both[0] - t if both else None
            if t is not None:
                meas = t * 1e3
                break
        est = rec.get("est_us")
        out.append({"backend": backend, "kernel": kernel, "shape": rec.get("shape"), "dtype": dtype,
                    "config": rec.get("config"), "est_us": est, "measured_us": meas,
                    "measured_over_est": (meas / est) if meas and est else None})
    return out


# ------------------------------------------------------------------------------ summary
def summarize(work: str, out: str) -> Dict[str, Any]:
    meta = _read_json(os.path.join(work, "meta.json"), {})
    env = _read_json(os.path.join(work, "env.json"), {})
    steps = _read_jsonl(os.path.join(work, "steps.jsonl"))
    tests = _read_jsonl(os.path.join(out, "tests.jsonl"))
    # The CUDA test session ran to its end (0: all passed, 1: some failed), not cut by its time limit.
    cuda_ok = any(r.get("step") == "cuda-tests" and r.get("session_exit") in (0, 1) for r in tests)
    ts = test_summary(tests, cuda_ok)
    bench = merge_bench(work)
    results = bench["results"] if bench else []
    rows = headline(results)
    static_path = meta.get("static_json")
    static = _read_json(static_path) if static_path else None
    summary = {
        "schema": SCHEMA, "dry_run": bool(meta.get("dry")), "date": meta.get("started"),
        "complete": any(s.get("name") == "done" for s in steps), "gpu": env.get("gpu"), "commit": env.get("commit"),
        "versions": env.get("versions", {}), "cuda_home": env.get("cuda_home"), "env": env,
        "steps": [s for s in steps if s.get("name") != "done"], "tests": {"total": ts["total"], **ts["counts"]},
        "matrix": ts["matrix"], "ops": ts["ops"], "families": ts["families"],
        "cuda_verified": ts["cuda_verified"], "cuda_not_verified": ts["cuda_not_verified"],
        "failures": ts["failures"][:200], "headline": rows, "floors": bench["floors"] if bench else None,
        "static_vs_measured": static_vs_measured(static, results) if static else None,
        "static_note": meta.get("static_note"),
    }
    os.makedirs(out, exist_ok=True)
    _write_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=1, default=str).encode())
    _write_atomic(os.path.join(out, "report.md"), report_md(summary).encode())
    if bench:
        _write_atomic(os.path.join(out, "bench.json"), json.dumps(bench, indent=1, default=str).encode())
    tar = plots_tar(work)
    if tar:
        _write_atomic(os.path.join(out, "plots.tar"), tar)
    return summary


def _x(v, fmt=".2f", suffix="x") -> str:
    return "-" if v is None else f"{format(v, fmt)}{suffix}"


def report_md(s: Dict[str, Any]) -> str:
    v = s.get("versions", {})
    kind = "DRY RUN (CPU, tiny sizes, Triton interpreter)" if s["dry_run"] else (s.get("gpu") or "no GPU")
    L = [f"# mixkernels GPU check: {kind}", "",
         f"* commit `{s.get('commit')}`, started {s.get('date')}, " + ("complete" if s["complete"] else "**incomplete**"),
         "* " + ", ".join(f"{k} {val}" for k, val in v.items()), f"* CUDA toolkit: {s.get('cuda_home')}",
         f"* tests: {s['tests']['total']} run: {s['tests'].get('passed', 0)} passed, {s['tests'].get('failed', 0)} failed, "
         f"{s['tests'].get('error', 0)} errors, {s['tests'].get('skipped', 0)} skipped", "",
         "## Steps", "", "| step | status | seconds | limit s | note |", "|---|---|---|---|---|"]
    L += [f"| {st.get('name')} | {st.get('status')} | {st.get('seconds', '')} | {st.get('limit_s', '')} | "
          f"{str(st.get('note', '')).replace('|', '/')} |" for st in s["steps"]]
    L += ["", "## Correctness at the headline shapes (family x backend x dtype)", "",
          "| family | backend | " + " | ".join(DTYPES) + " |", "|---|---|" + "---|" * len(DTYPES)]
    for fam, bks in s["matrix"].items():
        for b, cells in bks.items():
            L.append(f"| {fam} | {b} | " + " | ".join(cells[d] for d in DTYPES) + " |")
    L += ["", "## Whole suite by family and backend (passed / failed+errors / skipped)", "",
          "| family | backend | passed | failed | skipped |", "|---|---|---|---|---|"]
    for fam, bks in s["families"].items():
        for b, c in bks.items():
            L.append(f"| {fam} | {b} | {c.get('passed', 0)} | {c.get('failed', 0) + c.get('error', 0)} | {c.get('skipped', 0)} |")
    L += ["", "## CUDA_VERIFIED candidates (mixkernels/ops/_dispatch.py)", "",
          "* passed every CUDA test: " + (", ".join(s["cuda_verified"]) or "none")]
    L += [f"* not verified: {op}: {why}" for op, why in s["cuda_not_verified"].items()]
    rows = s["headline"]
    if rows:
        peers = list(OrderedDict.fromkeys(p for r in rows for p in r["speedup"]))
        L += ["", "## Headline benchmarks (speedup = peer time / mixkernels time)", "",
              "| suite | case | dtype | mode | provider | ms | % floor | " + " | ".join(f"vs {p}" for p in peers) +
              " | peak MB (eager) |", "|---" * (7 + len(peers) + 1) + "|"]
        for r in rows:
            eager_mb = r["peer_peak_mb"].get("eager") or r["peer_peak_mb"].get("timm-eager")
            mem = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}" + (f" ({eager_mb:.0f})" if eager_mb else "")
            L.append(f"| {r['suite']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']} | {r['ms']:.4g} | "
                     f"{_x(r['pct_floor'], '.1f', '')} | " + " | ".join(_x(r["speedup"].get(p)) for p in peers) + f" | {mem} |")
    sv = s.get("static_vs_measured")
    L += ["", "## Static estimates beside the measured times", ""]
    if sv:
        L += ["| backend | kernel | shape | dtype | est us | measured us | measured / est |", "|---|---|---|---|---|---|---|"]
        L += [f"| {r['backend']} | {r['kernel']} | {r['shape']} | {r['dtype']} | {_x(r['est_us'], '.1f', '')} | "
              f"{_x(r['measured_us'], '.1f', '')} | {_x(r['measured_over_est'])} |" for r in sv]
    else:
        L.append(s.get("static_note") or "no static report")
    if s["failures"]:
        L += ["", f"## Failures ({len(s['failures'])}; first 40)", ""]
        for f in s["failures"][:40]:
            L += [f"* `{f['nodeid']}` ({f['step']})", "", "```", f["message"][:1200], "```"]
    return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------ import
def _slug(s: str) -> str:
    s = re.sub(r"^nvidia\s+", "", s.strip().lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def _readme_table(dest_root: str, include_dry: bool, readme_dir: str = ".") -> str:
    rows = []
    for path in sorted(glob.glob(os.path.join(dest_root, "*", "summary.json")), reverse=True):
        s = _read_json(path)
        if not s or s.get("schema") != SCHEMA or (s.get("dry_run") and not include_dry):
            continue
        name = os.path.basename(os.path.dirname(path))
        t = s["tests"]
        best = {}
        for r in s.get("headline", []):
            if r["suite"] == "attention" and r["case"] == "mixmim-s1" and r["dtype"] == "bf16":
                if r["mode"] not in best or r["ms"] < best[r["mode"]]["ms"]:
                    best[r["mode"]] = r
        att = "; ".join(f"{m} {r['provider'].replace('mixkernels-', '')} {_x(r['pct_floor'], '.0f', '%')} of floor, "
                        f"vs SDPA {_x(r['speedup'].get('sdpa'))}, vs Flex {_x(r['speedup'].get('flex'))}"
                        for m, r in sorted(best.items())) or "-"
        step = next((r for r in s.get("headline", []) if r["suite"] == "model"), None)
        model = (f"{step['img_per_s']:.0f} img/s, vs eager {_x(step['speedup'].get('eager'))}, "
                 f"vs compiled {_x(step['speedup'].get('compiled'))}") if step and step.get("img_per_s") else "-"
        rel = os.path.relpath(os.path.dirname(path), readme_dir)
        rows.append(f"| [{name}]({rel}/report.md) | {s.get('gpu') or 'CPU (dry run)'} | `{str(s.get('commit'))[:10]}` | "
                    f"{t.get('passed', 0)} / {t.get('failed', 0) + t.get('error', 0)} / {t.get('skipped', 0)} | {att} | "
                    f"{model} | {', '.join(s.get('cuda_verified', [])) or 'none'} |")
    if not rows:
        return "No GPU run imported yet."
    head = ("| run | GPU | commit | tests pass / fail / skip | attention MixMIM-B s1 bf16 | MixMIM-B step | "
            "CUDA ops verified |\n|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def refresh_readme(readme: str, dest_root: str, include_dry: bool = False) -> bool:
    with open(readme) as f:
        text = f.read()
    if MARK_BEGIN not in text or MARK_END not in text:
        print(f"{readme}: no {MARK_BEGIN} ... {MARK_END} markers; table not written", file=sys.stderr)
        return False
    a, rest = text.split(MARK_BEGIN, 1)
    _, b = rest.split(MARK_END, 1)
    with open(readme, "w") as f:
        f.write(a + MARK_BEGIN + "\n" + _readme_table(dest_root, include_dry, os.path.dirname(os.path.abspath(readme))) + "\n" + MARK_END + b)
    return True


def import_run(out: str, dest_root: str = "benchmarks/results", readme: Optional[str] = "README.md",
               allow_dry: bool = False) -> str:
    s = _read_json(os.path.join(out, "summary.json"))
    if not s or s.get("schema") != SCHEMA:
        raise SystemExit(f"{out}: no gpu_check summary.json (schema {SCHEMA})")
    if s.get("dry_run") and not allow_dry:
        raise SystemExit(f"{out} is a dry run (GPU_CHECK_DRY=1): nothing to import (--allow-dry to try the import)")
    date = str(s.get("date") or _dt.date.today().isoformat())[:10]
    base = dest = os.path.join(dest_root, f"{date}-{_slug(s.get('gpu') or ('dry-cpu' if s.get('dry_run') else 'cpu'))}")
    old, n = _read_json(os.path.join(dest, "summary.json")), 2
    while old is not None and old.get("commit") != s.get("commit"):  # another run the same day: keep both
        dest = f"{base}-{n}"
        old, n = _read_json(os.path.join(dest, "summary.json")), n + 1
    os.makedirs(dest, exist_ok=True)
    for name in ("summary.json", "report.md", "bench.json", "tests.jsonl", "log.txt", "build.log", "static.json"):
        if os.path.isfile(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(dest, name))
    pngs = []
    if os.path.isfile(os.path.join(out, "plots.tar")):
        with tarfile.open(os.path.join(out, "plots.tar")) as tar:
            for m in tar.getmembers():
                base = os.path.basename(m.name)
                if m.isfile() and re.fullmatch(r"[\w.+-]+\.png", base):
                    with open(os.path.join(dest, base), "wb") as f:
                        f.write(tar.extractfile(m).read())
                    pngs.append(os.path.join(dest, base))
    bench = _read_json(os.path.join(dest, "bench.json"))
    if bench:
        from mixkernels.bench import report  # torch from here on

        report.write_markdown(os.path.join(dest, "bench.md"), bench, pngs)
    if readme:
        refresh_readme(readme, dest_root, include_dry=bool(s.get("dry_run")))
    print(f"imported {out} -> {dest}" + (f"; README table refreshed ({readme})" if readme else ""))
    print(f"tests: {s['tests']}")
    print("CUDA tests all passed for: " + (", ".join(s.get("cuda_verified", [])) or "no op"))
    for op, why in s.get("cuda_not_verified", {}).items():
        print(f"  not verified: {op}: {why}")
    if s.get("cuda_verified"):
        print("-> add them to CUDA_VERIFIED in mixkernels/ops/_dispatch.py: frozenset({" +
              ", ".join(repr(o) for o in s["cuda_verified"]) + "})")
    return dest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixkernels.bench.results", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s1 = sub.add_parser("summarize", help="(gpu_check.sh) rewrite OUT/summary.json etc. from the work folder")
    s1.add_argument("work")
    s1.add_argument("out")
    s2 = sub.add_parser("import", help="copy a returned $OUT into benchmarks/results/<date>-<gpu>/ and refresh the README")
    s2.add_argument("out")
    s2.add_argument("--dest", default="benchmarks/results")
    s2.add_argument("--readme", default="README.md", help="README to refresh ('' for none)")
    s2.add_argument("--allow-dry", action="store_true", help="import a GPU_CHECK_DRY=1 run (to test the import)")
    a = p.parse_args(argv)
    if a.cmd == "summarize":
        s = summarize(a.work, a.out)
        t = s["tests"]
        print(f"summary: tests {t.get('passed', 0)} passed, {t.get('failed', 0) + t.get('error', 0)} failed, "
              f"{t.get('skipped', 0)} skipped; {len(s['headline'])} mixkernels measurements")
        return 0
    import_run(a.out, a.dest, a.readme or None, a.allow_dry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
