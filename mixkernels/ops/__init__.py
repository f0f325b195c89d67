"""The public ops: validation, backend choice, autograd and torch.library registration.

``OPERATORS_REGISTRY`` (``mixkernels.ops.registry``) lists every public op with its backends,
kernel-level ops and example calls; docs/ARCHITECTURE.md describes the layers.
"""
from ._dispatch import BACKENDS, BackendUnavailable, select
from .losses import masked_recon_loss, mixmim_loss, simmim_loss
from .mixing import mix_tokens, unmix_tokens
from .registry import OPERATORS_REGISTRY
from .uniform import uniform_masks, uniform_sample, uniform_scatter
from .window_attention import window_attention
from .windows import window_merge, window_partition

# The package's public names (``mixkernels`` re-exports exactly these); tests/test_registry.py
# checks that the ops among them are the registry's.
__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "masked_recon_loss",
    "mix_tokens",
    "mixmim_loss",
    "simmim_loss",
    "uniform_masks",
    "uniform_sample",
    "uniform_scatter",
    "unmix_tokens",
    "window_attention",
    "window_merge",
    "window_partition",
]
