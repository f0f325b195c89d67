"""Pieces shared by the MixMIM and UM-MAE models: sin-cos embeddings, patch embed, ViT decoder block."""
from __future__ import annotations

from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.swin_block import DropPath, Mlp

__all__ = ["sincos_pos_embed_2d", "PatchEmbed", "DecoderBlock", "init_weights"]


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: Optional[int] = None) -> Tensor:
    """MAE's fixed 2D sin-cos embedding ``(grid_h*grid_w, dim)`` float32, row-major tokens
    (first half encodes the column, second half the row, as MAE's ``get_2d_sincos_pos_embed``)."""
    grid_w = grid_h if grid_w is None else grid_w
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patch embedding (``proj``, ``norm``) returning channels-last ``(B, H, W, C)``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, norm_layer: Optional[Type[nn.Module]]):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class _Attention(nn.Module):
    """timm ViT ``Attention`` layout (``qkv``, ``proj``) on ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class DecoderBlock(nn.Module):
    """timm ViT ``Block`` (pre-norm attention + MLP) with timm's state_dict names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def init_weights(m: nn.Module) -> None:
    """MAE/MixMIM init: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
