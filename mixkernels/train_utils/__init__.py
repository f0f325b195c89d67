"""Reusable pieces of the pretraining scripts (examples/): crash-safe checkpoints with exact
resume, and data loading that resumes mid-epoch and survives bad files."""
from .checkpoint import (CheckpointError, UnsafeCheckpointError, gather_rng_states, load_checkpoint, previous_path,
                         restore_rng_states, rng_state, save_checkpoint, set_rng_state)
from .data import (BadSample, EpochBatches, ImageFiles, ResumableSampler, SeededSamples, collate, load_rgb,
                   report_skipped)

__all__ = [
    "BadSample", "CheckpointError", "EpochBatches", "ImageFiles", "ResumableSampler", "SeededSamples",
    "UnsafeCheckpointError", "collate", "gather_rng_states", "load_checkpoint", "load_rgb", "previous_path",
    "report_skipped", "restore_rng_states", "rng_state", "save_checkpoint", "set_rng_state",
]
