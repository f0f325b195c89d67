"""The gpu_check summary and its import (mixkernels.bench.results) on a synthetic run."""
import json
import os

import pytest

from mixkernels.bench import results as R

OPS = list(R.OPS)


def _bench_doc(results, complete=True):
    return {"schema": "mixkernels-bench/1", "env": {"gpu": "NVIDIA H200"}, "floors": {"copy_GBps": 4000.0},
            "notes": [], "complete": complete, "args": {"command": "python -m mixkernels.bench"}, "results": results}


def _r(case, provider, ms, kind="peer", mode="fwd", suite="attention", **kw):
    return dict(suite=suite, case=case, dtype="bf16", mode=mode, provider=provider, kind=kind, status="ok", ms=ms, **kw)


def _make_run(tmp_path, cuda_fail=None, cuda_exit=1, dry=False):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "meta.json").write_text(json.dumps({"dry": dry, "commit": "abc123", "started": "2026-01-02T03:04:05+00:00"}))
    (work / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "commit": "abc123", "versions": {"torch": "2.11.0"}}))
    steps = [{"name": n, "status": "ok", "rc": 0, "seconds": 1, "limit_s": 10, "note": ""}
             for n in ("versions", "triton-tests", "cuda-tests", "done")]
    (work / "steps.jsonl").write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    lines = []
    for op in OPS:
        for b in ("triton", "cuda"):
            for d in R.DTYPES:
                bad = b == "cuda" and op == cuda_fail and d == "fp16"
                lines.append({"step": f"{b}-tests", "nodeid": f"tests/test_gpu_headline.py::test_headline[{op}-big-shape-{b}-{d}]",
                              "outcome": "failed" if bad else "passed", "seconds": 0.1, "message": "E boom" if bad else ""})
    lines.append({"step": "cuda-tests", "nodeid": "tests/test_token_ops.py::test_uniform_sample[cuda-float16-0-plain]",
                  "outcome": "passed", "seconds": 0.1, "message": ""})
    lines.append({"step": "cuda-tests", "session_exit": cuda_exit})
    (out / "tests.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{not json, cut by a kill")
    (work / "bench-attention").mkdir()
    (work / "bench-attention" / "bench.json").write_text(json.dumps(_bench_doc([
        _r("mixmim-s1", "mixkernels-triton", 1.0, kind="mixkernels", pct_floor=50.0, peak_mb=10.0),
        _r("mixmim-s1", "eager", 4.0, peak_mb=100.0), _r("mixmim-s1", "sdpa", 2.0)])))
    (work / "bench-flex").mkdir()
    (work / "bench-flex" / "bench.json").write_text(json.dumps(_bench_doc([_r("mixmim-s1", "flex", 3.0)], complete=False)))
    (work / "bench-cuda").mkdir()
    (work / "bench-cuda" / "bench.json").write_text(json.dumps(_bench_doc([
        _r("mixmim-s1", "mixkernels-cuda", 0.5, kind="mixkernels"), _r("mixmim-s1", "sdpa", 2.5)])))
    return work, out


def test_classify_headline_and_suite_ids():
    assert R.classify("tests/test_gpu_headline.py::test_headline[window_attention-mixmim-s1-cuda-bf16]") == \
        (("window_attention",), "cuda", "bf16", "window_attention")
    fams, b, d, op = R.classify("tests/test_token_ops.py::test_unmix_tokens[shared-pos-triton-float16]")
    assert (fams, b, d, op) == (("mixing",), "triton", "fp16", None)
    assert R.classify("tests/test_window_attention.py::test_opcheck[triton-cuda]")[1] == "triton"
    assert R.classify("tests/test_window_attention_cuda.py::test_lse_matches_reference")[1] == "cuda"
    assert R.classify("tests/test_losses.py::test_cuda_vector_and_scalar_paths[bf16-f32-aligned-1]")[:3] == \
        (("losses",), "cuda", "bf16")


@pytest.mark.parametrize("cuda_fail,cuda_exit", [(None, 0), ("unmix_tokens", 1), (None, 2)])
def test_summary_matrix_and_cuda_verified(tmp_path, cuda_fail, cuda_exit):
    work, out = _make_run(tmp_path, cuda_fail, cuda_exit)
    s = R.summarize(str(work), str(out))
    assert sorted(os.listdir(out)) == ["bench.json", "report.md", "summary.json", "tests.jsonl"]
    assert s["complete"] and s["gpu"] == "NVIDIA H200"
    assert s["matrix"]["window_attention"]["triton"] == {"bf16": "pass", "fp16": "pass", "fp32": "pass"}
    if cuda_exit == 2:  # the CUDA session was cut by its time limit: nothing is verified
        assert s["cuda_verified"] == [] and all("did not finish" in w for w in s["cuda_not_verified"].values())
    elif cuda_fail:
        assert s["matrix"]["mixing"]["cuda"]["fp16"] == "FAIL"
        assert "unmix_tokens" not in s["cuda_verified"] and "mix_tokens" in s["cuda_verified"]
        assert s["failures"][0]["message"] == "E boom"
    else:
        assert s["cuda_verified"] == OPS
    rows = {r["provider"]: r for r in s["headline"]}
    # same-run peers win (sdpa 2.0 for triton, 2.5 for cuda); flex only ran in another run
    assert rows["mixkernels-triton"]["speedup"] == {"eager": 4.0, "sdpa": 2.0, "flex": 3.0}
    assert rows["mixkernels-cuda"]["speedup"]["sdpa"] == 5.0 and rows["mixkernels-cuda"]["speedup"]["eager"] == 8.0
    md = (out / "report.md").read_text()
    assert "| window_attention | triton | pass | pass | pass |" in md
    merged = json.loads((out / "bench.json").read_text())
    assert not merged["complete"] and {r["run"] for r in merged["results"]} == {"attention", "flex", "cuda"}


def test_static_estimates_beside_measured(tmp_path):
    res = [_r("mixmim-s1", "mixkernels-triton", 0.2, kind="mixkernels", floor_bytes=400),
           _r("mixmim-s1", "mixkernels-triton", 0.5, kind="mixkernels", mode="fwd+bwd", floor_bytes=1200),
           _r("mix_tokens:mixmim-s1", "mixkernels-triton", 0.01, kind="mixkernels", suite="ops", floor_bytes=200),
           _r("uniform_sample:ummae-s1", "mixkernels-triton", 0.01, kind="mixkernels", suite="ops", floor_bytes=200)]
    rec = lambda k, shape, est, fb, b="triton": {"backend": b, "kernel": k, "shape": shape, "dtype": "bf16",
                                                  "est_us": est, "floor_bytes": fb}
    static = {"records": [rec("window_attention_fwd", "mixmim-b-s1", 100.0, 410), rec("window_attention_bwd", "mixmim-b-s1", 150.0, 790),
                          rec("mix_tokens", "mixmim-b-s1", 5.0, 205), rec("window_attention_fwd", "mixmim-b-s1", 90.0, 410, "cuda"),
                          rec("uniform_sample", "ummae-t-s1", 5.0, 90),  # a Swin-T shape: other bytes, no match
                          rec("window_attention_fwd", "swin-t-s1-shift", 50.0, 300)]}
    sv = R.static_vs_measured(static, res)
    assert [r["measured_us"] for r in sv] == [pytest.approx(200.0), pytest.approx(300.0), pytest.approx(10.0), None, None, None]
    assert sv[0]["measured_over_est"] == pytest.approx(2.0)


def test_import_into_results_and_readme(tmp_path):
    work, out = _make_run(tmp_path, None, 0)
    R.summarize(str(work), str(out))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{R.MARK_BEGIN}\nold table\n{R.MARK_END}\noutro\n")
    dest = R.import_run(str(out), str(tmp_path / "results"), str(readme))
    assert os.path.basename(dest) == "2026-01-02-h200"
    assert {"summary.json", "report.md", "bench.json", "bench.md", "tests.jsonl"} <= set(os.listdir(dest))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old table" not in text
    assert "[2026-01-02-h200](results/2026-01-02-h200/report.md)" in text, text
    assert "fwd cuda - of floor, vs SDPA 5.00x, vs Flex 6.00x" in text, text  # the fastest backend
    R.import_run(str(out), str(tmp_path / "results"), str(readme))  # same commit: the same folder again
    assert sorted(os.listdir(tmp_path / "results")) == ["2026-01-02-h200"]


def test_import_refuses_a_dry_run(tmp_path):
    work, out = _make_run(tmp_path, dry=True)
    R.summarize(str(work), str(out))
    with pytest.raises(SystemExit, match="dry run"):
        R.import_run(str(out), str(tmp_path / "results"), None)


def test_plots_linear_from_zero_with_a_line_at_one(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from mixkernels.bench import report

    seen = {}
    real_ylim, real_hline = matplotlib.axes.Axes.set_ylim, matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylim", lambda ax, *a, **k: (seen.setdefault("ylim", []).append(k), real_ylim(ax, *a, **k))[1])
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda ax, y=0, *a, **k: (seen.setdefault("hline", []).append(y), real_hline(ax, y, *a, **k))[1])
    res = [_r("s1", "mixkernels-triton", 1.0, kind="mixkernels", vs_eager=4.0), _r("s1", "eager", 4.0, vs_eager=1.0)]
    paths = report.write_plots(str(tmp_path), res, "t")
    assert [os.path.basename(p) for p in paths] == ["attention.png"]
    assert {"bottom": 0} in seen["ylim"] and seen["hline"] == [1.0]  # linear from 0, the eager line at 1
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert report.write_plots(str(tmp_path), res, "t") == []
    assert "pip install matplotlib" in capsys.readouterr().err
