"""Crash-safe training checkpoints.

* **Atomic and durable saves.** A checkpoint is written to a temporary file in the same
  folder, flushed and fsync'ed, the current checkpoint is renamed to ``<path>.prev`` (the
  fallback), the temporary file is renamed over ``<path>`` and the folder is fsync'ed. A
  crash at any point leaves ``<path>`` or ``<path>.prev`` complete, never a half-written file
  under either name.
* **Safe loading.** Only ``torch.load(weights_only=True)``: a checkpoint holds tensors,
  numbers, strings and containers of them (RNG states included: numpy's is stored as a
  tensor), so nothing needs full unpickling and a file carrying a pickled callable is refused
  (:class:`UnsafeCheckpointError`) before anything in it can run.
* **Damaged files** (empty, truncated, corrupted, not a checkpoint, missing keys) raise
  :class:`CheckpointError` naming the file. torch's zip format does not notice a flipped bit
  in tensor data, so every checkpoint carries a digest of its content, checked on load; :func:`load_checkpoint` then falls back to
  ``<path>.prev`` when that one is good, and says so.
* **Exact resume.** :func:`rng_state` / :func:`set_rng_state` capture and restore torch
  (CPU and every CUDA device), Python ``random`` and numpy's global generator.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import pickle
import random
import tempfile
import warnings
from typing import Any, Dict, Iterable, Optional, Tuple

import torch

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "previous_path",
    "rng_state",
    "set_rng_state",
    "gather_rng_states",
    "restore_rng_states",
]

FORMAT = 1  # bumped when the layout of what we save changes incompatibly


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged or not one of ours; the message names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds pickled objects that weights-only loading refuses (e.g. a callable)."""


def previous_path(path: str) -> str:
    """Where the checkpoint before the latest one is kept."""
    return os.fspath(path) + ".prev"


def _fsync_dir(folder: str) -> None:
    # A rename is durable only once the folder entry is on disk. Not every OS/filesystem lets
    # a folder be opened or fsync'ed (Windows, some network filesystems): best effort there.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _digest(obj: Any) -> str:
    """Content digest of a checkpoint state: tensor bytes, shapes and dtypes, and the plain values."""
    h = hashlib.blake2b(digest_size=16)

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        elif isinstance(x, dict):
            h.update(b"{%d" % len(x))
            for k, v in x.items():
                walk(k)
                walk(v)
        elif isinstance(x, (list, tuple)):
            h.update(b"[%d" % len(x) if isinstance(x, list) else b"(%d" % len(x))
            for v in x:
                walk(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    walk(obj)
    return h.hexdigest()


def save_checkpoint(path: str, state: Dict[str, Any], *, keep_previous: bool = True) -> None:
    """Write ``state`` (tensors, numbers, strings, containers) to ``path`` atomically and durably.

    The checkpoint that was at ``path`` becomes ``<path>.prev`` when ``keep_previous``.
    Leftover temporary files of saves that crashed are removed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = "." + os.path.basename(path) + "."
    for stale in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*.tmp")):
        with contextlib.suppress(OSError):
            os.unlink(stale)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a checkpoint gets the usual file mode
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, "digest": _digest(state), **state}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _reason(e: Exception) -> str:
    """The informative part of a loading error. torch's weights-only errors wrap it in advice to
    load with weights_only=False, which is exactly what must not be done with such a file."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(boiler)]
    lines = [ln.split(":", 1)[1].strip() if ln.startswith("WeightsUnpickler error") else ln for ln in lines]
    return " ".join(ln for ln in lines if ln) or type(e).__name__


def _load_one(path: str, map_location, required: Iterable[str]) -> Dict[str, Any]:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a save was interrupted or the disk was full")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in _reason(e):  # a reference to a callable/class: refused, never called
            raise UnsafeCheckpointError(
                f"checkpoint {path} was refused: it holds pickled objects that are not tensors or plain data "
                f"({_reason(e)}); weights-only loading never runs them: nothing in it was run") from None
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint ({_reason(e)})") from None
    except Exception as e:  # truncated/corrupted zip, wrong magic number, EOF, ...
        raise CheckpointError(f"checkpoint {path} is damaged or not a checkpoint ({type(e).__name__}: "
                              f"{_reason(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not a mixkernels checkpoint of format {FORMAT} (got {got!r})")
    digest = state.pop("digest", None)
    state.pop("format")
    if digest != _digest(state):
        raise CheckpointError(f"checkpoint {path} is corrupted: its content does not match the digest saved with it")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {missing}")
    return state


def load_checkpoint(path: str, *, map_location="cpu", required: Iterable[str] = (),
                    fallback: bool = True) -> Optional[Tuple[Dict[str, Any], str]]:
    """Load the checkpoint at ``path`` (weights-only), or ``<path>.prev`` if ``path`` is damaged.

    Returns ``(state, the file it came from)``, or None when neither file exists. A damaged
    ``path`` with a good ``<path>.prev`` warns (naming both) and returns the previous one; a
    refused (unsafe) file raises :class:`UnsafeCheckpointError` at once, without fallback.
    Raises :class:`CheckpointError` naming every file tried when none is usable.
    """
    path = os.fspath(path)
    tried = []
    for p in [path, previous_path(path)] if fallback else [path]:
        if not os.path.exists(p):
            continue
        try:
            state = _load_one(p, map_location, tuple(required))
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            tried.append(str(e))
            continue
        if tried:
            warnings.warn(f"{tried[0]}; resuming from the previous checkpoint {p} instead", RuntimeWarning, stacklevel=2)
        return state, p
    if tried:
        raise CheckpointError("no usable checkpoint: " + "; ".join(tried))
    return None


# ---------------------------------------------------------------- RNG state
def rng_state() -> Dict[str, Any]:
    """Every global random generator a training step may draw from, as tensors and numbers."""
    st: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
        st["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA only when the device count matches)."""
    torch.set_rng_state(st["torch"].cpu())
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in st:
        import numpy as np

        n = st["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        if len(st["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])
        else:
            warnings.warn(f"checkpoint holds CUDA RNG states of {len(st['cuda'])} devices, this process sees "
                          f"{torch.cuda.device_count()}: CUDA random streams are not restored", RuntimeWarning)


def gather_rng_states() -> list:
    """Every rank's :func:`rng_state`, in rank order (a collective call under torch.distributed)."""
    import torch.distributed as dist

    mine = rng_state()
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def restore_rng_states(states: list, rank: int = 0, world: int = 1) -> bool:
    """Restore this rank's entry of :func:`gather_rng_states`; False (and a warning) when the
    checkpoint was written by a different number of ranks."""
    if len(states) != world:
        warnings.warn(f"checkpoint holds RNG states of {len(states)} ranks, this run has {world}: "
                      f"random streams restart from the seed (the resumed run is not bit-identical)", RuntimeWarning)
        return False
    set_rng_state(states[rank])
    return True
