"""Fused Hugging Face ``transformers`` Swin and Swinv2 layers (imported only when transformers is).

:func:`mixkernels.swap_swin` turns each ``SwinLayer`` / ``Swinv2Layer`` into the subclass below
in place (``layer.__class__ = ...``): parameters, buffers, hooks, ``state_dict``,
``save_pretrained`` and transformers' gradient checkpointing stay exactly as they were, and the
original forward stays one ``super()`` call away. Both module layouts are handled: transformers
4.x (``attention.self.query/key/value``, ``head_mask`` and ``output_attentions`` arguments) and
5.x Swin (``attention.q_proj/k_proj/v_proj/o_proj``, attentions captured by hooks).

What the fused forward reproduces (transformers' own code, per call):

* Swin: pre-norm; ``set_shift_and_window_size`` exactly as transformers calls it (it clamps the
  window to ``min(H, W)`` and drops the shift when the grid is not larger than the window, and
  the change persists on the layer, as it does unswapped); pad bottom/right to window multiples,
  roll the padded map: ``pad -> op(shift) -> crop``. The shift mask is exact (-inf) where
  transformers adds -100: identical probabilities unless masked logits come within ~100 of the
  row's maximum.
* Swinv2: post-norm, cosine attention with a learned, clamped logit scale and a continuous
  position bias (CPB MLP): the op's cosine mode (``logit_scale``; q/k normalization, the clamp
  and the scale fused in the kernel) with ``16 * sigmoid(CPB MLP(coords))`` as the bias table
  (the MLP runs on the ``(2w-1)^2`` coordinates, never per pair). transformers adds its -100
  shift mask twice (-200); we mask exactly.

Calls the fused kernel cannot serve run transformers' original forward for that call only:
attention probabilities requested (``output_attentions`` argument or config, or transformers
5.x's output capture) and ``head_mask`` (4.x). Attention dropout while training raises
``NotImplementedError`` (no fused implementation), as in the other swapped families.
"""
from __future__ import annotations

import inspect
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.swin import modeling_swin as _hf_v1
from transformers.models.swinv2 import modeling_swinv2 as _hf_v2

from ..ops import window_attention
from .padding import crop_windows, pad_to_windows
from .swinv2_block import cpb_table

try:  # transformers 5.x records attentions through hooks while this collector is active
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers pass output_attentions explicitly
    _active_collector = None

__all__ = ["FusedSwinLayer", "FusedSwinv2Layer", "swap_layer", "layout_problem"]

torch.fx.wrap("window_attention")
torch.fx.wrap("pad_to_windows")
torch.fx.wrap("crop_windows")

_V1_LEGACY = "head_mask" in inspect.signature(_hf_v1.SwinLayer.forward).parameters
_V2_LEGACY = "head_mask" in inspect.signature(_hf_v2.Swinv2Layer.forward).parameters


def _plain_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks)


def _qkv(x: Tensor, q: nn.Module, k: nn.Module, v: nn.Module) -> Tensor:
    """``(..., 3C)`` in the op's channel order ``(3, nH, d)`` from transformers' three projections.

    Plain ``nn.Linear`` projections run as one GEMM on the concatenated weights (no activation
    copy); anything else (LoRA/PEFT wrappers, quantized layers, hooks) is called as a module.
    """
    if _plain_linear(q) and _plain_linear(k) and _plain_linear(v):
        bias = None
        if q.bias is not None or k.bias is not None or v.bias is not None:
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in (q, k, v)])
        return F.linear(x, torch.cat([q.weight, k.weight, v.weight]), bias)
    return torch.cat([q(x), k(x), v(x)], dim=-1)


def _fallback_warning(reason: str) -> None:
    warnings.warn(
        f"swapped transformers Swin layer: {reason}; running transformers' own attention for this call "
        "(the fused kernel never materializes attention probabilities)", stacklevel=3,
    )


def _attentions_requested(layer: nn.Module, kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    if _active_collector is not None:
        collected = _active_collector.get()
        return bool(collected) and "attentions" in collected
    return bool(getattr(layer.attention.config, "output_attentions", False))  # pragma: no cover


def _no_attention_dropout(p: float, training: bool) -> None:
    if training and p > 0:
        raise NotImplementedError(
            f"attention dropout (attention_probs_dropout_prob={p}) has no fused implementation; "
            "use 0 (transformers' Swin default) or eval mode"
        )


def _window_attention(layer: nn.Module, x: Tensor, qkv_fn, heads: int, table: Tensor, scale: Optional[float],
                      logit_scale: Optional[Tensor] = None) -> Tensor:
    """pad -> qkv -> fused op (shift on the padded grid) -> crop, for ``(B, H, W, C)`` ``x``."""
    ws, ss = int(layer.window_size), int(layer.shift_size)
    win, shift = (ws, ws), (ss, ss)
    xp = pad_to_windows(x, win)
    out = window_attention(qkv_fn(xp), heads, win, shift_size=shift, rel_pos_bias=table, scale=scale,
                           logit_scale=logit_scale, backend=layer.backend)
    return crop_windows(out, x.shape[1], x.shape[2])


class FusedSwinLayer(_hf_v1.SwinLayer):
    """transformers ``SwinLayer`` with the fused window attention (see the module docstring)."""

    backend: Optional[str] = None

    def _bias_table(self) -> Tensor:
        a = self.attention
        if hasattr(a, "relative_position_bias"):  # 5.x
            rpb = a.relative_position_bias
            table, table_window = rpb.relative_position_bias_table, tuple(rpb.window_size)
        else:  # 4.x
            table, table_window = a.self.relative_position_bias_table, tuple(a.self.window_size)
        if table_window != (int(self.window_size),) * 2:
            raise ValueError(
                f"this input clamps the window to {int(self.window_size)} but the relative-position table is for "
                f"{table_window}: transformers' own SwinLayer fails on this input too (bias shape mismatch)"
            )
        return table

    def _fused(self, hidden_states: Tensor, input_dimensions, always_partition: bool) -> Tensor:
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        H, W = input_dimensions
        B, _, C = hidden_states.shape
        x = self.layernorm_before(hidden_states).view(B, H, W, C)
        a = self.attention
        if hasattr(a, "q_proj"):  # 5.x: q/k/v/o on the attention module, layer-level dropout
            _no_attention_dropout(a.attention_dropout, self.training)
            out = _window_attention(self, x, lambda t: _qkv(t, a.q_proj, a.k_proj, a.v_proj), a.num_attention_heads,
                                    self._bias_table(), a.scaling)
            out = self.dropout(a.o_proj(out))
        else:  # 4.x: attention.self / attention.output
            sa = a.self
            _no_attention_dropout(sa.dropout.p, self.training)
            out = _window_attention(self, x, lambda t: _qkv(t, sa.query, sa.key, sa.value), sa.num_attention_heads,
                                    self._bias_table(), sa.attention_head_size ** -0.5)
            out = a.output.dropout(a.output.dense(out))
        hidden_states = hidden_states + self.drop_path(out.reshape(B, H * W, C))
        if hasattr(self, "mlp"):  # 5.x
            return self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states
        return hidden_states + self.output(self.intermediate(self.layernorm_after(hidden_states)))

    if _V1_LEGACY:
        def forward(self, hidden_states, input_dimensions, head_mask=None, output_attentions=False,
                    always_partition=False):
            if head_mask is not None or output_attentions:
                _fallback_warning("head_mask given" if head_mask is not None else "output_attentions=True")
                return super().forward(hidden_states, input_dimensions, head_mask, output_attentions, always_partition)
            return (self._fused(hidden_states, input_dimensions, always_partition),)
    else:
        def forward(self, hidden_states, input_dimensions, always_partition=False, **kwargs):
            if _attentions_requested(self, kwargs):
                _fallback_warning("attentions requested")
                return super().forward(hidden_states, input_dimensions, always_partition, **kwargs)
            return self._fused(hidden_states, input_dimensions, always_partition), None


class FusedSwinv2Layer(_hf_v2.Swinv2Layer):
    """transformers ``Swinv2Layer`` on the fused op in cosine mode (see the module docstring)."""

    backend: Optional[str] = None

    def _fused(self, hidden_states: Tensor, input_dimensions) -> Tensor:
        H, W = input_dimensions
        B, _, C = hidden_states.shape
        sa = self.attention.self
        _no_attention_dropout(sa.dropout.p, self.training)
        heads = sa.num_attention_heads
        table = cpb_table(sa.continuous_position_bias_mlp, sa.relative_coords_table, heads)
        out = _window_attention(self, hidden_states.view(B, H, W, C), lambda t: _qkv(t, sa.query, sa.key, sa.value),
                                heads, table, None, logit_scale=sa.logit_scale)
        out = self.attention.output(out, out)  # dense + dropout (its second argument is unused)
        hidden_states = hidden_states + self.drop_path(self.layernorm_before(out.reshape(B, H * W, C)))
        layer_output = self.output(self.intermediate(hidden_states))
        return hidden_states + self.drop_path(self.layernorm_after(layer_output))

    if _V2_LEGACY:
        def forward(self, hidden_states, input_dimensions, head_mask=None, output_attentions=False):
            if head_mask is not None or output_attentions:
                _fallback_warning("head_mask given" if head_mask is not None else "output_attentions=True")
                return super().forward(hidden_states, input_dimensions, head_mask, output_attentions)
            return (self._fused(hidden_states, input_dimensions),)
    else:
        def forward(self, hidden_states, input_dimensions, output_attentions=False):
            if output_attentions:
                _fallback_warning("output_attentions=True")
                return super().forward(hidden_states, input_dimensions, output_attentions)
            return (self._fused(hidden_states, input_dimensions),)


_FUSED = {_hf_v1.SwinLayer: FusedSwinLayer, _hf_v2.Swinv2Layer: FusedSwinv2Layer}
_V1_ATTRS = (("q_proj", "k_proj", "v_proj", "o_proj", "relative_position_bias"),
             ("self.query", "self.key", "self.value", "self.relative_position_bias_table", "output.dense"))
_V2_ATTRS = ("self.query", "self.key", "self.value", "self.logit_scale", "self.continuous_position_bias_mlp",
             "self.relative_coords_table", "self.relative_position_index", "output.dense")


def _has(obj, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def layout_problem(layer: nn.Module) -> Optional[str]:
    """Why ``layer`` (a transformers Swin/Swinv2 layer) cannot be swapped, or ``None``."""
    a = getattr(layer, "attention", None)
    if type(layer) is _hf_v1.SwinLayer:
        if a is None or not any(all(_has(a, n) for n in names) for names in _V1_ATTRS):
            return "unrecognized SwinAttention layout (transformers version not supported)"
    elif type(layer) is _hf_v2.Swinv2Layer:
        if a is None or not all(_has(a, n) for n in _V2_ATTRS):
            return "unrecognized Swinv2Attention layout (transformers version not supported)"
    else:
        return f"{type(layer).__name__} is not a transformers SwinLayer / Swinv2Layer"
    return None


def swap_layer(layer: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Turn a transformers ``SwinLayer``/``Swinv2Layer`` into its fused subclass, in place; returns it."""
    problem = layout_problem(layer)
    if problem:
        raise TypeError(f"cannot swap {type(layer).__module__}.{type(layer).__name__}: {problem}")
    layer.__class__ = _FUSED[type(layer)]
    layer.backend = backend
    return layer
