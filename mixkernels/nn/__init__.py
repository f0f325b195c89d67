"""Modules built on the fused ops: timm-compatible window attention and Swin block, the fused
torchvision block. (``mixkernels.nn.hf_swin`` imports transformers: it is loaded only by
``swap_swin`` on a transformers model.)"""
from .swin_block import DropPath, Mlp, SwinBlock
from .torchvision_swin import TorchvisionSwinBlock
from .window_attention import WindowAttention

__all__ = ["WindowAttention", "SwinBlock", "TorchvisionSwinBlock", "Mlp", "DropPath"]
