"""Fused replacements of torchvision's ``SwinTransformerBlock`` (v1) and ``SwinTransformerBlockV2``:
same parameters, buffers, state_dict."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import window_attention
from .padding import crop_windows, drop_shift_where_one_window, pad_to_windows
from .swin_block import AttnBackend
from .swinv2_block import cpb_table

__all__ = ["TorchvisionSwinBlock", "TorchvisionSwinBlockV2"]

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
        # Own parameters and buffers in the source's order (same state_dict): v1 the bias table and
        # relative_position_index; v2 logit_scale, relative_coords_table and relative_position_index.
        for name, p in src._parameters.items():
            setattr(self, name, p)
        for name, b in src._buffers.items():
            self.register_buffer(name, b, persistent=name not in src._non_persistent_buffers_set)
        self.backend = backend

    def _attention(self, qkv: Tensor, win, shift) -> Tensor:
        return window_attention(qkv, self.num_heads, win, shift_size=shift,
                                rel_pos_bias=self.relative_position_bias_table,
                                scale=(self.qkv.in_features // self.num_heads) ** -0.5, backend=self.backend)

    def _qkv(self, x: Tensor) -> Tensor:
        return self.qkv(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.attention_dropout > 0:
            raise NotImplementedError(
                f"attention dropout ({self.attention_dropout}) has no fused implementation; use 0 or eval mode"
            )
        win = (self.window_size[0], self.window_size[1])
        xp = pad_to_windows(x, win)
        shift = drop_shift_where_one_window(xp, win, self.shift_size)
        out = crop_windows(self._attention(self._qkv(xp), win, shift), x.shape[1], x.shape[2])
        return F.dropout(self.proj(out), p=self.dropout, training=self.training)


class _TorchvisionFusedAttentionV2(_TorchvisionFusedAttention):
    """torchvision ``ShiftedWindowAttentionV2`` on the fused op in cosine mode: same parameters
    (``logit_scale``, ``cpb_mlp``, ``qkv``, ``proj``) and buffers (``relative_coords_table``,
    ``relative_position_index``). As torchvision, the k third of ``qkv.bias`` is used as zero
    (its gradient is 0) and the CPB ``16 * sigmoid(cpb_mlp(relative_coords_table))`` is the bias table.
    """

    def __init__(self, src: nn.Module, backend: Optional[str]):
        super().__init__(src, backend)  # logit_scale and both buffers
        self.cpb_mlp = src.cpb_mlp

    def _qkv(self, x: Tensor) -> Tensor:
        b = self.qkv.bias
        if b is None:
            return self.qkv(x)
        n = b.numel() // 3
        return F.linear(x, self.qkv.weight, torch.cat((b[:n], torch.zeros_like(b[n:2 * n]), b[2 * n:])))

    def _attention(self, qkv: Tensor, win, shift) -> Tensor:
        return window_attention(qkv, self.num_heads, win, shift_size=shift,
                                rel_pos_bias=cpb_table(self.cpb_mlp, self.relative_coords_table, self.num_heads),
                                logit_scale=self.logit_scale, backend=self.backend)


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


class TorchvisionSwinBlockV2(AttnBackend, nn.Module):
    """Fused replacement of torchvision's ``SwinTransformerBlockV2`` (``swin_v2_t/s/b``): post-norm,
    cosine attention; same state_dict keys. Built by :func:`mixkernels.swap_swin` from an existing
    block, sharing its parameter and buffer objects."""

    def __init__(self, src: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = src.norm1
        self.attn = _TorchvisionFusedAttentionV2(src.attn, backend)
        self.stochastic_depth = src.stochastic_depth
        self.norm2 = src.norm2
        self.mlp = src.mlp
        self.train(src.training)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.stochastic_depth(self.norm1(self.attn(x)))
        return x + self.stochastic_depth(self.norm2(self.mlp(x)))
