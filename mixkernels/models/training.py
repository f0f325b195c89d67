"""One training step (forward + backward + AdamW) of a named model, for benchmarks and smoke tests."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

__all__ = ["make_training_step", "TrainingStep", "MODEL_NAMES"]

MODEL_NAMES = (
    "mixmim_tiny", "mixmim_base", "mixmim_large", "mixmim_huge",
    "ummae_swin_tiny_test", "ummae_swin_tiny", "ummae_swin_large",
    "swin_tiny", "swin_base",
)


class TrainingStep:
    """Callable: one fwd+bwd+AdamW step on fixed synthetic images; returns the (unsynced) loss.

    Attributes: ``model`` (possibly compiled), ``module`` (the eager model), ``optimizer``,
    ``images``, ``batch``, ``name``, ``fused``, ``compiled``.
    """

    def __init__(self, name: str, module: nn.Module, model: Callable, loss_fn: Callable[[Callable], Tensor],
                 images: Tensor, autocast_dtype: Optional[torch.dtype], fused: bool, compiled: bool):
        self.name, self.module, self.model, self.images = name, module, model, images
        self.batch = images.shape[0]
        self.fused, self.compiled = fused, compiled
        self._loss_fn = loss_fn
        self._autocast = autocast_dtype
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1.5e-4,
                                           betas=(0.9, 0.95), weight_decay=0.05)

    def _ctx(self):
        if self._autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.images.device.type, dtype=self._autocast)

    def __call__(self) -> Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with self._ctx():
            loss = self._loss_fn(self.model)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _build(name: str, fused: bool):
    from . import mixmim, ummae

    if name.startswith("mixmim_"):
        model = getattr(mixmim, name)(reference=not fused)
        return model, model.img_size, lambda m, x: m(x)[0]
    if name.startswith("ummae_"):
        model = getattr(ummae, name)(reference=not fused)
        return model, model.img_size, lambda m, x: m(x)[0]
    if name in ("swin_tiny", "swin_base"):
        from .._compat import import_timm

        import_timm()
        import timm

        arch = {"swin_tiny": "swin_tiny_patch4_window7_224", "swin_base": "swin_base_patch4_window7_224"}[name]
        model = timm.create_model(arch, pretrained=False, drop_path_rate=0.0)
        if fused:
            from ..swap import swap_swin

            swap_swin(model)
        n_cls = model.num_classes

        def loss(m, x):
            logits = m(x)
            target = torch.arange(x.shape[0], device=x.device) % n_cls
            return nn.functional.cross_entropy(logits.float(), target)

        return model, 224, loss
    raise ValueError(f"model_name must be one of {MODEL_NAMES}, got {name!r}")


def make_training_step(model_name: str, fused: bool, compile: bool, batch: int, device="cuda",
                       dtype: Optional[torch.dtype] = torch.bfloat16, seed: int = 0) -> TrainingStep:
    """Build a model and return a :class:`TrainingStep`.

    Args:
        model_name: one of :data:`MODEL_NAMES`.
        fused: True = mixkernels ops with automatic backends (MixMIM/UM-MAE) or ``swap_swin``
            (timm Swin); False = the official-style eager model (every op on the reference
            path, which materializes the partition, the N x N bias and masks and the
            probabilities as the official code does) or plain timm Swin.
        compile: wrap the model in ``torch.compile``.
        batch: images per step.
        device: where to run.
        dtype: autocast dtype (e.g. ``torch.bfloat16``); ``None`` or ``torch.float32`` = no autocast.
    """
    torch.manual_seed(seed)
    module, img, loss = _build(model_name, fused)
    device = torch.device(device)
    module = module.to(device).train()
    model = torch.compile(module) if compile else module
    images = torch.randn(batch, 3, img, img, device=device)
    ac = None if dtype in (None, torch.float32) else dtype
    return TrainingStep(model_name, module, model, lambda m: loss(m, images), images, ac, fused, compile)
