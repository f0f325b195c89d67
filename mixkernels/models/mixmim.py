"""MixMIM / MixMAE pretraining model (Sense-X/MixMIM semantics) on the fused ops.

Official structure this follows (``models_mixmim.py``):
* one mask per batch, drawn on the encoder's output grid (7x7 at 224 px): the first
  ``int(L * ratio)`` positions of ``argsort(rand(L))`` are masked, then upsampled by nearest
  interpolation to every stage's grid;
* patch embed (conv + LayerNorm) -> mix (``x*(1-m) + x.flip(0)*m``) -> + fixed sin-cos
  absolute position embedding -> Swin stages without shifted windows, where a token attends
  only to tokens with the same mask value inside its window (same source image) -> PatchMerging
  between stages -> LayerNorm. The encoder outputs the mixed ``(B, L, C)`` tokens at stride 32;
* decoder: Linear to 512 -> un-mix into ``2B`` sequences with one learnable mask token
  (``x*(1-m) + tok*m`` and ``x*m + tok*(1-m)``) -> + fixed sin-cos decoder position embedding
  -> 8 timm ViT blocks -> LayerNorm -> Linear to ``32*32*3``;
* loss: ``pred[:B]*m + pred[B:].flip(0)*(1-m)`` against norm-pix patch-32 targets, plain mean.

Here mixing, the grouped window attention, un-mixing and the loss are the mixkernels ops
(``backend`` picks the implementation; ``reference=True`` routes every op to the reference).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn

from .. import ops
from ..nn.swin_block import SwinBlock
from ._common import DecoderBlock, PatchEmbed, init_weights, sincos_pos_embed_2d

__all__ = ["MixMIM", "PatchMerging", "mixmim_tiny", "mixmim_base", "mixmim_large", "mixmim_huge"]


class PatchMerging(nn.Module):
    """Swin patch merging on ``(B, H, W, C)``: concat of the 2x2 neighbours (order
    ``[0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2]``) -> ``norm`` -> ``reduction``."""

    def __init__(self, dim: int, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class MixMIMStage(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window_size, mlp_ratio, qkv_bias, drop_path,
                 norm_layer, downsample: bool, backend):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(dim, resolution, num_heads=num_heads, window_size=window_size, shift_size=0,
                      mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=drop_path[i], norm_layer=norm_layer,
                      backend=backend)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(dim, norm_layer) if downsample else None

    def forward(self, x: Tensor, group: Optional[Tensor]) -> Tensor:
        for blk in self.blocks:
            x = blk(x, group=group)
        return self.downsample(x) if self.downsample is not None else x


class MixMIM(nn.Module):
    """MixMIM pretraining model. ``forward(imgs, mask=None)`` returns ``(loss, pred, mask)``:
    ``pred`` ``(2B, L, stride**2*3)`` from the dual decoder, ``mask`` bool ``(L,)`` on the
    ``(img/stride)^2`` output grid (True = token taken from the partner image ``B-1-i``)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_size: Sequence[int] = (14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.5,
        backend: Optional[str] = None,
        reference: bool = False,
    ):
        super().__init__()
        S = len(depths)
        self.num_layers = S
        self.encoder_stride = patch_size * 2 ** (S - 1)
        if img_size % self.encoder_stride:
            raise ValueError(f"img_size must be a multiple of the encoder stride {self.encoder_stride}, got {img_size}")
        self.img_size, self.patch_size, self.embed_dim = img_size, patch_size, embed_dim
        self.num_features = embed_dim * 2 ** (S - 1)
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        self.backend = "reference" if reference else backend
        grid = img_size // patch_size
        self.patch_grid = (grid, grid)
        self.out_grid = img_size // self.encoder_stride

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer)
        self.absolute_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(embed_dim, grid).reshape(1, grid * grid, embed_dim), requires_grad=False)
        self.pos_drop = nn.Dropout(drop_rate)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.layers = nn.ModuleList()
        for i in range(S):
            self.layers.append(MixMIMStage(
                embed_dim * 2 ** i, (grid // 2 ** i, grid // 2 ** i), depths[i], num_heads[i], window_size[i],
                mlp_ratio, qkv_bias, dpr[sum(depths[:i]):sum(depths[:i + 1])], norm_layer, i < S - 1, self.backend,
            ))
        self.norm = norm_layer(self.num_features)

        L = self.out_grid ** 2
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            sincos_pos_embed_2d(decoder_dim, self.out_grid).reshape(1, L, decoder_dim), requires_grad=False)
        self.decoder_embed = nn.Linear(self.num_features, decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(decoder_dim, decoder_num_heads, mlp_ratio, True, norm_layer=norm_layer)
             for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.encoder_stride ** 2 * in_chans)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def set_backend(self, backend: Optional[str]) -> None:
        self.backend = backend
        for m in self.modules():
            if isinstance(m, SwinBlock):
                m.backend = backend

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"mask_token"}

    def random_masking(self, device=None, mask_ratio: Optional[float] = None,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """Batch-shared bool mask ``(L,)`` on the output grid with ``int(L * ratio)`` True."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        L = self.out_grid ** 2
        noise = torch.rand(L, device=device, generator=generator)
        rank = noise.argsort().argsort()  # position of each token in the ascending order
        return rank < int(L * ratio)

    def stage_masks(self, mask: Tensor):
        """The output-grid mask upsampled (nearest) to every stage's grid: list of ``(H_i, W_i)``."""
        g = self.out_grid
        m = mask.reshape(g, g)
        out = []
        for i in range(self.num_layers):
            f = 2 ** (self.num_layers - 1 - i)
            out.append(m.repeat_interleave(f, 0).repeat_interleave(f, 1))
        return out

    def forward_encoder(self, imgs: Tensor, mask: Tensor) -> Tensor:
        """``imgs`` ``(B, 3, H, W)``, ``mask`` ``(L,)`` -> mixed encoder tokens ``(B, L, C)``."""
        masks = self.stage_masks(mask)
        x = self.patch_embed(imgs)  # (B, H, W, C)
        B, H, W, C = x.shape
        x = ops.mix_tokens(x, masks[0], backend=self.backend)
        x = self.pos_drop(x + self.absolute_pos_embed.reshape(1, H, W, C).to(x.dtype))
        for layer, m in zip(self.layers, masks):
            x = layer(x, m)
        x = self.norm(x)
        return x.reshape(B, -1, x.shape[-1])

    def forward_decoder(self, z: Tensor, mask: Tensor) -> Tensor:
        """``z`` ``(B, L, C)`` -> dual predictions ``(2B, L, stride**2*3)``."""
        x = self.decoder_embed(z)
        x = ops.unmix_tokens(x, mask, self.mask_token.to(x.dtype), self.decoder_pos_embed.to(x.dtype),
                             backend=self.backend)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        return ops.mixmim_loss(pred, imgs, mask, self.encoder_stride, norm_pix=self.norm_pix_loss,
                               backend=self.backend)

    def forward(self, imgs: Tensor, mask: Optional[Tensor] = None,
                mask_ratio: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
        if mask is None:
            mask = self.random_masking(imgs.device, mask_ratio)
        z = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(z, mask)
        return self.forward_loss(imgs, pred, mask), pred, mask


def _make(defaults: dict, kwargs: dict) -> MixMIM:
    defaults.update(kwargs)
    return MixMIM(**defaults)


def mixmim_tiny(**kwargs) -> MixMIM:
    """A CPU-test-sized MixMIM: 32 px, patch 4, two stages, head_dim 16."""
    return _make(dict(img_size=32, patch_size=4, embed_dim=32, depths=(1, 1), num_heads=(2, 4),
                      window_size=(4, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2), kwargs)


def mixmim_base(**kwargs) -> MixMIM:
    """MixMIM-B: Swin-B widths (128), depths 2-2-18-2, head_dim 32, windows 14-14-14-7."""
    return _make(dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)), kwargs)


def mixmim_large(**kwargs) -> MixMIM:
    return _make(dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)), kwargs)


def mixmim_huge(**kwargs) -> MixMIM:
    return _make(dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)), kwargs)


