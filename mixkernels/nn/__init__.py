"""Modules built on the fused ops: timm-compatible window attention and Swin block."""
from .swin_block import DropPath, Mlp, SwinBlock
from .window_attention import WindowAttention

__all__ = ["WindowAttention", "SwinBlock", "Mlp", "DropPath"]
