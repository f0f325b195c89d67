"""Window attention module: timm ``WindowAttention`` parameters, fused op inside."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..ops import window_attention

__all__ = ["WindowAttention", "to_2tuple"]

# The fused op validates shapes in Python: symbolic tracers (torch.fx, torchvision's
# create_feature_extractor) must record it as one leaf call (see nn/padding.py).
torch.fx.wrap("window_attention")


def to_2tuple(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


class WindowAttention(nn.Module):
    """(Shifted) window multi-head self-attention on an un-partitioned ``(B, H, W, C)`` map.

    Constructor arguments, parameter names and ``state_dict`` keys are those of timm's
    ``WindowAttention`` (``qkv``, ``proj``, ``relative_position_bias_table``); there are no
    buffers (the relative position index and the shift mask live inside the fused op).
    ``forward`` takes the *normed, window-divisible* map and returns the projected output
    in the same layout: qkv Linear -> :func:`mixkernels.window_attention` -> proj.

    Attention dropout (``attn_drop > 0`` while training) has no fused implementation and
    raises ``NotImplementedError``; ``proj_drop`` works as in timm.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: Optional[int] = None,
        window_size: Union[int, Tuple[int, int]] = 7,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        attn_dim = head_dim * num_heads
        self.scale = head_dim ** -0.5
        self.backend = backend
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads, **dd))
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.relative_position_bias_table.device.type != "meta":
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def set_window_size(self, window_size) -> None:
        """timm's ``set_window_size``: a new window, the bias table resized with timm's
        ``resize_rel_pos_bias_table`` (a new Parameter, as in timm; needs timm)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        try:
            from timm.layers import resize_rel_pos_bias_table
        except ImportError as e:  # pragma: no cover
            raise NotImplementedError("changing the window size resizes the bias table with timm; install timm") from e
        old = self.window_size
        self.window_size, self.window_area = window_size, window_size[0] * window_size[1]
        table = self.relative_position_bias_table
        with torch.no_grad():
            shape = ((2 * window_size[0] - 1) * (2 * window_size[1] - 1), self.num_heads)
            resized = resize_rel_pos_bias_table(table, new_window_size=window_size, new_bias_shape=shape,
                                                old_window_size=old)
        self.relative_position_bias_table = nn.Parameter(resized, requires_grad=table.requires_grad)

    def forward(
        self,
        x: Tensor,
        shift_size=0,
        group: Optional[Tensor] = None,
        coords: Optional[Tensor] = None,
        coord_range=None,
    ) -> Tensor:
        """``x``: ``(B, H, W, C)`` with ``H, W`` multiples of the window; returns ``(B, H, W, C)``."""
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"attention dropout (attn_drop={self.attn_drop.p}) has no fused implementation; "
                "use attn_drop=0 (the Swin/MixMIM/UM-MAE pretraining recipes do) or eval mode"
            )
        qkv = self.qkv(x)
        out = window_attention(
            qkv, self.num_heads, self.window_size, shift_size=shift_size,
            rel_pos_bias=self.relative_position_bias_table, group=group, coords=coords,
            coord_range=coord_range, scale=self.scale, backend=self.backend,
        )
        return self.proj_drop(self.proj(out))
