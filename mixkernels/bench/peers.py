"""Peer implementations measured side by side with mixkernels, in the same process.

Each ``*_provider`` returns a :class:`~mixkernels.bench.harness.Provider`; its ``build`` raises
:class:`~mixkernels.bench.harness.Skip` with the reason when the peer cannot run here.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .. import reference as ref
from .harness import Case, Provider, Runner, Skip

__all__ = [
    "mixkernels_providers", "eager_provider", "compiled_provider", "sdpa_provider", "flex_provider",
    "xformers_provider", "natten_provider", "flash_attn_provider", "import_timm", "compile_fn",
]

Fn = Callable[[Dict[str, Any]], Any]


def _raise_recompile_limits() -> None:
    # Every case compiles its own graph from the same Python function; past the default limit of
    # 8 recompiles Dynamo silently runs eager, which would mislabel eager time as "compiled".
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 512))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4096))


def compile_fn(fn: Fn) -> Fn:
    """``torch.compile`` with static shapes (one specialized graph per case, as a user gets)."""
    _raise_recompile_limits()
    return torch.compile(fn, dynamic=False)


# ------------------------------------------------------------------------------ generic peers
def mixkernels_providers(op: Callable[..., Any], device: torch.device) -> list:
    """One provider per mixkernels backend that makes sense on ``device``; ``op(inp, backend)``.

    Availability is asked of the dispatcher itself: the first call raises BackendUnavailable
    (recorded as "skipped: <reason>") until that backend's kernel lands.
    """
    names = ("cuda", "triton") if device.type == "cuda" else ("cpu", "triton")
    out = []
    for b in names:
        def build(case: Case, inp, _b=b) -> Runner:
            if _b == "triton" and device.type == "cpu":
                if os.environ.get("TRITON_INTERPRET") == "1":
                    raise Skip("Triton interpreter (TRITON_INTERPRET=1) is not a performance measurement")
                raise Skip("Triton needs a CUDA device (CPU tensors only run under the interpreter)")
            return Runner(lambda i: op(i, _b))

        out.append(Provider(f"mixkernels-{b}", "mixkernels", build))
    return out


def eager_provider(fn: Fn, name: str = "eager") -> Provider:
    return Provider(name, "peer", lambda case, inp: Runner(fn))


def compiled_provider(fn: Fn, settings, name: str = "compiled") -> Provider:
    def build(case: Case, inp) -> Runner:
        if settings.skip_compile:
            raise Skip(settings.compile_reason or "torch.compile peers disabled")
        return Runner(compile_fn(fn))

    return Provider(name, "peer", build)


# ------------------------------------------------------------------------------ attention peers
def _geometry(inp: Dict[str, Any]):
    B, H, W, C3 = inp["qkv"].shape
    nh = inp["nh"]
    wh, ww = inp["window"]
    sh, sw = inp["shift"]
    C = C3 // 3
    return B, H, W, C, nh, C // nh, wh, ww, sh, sw, (H // wh) * (W // ww), wh * ww


def window_labels(inp: Dict[str, Any]) -> Optional[torch.Tensor]:
    """``(G, nW, N)`` int64 labels per window token combining the shift regions and the group
    mask (a pair attends iff labels are equal), or None when nothing is masked."""
    B, H, W, C, nh, d, wh, ww, sh, sw, nW, N = _geometry(inp)
    dev = inp["qkv"].device
    lab = None
    if sh or sw:
        ids = ref.shift_region_ids(H, W, (wh, ww), (sh, sw), device=dev)  # on the rolled grid
        lab = ref.window_partition(ids[None, :, :, None], (wh, ww)).reshape(1, nW, N)
    g = inp.get("group")
    if g is not None:
        g = g.long()
        g = g.unsqueeze(0) if g.dim() == 2 else g
        gw = ref.window_partition(g.unsqueeze(-1), (wh, ww), (sh, sw)).reshape(-1, nW, N)
        gw = gw - gw.min()
        lab = gw if lab is None else lab * (int(gw.max()) + 1) + gw
    return lab


def _partition_qkv(inp, layout: str = "bhnd"):
    B, H, W, C, nh, d, wh, ww, sh, sw, nW, N = _geometry(inp)
    win = ref.window_partition(inp["qkv"], (wh, ww), (sh, sw)).reshape(B * nW, N, 3, nh, d)
    if layout == "bnhd":  # xformers BMHK
        return win.unbind(2)
    return win.permute(2, 0, 3, 1, 4).unbind(0)


def _merge(o, inp):
    B, H, W, C, nh, d, wh, ww, sh, sw, nW, N = _geometry(inp)
    return ref.window_merge(o.reshape(B * nW, N, C), (wh, ww), H, W, (sh, sw))


def additive_mask(labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(G, nW, 1, N, N)`` float32: 0 where a pair may attend, -inf elsewhere (or None)."""
    if labels is None:
        return None
    allowed = labels[:, :, :, None] == labels[:, :, None, :]
    neg = torch.zeros(allowed.shape, device=labels.device, dtype=torch.float32)
    return neg.masked_fill(~allowed, float("-inf")).unsqueeze(2)


def _folded_mask(inp, neg, dtype, pad_to: int = 1):
    """Relative-position bias + shift/group masks folded into one dense additive mask
    ``(B*nW, nH, N, N)``: what SDPA / xformers need, materialized every call (it depends on the
    bias parameter)."""
    B, H, W, C, nh, d, wh, ww, sh, sw, nW, N = _geometry(inp)
    dev = inp["qkv"].device
    bias = torch.zeros(nh, N, N, device=dev, dtype=torch.float32)
    if inp.get("rpb") is not None:
        idx = ref.relative_position_index(wh, ww, device=dev).reshape(-1)
        bias = inp["rpb"][idx].reshape(N, N, nh).permute(2, 0, 1)
    m = bias[None, None]  # (1, 1, nH, N, N)
    if neg is not None:
        m = m + neg  # (G, nW, nH, N, N)
    m = m.to(dtype).expand(B, nW, nh, N, N)
    Np = -(-N // pad_to) * pad_to
    if Np == N:
        return m.reshape(B * nW, nh, N, N)
    full = torch.empty(B, nW, nh, N, Np, device=dev, dtype=dtype)  # one write into an aligned buffer
    full[..., :N] = m
    return full.view(B * nW, nh, N, Np)[..., :N]


def sdpa_provider(device: torch.device) -> Provider:
    """SDPA with the bias and masks folded into ``attn_mask`` plus the partition copies; pinned to
    EFFICIENT_ATTENTION on CUDA (the only fused SDPA kernel that takes an arbitrary float mask)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def build(case: Case, inp) -> Runner:
        neg = additive_mask(window_labels(inp))  # depends on the masks only: built once

        def fn(i):
            q, k, v = _partition_qkv(i)
            # EFFICIENT_ATTENTION wants the mask's rows 16-element aligned; torch would pad a copy
            mask = _folded_mask(i, neg, q.dtype, pad_to=16 if device.type == "cuda" else 1)
            if device.type == "cuda":
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return _merge(o.transpose(1, 2), i)

        note = "EFFICIENT_ATTENTION, folded mask" if device.type == "cuda" else "CPU default SDPA backend, folded mask"
        return Runner(fn, note=note)

    return Provider("sdpa", "peer", build)


def flex_provider(device: torch.device, settings) -> Provider:
    """Compiled FlexAttention: bias as ``score_mod``, shift/group masks as ``mask_mod`` (block
    mask built once per case, outside the timed call: it depends on the mask, not parameters)."""

    def build(case: Case, inp) -> Runner:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Skip(f"FlexAttention not available in torch {torch.__version__} ({e})")
        if settings.skip_compile:
            raise Skip(settings.compile_reason or "torch.compile peers disabled (FlexAttention needs it)")
        if device.type == "cpu" and case.mode == "fwd+bwd":
            raise Skip("FlexAttention has no CPU backward")
        B, H, W, C, nh, d, wh, ww, sh, sw, nW, N = _geometry(inp)
        labels = window_labels(inp)
        idx = ref.relative_position_index(wh, ww, device=device)
        block_mask = None
        if labels is not None:
            G = labels.shape[0]
            lab = labels.reshape(G * nW, N)

            def mask_mod(b, h, qi, ki):
                w = b % (G * nW)
                return lab[w, qi] == lab[w, ki]

            block_mask = create_block_mask(mask_mod, B * nW, None, N, N, device=device)
        has_bias = inp.get("rpb") is not None

        def fn(i):
            q, k, v = _partition_qkv(i)
            rpb = i["rpb"]

            def score_mod(score, b, h, qi, ki):
                return score + rpb[idx[qi, ki], h] if has_bias else score

            o = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
            return _merge(o.transpose(1, 2), i)

        compiled = compile_fn(fn)
        if device.type == "cpu":  # forward only there: detached inputs, no autograd graph
            def fwd_only(i):
                with torch.no_grad():
                    return compiled({k: v.detach() if torch.is_tensor(v) else v for k, v in i.items()})

            return Runner(fwd_only, note="torch.compile(flex_attention), no_grad (no CPU backward)")
        return Runner(compiled, note="torch.compile(flex_attention)")

    return Provider("flex", "peer", build)


def xformers_provider() -> Provider:
    def build(case: Case, inp) -> Runner:
        if importlib.util.find_spec("xformers") is None:
            raise Skip("not installed")
        if inp["qkv"].device.type != "cuda":
            raise Skip("xformers memory_efficient_attention needs CUDA")
        import xformers.ops as xops

        neg = additive_mask(window_labels(inp))

        def fn(i):
            q, k, v = _partition_qkv(i, "bnhd")
            mask = _folded_mask(i, neg, q.dtype, pad_to=8)  # xformers wants an aligned bias
            return _merge(xops.memory_efficient_attention(q, k, v, attn_bias=mask), i)

        return Runner(fn, note="memory_efficient_attention, folded mask")

    return Provider("xformers", "peer", build)


def natten_provider() -> Provider:
    def build(case: Case, inp) -> Runner:
        if importlib.util.find_spec("natten") is None:
            raise Skip("not installed")
        raise Skip("NATTEN has neighborhood attention only: no window attention with a relative-position "
                   "table and a group mask to compare against")

    return Provider("natten", "peer", build)


def flash_attn_provider() -> Provider:
    def build(case: Case, inp) -> Runner:
        if importlib.util.find_spec("flash_attn") is None:
            raise Skip("not installed")
        raise Skip("flash-attn takes no additive bias or arbitrary mask (Swin needs both)")

    return Provider("flash-attn", "peer", build)


# ------------------------------------------------------------------------------ timm
def import_timm():
    """``import timm`` through the package's CPU-torch shim (docs/DESIGN.md section 5)."""
    from .._compat import import_timm as _imp

    return _imp()
