"""Fused replacement of torchvision's (v1) ``SwinTransformerBlock``: same parameters, buffer, state_dict."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import window_attention
from .padding import crop_windows, drop_shift_where_one_window, pad_to_windows
from .swin_block import AttnBackend

__all__ = ["TorchvisionSwinBlock"]

# One leaf call each for symbolic tracers (create_feature_extractor): see nn/padding.py.
torch.fx.wrap("window_attention")
torch.fx.wrap("pad_to_windows")
torch.fx.wrap("crop_windows")
torch.fx.wrap("drop_shift_where_one_window")


class _TorchvisionFusedAttention(nn.Module):
    """torchvision ``ShiftedWindowAttention`` (same parameters, buffer and state_dict) on the fused op.

    torchvision pads first (bottom/right), drops the shift along a dimension whose padded size
    fits in one window, rolls the *padded* map and computes the shift mask on it; window sizes
    are never clamped (an input smaller than the window is padded up to it). Pad tokens carry
    the qkv bias. That is exactly pad -> op(shift on the padded grid) -> crop.
    """

    def __init__(self, src: nn.Module, backend: Optional[str]):
        super().__init__()
        self.window_size = list(src.window_size)
        self.shift_size = list(src.shift_size)
        self.num_heads = src.num_heads
        self.attention_dropout = src.attention_dropout
        self.dropout = src.dropout
        self.qkv, self.proj = src.qkv, src.proj
        self.relative_position_bias_table = src.relative_position_bias_table
        persistent = "relative_position_index" not in src._non_persistent_buffers_set
        self.register_buffer("relative_position_index", src.relative_position_index, persistent=persistent)
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.attention_dropout > 0:
            raise NotImplementedError(
                f"attention dropout ({self.attention_dropout}) has no fused implementation; use 0 or eval mode"
            )
        win = (self.window_size[0], self.window_size[1])
        xp = pad_to_windows(x, win)
        shift = drop_shift_where_one_window(xp, win, self.shift_size)
        out = window_attention(
            self.qkv(xp), self.num_heads, win, shift_size=shift, rel_pos_bias=self.relative_position_bias_table,
            scale=(self.qkv.in_features // self.num_heads) ** -0.5, backend=self.backend,
        )
        out = crop_windows(out, x.shape[1], x.shape[2])
        return F.dropout(self.proj(out), p=self.dropout, training=self.training)


class TorchvisionSwinBlock(AttnBackend, nn.Module):
    """Fused replacement of torchvision's (v1) ``SwinTransformerBlock``; same state_dict keys.

    Built by :func:`mixkernels.swap_swin` from an existing block, sharing its parameter objects.
    """

    def __init__(self, src: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = src.norm1
        self.attn = _TorchvisionFusedAttention(src.attn, backend)
        self.stochastic_depth = src.stochastic_depth
        self.norm2 = src.norm2
        self.mlp = src.mlp
        self.train(src.training)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))
