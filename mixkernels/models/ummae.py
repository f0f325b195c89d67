"""UM-MAE Swin pretraining model (implus/UM-MAE ``models_mae_swin.py`` semantics) on the fused ops.

Official structure this follows:
* mask units of ``stride`` px (16 px = 4x4 tokens at patch 4); Uniform Sampling keeps exactly
  one unit of every 2x2 cell ("regular" mask, ratio 0.75); Secondary Masking replaces
  ``vis_mask_ratio`` (25%) of the kept units with a learnable ``vis_mask_token`` that is passed
  through ``patch_embed.norm`` first;
* the kept units are packed into the half-resolution compact image (the official dilated
  depth-wise conv sum); every compact token keeps its true (row, col) in the full token grid;
* Swin encoder on the compact image: blocks alternate shift 0 / window//2 (window clamped to
  the resolution, no shift then); the relative position bias is a small MLP (``posmlp``: 1x1
  conv 2->posmlp_dim, ReLU, ->heads) of the log-spaced true-coordinate difference
  ``sign(d)*log(1+|d|)``, ``d = pos_key - pos_query``, coordinates halved at every stage;
  stage 2+ start with ``PatchMerge`` (LayerNorm + 2x2 stride-2 conv) inside their first block;
* decoder: Linear to ``e*e*D`` + PixelShuffle(e) back to one token per kept unit, mask tokens
  for the removed units, fixed sin-cos position embedding, timm ViT blocks, Linear to
  ``stride**2*3``; loss only on removed units (norm-pix optional), mean over them.

Here: ``uniform_sample`` (with the fused secondary masking), ``window_attention(coords=...)``
and ``masked_recon_loss`` are the mixkernels ops. Because ``posmlp`` is applied pointwise to
an integer coordinate difference, it is evaluated once per block on every difference in range
and handed to the op as a ``((2G-1)^2, heads)`` table indexed by true coordinates: the same
numbers as the official per-window dense bias, without materializing it.
One deliberate difference: the official decoder adds ``pos_embed[~mask]`` (row-major order
of the unit grid) to the visible tokens, which come out of PixelShuffle in compact (cell)
order, so visible tokens get a neighbour's position; here each visible token is scattered
back to its own unit (``uniform_scatter``) and gets its own position embedding.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence, Tuple, Type

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..nn.swin_block import DropPath, Mlp, calc_window_shift
from ._common import DecoderBlock, PatchEmbed, init_weights, sincos_pos_embed_2d

__all__ = ["UMMAESwin", "ummae_swin_tiny_test", "ummae_swin_tiny", "ummae_swin_large"]


class PatchMerge(nn.Module):
    """UM-MAE downsampling: LayerNorm then a 2x2 stride-2 conv, on ``(B, H, W, C)``."""

    def __init__(self, in_chans: int, embed_dim: int, norm_layer: Type[nn.Module]):
        super().__init__()
        self.norm = norm_layer(in_chans)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class PosMLPAttention(nn.Module):
    """Window attention whose bias is ``posmlp`` of true-coordinate differences (``qkv``, ``proj``, ``posmlp``)."""

    def __init__(self, dim: int, num_heads: int, window: int, posmlp_dim: int = 32, backend: Optional[str] = None):
        super().__init__()
        self.num_heads, self.window, self.backend = num_heads, window, backend
        self.posmlp = nn.Sequential(nn.Conv2d(2, posmlp_dim, 1), nn.ReLU(inplace=True), nn.Conv2d(posmlp_dim, num_heads, 1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def bias_table(self, grid: int, scale: float, dtype: torch.dtype) -> Tensor:
        """``((2G-1)^2, nH)``: entry for query-minus-key difference ``(dy, dx)`` is
        ``posmlp(f(-dy/scale), f(-dx/scale))``, ``f(d) = sign(d) log(1+|d|)``."""
        dev = self.qkv.weight.device
        d = -(torch.arange(2 * grid - 1, device=dev, dtype=torch.float64) - (grid - 1)) / scale
        d = torch.sign(d) * torch.log1p(d.abs())
        inp = torch.stack(torch.meshgrid(d, d, indexing="ij"))[None]  # (1, 2, 2G-1, 2G-1): (dy, dx)
        out = self.posmlp(inp.to(self.posmlp[0].weight.dtype))  # (1, nH, 2G-1, 2G-1)
        return out[0].permute(1, 2, 0).reshape(-1, self.num_heads).to(dtype)

    def forward(self, x: Tensor, shift: int, coords: Tensor, grid: int, scale: float) -> Tensor:
        qkv = self.qkv(x)
        table = self.bias_table(grid, scale, torch.float32 if qkv.dtype != torch.float64 else qkv.dtype)
        out = ops.window_attention(qkv, self.num_heads, self.window, shift_size=shift, rel_pos_bias=table,
                                   coords=coords, coord_range=(grid, grid), backend=self.backend)
        return self.proj(out)


class UMSwinBlock(nn.Module):
    def __init__(self, dim, resolution, num_heads, window_size, shift_size, mlp_ratio, posmlp_dim, drop_path,
                 norm_layer, downsample: Optional[nn.Module], backend):
        super().__init__()
        (w, _), (s, _) = calc_window_shift(resolution, window_size, shift_size)
        self.window_size, self.shift_size = w, s
        self.norm1 = norm_layer(dim)
        self.attn = PosMLPAttention(dim, num_heads, w, posmlp_dim, backend)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.downsample = downsample

    def forward(self, x: Tensor, coords: Tensor, grid: int, scale: float) -> Tuple[Tensor, Tensor, float]:
        if self.downsample is not None:
            x, coords, scale = self.downsample(x), coords[:, 0::2, 0::2], scale * 2
        x = x + self.drop_path(self.attn(self.norm1(x), self.shift_size, coords, grid, scale))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, coords, scale


class UMMAESwin(nn.Module):
    """UM-MAE with a Swin encoder. ``forward(imgs, keep=None, secondary=None)`` returns
    ``(loss, pred, removed)``: ``pred`` ``(B, Lu, stride**2*3)`` over all mask units (row-major),
    ``removed`` bool ``(B, Lu)`` (the units the loss counts)."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        stride: int = 16,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        window_size: int = 8,
        posmlp_dim: int = 32,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss: bool = True,
        vis_mask_ratio: float = 0.25,
        drop_path_rate: float = 0.0,
        backend: Optional[str] = None,
        reference: bool = False,
    ):
        super().__init__()
        S = len(depths)
        G = img_size // patch_size
        K = stride // patch_size  # mask unit side in tokens
        units = img_size // stride
        out = G // 2 ** S  # encoder output grid
        if G * patch_size != img_size or K * patch_size != stride or units % 2 or (units // 2) % out:
            raise ValueError(f"img_size {img_size}, patch {patch_size}, stride {stride} and {S} stages do not tile")
        self.expand = units // 2 // out  # PixelShuffle factor back to one token per kept unit
        self.img_size, self.patch_size, self.stride, self.unit = img_size, patch_size, stride, K
        self.grid, self.units, self.embed_dim = G, units, embed_dim
        self.norm_pix_loss, self.vis_mask_ratio = norm_pix_loss, vis_mask_ratio
        self.backend = "reference" if reference else backend

        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, norm_layer)
        n = sum(depths)
        dpr = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]
        self.blocks = nn.ModuleList()
        for i in range(S):
            dim = embed_dim * 2 ** i
            for j in range(depths[i]):
                down = PatchMerge(dim // 2, dim, norm_layer) if (i > 0 and j == 0) else None
                res = G // 2 ** (i + 1)
                self.blocks.append(UMSwinBlock(dim, (res, res), num_heads[i], window_size,
                                               0 if j % 2 == 0 else window_size // 2, mlp_ratio, posmlp_dim,
                                               dpr[sum(depths[:i]) + j], norm_layer, down, self.backend))
        enc_dim = embed_dim * 2 ** (S - 1)
        self.norm = norm_layer(enc_dim)

        D = decoder_embed_dim
        self.decoder_embed = nn.Linear(enc_dim, self.expand ** 2 * D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.decoder_pos_embed = nn.Parameter(sincos_pos_embed_2d(D, units).reshape(1, units * units, D),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [DecoderBlock(D, decoder_num_heads, mlp_ratio, True, norm_layer=norm_layer) for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(D)
        self.decoder_pred = nn.Linear(D, stride ** 2 * in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        if self.vis_mask_ratio > 0:
            nn.init.normal_(self.vis_mask_token, std=0.02)
        for m in self.modules():
            init_weights(m)
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.proj.weight
        with torch.no_grad():
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def set_backend(self, backend: Optional[str]) -> None:
        self.backend = backend
        for m in self.modules():
            if isinstance(m, PosMLPAttention):
                m.backend = backend

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"mask_token", "vis_mask_token"}

    def random_masks(self, batch: int, device=None, generator: Optional[torch.Generator] = None):
        """``keep`` uint8 ``(B, U/2, U/2)`` and ``secondary`` bool (or None) on the cell grid."""
        c = self.units // 2
        keep, sec = ops.uniform_masks(batch, (c, c), secondary_ratio=max(self.vis_mask_ratio, 0.0),
                                      generator=generator, device=device)
        return keep, (sec if self.vis_mask_ratio > 0 else None)

    def removed_units(self, keep: Tensor) -> Tensor:
        """Bool ``(B, U*U)``: True for the three units of each 2x2 cell that were not kept."""
        B, hc, wc = keep.shape
        rem = torch.ones(B, hc, wc, 4, dtype=torch.bool, device=keep.device)
        rem = rem.scatter(3, keep.long().unsqueeze(-1), False)
        return rem.reshape(B, hc, wc, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, -1)

    def compact_coords(self, keep: Tensor) -> Tensor:
        """True (row, col) of every compact-image token, int64 ``(B, G/2, G/2, 2)``."""
        B, G = keep.shape[0], self.grid
        r, c = torch.meshgrid(torch.arange(G, device=keep.device), torch.arange(G, device=keep.device), indexing="ij")
        full = torch.stack([r, c], -1).to(torch.float32).expand(B, G, G, 2)
        return ops.uniform_sample(full, keep, self.unit, backend="reference").round().long()

    def forward_encoder(self, imgs: Tensor, keep: Tensor, secondary: Optional[Tensor]) -> Tensor:
        x = self.patch_embed(imgs)  # (B, G, G, C)
        tok = None
        if secondary is not None:
            tok = self.patch_embed.norm(self.vis_mask_token).reshape(-1).to(x.dtype)
        x = ops.uniform_sample(x, keep, self.unit, mask_token=tok, secondary=secondary, backend=self.backend)
        coords = self.compact_coords(keep)
        scale = 1.0
        for blk in self.blocks:
            x, coords, scale = blk(x, coords, self.grid, scale)
        return self.norm(x)  # (B, out, out, C)

    def forward_decoder(self, z: Tensor, keep: Tensor, removed: Tensor) -> Tensor:
        B = z.shape[0]
        x = self.decoder_embed(z).permute(0, 3, 1, 2)  # (B, e*e*D, out, out)
        x = F.pixel_shuffle(x, self.expand).permute(0, 2, 3, 1)  # (B, U/2, U/2, D): one token per kept unit
        x = ops.uniform_scatter(x, keep, 1, backend=self.backend)  # (B, U, U, D), zeros at removed units
        x = x.reshape(B, self.units * self.units, -1)
        x = torch.where(removed.unsqueeze(-1), self.mask_token.to(x.dtype), x) + self.decoder_pos_embed.to(x.dtype)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def forward(self, imgs: Tensor, keep: Optional[Tensor] = None,
                secondary: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        if keep is None:
            keep, secondary = self.random_masks(imgs.shape[0], imgs.device)
        removed = self.removed_units(keep)
        z = self.forward_encoder(imgs, keep, secondary)
        pred = self.forward_decoder(z, keep, removed)
        loss = ops.masked_recon_loss(pred, imgs, removed, self.stride, norm_pix=self.norm_pix_loss,
                                     backend=self.backend)
        return loss, pred, removed


def ummae_swin_tiny_test(**kwargs) -> UMMAESwin:
    """CPU-test-sized UM-MAE Swin: 32 px, patch 4, unit 4 px (one token), two stages."""
    args = dict(img_size=32, patch_size=4, stride=4, embed_dim=32, depths=(2, 1), num_heads=(2, 4), window_size=2,
                posmlp_dim=8, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    args.update(kwargs)
    return UMMAESwin(**args)


def ummae_swin_tiny(**kwargs) -> UMMAESwin:
    """``mae_swin_tiny_256`` (decoder 512-d, 2 blocks)."""
    return UMMAESwin(**kwargs)


def ummae_swin_large(**kwargs) -> UMMAESwin:
    args = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
    args.update(kwargs)
    return UMMAESwin(**args)
