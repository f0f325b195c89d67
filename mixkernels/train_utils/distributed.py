"""Multi-process pieces of the pretraining script: process group, DDP / FSDP2 wrapping, checkpoints.

Checkpoints come in two formats, both crash-safe and both loadable by any run (single process,
DDP or FSDP2, at any world size):

* **full** (``checkpoint.pt``): single process and DDP. One file with the full model and
  optimizer state, written by rank 0 through :func:`~.checkpoint.save_checkpoint` (atomic,
  digest-checked, ``.prev`` fallback).
* **sharded** (``checkpoint.dcp/``): FSDP2. Every rank writes its own shards through
  ``torch.distributed.checkpoint`` (no full gather on one rank, so it scales with the model);
  the small state (step, data position, RNG states) goes beside them in ``meta.pt``
  (:func:`~.checkpoint.save_checkpoint`). The folder is written as ``checkpoint.dcp.tmp`` and
  renamed into place by rank 0 once every rank is done (the previous one becomes
  ``checkpoint.dcp.prev``), so a crash leaves the last complete checkpoint. Loading reshards:
  ``torch.distributed.checkpoint`` maps the saved shards onto this run's (another world size,
  or no sharding at all).

:func:`load` picks the newest usable checkpoint of either format (by step), falling back to the
``.prev`` copies when the latest is damaged, the same choice on every rank.
"""
from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CheckpointError, UnsafeCheckpointError, _fsync_dir, load_checkpoint, previous_path, save_checkpoint

__all__ = ["setup", "wrap", "unwrap", "is_sharded", "save", "load", "full_model_state", "FULL", "SHARDED"]

FULL = "checkpoint.pt"
SHARDED = "checkpoint.dcp"


def setup() -> Tuple[int, int, int]:
    """``(rank, world, local rank)``; initializes the process group under torchrun (NCCL on CUDA, else gloo)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 1:
        return 0, 1, 0
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def wrap(model: nn.Module, *, fsdp: bool, world: int, device: torch.device,
         units: Sequence[Type[nn.Module]] = ()) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every module of a ``units`` type, then the root) when
    ``fsdp``; the model itself in a single process. Call before building the optimizer."""
    if world == 1:
        return model
    if fsdp:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:  # torch < 2.6
            from torch.distributed._composable.fsdp import fully_shard
        for m in [m for m in model.modules() if isinstance(m, tuple(units))]:
            fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 sharded the model's parameters (they are DTensors)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_model_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full (gathered, on CPU) model state dict, on every rank (a collective when sharded)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))  # (cpu_offload: rank 0 only)
        return {k: v.detach().cpu() for k, v in full.items()}
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


# ---------------------------------------------------------------- save
def save(out: str, model: nn.Module, opt: torch.optim.Optimizer, meta: Dict[str, Any], rank: int) -> str:
    """Checkpoint ``model``, ``opt`` and ``meta`` (step, data position, RNG states, ...) under
    ``out``: sharded when the model is, else one full file. Collective; returns the path."""
    if is_sharded(model):
        return _save_sharded(os.path.join(out, SHARDED), model, opt, meta, rank)
    path = os.path.join(out, FULL)
    raw = unwrap(model)
    if rank == 0:
        save_checkpoint(path, {"model": raw.state_dict(), "optimizer": opt.state_dict(), **meta})
    _barrier()
    return path


def _save_sharded(path: str, model, opt, meta, rank: int) -> str:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path + ".tmp"
    if rank == 0 and os.path.exists(tmp):  # a save that crashed
        shutil.rmtree(tmp)
    _barrier()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=tmp)
    if rank == 0:
        save_checkpoint(os.path.join(tmp, "meta.pt"), meta, keep_previous=False)
    _barrier()  # every rank's shards are on disk
    if rank == 0:
        prev = previous_path(path)
        if os.path.exists(path):
            if os.path.exists(prev):
                shutil.rmtree(prev)
            os.replace(path, prev)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    _barrier()
    return path


# ---------------------------------------------------------------- load
def _candidates(out: str) -> Iterable[Tuple[str, str]]:
    """(kind, path) of every checkpoint that may exist, newest first within a kind."""
    for kind, name in (("sharded", SHARDED), ("full", FULL)):
        p = os.path.join(out, name)
        yield kind, p
        yield kind, previous_path(p)


def _meta_of(kind: str, path: str, required: Sequence[str]) -> Dict[str, Any]:
    if kind == "sharded":
        found = load_checkpoint(os.path.join(path, "meta.pt"), required=required, fallback=False)
        if not os.path.exists(os.path.join(path, ".metadata")):
            raise CheckpointError(f"checkpoint {path} is incomplete: no torch.distributed.checkpoint metadata")
    else:
        found = load_checkpoint(path, required=("model", "optimizer") + tuple(required), fallback=False)
    if found is None:
        raise CheckpointError(f"checkpoint {path} is missing")
    return found[0]


def _choose(out: str, required: Sequence[str]) -> Tuple[Optional[Tuple[str, str]], list]:
    """Rank 0's choice of the newest usable checkpoint, and the problems met on the way."""
    best, problems = None, []
    for kind, path in _candidates(out):
        if not os.path.exists(path):
            continue
        try:
            meta = _meta_of(kind, path, required)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if best is None or meta["step"] > best[2]:
            best = (kind, path, meta["step"])
    return (best[:2] if best else None), problems


def load(out: str, model: nn.Module, opt: torch.optim.Optimizer, rank: int,
         required: Sequence[str] = ("step",)) -> Optional[Tuple[Dict[str, Any], str]]:
    """Load the newest usable checkpoint under ``out`` (either format, resharded as needed) into
    ``model`` and ``opt``; returns ``(meta, path)``, or None when there is none. Collective."""
    choice, problems, refused = None, [], None
    if rank == 0:
        try:
            choice, problems = _choose(out, required)
        except UnsafeCheckpointError as e:  # raised on every rank below: the others must not wait in the broadcast
            refused = str(e)
    if _distributed():
        box = [(choice, problems, refused)]
        dist.broadcast_object_list(box, src=0)
        choice, problems, refused = box[0]
    if refused is not None:
        raise UnsafeCheckpointError(refused)
    if problems and rank == 0 and choice is not None:
        what = "the previous checkpoint " if choice[1].endswith(".prev") else ""
        warnings.warn("; ".join(problems) + f"; resuming from {what}{choice[1]} instead", RuntimeWarning, stacklevel=2)
    if choice is None:
        if problems:
            raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
        return None
    kind, path = choice
    if kind == "sharded":
        return _load_sharded(path, model, opt, required), path
    state = _meta_of(kind, path, required)
    _set_full(model, opt, state.pop("model"), state.pop("optimizer"))
    return state, path


def _set_full(model, opt, msd, osd) -> None:
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    unwrap(model).load_state_dict(msd)
    opt.load_state_dict(osd)


def _load_sharded(path: str, model, opt, required) -> Dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    raw = model if is_sharded(model) else unwrap(model)
    msd, osd = get_state_dict(raw, opt)  # this run's layout (sharded or not): DCP reshards into it
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    set_state_dict(raw, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return _meta_of("sharded", path, required)
