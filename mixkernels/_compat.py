"""Import shims for optional dependencies (torchvision, timm) on CPU-only torch builds."""
from __future__ import annotations

import sys

import torch

__all__ = ["import_torchvision", "import_timm"]

_LIB = None  # keeps the torch.library fragment alive for the process lifetime


def _define_missing_torchvision_schemas() -> None:
    """torchvision wheels built against CUDA torch fail to load their ``_C`` ops on a CPU-only
    torch, and ``torchvision._meta_registrations`` then registers fakes for ``torchvision::nms``
    and ``torchvision::qnms``, which do not exist. Defining just the two schemas lets the
    import finish; calling them still fails (nothing here needs them)."""
    global _LIB
    if _LIB is not None or torch.version.cuda is not None:
        return
    ns = getattr(torch.ops, "torchvision", None)
    if ns is not None and hasattr(ns, "nms"):
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in ("nms", "qnms"):
        try:
            lib.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:  # already defined (the real extension loaded)
            pass
    _LIB = lib


def import_torchvision():
    """``import torchvision``, working around the missing op schemas on CPU-only torch."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    _define_missing_torchvision_schemas()
    import torchvision

    return torchvision


def import_timm():
    """``import timm`` (which imports torchvision) through :func:`import_torchvision`."""
    import_torchvision()
    import timm

    return timm
