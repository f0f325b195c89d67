"""``swap_swin``: put the fused Swin block into timm / torchvision Swin (v1) models, in place."""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .nn.swin_block import SwinBlock
from .ops import window_attention

__all__ = ["swap_swin", "TorchvisionSwinBlock"]


def _timm_classes():
    mod = sys.modules.get("timm.models.swin_transformer")
    v1 = getattr(mod, "SwinTransformerBlock", None) if mod else None
    v2mod = sys.modules.get("timm.models.swin_transformer_v2")
    v2 = getattr(v2mod, "SwinTransformerV2Block", None) if v2mod else None
    return v1, v2


def _tv_classes():
    mod = sys.modules.get("torchvision.models.swin_transformer")
    if mod is None:
        return None, None, None
    return mod.SwinTransformerBlock, mod.SwinTransformerBlockV2, mod.ShiftedWindowAttention


def _from_timm(blk: nn.Module, backend: Optional[str]) -> SwinBlock:
    """A :class:`SwinBlock` that owns ``blk``'s submodules and parameters (same objects)."""
    a = blk.attn
    head_dim = a.qkv.out_features // (3 * a.num_heads)
    new = SwinBlock(
        blk.dim, blk.input_resolution, num_heads=a.num_heads, head_dim=head_dim, window_size=blk.window_size,
        shift_size=0, always_partition=True, mlp_ratio=blk.mlp_ratio, qkv_bias=a.qkv.bias is not None,
        device="meta", backend=backend,
    )
    # timm already clamped window/shift for its resolution: take them as they are.
    new.always_partition, new.dynamic_mask = blk.always_partition, getattr(blk, "dynamic_mask", False)
    new.target_shift_size = getattr(blk, "target_shift_size", blk.shift_size)
    new.window_size, new.shift_size = tuple(blk.window_size), tuple(blk.shift_size)
    new.window_area = blk.window_area
    new.norm1, new.norm2, new.mlp = blk.norm1, blk.norm2, blk.mlp
    new.drop_path1, new.drop_path2 = blk.drop_path1, blk.drop_path2
    na = new.attn
    na.window_size, na.window_area, na.scale = tuple(a.window_size), a.window_area, a.scale
    na.qkv, na.proj, na.attn_drop, na.proj_drop = a.qkv, a.proj, a.attn_drop, a.proj_drop
    na.relative_position_bias_table = a.relative_position_bias_table
    new.train(blk.training)
    return new


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
        B, H, W, C = x.shape
        wh, ww = self.window_size
        pad_b, pad_r = (wh - H % wh) % wh, (ww - W % ww) % ww
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        Hp, Wp = H + pad_b, W + pad_r
        sh = 0 if wh >= Hp else self.shift_size[0]
        sw = 0 if ww >= Wp else self.shift_size[1]
        out = window_attention(
            self.qkv(x), self.num_heads, (wh, ww), shift_size=(sh, sw),
            rel_pos_bias=self.relative_position_bias_table, scale=(C // self.num_heads) ** -0.5,
            backend=self.backend,
        )
        if pad_b or pad_r:
            out = out[:, :H, :W]
        return F.dropout(self.proj(out), p=self.dropout, training=self.training)


class TorchvisionSwinBlock(nn.Module):
    """Fused replacement of torchvision's (v1) ``SwinTransformerBlock``; same state_dict keys."""

    def __init__(self, src: nn.Module, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = src.norm1
        self.attn = _TorchvisionFusedAttention(src.attn, backend)
        self.stochastic_depth = src.stochastic_depth
        self.norm2 = src.norm2
        self.mlp = src.mlp
        self.train(src.training)

    @property
    def backend(self) -> Optional[str]:
        return self.attn.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self.attn.backend = value

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.stochastic_depth(self.attn(self.norm1(x)))
        return x + self.stochastic_depth(self.mlp(self.norm2(x)))


def _plan(model: nn.Module) -> Tuple[List[Tuple[nn.Module, str, nn.Module, str]], List[str]]:
    """Blocks to replace as (parent, child name, block, kind) and unsupported Swin blocks found."""
    timm_v1, timm_v2 = _timm_classes()
    tv_v1, tv_v2, tv_attn = _tv_classes()
    todo, bad = [], []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            t = type(child)
            if timm_v1 is not None and t is timm_v1:
                todo.append((parent, name, child, "timm"))
            elif tv_v1 is not None and t is tv_v1:
                if type(child.attn) is not tv_attn:
                    bad.append(f"{full} ({t.__module__}.{t.__name__} with attn {type(child.attn).__name__})")
                else:
                    todo.append((parent, name, child, "torchvision"))
            elif (timm_v2 is not None and t is timm_v2) or (tv_v2 is not None and t is tv_v2):
                bad.append(f"{full} ({t.__module__}.{t.__name__})")
    return todo, bad


def swap_swin(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace, in place, every Swin (v1) block of a timm ``SwinTransformer`` or torchvision
    ``swin_t/s/b`` model with a fused block that shares the same parameter objects (optimizers
    keep working, ``state_dict`` keys and values are unchanged).

    Args:
        model: a timm ``SwinTransformer`` (v1), a torchvision ``SwinTransformer`` with v1 blocks,
            or any module containing such blocks (a stage, a single block's parent).
        backend: passed to :func:`mixkernels.window_attention` (``None`` = automatic).
    Returns:
        ``model`` (modified in place).
    Raises:
        TypeError: the model holds unsupported Swin blocks (SwinV2) or no Swin v1 block at all.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_swin expects a torch.nn.Module, got {type(model).__name__}")
    name = f"{type(model).__module__}.{type(model).__name__}"
    timm_v1, _ = _timm_classes()
    tv_v1, _, _ = _tv_classes()
    if type(model) in (timm_v1, tv_v1):
        raise TypeError(f"swap_swin replaces blocks inside their parent module; got a bare {name}: "
                        "pass the model (or stage) that holds it")
    todo, bad = _plan(model)
    if bad:
        raise TypeError(
            f"swap_swin does not support {name}: it contains blocks with no fused equivalent: {', '.join(bad[:3])}"
            + (" ..." if len(bad) > 3 else "") + " (supported: timm SwinTransformer v1, torchvision swin_t/s/b)"
        )
    if not todo:
        if any(isinstance(m, (SwinBlock, TorchvisionSwinBlock)) for m in model.modules()):
            return model  # already swapped
        raise TypeError(
            f"swap_swin does not support {name}: no timm SwinTransformerBlock (v1) or torchvision "
            "SwinTransformerBlock found (supported: timm SwinTransformer v1, torchvision swin_t/s/b)"
        )
    for parent, child_name, blk, kind in todo:
        new = _from_timm(blk, backend) if kind == "timm" else TorchvisionSwinBlock(blk, backend)
        if {id(p) for p in new.parameters()} != {id(p) for p in blk.parameters()}:  # pragma: no cover
            raise RuntimeError(f"swap_swin: the fused {child_name} does not own exactly the original parameters")
        setattr(parent, child_name, new)
    return model
