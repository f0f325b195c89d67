"""Checkpoints never lose work and never run code; data loading resumes exactly (mixkernels.train_utils)."""
import os
import random
import stat
import warnings

import numpy as np
import pytest
import torch

from mixkernels import train_utils as tu
from mixkernels.train_utils import checkpoint as ck


def _state(step=1):
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters(), betas=(0.9, 0.95))
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optimizer": opt.state_dict(), "step": step, "rng": [tu.rng_state()],
            "data": {"epoch": 0, "batch_in_epoch": 2, "skipped": [["a.jpg", "OSError: truncated"]]},
            "args": {"lr": 1e-3, "out": "x", "resume": True, "none": None}}


def test_round_trip_keeps_previous_and_cleans_up(tmp_path):
    path = str(tmp_path / "ck.pt")
    (tmp_path / ".ck.pt.123.tmp").write_bytes(b"left by a crashed save")
    tu.save_checkpoint(path, _state(1))
    tu.save_checkpoint(path, _state(2))
    state, src = tu.load_checkpoint(path, required=("model", "step"))
    assert src == path and state["step"] == 2 and state["data"]["skipped"] == [["a.jpg", "OSError: truncated"]]
    prev, src = tu.load_checkpoint(tu.previous_path(path), fallback=False)
    assert prev["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "ck.pt.prev"]  # no temporary files left
    mode = stat.S_IMODE(os.stat(path).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert tu.load_checkpoint(str(tmp_path / "missing.pt")) is None


def test_save_is_durable(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tu.save_checkpoint(str(tmp_path / "ck.pt"), _state())
    assert synced == [False, True]  # the file's data before the rename, the folder entry after it


def test_crash_while_writing_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ck.pt")
    tu.save_checkpoint(path, _state(1))
    real = torch.save

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        tu.save_checkpoint(path, _state(2))
    monkeypatch.setattr(torch, "save", real)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    assert tu.load_checkpoint(path)[0]["step"] == 1


def test_crash_between_the_renames_falls_back(tmp_path):
    path = str(tmp_path / "ck.pt")
    tu.save_checkpoint(path, _state(1))
    os.replace(path, tu.previous_path(path))  # as if killed after rotating, before the new one landed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, src = tu.load_checkpoint(path)  # nothing damaged: no warning
    assert src == tu.previous_path(path) and state["step"] == 1


def _damage(path, how):
    data = open(path, "rb").read()
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = b"\x00not a checkpoint at all" * 10
    elif how == "bitflip":
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    open(path, "wb").write(data)


@pytest.mark.parametrize("how", ["empty", "truncated", "garbage", "bitflip"])
def test_damaged_checkpoint_names_the_file_and_falls_back(tmp_path, how):
    path = str(tmp_path / "ck.pt")
    tu.save_checkpoint(path, _state(1))
    tu.save_checkpoint(path, _state(2))
    _damage(path, how)
    with pytest.raises(tu.CheckpointError, match="ck.pt"):
        tu.load_checkpoint(path, fallback=False)
    with pytest.warns(RuntimeWarning, match=r"ck\.pt .*previous checkpoint .*ck\.pt\.prev"):
        state, src = tu.load_checkpoint(path)
    assert src.endswith("ck.pt.prev") and state["step"] == 1
    _damage(tu.previous_path(path), "truncated")
    with pytest.raises(tu.CheckpointError) as info:
        tu.load_checkpoint(path)
    assert "ck.pt " in str(info.value) and "ck.pt.prev" in str(info.value)


def test_incomplete_or_foreign_checkpoint_is_rejected(tmp_path):
    path = str(tmp_path / "ck.pt")
    tu.save_checkpoint(path, {"step": 3})
    with pytest.raises(tu.CheckpointError, match=r"ck\.pt is incomplete: missing \['model'\]"):
        tu.load_checkpoint(path, required=("model", "step"))
    torch.save({"model": {}, "step": 1}, path)  # the example's old, unversioned format
    with pytest.raises(tu.CheckpointError, match="not a mixkernels checkpoint"):
        tu.load_checkpoint(path)


class _Planted:
    """Unpickling this creates a folder: stands for any code a planted checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_callable_is_refused_and_never_runs(tmp_path):
    marker = str(tmp_path / "pwned")
    path = str(tmp_path / "ck.pt")
    tu.save_checkpoint(path, _state(1))
    tu.save_checkpoint(path, {**_state(2), "extra": _Planted(marker)})
    with pytest.raises(tu.UnsafeCheckpointError, match=r"ck\.pt was refused.*nothing in it was run"):
        tu.load_checkpoint(path)  # no silent fallback to the previous one either
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)  # the payload is live: full unpickling runs it
    assert os.path.exists(marker)


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    path = str(tmp_path / "ck.pt")
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.randn()  # numpy keeps a cached gaussian: part of the state
    tu.save_checkpoint(path, {"rng": [tu.rng_state()]})
    want = (torch.rand(3), random.random(), np.random.randn(3))
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    assert tu.restore_rng_states(tu.load_checkpoint(path)[0]["rng"])
    got = (torch.rand(3), random.random(), np.random.randn(3))
    assert torch.equal(got[0], want[0]) and got[1] == want[1] and np.array_equal(got[2], want[2])
    with pytest.warns(RuntimeWarning, match="2 ranks"):
        assert not tu.restore_rng_states([tu.rng_state()] * 2, 0, 1)


def test_sampler_splits_epochs_and_resumes_mid_epoch():
    n, world = 11, 3
    samplers = [tu.ResumableSampler(n, rank=r, world=world, seed=5) for r in range(world)]
    for e in range(3):
        keys = []
        for s in samplers:
            s.set_epoch(e)
            keys += list(s)
        assert len(keys) == 9 and all(k[0] == e for k in keys) and len({k[1] for k in keys}) == 9
    s = samplers[1]
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=2)
    assert list(s) == full[2:] and len(s) == 1
    s.set_epoch(1)
    assert list(s) != full  # a new permutation per epoch
    with pytest.raises(ValueError, match="start must be in"):
        s.set_epoch(0, start=4)


class _Augmented(torch.utils.data.Dataset):
    """Random 'augmentation' from every global RNG; some indices fail like unreadable files."""

    def __len__(self):
        return 6

    def path(self, i):
        return f"img{i}.jpg"

    def __getitem__(self, i):
        if i in (2, 3):
            raise OSError("image file is truncated")
        return torch.tensor([float(i), torch.rand(()).item(), random.random(), np.random.rand()])


def test_seeded_samples_are_a_function_of_epoch_and_index():
    ds = tu.SeededSamples(_Augmented(), seed=7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, skipped = ds[(1, 4)]
    assert torch.equal(torch.get_rng_state(), before)  # the training process's RNG is untouched
    torch.manual_seed(123), random.seed(123)
    assert torch.equal(ds[(1, 4)][0], a) and not skipped
    assert not torch.equal(ds[(2, 4)][0], a)  # another epoch, another augmentation
    # Bad samples: replaced by the next good one, reported.
    b, skipped = ds[(0, 2)]
    assert b[0] == 4 and skipped == [("img2.jpg", "OSError: image file is truncated"),
                                     ("img3.jpg", "OSError: image file is truncated")]
    batch, rep = tu.collate([ds[(0, 1)], ds[(0, 2)]])
    assert batch.shape == (2, 4) and len(rep) == 2
    with pytest.raises(tu.BadSample, match="2 consecutive samples could not be loaded"):
        tu.SeededSamples(_Augmented(), max_tries=2)[(0, 2)]
