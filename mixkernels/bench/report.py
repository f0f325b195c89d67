"""Reports: terminal table, JSON, markdown, PNG plots, and the comparison with an earlier run."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["environment", "table", "write_json", "write_markdown", "write_plots", "compare", "load", "result_key"]

SCHEMA = "mixkernels-bench/1"


# ------------------------------------------------------------------------------ environment
def _git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    env: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        import mixkernels

        env["mixkernels"] = mixkernels.__version__
    except Exception:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_GiB"] = round(p.total_memory / 2**30, 1)
        env["gpu_sm"] = f"{p.major}.{p.minor}"
        env["gpu_sms"] = p.multi_processor_count
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


# ------------------------------------------------------------------------------ formatting
def _f(v, fmt: str, na: str = "-") -> str:
    return na if v is None else format(v, fmt)


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}"


def _speedups(r: Dict[str, Any]) -> str:
    sp = r.get("speedup") or {}
    return " ".join(f"{k} {v:.2f}x" for k, v in sp.items())


def result_key(r: Dict[str, Any]) -> str:
    return f"{r['suite']}/{r['case']}/{r['dtype']}/{r['mode']}/{r['provider']}"


def _rows(results: Sequence[Dict[str, Any]], markdown: bool) -> Tuple[List[str], List[List[str]]]:
    head = ["case", "dtype", "mode", "provider", "ms", "GB/s", "% floor", "vs eager", "peak MB",
            "max err", "grad err", "speedup vs peers / status"]
    rows = []
    for r in results:
        st = r.get("status")
        if st == "ok":
            tail = _speedups(r) or r.get("note", "")
            if r.get("img_per_s"):
                tail = (f"{r['img_per_s']:.1f} img/s " + tail).strip()
        else:
            tail = f"{st}: {r.get('reason', '')}"
            if not markdown and len(tail) > 90:
                tail = tail[:87] + "..."
        rows.append([
            r["case"], r["dtype"], r["mode"], r["provider"], _ms(r.get("ms")), _f(r.get("GBps"), ".3g"),
            _f(r.get("pct_floor"), ".1f"), _f(r.get("vs_eager"), ".2f"), _f(r.get("peak_mb"), ".1f", "n/a" if st == "ok" else "-"),
            _f(r.get("max_err"), ".1e"), _f(r.get("max_grad_err"), ".1e"), tail,
        ])
    return head, rows


def table(results: Sequence[Dict[str, Any]]) -> str:
    """Fixed-width terminal table, one block per suite."""
    out = []
    for suite, rs in _by_suite(results).items():
        head, rows = _rows(rs, markdown=False)
        widths = [max(len(head[c]), *(len(r[c]) for r in rows)) for c in range(len(head) - 1)]
        line = lambda cells: "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out.append(f"== {suite}")
        out.append(line(head[:-1]) + "  " + head[-1])
        prev = None
        for r in rows:
            grp = tuple(r[:3])
            if prev is not None and grp != prev:
                out.append("")
            prev = grp
            out.append(line(r[:-1]) + "  " + r[-1])
        out.append("")
    return "\n".join(out)


def _by_suite(results) -> "OrderedDict[str, List[Dict[str, Any]]]":
    d: "OrderedDict[str, List[Dict[str, Any]]]" = OrderedDict()
    for r in results:
        d.setdefault(r["suite"], []).append(r)
    return d


def summary(results: Sequence[Dict[str, Any]]) -> str:
    n = {k: sum(1 for r in results if r.get("status") == k) for k in ("ok", "skipped", "error")}
    return f"{len(results)} measurements: {n['ok']} ok, {n['skipped']} skipped, {n['error']} errors"


# ------------------------------------------------------------------------------ files
def write_json(path: str, doc: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str, allow_nan=True)
    os.replace(tmp, path)  # a run killed mid-write leaves the previous complete file


def load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a mixkernels benchmark JSON (schema {doc.get('schema')!r})")
    return doc


def write_markdown(path: str, doc: Dict[str, Any], plots: Sequence[str] = ()) -> None:
    env, floors = doc["env"], doc["floors"]
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_threads')} threads)"
    lines = [
        f"# mixkernels benchmark: {dev}",
        "",
        f"* date {env.get('date')}, commit `{env.get('git_commit')}`, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"triton {env.get('triton')}, python {env.get('python')}",
        f"* command: `{doc['args'].get('command', '')}`" + ("" if doc.get("complete", True) else " (**incomplete run**)"),
        f"* floors measured at start: copy {floors.get('copy_GBps', 0):.0f} GB/s, matmul {floors.get('matmul_TFLOPs', 0):.3g} "
        f"TFLOP/s ({floors.get('matmul_dtype')})",
        "* ms: median; GB/s: floor bytes / time (attention: q, k, v read once and o written once, plus dO, dq, "
        "dk, dv for backward; token ops and losses: bytes read + written once); % floor: floor bytes at the "
        "measured copy bandwidth / time; peak MB: `max_memory_allocated` during one call beyond the inputs "
        "(n/a on CPU); errors: max |x - x_fp64| against the float64 reference (grad err: first input's gradient).",
        f"* {summary(doc['results'])}",
    ]
    for note in doc.get("notes", []):
        lines.append(f"* {note}")
    lines.append("")
    for suite, rs in _by_suite(doc["results"]).items():
        head, rows = _rows(rs, markdown=True)
        lines += [f"## {suite}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
        lines.append("")
        for p in plots:
            if os.path.basename(p).startswith(suite + "."):
                lines += [f"![{suite}]({os.path.basename(p)})", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plots(out_dir: str, results: Sequence[Dict[str, Any]], title: str) -> List[str]:
    """One PNG per suite, bars per provider for each shape, on linear axes that start at zero:
    speedup vs eager (eager / provider time, a dashed line at 1.0) when the suite has an eager
    peer, else median time; and peak memory (GPU) below. Log axes or axes that do not start at
    zero exaggerate gaps, so neither is used."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        import sys

        print(f"note: no PNG plots: matplotlib is not importable ({type(e).__name__}: {e}); "
              "install it with `pip install matplotlib` (or `pip install mixkernels[bench]`)", file=sys.stderr)
        return []
    paths = []
    for suite, rs in _by_suite(results).items():
        ok = [r for r in rs if r.get("status") == "ok"]
        if not ok:
            continue
        modes = list(OrderedDict.fromkeys(r["mode"] for r in ok))
        speedup = any(r.get("vs_eager") for r in ok)
        fields = [("vs_eager", "speedup vs eager (x, higher is better)")] if speedup else [("ms", "median time (ms)")]
        if any(r.get("peak_mb") for r in ok):  # memory is measured on GPU only
            fields.append(("peak_mb", "peak memory (MB)"))
        fig, axes = plt.subplots(len(fields), len(modes), figsize=(max(7, 5.5 * len(modes)), 4 * len(fields)), squeeze=False)
        for c, mode in enumerate(modes):
            sel = [r for r in ok if r["mode"] == mode]
            shapes = list(OrderedDict.fromkeys(f"{r['case']}\n{r['dtype']}" for r in sel))
            provs = list(OrderedDict.fromkeys(r["provider"] for r in sel))
            width = 0.8 / max(1, len(provs))
            for row, (field, label) in enumerate(fields):
                ax = axes[row][c]
                any_val = False
                for k, p in enumerate(provs):
                    xs, ys = [], []
                    for x, s in enumerate(shapes):
                        v = next((r.get(field) for r in sel if r["provider"] == p and f"{r['case']}\n{r['dtype']}" == s), None)
                        if v is not None and v > 0:
                            xs.append(x + (k - (len(provs) - 1) / 2) * width)
                            ys.append(v)
                    if ys:
                        any_val = True
                        ax.bar(xs, ys, width, label=p)
                ax.set_xticks(range(len(shapes)))
                ax.set_xticklabels(shapes, rotation=45, ha="right", fontsize=7)
                ax.set_title(f"{suite} {mode}: {label}", fontsize=9)
                ax.set_ylim(bottom=0)
                if field == "vs_eager":
                    ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
                if any_val:
                    ax.legend(fontsize=7)
                else:
                    ax.text(0.5, 0.5, "n/a (not measured on this device)", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{suite}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------ compare
def compare(new: Sequence[Dict[str, Any]], old: Sequence[Dict[str, Any]], threshold_pct: Optional[float]) -> Tuple[str, List[str]]:
    """Per-case change in median time against an earlier run.

    Returns the printable report and the keys that regressed: a mixkernels provider whose time
    grew by more than ``threshold_pct`` percent, or that ran before and fails now. Peers are
    listed for context but never counted as our regression.
    """
    old_by = {result_key(r): r for r in old}
    lines, bad = [], []
    hdr = f"{'case':<70} {'old ms':>10} {'new ms':>10} {'change':>9}"
    lines.append(hdr)
    for r in new:
        k = result_key(r)
        o = old_by.get(k)
        if o is None:
            continue
        mine = r.get("kind") == "mixkernels"
        if o.get("status") == "ok" and r.get("status") == "ok":
            ch = 100.0 * (r["ms"] / o["ms"] - 1.0)
            flag = ""
            if mine and threshold_pct is not None and ch > threshold_pct:
                flag = "  REGRESSION"
                bad.append(k)
            lines.append(f"{k:<70} {o['ms']:>10.4g} {r['ms']:>10.4g} {ch:>+8.1f}%{flag}")
        elif o.get("status") == "ok" and r.get("status") == "error":
            lines.append(f"{k:<70} {o['ms']:>10.4g} {'error':>10} {'':>9}" + ("  REGRESSION" if mine else ""))
            if mine:
                bad.append(k)
    if len(lines) == 1:
        lines.append("(no case in common with the old run)")
    return "\n".join(lines), bad
