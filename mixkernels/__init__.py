"""mixkernels: fused kernels for masked-image-modeling pretraining of hierarchical ViTs.

Ops (each takes ``backend=None``; ``MIXKERNELS_BACKEND`` overrides): ``window_attention``,
``mix_tokens``, ``unmix_tokens``, ``window_partition``, ``window_merge``, ``uniform_sample``,
``uniform_scatter``, ``mixmim_loss``, ``masked_recon_loss`` (``mixkernels.ops.OPERATORS_REGISTRY``
lists them with their backends). ``python -m mixkernels.info`` reports what was built and which
backend each op uses here; docs/ARCHITECTURE.md describes the layers.
"""
from . import _ext  # noqa: F401  (loads the compiled extensions, never raises)
from . import reference
from . import ops as _ops
from .ops import *  # noqa: F401,F403  (the public ops: mixkernels/ops/__init__.py lists them once)

__version__ = "0.1.0"

__all__ = ["reference", *_ops.__all__]


def __getattr__(name):  # lazy: nn / models / swap_swin import timm-sized dependencies
    if name in ("nn", "models"):
        import importlib

        return importlib.import_module(f"mixkernels.{name}")
    if name == "swap_swin":
        from .swap import swap_swin

        return swap_swin
    raise AttributeError(f"module 'mixkernels' has no attribute {name!r}")
