"""Drop-in Swin block: timm ``SwinTransformerBlock`` constructor and state_dict, fused attention."""
from __future__ import annotations

from typing import Optional, Tuple, Type, Union

import torch
from torch import Tensor, nn

from .padding import PAD_GROUP, crop_windows, pad_group, pad_to_windows
from .window_attention import WindowAttention, to_2tuple

__all__ = ["SwinBlock", "Mlp", "DropPath", "drop_path", "PAD_GROUP"]

# Shape logic stays out of traced control flow (see nn/padding.py).
torch.fx.wrap("pad_to_windows")
torch.fx.wrap("pad_group")
torch.fx.wrap("crop_windows")


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth per sample (timm's ``drop_path`` with ``scale_by_keep``)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    """timm ``Mlp`` layout (``fc1``, ``act``, ``drop1``, ``norm``, ``fc2``, ``drop2``)."""

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: Type[nn.Module] = nn.GELU, bias: bool = True, drop: float = 0.0, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def calc_window_shift(resolution, window_size, shift_size, always_partition: bool = False):
    """timm's ``_calc_window_shift``: clamp the window to the resolution, no shift when it fits."""
    window_size, shift_size = to_2tuple(window_size), to_2tuple(shift_size)
    if always_partition:
        return window_size, shift_size
    resolution = to_2tuple(resolution)
    win = tuple(r if r <= w else w for r, w in zip(resolution, window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, win, shift_size))
    return win, shift


class AttnBackend:
    """Mixin for blocks: ``block.backend`` reads and sets the backend of ``block.attn``."""

    @property
    def backend(self) -> Optional[str]:
        return self.attn.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self.attn.backend = value


class SwinBlock(AttnBackend, nn.Module):
    """Swin Transformer block with the fused window attention.

    Same constructor arguments, attribute names and ``state_dict`` keys as timm's
    ``SwinTransformerBlock`` (``norm1``, ``attn.qkv``, ``attn.proj``,
    ``attn.relative_position_bias_table``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), so timm
    checkpoints load unchanged; no buffers. ``backend`` is passed to the attention op.

    ``forward(x, group=None, coords=None, coord_range=None)`` on ``(B, H, W, C)``:
    ``norm1 -> qkv -> window_attention (roll, partition, shift mask, bias, merge fused) ->
    proj -> residual -> norm2 -> MLP -> residual``. ``group`` ``(H, W)`` or ``(B, H, W)``
    restricts attention to tokens with the same label (MixMIM); ``coords`` indexes the
    bias table by true positions (see :func:`mixkernels.window_attention`).

    Padding (``H`` or ``W`` not a multiple of the window) follows timm exactly: timm rolls
    the *unpadded* map, zero-pads it after ``norm1`` (pad tokens carry the qkv bias and are
    masked only by the shift mask computed on the padded size), then crops and rolls back.
    With a shift, that is expressed for the op (which rolls the padded map) by rolling back
    before padding; the extra rolls run only on this rare path. With ``group``, pad tokens
    get their own label (real tokens never attend to them); ``coords`` cannot be padded.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: Union[int, Tuple[int, int]],
        num_heads: int = 4,
        head_dim: Optional[int] = None,
        window_size: Union[int, Tuple[int, int]] = 7,
        shift_size: int = 0,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask  # the op always builds the mask for the actual size
        self.window_size, self.shift_size = calc_window_shift(
            self.input_resolution, window_size, shift_size, always_partition
        )
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttention(dim, num_heads=num_heads, head_dim=head_dim, window_size=self.window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, backend=backend, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def set_input_size(self, feat_size, window_size, always_partition: Optional[bool] = None) -> None:
        """timm's ``set_input_size``: new feature size and window; a window change resizes the
        bias table as timm does (a new Parameter: rebuild optimizers, as with timm)."""
        self.input_resolution = to_2tuple(feat_size)
        if always_partition is not None:
            self.always_partition = always_partition
        ws = to_2tuple(window_size)
        target_shift = (ws[0] // 2, ws[1] // 2) if any(self.target_shift_size) else (0, 0)
        win, shift = calc_window_shift(self.input_resolution, ws, target_shift, self.always_partition)
        self.attn.set_window_size(win)
        self.window_size, self.shift_size = win, shift
        self.window_area = win[0] * win[1]

    def _attn(self, x: Tensor, group: Optional[Tensor], coords: Optional[Tensor], coord_range) -> Tensor:
        win, shift = self.window_size, self.shift_size
        # timm order (roll, then pad): see nn/padding.py; coords cannot be padded.
        xp = pad_to_windows(x, win, shift, roll_first=True,
                            pad_error=None if coords is None else "coords need a window-divisible token grid")
        if group is not None:
            group = pad_group(group, win, shift, roll_first=True)
        out = self.attn(xp, shift, group, coords, coord_range)
        return crop_windows(out, x.shape[1], x.shape[2], shift, roll_first=True)

    def forward(self, x: Tensor, group: Optional[Tensor] = None, coords: Optional[Tensor] = None,
                coord_range=None) -> Tensor:
        """``x``: ``(B, H, W, C)``; returns ``(B, H, W, C)``."""
        x = x + self.drop_path1(self._attn(self.norm1(x), group, coords, coord_range))
        return x + self.drop_path2(self.mlp(self.norm2(x)))
