"""Pure-PyTorch references: the executable spec every backend is tested against."""
from .losses import masked_recon_loss, mixmim_loss, patch_targets, patchify, simmim_loss, upsample_mask
from .mixing import mix_tokens, unmix_tokens
from .uniform import uniform_sample, uniform_scatter
from .window_attention import (
    merge_heads,
    relative_position_index,
    shift_region_ids,
    window_attention,
    window_attention_logits,
)
from .windows import window_merge, window_partition

__all__ = [
    "masked_recon_loss",
    "merge_heads",
    "mix_tokens",
    "mixmim_loss",
    "patch_targets",
    "patchify",
    "relative_position_index",
    "shift_region_ids",
    "simmim_loss",
    "uniform_sample",
    "uniform_scatter",
    "unmix_tokens",
    "upsample_mask",
    "window_attention",
    "window_attention_logits",
    "window_merge",
    "window_partition",
]
