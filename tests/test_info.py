"""`python -m mixkernels.info` reports the build, devices and the backend per op."""
import os
import subprocess
import sys

from mixkernels import _ext, info


def test_info_runs_and_reports_the_cpu_extension():
    res = subprocess.run([sys.executable, "-m", "mixkernels.info"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for op in ("window_attention", "mix_tokens", "unmix_tokens", "window_partition", "uniform_sample", "mixmim_loss"):
        assert op in out
    want = "mixkernels._C (CPU kernels): loaded" if _ext.cpu_error is None else "mixkernels._C (CPU kernels): mixkernels._C failed"
    assert want in out
    if os.environ.get("MIXKERNELS_REQUIRE_EXT") == "1":
        assert "mixkernels._C (CPU kernels): loaded" in out


def test_backend_table_automatic_choice_is_runnable():
    for name, auto, status in info.backend_table("cpu"):
        assert status[auto] == "ok" or auto == "reference", (name, auto, status)
