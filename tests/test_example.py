"""examples/pretrain_mixmim.py runs on the CPU (synthetic data, tiny model), saves and resumes."""
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_mixmim.py")


def _run(out, steps, *extra):
    cmd = [sys.executable, SCRIPT, "--synthetic", "--model", "mixmim_tiny", "--batch-size", "4", "--steps", str(steps),
           "--log-every", "1", "--save-every", "100", "--out", str(out), *extra]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def test_pretrain_example_runs_saves_and_resumes(tmp_path):
    log = _run(tmp_path, 2)
    assert "done: step 2" in log and "img_s" in log
    ckpt = tmp_path / "checkpoint.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["step"] == 2 and "layers.0.blocks.0.attn.qkv.weight" in state["model"]
    assert len(state["optimizer"]["state"]) > 0
    w2 = state["model"]["decoder_pred.weight"].clone()

    log = _run(tmp_path, 3, "--resume", "--cpu-amp")
    assert "resumed from" in log and "at step 2" in log and "done: step 3" in log
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["step"] == 3
    assert not torch.equal(state["model"]["decoder_pred.weight"], w2)  # it trained one more step
