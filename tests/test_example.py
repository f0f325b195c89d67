"""examples/pretrain.py (and its old name pretrain_mixmim.py) on the CPU, tiny models: every recipe
trains, saves and resumes; MixMIM resumes bit for bit after a SIGKILL and survives a folder of
broken images; two gloo processes (DDP, FSDP2) match one process at twice the batch, and FSDP2's
sharded checkpoint resumes at another world size."""
import io
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib

import pytest
import torch

from mixkernels import train_utils as tu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "pretrain_mixmim.py")


def _cmd(out, steps, *extra):
    return [sys.executable, SCRIPT, "--model", "mixmim_tiny", "--batch-size", "4", "--steps", str(steps),
            "--log-every", "1", "--out", str(out), *extra]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def _proc(cmd, timeout=300) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its output in files (a stray rank that outlives its launcher cannot hold a
    pipe open), then kill every process left that names the run's ``--out`` folder. On timeout each
    of them gets SIGABRT first, so faulthandler prints where it hung, and the test fails with that."""
    out_dir = str(cmd[cmd.index("--out") + 1])
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=dict(_env(), PYTHONFAULTHANDLER="1"))
        try:
            p.wait(timeout=timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            _signal_run(out_dir, signal.SIGABRT)
            time.sleep(5)
            p.kill()
            p.wait()
        strays = _signal_run(out_dir, signal.SIGKILL)
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if hung:
        pytest.fail(f"timed out after {timeout} s: {' '.join(map(str, cmd))}\n{out[-3000:]}\n{err[-12000:]}")
    if strays:
        print(f"killed {len(strays)} process(es) left by {' '.join(map(str, cmd))}: {strays}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _signal_run(out_dir: str, sig) -> list:
    """Send ``sig`` to every process whose command line names ``out_dir``; their pids."""
    hit = []
    if not os.path.isdir("/proc"):  # not Linux: nothing to look for
        return hit
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if out_dir.encode() in args and int(pid) != os.getpid():
            try:
                os.kill(int(pid), sig)
                hit.append(int(pid))
            except OSError:
                pass
    return hit


def _run(out, steps, *extra, expect_rc=0):
    r = _proc(_cmd(out, steps, *extra))
    assert r.returncode == expect_rc, f"rc {r.returncode}\n" + r.stdout[-3000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def test_pretrain_example_runs_saves_and_resumes(tmp_path):
    log = _run(tmp_path, 2, "--synthetic", "--save-every", "100")
    assert "done: step 2" in log and "img_s" in log
    ckpt = str(tmp_path / "checkpoint.pt")
    state, _ = tu.load_checkpoint(ckpt)  # weights only
    assert state["step"] == 2 and "layers.0.blocks.0.attn.qkv.weight" in state["model"]
    assert len(state["optimizer"]["state"]) > 0
    w2 = state["model"]["decoder_pred.weight"].clone()

    log = _run(tmp_path, 3, "--synthetic", "--save-every", "100", "--resume", "--cpu-amp")
    assert "resumed from" in log and "at step 2" in log and "done: step 3" in log
    state, _ = tu.load_checkpoint(ckpt)
    assert state["step"] == 3
    assert not torch.equal(state["model"]["decoder_pred.weight"], w2)  # it trained one more step
    assert tu.load_checkpoint(tu.previous_path(ckpt), fallback=False)[0]["step"] == 2

    data = open(ckpt, "rb").read()
    open(ckpt, "wb").write(data[: len(data) // 3])  # damaged (e.g. a copy cut short)
    log = _run(tmp_path, 3, "--synthetic", "--save-every", "100", "--resume")
    assert f"checkpoint {ckpt} is damaged" in log and "resuming from the previous checkpoint" in log
    assert "at step 2" in log and "done: step 3" in log


# ---------------------------------------------------------------- a folder of good and broken images
def _png_bomb(path, w=50_000, h=50_000):
    """A valid little PNG whose header claims w x h pixels (a decompression bomb's signature)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4: ihdr + 12] = struct.pack(">II", w, h)
    data[ihdr + 17: ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr: ihdr + 17])))
    open(path, "wb").write(bytes(data))


BAD = ["bad_bomb.png", "bad_corrupt.png", "bad_empty.jpg", "bad_over_cap.png", "bad_text.jpg", "bad_truncated.jpg"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """10 good images in every awkward mode, 6 broken files, one non-image file (ignored)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)

    def rgb(w=40, h=36):
        return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())

    good = root / "cls_a"
    good.mkdir()
    for i in range(3):
        rgb().save(good / f"rgb{i}.jpg", quality=90)
    rgb().save(good / "rgb.png")
    rgb().convert("L").save(good / "gray.jpg")
    rgb().convert("CMYK").save(good / "cmyk.jpg")
    rgba = rgb().convert("RGBA")
    rgba.putalpha(128)
    rgba.save(good / "rgba.png")
    pal = rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    pal.save(good / "palette.png", transparency=3)
    Image.fromarray((torch.randint(0, 65536, (36, 40), generator=g).numpy()).astype("uint16")).save(good / "gray16.png")
    rgb().convert("1").save(good / "bits.bmp")
    bad = root / "cls_b"
    bad.mkdir()
    buf = io.BytesIO()
    rgb().save(buf, "JPEG", quality=95)
    (bad / "bad_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bad / "bad_empty.jpg").write_bytes(b"")
    (bad / "bad_text.jpg").write_text("not an image\n" * 20)
    _png_bomb(bad / "bad_bomb.png")
    rgb(60, 60).save(bad / "bad_over_cap.png")  # 3600 pixels > --max-image-pixels 3000
    png = io.BytesIO()
    rgb().save(png, "PNG")
    data = png.getvalue()
    (bad / "bad_corrupt.png").write_bytes(data[:60] + bytes(b ^ 0x5A for b in data[60:]))
    (root / "README.txt").write_text("not an image file: not listed")
    return root


STEPS = 8
FOLDER_ARGS = ("--workers", "2", "--max-image-pixels", "3000", "--save-every", "3")


def _losses(path):
    """{step: [loss bits of every time the step ran]} from --loss-log."""
    out = {}
    for line in open(path):
        step, h = line.split()
        out.setdefault(int(step), []).append(float.fromhex(h))
    return out


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    log = _run(out, STEPS, "--data", str(image_folder), "--loss-log", str(out / "loss.txt"), *FOLDER_ARGS)
    return log, _losses(out / "loss.txt")


def test_broken_images_are_skipped_and_reported(uninterrupted):
    log, losses = uninterrupted
    assert f"done: step {STEPS}" in log and sorted(losses) == list(range(1, STEPS + 1))
    # 16 listed files, 4 batches of 4 per epoch: two whole epochs, each reporting every bad file once.
    for epoch in (0, 1):
        head = f"skipped 6 unreadable sample(s) in epoch {epoch}"
        assert head in log, log[-3000:]
        report = log.split(head)[1].split("data:")[0].split("done:")[0]
        for name in BAD:
            assert name in report, (name, report)
        assert "README" not in report
    assert "bad_over_cap.png: BadSample: 60x60 = 3600 pixels exceeds the cap of 3000" in log
    assert "bad_bomb.png: BadSample: Image size (2500000000 pixels)" in log
    assert "bad_truncated.jpg: OSError: image file is truncated" in log and "bad_empty.jpg: BadSample: empty file" in log
    assert "skipped 12 unreadable sample(s)" in log  # 6 per epoch, in the final line


def _assert_same_curve(resumed, reference):
    assert sorted(resumed) == sorted(reference)
    for step, vals in resumed.items():  # every time a step ran (before the kill and again after it)
        assert all(v == reference[step][0] for v in vals), (step, vals, reference[step])


def test_sigkill_at_a_chosen_step_then_resume_is_bit_exact(image_folder, uninterrupted, tmp_path):
    loss = str(tmp_path / "loss.txt")
    args = ("--data", str(image_folder), "--loss-log", loss, *FOLDER_ARGS)
    _run(tmp_path, STEPS, *args, "--kill-after-step", "5", expect_rc=-signal.SIGKILL)
    assert sorted(_losses(loss)) == [1, 2, 3, 4, 5]
    log = _run(tmp_path, STEPS, *args, "--resume")
    # Checkpoint of step 3: mid-epoch 0 (batch 3 of 4); skips seen before the kill are kept.
    assert "at step 3 (epoch 0, batch 3)" in log
    assert "skipped 6 unreadable sample(s) in epoch 0" in log
    _assert_same_curve(_losses(loss), uninterrupted[1])


def test_sigkill_from_outside_then_resume_is_bit_exact(image_folder, uninterrupted, tmp_path):
    loss = tmp_path / "loss.txt"
    args = ("--data", str(image_folder), "--loss-log", str(loss), "--workers", "2", "--max-image-pixels", "3000",
            "--save-every", "1")  # a save every step: the kill may well land inside one
    p = subprocess.Popen(_cmd(tmp_path, STEPS, *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    t0 = time.monotonic()
    while (not loss.exists() or len(loss.read_text().splitlines()) < 3) and p.poll() is None:
        assert time.monotonic() - t0 < 240, "the run made no progress"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    log = _run(tmp_path, STEPS, *args, "--resume")
    assert "resumed from" in log
    _assert_same_curve(_losses(loss), uninterrupted[1])


def test_resume_refuses_a_planted_checkpoint(tmp_path):
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    tu.save_checkpoint(str(tmp_path / "checkpoint.pt"), {"model": {}, "optimizer": {}, "step": 0, "data": {},
                                                        "rng": [], "x": Planted()})
    r = _proc(_cmd(tmp_path, 1, "--synthetic", "--resume"))
    assert r.returncode != 0 and "checkpoint.pt was refused" in r.stderr, r.stderr[-3000:]
    assert not marker.exists()


def _torchrun(out, steps, *extra, expect_ok=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
           "--model", "mixmim_tiny", "--batch-size", "2", "--steps", str(steps), "--log-every", "1", "--out", str(out),
           *extra]
    r = _proc(cmd)
    assert (r.returncode == 0) == expect_ok, f"rc {r.returncode}\n" + r.stdout[-3000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


def test_ddp_bad_files_do_not_stall_and_resume_is_bit_exact(image_folder, tmp_path):
    """Two gloo ranks on the CPU: bad files land on both ranks' shares (each replaced, so both keep
    the same batch count); the skip report sums the ranks; a killed run resumes bit-exactly with
    every rank's RNG state restored."""
    args = ("--data", str(image_folder), "--workers", "0", "--max-image-pixels", "3000", "--save-every", "3")
    a = tmp_path / "a"
    log = _torchrun(a, 6, *args, "--loss-log", str(a / "loss.txt"))
    assert "done: step 6" in log and "skipped 6 unreadable sample(s) in epoch 0" in log
    b = tmp_path / "b"
    _torchrun(b, 6, *args, "--loss-log", str(b / "loss.txt"), "--kill-after-step", "4", expect_ok=False)
    log = _torchrun(b, 6, *args, "--loss-log", str(b / "loss.txt"), "--resume")
    assert "at step 3 (epoch 0, batch 3)" in log  # 16 files / 2 ranks / batch 2: 4 batches per epoch
    _assert_same_curve(_losses(b / "loss.txt"), _losses(a / "loss.txt"))


# ---------------------------------------------------------------- every recipe; multi-process equivalence
PRETRAIN = os.path.join(ROOT, "examples", "pretrain.py")
RECIPES = {"mixmim": "mixmim_tiny", "ummae": "ummae_swin_tiny_test", "simmim": "simmim_swinv2_tiny_test",
           "simmim-swin": "simmim_swin_tiny_test"}


def _pretrain(out, steps, method, model, *extra, nproc=1, batch=4, expect_rc=0):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd = launcher + [PRETRAIN, "--method", method, "--model", model, "--synthetic", "--batch-size", str(batch),
                      "--steps", str(steps), "--log-every", "1", "--out", str(out), *extra]
    r = _proc(cmd)
    assert r.returncode == expect_rc, f"rc {r.returncode}\n" + r.stdout[-3000:] + r.stderr[-4000:]
    return r.stdout + r.stderr


@pytest.mark.parametrize("recipe", RECIPES)
def test_each_recipe_trains_saves_and_resumes_exactly(recipe, tmp_path):
    """Killed (SIGKILL) right after the checkpoint of step 2, resumed: the same losses (bit for bit) and
    weights as 3 uninterrupted steps (same --steps: the lr schedule depends on it)."""
    method, model = recipe.split("-")[0], RECIPES[recipe]
    a, b = tmp_path / "a", tmp_path / "b"
    log = _pretrain(a, 3, method, model, "--save-every", "2", "--loss-log", str(a / "loss.txt"))
    assert "done: step 3" in log and "img_s" in log
    args = (method, model, "--save-every", "2", "--loss-log", str(b / "loss.txt"))
    _pretrain(b, 3, *args, "--kill-after-step", "2", expect_rc=-signal.SIGKILL)
    state, _ = tu.load_checkpoint(str(b / "checkpoint.pt"))
    assert state["step"] == 2 and state["args"]["method"] == method and len(state["optimizer"]["state"]) > 0
    log = _pretrain(b, 3, *args, "--resume")
    assert "at step 2" in log and "done: step 3" in log
    _assert_same_curve(_losses(b / "loss.txt"), _losses(a / "loss.txt"))
    wa, wb = (tu.load_checkpoint(str(d / "checkpoint.pt"))[0]["model"] for d in (a, b))
    assert list(wa) == list(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_old_script_name_runs_the_mixmim_recipe(tmp_path):
    log = _run(tmp_path, 1, "--synthetic")
    state, _ = tu.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert "done: step 1" in log and state["args"]["method"] == "mixmim"


def _params(path):
    return torch.load(path, weights_only=True)


STEPS_2P = 3
LR = ("--lr", "0.1")  # batch 4: lr 1.6e-3, a visible change in 3 AdamW steps
LR_PER_STEP = 0.1 * 4 / 256  # --lr is for batch 256, scaled linearly (examples/pretrain.py)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """{method: full parameters} after 3 steps of one process at batch 4 (the reference of 2 x batch 2)."""
    out = {}
    for method in ("simmim", "ummae"):
        d = tmp_path_factory.mktemp(f"one_{method}")
        _pretrain(d, STEPS_2P, method, RECIPES[method], *LR, "--dump-params", str(d / "p.pt"), batch=4)
        _pretrain(d / "init", 0, method, RECIPES[method], "--dump-params", str(d / "init.pt"), batch=4)
        out[method] = _params(d / "p.pt.rank0")
        init = _params(d / "init.pt.rank0")
        assert max((out[method][k] - init[k]).abs().max().item() for k in init) > 1e-3  # it did train
    return out


@pytest.mark.parametrize("method,wrap", [("simmim", "ddp"), ("simmim", "fsdp"), ("ummae", "fsdp")])
def test_two_processes_match_one_process(one_process, method, wrap, tmp_path):
    """torchrun --nproc_per_node 2 on the CPU (gloo): the ranks end with identical parameters, equal
    (to float rounding) to one process at twice the batch: the masks are drawn per image in the data
    pipeline, seeded by (seed, epoch, image), and the two ranks' batches are the one process's halves."""
    extra = ("--fsdp",) if wrap == "fsdp" else ()
    log = _pretrain(tmp_path, STEPS_2P, method, RECIPES[method], *LR, *extra, "--dump-params", str(tmp_path / "p.pt"),
                    nproc=2, batch=2)
    assert f"done: step {STEPS_2P}" in log
    r0, r1, one = _params(tmp_path / "p.pt.rank0"), _params(tmp_path / "p.pt.rank1"), one_process[method]
    assert list(r0) == list(one)
    for k in one:
        assert torch.equal(r0[k], r1[k]), f"ranks differ in {k}"
        # AdamW's first steps move each weight by about lr * sign(grad): a gradient near 0 whose rounding
        # differs between the two reductions can move by a small fraction of lr (seen: 1.8e-5 on 1 of 12288
        # elements); wrong data or masks would move most weights by ~lr = 1.6e-3.
        a, b = r0[k], one[k]
        if k.endswith("qkv.bias"):
            # The key third's gradient is 0 up to rounding (softmax ignores a per-row constant, and q.b_k is
            # one): AdamW turns that noise into steps of up to lr (seen: 1.9e-4 on 6 of 96 entries). Bounded
            # there by the steps' size; the query and value thirds are compared as everything else.
            kb = torch.zeros_like(a, dtype=torch.bool).view(3, -1)
            kb[1] = True
            kb = kb.view(-1)
            assert (a[kb] - b[kb]).abs().max().item() <= 2 * STEPS_2P * LR_PER_STEP, k
            a, b = a[~kb], b[~kb]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    if wrap == "fsdp":  # sharded checkpoint: every rank's shards plus meta.pt, no single full file
        assert (tmp_path / "checkpoint.dcp" / "meta.pt").exists() and not (tmp_path / "checkpoint.pt").exists()
        # ... resumable at another world size: one process loads it (resharded) exactly
        log = _pretrain(tmp_path, STEPS_2P, method, RECIPES[method], *LR, "--resume", "--dump-params",
                        str(tmp_path / "q.pt"), batch=4)
        assert f"resumed from {tmp_path / 'checkpoint.dcp'} at step {STEPS_2P}" in log
        q = _params(tmp_path / "q.pt.rank0")
        assert all(torch.equal(q[k], r0[k]) for k in r0)
