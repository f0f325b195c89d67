"""SimMIM pretraining model (microsoft/SimMIM semantics) with a Swin or SwinV2 encoder on the fused ops.

Official structure this follows (``models/simmim.py``, ``data/data_simmim.py``):
* mask: per image, ``ceil(ratio * n)`` of the ``(img / mask_patch)^2`` mask patches (32 px,
  ratio 0.6), upsampled to the model's patch grid (``repeat_interleave``);
* encoder: patch embed (conv + LayerNorm) -> masked patches replaced by one learnable
  ``mask_token`` -> Swin stages (blocks alternate shift 0 / window // 2, windows clamped to the
  resolution; patch merging at the end of every stage but the last) -> LayerNorm -> ``(B, C, h, w)``
  at stride ``encoder_stride = patch * 2**(stages-1)`` (32);
  Swin: pre-norm blocks, merging = norm then reduction; SwinV2: post-norm blocks with cosine
  attention and the CPB MLP, merging = reduction then norm, block norms zero-initialized
  (``_init_respostnorm``);
* decoder: ``Conv2d(C, encoder_stride**2 * 3, 1)`` + ``PixelShuffle(encoder_stride)`` to a
  full-resolution reconstruction;
* loss: ``(|x - x_rec| * M).sum() / (M.sum() + 1e-5) / 3`` with ``M`` the pixel mask.

Here the window attention (plain or cosine) and the loss are the mixkernels ops (``backend``
picks the implementation; ``reference=True`` routes every op to the reference). Two deliberate
differences: the mask token is selected with ``torch.where`` (the official ``x*(1-w) + tok*w``
lets a NaN of a masked patch through), and the loss has no ``+1e-5`` (a mean over zero masked
pixels is NaN, as for the other losses; it changes a real loss by ~1e-9 relative).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn.swin_block import SwinBlock
from ..nn.swinv2_block import SwinV2Block
from ._common import PatchEmbed
from .mixmim import PatchMerging

__all__ = ["SimMIM", "MaskGenerator", "PatchMergingV2", "simmim_swin_tiny_test", "simmim_swinv2_tiny_test", "simmim_swin_base",
           "simmim_swinv2_base"]


class MaskGenerator:
    """SimMIM's ``MaskGenerator``: ``ceil(ratio * n)`` of the ``n = (img / mask_patch)^2`` mask
    patches, upsampled to the model's patch grid: bool ``(B, img/p, img/p)``. Picklable (data
    loader workers can draw the masks with the images, as SimMIM's data pipeline does)."""

    def __init__(self, img_size: int = 192, mask_patch_size: int = 32, model_patch_size: int = 4,
                 mask_ratio: float = 0.6):
        if img_size % mask_patch_size or mask_patch_size % model_patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of mask_patch_size {mask_patch_size}, itself a "
                             f"multiple of the model's patch size {model_patch_size}")
        self.grid = img_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.count = int(math.ceil(self.grid ** 2 * mask_ratio))

    def __call__(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        g, n = self.grid, self.grid ** 2
        noise = torch.rand(batch, n, device=device, generator=generator)
        m = (noise.argsort(1).argsort(1) < self.count).reshape(batch, g, g)
        return m.repeat_interleave(self.scale, 1).repeat_interleave(self.scale, 2)


class PatchMergingV2(PatchMerging):
    """SwinV2 patch merging: the same 2x2 concat, then ``reduction`` and *then* ``norm`` (post-norm)."""

    def __init__(self, dim: int, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__(dim, norm_layer)
        self.norm = norm_layer(2 * dim)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.norm(self.reduction(x))


class SimMIMStage(nn.Module):
    def __init__(self, v2: bool, dim, resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias, drop_path,
                 norm_layer, downsample: bool, backend):
        super().__init__()
        block = SwinV2Block if v2 else SwinBlock
        self.blocks = nn.ModuleList([
            block(dim, resolution, num_heads=num_heads, window_size=window_size,
                  shift_size=0 if i % 2 == 0 else window_size // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                  drop_path=drop_path[i], norm_layer=norm_layer, backend=backend)
            for i in range(depth)
        ])
        merge = PatchMergingV2 if v2 else PatchMerging
        self.downsample = merge(dim, norm_layer) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class SimMIM(nn.Module):
    """SimMIM with a Swin (``encoder="swin"``) or SwinV2 (``"swinv2"``) encoder.

    ``forward(imgs, mask=None)`` returns ``(loss, x_rec, mask)``: ``x_rec`` ``(B, 3, H, W)`` the
    full-resolution reconstruction, ``mask`` bool ``(B, H/p, W/p)`` on the model's patch grid
    (True = masked = counted in the loss), drawn by :meth:`random_masks` when not given.
    """

    def __init__(
        self,
        encoder: str = "swin",
        img_size: int = 192,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        backend: Optional[str] = None,
        reference: bool = False,
    ):
        super().__init__()
        if encoder not in ("swin", "swinv2"):
            raise ValueError(f"encoder must be 'swin' or 'swinv2', got {encoder!r}")
        S = len(depths)
        self.encoder_name = encoder
        self.encoder_stride = patch_size * 2 ** (S - 1)
        if img_size % self.encoder_stride:
            raise ValueError(f"img_size {img_size} must be a multiple of the encoder stride {self.encoder_stride}")
        self.mask_generator = MaskGenerator(img_size, mask_patch_size, patch_size, mask_ratio)
        self.img_size, self.patch_size, self.in_chans, self.embed_dim = img_size, patch_size, in_chans, embed_dim
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio
        self.num_features = embed_dim * 2 ** (S - 1)
        self.backend = "reference" if reference else backend
        grid = img_size // patch_size
        self.patch_grid = (grid, grid)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList([
            SimMIMStage(encoder == "swinv2", embed_dim * 2 ** i, (grid // 2 ** i, grid // 2 ** i), depths[i],
                        num_heads[i], window_size, mlp_ratio, qkv_bias, dpr[sum(depths[:i]):sum(depths[:i + 1])],
                        norm_layer, i < S - 1, self.backend)
            for i in range(S)
        ])
        self.norm = norm_layer(self.num_features)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.num_features, self.encoder_stride ** 2 * in_chans, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if self.encoder_name == "swinv2":  # res-post-norm: every block starts as the identity
            for layer in self.layers:
                for blk in layer.blocks:
                    for norm in (blk.norm1, blk.norm2):
                        nn.init.zeros_(norm.weight)
                        nn.init.zeros_(norm.bias)

    def set_backend(self, backend: Optional[str]) -> None:
        self.backend = backend
        for m in self.modules():
            if isinstance(m, (SwinBlock, SwinV2Block)):
                m.backend = backend

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"mask_token"}

    def random_masks(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
        """SimMIM's masks (:class:`MaskGenerator`): per image ``ceil(ratio * n)`` of the ``n`` mask
        patches, bool ``(B, H/p, W/p)`` on the model's patch grid."""
        return self.mask_generator(batch, device, generator)

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """``imgs`` ``(B, 3, H, W)``, ``mask`` ``(B, H/p, W/p)`` -> ``(B, C, H/stride, W/stride)``."""
        x = self.patch_embed(imgs)  # (B, h, w, C)
        x = torch.where(mask.unsqueeze(-1), self.mask_token.to(x.dtype).reshape(1, 1, 1, -1), x)
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).permute(0, 3, 1, 2)

    def forward(self, imgs: Tensor, mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        if mask is None:
            mask = self.random_masks(imgs.shape[0], imgs.device)
        mask = mask.bool()
        x_rec = self.decoder(self.forward_encoder(imgs, mask))
        loss = ops.simmim_loss(x_rec, imgs, mask, self.patch_size, backend=self.backend)
        return loss, x_rec, mask


def _make(defaults: dict, kwargs: dict) -> SimMIM:
    defaults.update(kwargs)
    return SimMIM(**defaults)


def simmim_swin_tiny_test(**kwargs) -> SimMIM:
    """CPU-test-sized SimMIM-Swin: 32 px, patch 4, mask patches 8 px, two stages, head_dim 16."""
    return _make(dict(encoder="swin", img_size=32, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4),
                      window_size=4, mask_patch_size=8, drop_path_rate=0.0), kwargs)


def simmim_swinv2_tiny_test(**kwargs) -> SimMIM:
    """CPU-test-sized SimMIM-SwinV2 (cosine attention, CPB MLP)."""
    return simmim_swin_tiny_test(**dict(dict(encoder="swinv2"), **kwargs))


def simmim_swin_base(**kwargs) -> SimMIM:
    """SimMIM's Swin-B: 192 px, window 6, depths 2-2-18-2, heads 4-8-16-32."""
    return _make(dict(encoder="swin"), kwargs)


def simmim_swinv2_base(**kwargs) -> SimMIM:
    """SimMIM's SwinV2-B: 192 px, window 12."""
    return _make(dict(encoder="swinv2", window_size=12), kwargs)
