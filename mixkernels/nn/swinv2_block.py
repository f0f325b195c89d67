"""Drop-in SwinV2 block: timm ``SwinTransformerV2Block`` constructor and state_dict, fused cosine attention."""
from __future__ import annotations

import math
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import window_attention
from .padding import crop_windows, pad_to_windows
from .swin_block import AttnBackend, DropPath, Mlp, calc_window_shift
from .window_attention import to_2tuple

__all__ = ["WindowAttentionV2", "SwinV2Block", "cpb_coords_table", "cpb_table"]

torch.fx.wrap("window_attention")
torch.fx.wrap("pad_to_windows")
torch.fx.wrap("crop_windows")


def cpb_coords_table(window_size, pretrained_window_size=(0, 0), device=None, dtype=None) -> Tensor:
    """SwinV2's log-spaced relative coordinates ``(1, 2wh-1, 2ww-1, 2)``, the CPB MLP's input
    (timm's ``relative_coords_table``): ``sign(t) * log2(1 + |t|) / 3`` with
    ``t = 8 * d / (w - 1)`` (``w`` the pretrained window when set, ``max(w - 1, 1)`` as timm)."""
    wh, ww = to_2tuple(window_size)
    ph, pw = to_2tuple(pretrained_window_size)
    rh = torch.arange(-(wh - 1), wh, device=device, dtype=torch.float32)
    rw = torch.arange(-(ww - 1), ww, device=device, dtype=torch.float32)
    table = torch.stack(torch.meshgrid(rh, rw, indexing="ij")).permute(1, 2, 0).contiguous().unsqueeze(0)
    div = (ph, pw) if ph > 0 else (wh, ww)
    table[..., 0] /= max(div[0] - 1, 1)
    table[..., 1] /= max(div[1] - 1, 1)
    table *= 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / math.log2(8)
    return table.to(dtype=dtype)


def cpb_table(cpb_mlp: nn.Module, coords_table: Tensor, num_heads: int) -> Tensor:
    """The continuous position bias as the op's ``rel_pos_bias`` table ``((2wh-1)*(2ww-1), nH)``:
    ``16 * sigmoid(cpb_mlp(coords))``. timm/torchvision apply the sigmoid after gathering the
    ``(N, N)`` bias from this table; elementwise, so the numbers are the same."""
    return 16 * torch.sigmoid(cpb_mlp(coords_table).view(-1, num_heads))


class WindowAttentionV2(nn.Module):
    """SwinV2 window attention on an un-partitioned ``(B, H, W, C)`` map.

    Parameter and buffer names are timm's ``swin_transformer_v2.WindowAttention``
    (``logit_scale`` ``(nH, 1, 1)``, ``cpb_mlp``, ``qkv`` without bias, ``q_bias``, ``v_bias``, the
    zero ``k_bias`` and ``relative_coords_table`` as non-persistent buffers, ``proj``), so the
    ``state_dict`` is timm's. ``forward``: qkv Linear with bias ``(q_bias, 0, v_bias)`` ->
    :func:`mixkernels.window_attention` in cosine mode (``logit_scale``, the CPB table as
    ``rel_pos_bias``) -> proj. The relative position index lives inside the op.
    """

    def __init__(
        self,
        dim: int,
        window_size: Union[int, Tuple[int, int]],
        num_heads: int,
        qkv_bias: bool = True,
        qkv_bias_separate: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: Union[int, Tuple[int, int]] = (0, 0),
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.qkv_bias_separate = qkv_bias_separate
        self.backend = backend
        self.logit_scale = nn.Parameter(torch.empty((num_heads, 1, 1), **dd))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 512, bias=True, **dd), nn.ReLU(inplace=True),
                                     nn.Linear(512, num_heads, bias=False, **dd))
        self.qkv = nn.Linear(dim, dim * 3, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.empty(dim, **dd))
            self.register_buffer("k_bias", torch.zeros(dim, **dd), persistent=False)
            self.v_bias = nn.Parameter(torch.empty(dim, **dd))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.register_buffer("relative_coords_table", self._coords(device, dtype), persistent=False)
        self.reset_parameters()

    def _coords(self, device, dtype) -> Optional[Tensor]:
        if device is not None and torch.device(device).type == "meta":
            return torch.empty((1, 2 * self.window_size[0] - 1, 2 * self.window_size[1] - 1, 2), device="meta")
        return cpb_coords_table(self.window_size, self.pretrained_window_size, device, dtype)

    def reset_parameters(self) -> None:
        if self.logit_scale.device.type == "meta":
            return
        nn.init.constant_(self.logit_scale, math.log(10))
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)

    def set_window_size(self, window_size) -> None:
        """timm's ``set_window_size``: new window, new coordinates table (the CPB MLP is continuous)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        t = self.relative_coords_table
        self.window_size = window_size
        self.register_buffer("relative_coords_table", self._coords(t.device, t.dtype), persistent=False)

    def bias_table(self) -> Tensor:
        """``((2wh-1)*(2ww-1), nH)`` continuous position bias table (``16 * sigmoid(cpb_mlp(...))``)."""
        return cpb_table(self.cpb_mlp, self.relative_coords_table, self.num_heads)

    def qkv_proj(self, x: Tensor) -> Tensor:
        """timm's qkv: ``(q_bias, k_bias = 0, v_bias)`` as one Linear bias (or added after)."""
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: Tensor, shift_size=0) -> Tensor:
        """``x``: ``(B, H, W, C)`` with ``H, W`` multiples of the window; returns ``(B, H, W, C)``."""
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"attention dropout (attn_drop={self.attn_drop.p}) has no fused implementation; use 0 or eval mode"
            )
        out = window_attention(self.qkv_proj(x), self.num_heads, self.window_size, shift_size=shift_size,
                               rel_pos_bias=self.bias_table(), logit_scale=self.logit_scale, backend=self.backend)
        return self.proj_drop(self.proj(out))


class SwinV2Block(AttnBackend, nn.Module):
    """SwinV2 block with the fused cosine window attention.

    Same constructor arguments, attribute names and ``state_dict`` keys as timm's
    ``SwinTransformerV2Block`` (``attn.logit_scale``, ``attn.cpb_mlp.*``, ``attn.qkv.weight``,
    ``attn.q_bias``, ``attn.v_bias``, ``attn.proj``, ``norm1``, ``mlp.fc1``, ``mlp.fc2``, ``norm2``);
    no persistent buffers (timm has none either). Post-norm, as SwinV2:
    ``x + drop_path(norm1(attn(x)))``, then ``x + drop_path(norm2(mlp(x)))``. Padding follows
    timm (roll the unpadded map, then zero-pad; pad tokens carry the q/v bias), see nn/padding.py.
    """

    def __init__(
        self,
        dim: int,
        input_resolution: Union[int, Tuple[int, int]],
        num_heads: int,
        window_size: Union[int, Tuple[int, int]] = 7,
        shift_size: Union[int, Tuple[int, int]] = 0,
        always_partition: bool = False,
        dynamic_mask: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Type[nn.Module] = nn.LayerNorm,
        pretrained_window_size: Union[int, Tuple[int, int]] = 0,
        device=None,
        dtype=None,
        *,
        backend: Optional[str] = None,
    ):
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.dim = dim
        self.input_resolution = to_2tuple(input_resolution)
        self.num_heads = num_heads
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition = always_partition
        self.dynamic_mask = dynamic_mask  # the op always builds the shift mask for the actual size
        self.window_size, self.shift_size = calc_window_shift(self.input_resolution, window_size, shift_size,
                                                              always_partition)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        self.attn = WindowAttentionV2(dim, self.window_size, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                      proj_drop=proj_drop, pretrained_window_size=pretrained_window_size,
                                      backend=backend, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def set_input_size(self, feat_size, window_size, always_partition: Optional[bool] = None) -> None:
        """timm's ``set_input_size``: new feature size and window (new CPB coordinates table)."""
        self.input_resolution = to_2tuple(feat_size)
        if always_partition is not None:
            self.always_partition = always_partition
        ws = to_2tuple(window_size)
        target_shift = (ws[0] // 2, ws[1] // 2) if any(self.target_shift_size) else (0, 0)
        win, shift = calc_window_shift(self.input_resolution, ws, target_shift, self.always_partition)
        self.attn.set_window_size(win)
        self.window_size, self.shift_size = win, shift
        self.window_area = win[0] * win[1]

    def _attn(self, x: Tensor) -> Tensor:
        win, shift = self.window_size, self.shift_size
        out = self.attn(pad_to_windows(x, win, shift, roll_first=True), shift)
        return crop_windows(out, x.shape[1], x.shape[2], shift, roll_first=True)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, H, W, C)``; returns ``(B, H, W, C)``."""
        x = x + self.drop_path1(self.norm1(self._attn(x)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))
