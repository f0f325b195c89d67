"""``swap_swin``: put the fused window attention into the Swin models people use, in place.

A family is one :class:`Adapter` in :data:`ADAPTERS`: the module class it replaces (looked up
in ``sys.modules``, so no library is imported here and each one stays optional), a check that
names what it cannot handle, and a builder returning the fused module that shares the original
parameter objects. Swin blocks that have no adapter are listed in :data:`PENDING` and refused
with the reason. Supported today:

* timm ``SwinTransformerBlock`` (v1) -> :class:`mixkernels.nn.SwinBlock`
* timm ``SwinTransformerV2Block`` (``swinv2_*``) -> :class:`mixkernels.nn.SwinV2Block` (cosine attention)
* torchvision ``SwinTransformerBlock`` (v1, ``swin_t/s/b``) -> :class:`mixkernels.nn.TorchvisionSwinBlock`
* torchvision ``SwinTransformerBlockV2`` (``swin_v2_t/s/b``) -> :class:`mixkernels.nn.TorchvisionSwinBlockV2`
* transformers ``SwinLayer`` and ``Swinv2Layer`` -> ``mixkernels.nn.hf_swin.FusedSwinLayer`` /
  ``FusedSwinv2Layer`` (same object, fused subclass; transformers 4.x and 5.x layouts)
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from torch import fx, nn

from .nn.swin_block import SwinBlock
from .nn.swinv2_block import SwinV2Block
from .nn.torchvision_swin import TorchvisionSwinBlock, TorchvisionSwinBlockV2

__all__ = ["swap_swin", "Adapter", "ADAPTERS", "PENDING", "TorchvisionSwinBlock", "TorchvisionSwinBlockV2"]


def _cls(module: str, name: str) -> Optional[type]:
    mod = sys.modules.get(module)
    return getattr(mod, name, None) if mod is not None else None


@dataclass(frozen=True)
class Adapter:
    """How one Swin family is swapped.

    Attributes:
        family: the name users see in messages and the README (e.g. ``"timm v1"``).
        module: the module defining the replaced class (looked up in ``sys.modules`` only).
        cls: the replaced class's name; matched by exact type (subclasses may change forward).
        build: ``(block, backend) -> fused`` sharing ``block``'s parameter objects; may return
            ``block`` itself (changed in place).
        problem: ``block -> reason`` it cannot be swapped, or ``None``.
        fused: ``() -> classes`` of swapped modules (for "already swapped" detection).
    """

    family: str
    module: str
    cls: str
    build: Callable[[nn.Module, Optional[str]], nn.Module]
    problem: Callable[[nn.Module], Optional[str]] = lambda blk: None
    fused: Callable[[], Tuple[type, ...]] = lambda: ()

    def matches(self, m: nn.Module) -> bool:
        c = _cls(self.module, self.cls)
        return c is not None and type(m) is c


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


def _from_timm_v2(blk: nn.Module, backend: Optional[str]) -> SwinV2Block:
    """A :class:`SwinV2Block` that owns ``blk``'s submodules, parameters and buffers (same objects)."""
    a = blk.attn
    new = SwinV2Block(
        blk.dim, blk.input_resolution, num_heads=a.num_heads, window_size=blk.window_size, shift_size=0,
        always_partition=True, mlp_ratio=blk.mlp_ratio, qkv_bias=a.q_bias is not None,
        pretrained_window_size=a.pretrained_window_size, device="meta", backend=backend,
    )
    # timm already clamped window/shift for its resolution: take them as they are.
    new.always_partition, new.dynamic_mask = blk.always_partition, getattr(blk, "dynamic_mask", False)
    new.target_shift_size = blk.target_shift_size
    new.window_size, new.shift_size = tuple(blk.window_size), tuple(blk.shift_size)
    new.window_area = blk.window_area
    new.norm1, new.norm2, new.mlp = blk.norm1, blk.norm2, blk.mlp
    new.drop_path1, new.drop_path2 = blk.drop_path1, blk.drop_path2
    na = new.attn
    na.window_size, na.qkv_bias_separate = tuple(a.window_size), getattr(a, "qkv_bias_separate", False)
    na.logit_scale, na.cpb_mlp, na.qkv, na.proj = a.logit_scale, a.cpb_mlp, a.qkv, a.proj
    na.q_bias, na.v_bias = a.q_bias, a.v_bias
    na.attn_drop, na.proj_drop = a.attn_drop, a.proj_drop
    na.register_buffer("k_bias", a.k_bias, persistent=False)
    na.register_buffer("relative_coords_table", a.relative_coords_table, persistent=False)
    new.train(blk.training)
    return new


def _timm_v2_problem(blk: nn.Module) -> Optional[str]:
    a = getattr(blk, "attn", None)
    need = ("logit_scale", "cpb_mlp", "qkv", "q_bias", "v_bias", "relative_coords_table", "proj")
    missing = [n for n in need if not hasattr(a, n)]
    return f"unrecognized WindowAttention layout (missing {', '.join(missing)})" if missing else None


def _tv_problem(blk: nn.Module) -> Optional[str]:
    attn = _cls("torchvision.models.swin_transformer", "ShiftedWindowAttention")
    if type(blk.attn) is not attn:
        return f"attn is {type(blk.attn).__name__}, not ShiftedWindowAttention"
    return None


def _tv_v2_problem(blk: nn.Module) -> Optional[str]:
    attn = _cls("torchvision.models.swin_transformer", "ShiftedWindowAttentionV2")
    if type(blk.attn) is not attn:
        return f"attn is {type(blk.attn).__name__}, not ShiftedWindowAttentionV2"
    return None


def _hf_build(blk: nn.Module, backend: Optional[str]) -> nn.Module:
    from .nn.hf_swin import swap_layer

    return swap_layer(blk, backend)


def _hf_problem(blk: nn.Module) -> Optional[str]:
    from .nn.hf_swin import layout_problem

    return layout_problem(blk)


def _hf_fused() -> Tuple[type, ...]:
    mod = sys.modules.get("mixkernels.nn.hf_swin")
    return (mod.FusedSwinLayer, mod.FusedSwinv2Layer) if mod is not None else ()


ADAPTERS: List[Adapter] = [
    Adapter("timm v1", "timm.models.swin_transformer", "SwinTransformerBlock", _from_timm,
            fused=lambda: (SwinBlock,)),
    Adapter("timm v2", "timm.models.swin_transformer_v2", "SwinTransformerV2Block", _from_timm_v2,
            problem=_timm_v2_problem, fused=lambda: (SwinV2Block,)),
    Adapter("torchvision v1", "torchvision.models.swin_transformer", "SwinTransformerBlock", TorchvisionSwinBlock,
            problem=_tv_problem, fused=lambda: (TorchvisionSwinBlock,)),
    Adapter("torchvision v2", "torchvision.models.swin_transformer", "SwinTransformerBlockV2", TorchvisionSwinBlockV2,
            problem=_tv_v2_problem, fused=lambda: (TorchvisionSwinBlockV2,)),
    Adapter("transformers Swin", "transformers.models.swin.modeling_swin", "SwinLayer", _hf_build,
            problem=_hf_problem, fused=_hf_fused),
    Adapter("transformers Swinv2", "transformers.models.swinv2.modeling_swinv2", "Swinv2Layer", _hf_build,
            problem=_hf_problem, fused=_hf_fused),
]

# Swin blocks recognized but not swapped: (module, class, reason).
PENDING: List[Tuple[str, str, str]] = [
    ("timm.models.swin_transformer_v2_cr", "SwinTransformerV2CrBlock",
     "timm swinv2_cr (its own res-post-norm block and dense meta-MLP bias) has no adapter yet"),
]

_SUPPORTED = "supported: " + ", ".join(a.family for a in ADAPTERS)


def _plan(model: nn.Module) -> Tuple[List[Tuple[nn.Module, str, nn.Module, Adapter]], List[str]]:
    """Blocks to replace as (parent, child name, block, adapter) and the unsupported blocks found."""
    pending = [(c, why) for c, why in ((_cls(m, n), why) for m, n, why in PENDING) if c is not None]
    todo, bad = [], []
    for parent_name, parent in model.named_modules():
        for name, child in parent.named_children():
            full = f"{parent_name}.{name}" if parent_name else name
            label = f"{full} ({type(child).__module__}.{type(child).__name__}"
            adapter = next((a for a in ADAPTERS if a.matches(child)), None)
            if adapter is not None:
                problem = adapter.problem(child)
                if problem:
                    bad.append(f"{label}: {problem})")
                else:
                    todo.append((parent, name, child, adapter))
                continue
            why = next((why for c, why in pending if type(child) is c), None)
            if why:
                bad.append(f"{label}: {why})")
    return todo, bad


def swap_swin(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Replace, in place, every supported Swin block of ``model`` with a fused one that shares
    the same parameter objects (optimizers keep working, ``state_dict`` keys and values are
    unchanged, forward outputs and gradients match the original).

    Args:
        model: a timm ``SwinTransformer`` or ``SwinTransformerV2``, a torchvision ``SwinTransformer``
            (``swin_t/s/b``, ``swin_v2_t/s/b``), a transformers Swin/Swinv2 model (``SwinModel``, ``Swinv2Model``,
            ``SwinForImageClassification``, ``SwinForMaskedImageModeling``, backbones, ...),
            or any module containing such blocks (a stage, a detection backbone).
        backend: passed to :func:`mixkernels.window_attention` (``None`` = automatic); each
            swapped block has a ``backend`` attribute to change it later.
    Returns:
        ``model`` (modified in place).
    Raises:
        TypeError: the model holds Swin blocks without a fused equivalent (timm ``swinv2_cr``,
            unknown layouts) or no supported Swin block at all, or is a bare block.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_swin expects a torch.nn.Module, got {type(model).__name__}")
    name = f"{type(model).__module__}.{type(model).__name__}"
    if any(a.matches(model) for a in ADAPTERS):
        raise TypeError(f"swap_swin replaces blocks inside their parent module; got a bare {name}: "
                        "pass the model (or stage) that holds it")
    todo, bad = _plan(model)
    if bad:
        raise TypeError(
            f"swap_swin does not support {name}: it contains blocks with no fused equivalent: {', '.join(bad[:3])}"
            + (" ..." if len(bad) > 3 else "") + f" ({_SUPPORTED})"
        )
    if not todo:
        fused = tuple(c for a in ADAPTERS for c in a.fused())
        if any(isinstance(m, fused) for m in model.modules()):
            return model  # already swapped
        hint = ""
        if any(isinstance(m, fx.GraphModule) for m in model.modules()):
            hint = ("; it holds an fx GraphModule, whose traced code no longer calls the blocks: swap before "
                    "tracing (e.g. timm FeatureGraphNet(swap_swin(model), out_indices), or "
                    "create_feature_extractor(swap_swin(model), ...))")
        raise TypeError(f"swap_swin does not support {name}: no supported Swin block found ({_SUPPORTED}){hint}")
    for parent, child_name, blk, adapter in todo:
        before = {id(p) for p in blk.parameters()}
        new = adapter.build(blk, backend)
        if {id(p) for p in new.parameters()} != before:  # pragma: no cover
            raise RuntimeError(f"swap_swin: the fused {child_name} does not own exactly the original parameters")
        if new is not blk:
            setattr(parent, child_name, new)
    return model
