"""Modules built on the fused ops: timm-compatible window attention and Swin / SwinV2 blocks, the
fused torchvision blocks. (``mixkernels.nn.hf_swin`` imports transformers: it is loaded only by
``swap_swin`` on a transformers model.)"""
from .swin_block import DropPath, Mlp, SwinBlock
from .swinv2_block import SwinV2Block, WindowAttentionV2
from .torchvision_swin import TorchvisionSwinBlock, TorchvisionSwinBlockV2
from .window_attention import WindowAttention

__all__ = ["WindowAttention", "SwinBlock", "WindowAttentionV2", "SwinV2Block", "TorchvisionSwinBlock",
           "TorchvisionSwinBlockV2", "Mlp", "DropPath"]
