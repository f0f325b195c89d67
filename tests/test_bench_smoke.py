"""Smoke test of the benchmark suite: the CPU quick run writes well-formed reports, errors are
measured against the float64 reference, and --compare flags regressions. No timing asserts."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from mixkernels.bench import report
from mixkernels.bench.__main__ import compare_with
from mixkernels.bench.harness import Case, Provider, Runner, Settings, run_case

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # tests/conftest sets it; the bench never times the interpreter
    proc = subprocess.run(
        [sys.executable, "-m", "mixkernels.bench", "--quick", "--device", "cpu", "--suite", "all", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_quick_run_writes_json(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "bench.json").read_text())
    assert doc["schema"] == report.SCHEMA and doc["complete"] is True
    for k in ("date", "git_commit", "torch", "triton", "cuda", "gpu", "python"):
        assert k in doc["env"]
    assert doc["floors"]["copy_GBps"] > 0 and doc["floors"]["matmul_TFLOPs"] > 0
    res = doc["results"]
    assert {r["suite"] for r in res} == {"attention", "ops", "block", "model"}
    for r in res:
        assert r["status"] in ("ok", "skipped", "error"), r
        if r["status"] == "ok":
            assert r["ms"] > 0 and math.isfinite(r["ms"])
            assert math.isfinite(r["max_err"])
            assert r["peak_mb"] is None  # CPU: not measured, never faked
            if r["mode"] == "fwd+bwd":
                assert math.isfinite(r["max_grad_err"])
            if r["floor_bytes"]:
                assert r["GBps"] > 0 and r["pct_floor"] > 0
        else:
            assert r["reason"]
    # the eager reference peers run everywhere and match the float64 reference (fp32 here)
    eager = [r for r in res if r["provider"] in ("eager", "timm-eager") and r["suite"] in ("attention", "ops", "block")]
    assert eager and all(r["status"] == "ok" for r in eager), [r for r in eager if r["status"] != "ok"]
    assert all(r["max_err"] < 1e-4 for r in eager)
    # compile peers are skipped in CPU quick mode, with the reason in the output
    comp = [r for r in res if r["provider"] in ("compiled", "flex", "timm-compiled") and r["suite"] != "model"]
    assert comp and all(r["status"] == "skipped" and "--quick" in r["reason"] for r in comp)
    # a backend that is not there yet is a skip with the dispatcher's reason, not an error
    wa = [r for r in res if r["suite"] == "attention" and r["provider"] == "mixkernels-triton"]
    assert wa and all(r["status"] == "skipped" for r in wa)


def test_quick_run_writes_markdown_and_png(quick_run):
    out, stdout = quick_run
    md = (out / "bench.md").read_text()
    assert md.startswith("# mixkernels benchmark")
    for suite in ("attention", "ops", "block", "model"):
        assert f"## {suite}" in md
    assert "| case | dtype | mode | provider | ms |" in md
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "attention.png" in pngs and "ops.png" in pngs
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000
        assert f"]({name})" in md
    import matplotlib.image as mpimg

    assert mpimg.imread(str(out / "attention.png")).ndim == 3
    assert "measurements:" in stdout and "== attention" in stdout  # the terminal table


def _res(provider, ms, kind, status="ok", case="c"):
    return {"suite": "ops", "case": case, "dtype": "bf16", "mode": "fwd", "provider": provider, "kind": kind,
            "status": status, "ms": ms}


def test_compare_flags_regression(tmp_path, capsys):
    old = [_res("mixkernels-cuda", 1.0, "mixkernels"), _res("eager", 1.0, "peer"),
           _res("mixkernels-cuda", 1.0, "mixkernels", case="d"), _res("mixkernels-triton", 1.0, "mixkernels", case="e")]
    new = [_res("mixkernels-cuda", 1.2, "mixkernels"), _res("eager", 2.0, "peer"),
           _res("mixkernels-cuda", 0.5, "mixkernels", case="d"),
           _res("mixkernels-triton", None, "mixkernels", status="error", case="e")]
    text, bad = report.compare(new, old, 10.0)
    assert bad == ["ops/c/bf16/fwd/mixkernels-cuda", "ops/e/bf16/fwd/mixkernels-triton"]  # peers never count
    assert "+20.0%" in text and "-50.0%" in text
    _, bad = report.compare(new, old, 25.0)
    assert bad == ["ops/e/bf16/fwd/mixkernels-triton"]
    # the CLI path: exit status 1 beyond the threshold, 0 without --fail-on-regression
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": report.SCHEMA, "env": {"gpu": "X", "git_commit": "abc"}, "results": old}))
    assert compare_with(new[:3], str(path), 10.0) == 1
    assert compare_with(new[:3], str(path), 30.0) == 0
    assert compare_with(new[:3], str(path), None) == 0
    assert "REGRESSION" in capsys.readouterr().out


def test_wrong_kernel_shows_in_error():
    """A fast wrong provider is measured but its error against float64 is reported."""

    def make(device, dtype, gen):
        return {"x": torch.randn(64, 32, generator=gen, dtype=dtype).requires_grad_(True)}

    ref = lambda i: i["x"] * 2
    provs = [Provider("eager", "peer", lambda c, i: Runner(ref)),
             Provider("mixkernels-bad", "mixkernels", lambda c, i: Runner(lambda j: j["x"] * 2.5))]
    for mode in ("fwd", "fwd+bwd"):
        case = Case("ops", "toy", torch.float32, mode, make, ref, provs, grad=("x",), bytes_fwd=64 * 32 * 8,
                    bytes_bwd=64 * 32 * 8)
        rs = {r["provider"]: r for r in run_case(case, Settings(torch.device("cpu"), quick=True), {"copy_GBps": 1.0, "matmul_TFLOPs": 1.0})}
        assert rs["eager"]["status"] == "ok" and rs["eager"]["max_err"] < 1e-6
        assert rs["mixkernels-bad"]["status"] == "ok" and rs["mixkernels-bad"]["max_err"] > 0.1
        if mode == "fwd+bwd":
            assert rs["mixkernels-bad"]["max_grad_err"] > 0.1
        assert "eager" in rs["mixkernels-bad"]["speedup"]
