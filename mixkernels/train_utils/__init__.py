"""Reusable pieces of the pretraining scripts (examples/): crash-safe checkpoints with exact
resume, data loading that resumes mid-epoch and survives bad files, and the multi-process
pieces (``train_utils.distributed``: DDP / FSDP2 wrapping, full or sharded checkpoints)."""
from .checkpoint import (CheckpointError, UnsafeCheckpointError, gather_rng_states, load_checkpoint, previous_path,
                         restore_rng_states, rng_state, save_checkpoint, set_rng_state)
from .data import (BadSample, EpochBatches, ImageFiles, ResumableSampler, SeededSamples, collate, load_rgb,
                   report_skipped)
from . import distributed  # noqa: E402

__all__ = [
    "BadSample", "CheckpointError", "distributed", "EpochBatches", "ImageFiles", "ResumableSampler", "SeededSamples",
    "UnsafeCheckpointError", "collate", "gather_rng_states", "load_checkpoint", "load_rgb", "previous_path",
    "report_skipped", "restore_rng_states", "rng_state", "save_checkpoint", "set_rng_state",
]
