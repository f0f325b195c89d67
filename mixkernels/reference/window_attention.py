"""Reference window attention: timm/torchvision Swin attention, step by step.

This is the executable spec of ``mixkernels.window_attention``. It materializes
everything the fused kernels avoid (roll, partition, N x N bias and mask, the
softmax probabilities) and is differentiated by plain autograd.

Edge-input rules (docs/SEMANTICS.md; every backend follows them):

1. ``group`` labels and ``coords`` compare exactly at their full integer width (int64
   included): labels equal modulo 2**32 stay different, and coordinate differences are
   exact (no wrap-around, even between -2**63 and 2**63-1).
2. A query row whose every key is masked (possible only through ``-inf`` in ``attn_bias`` /
   ``rel_pos_bias``) is the softmax of an all ``-inf`` row: NaN, as in timm's eager Swin.
   NaN/Inf inputs propagate through the arithmetic below (e.g. ``0 * NaN`` in ``P @ V``
   reaches rows that cannot attend the NaN key). A pair masked by the shift or ``group``
   rule gets logit ``-inf`` and gradient exactly 0 (``masked_fill``'s backward).
3. A pair whose coordinate difference falls outside the ``coord_range`` table gets no
   relative-position bias (adds 0, no gradient to the table) and still attends.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .windows import window_merge, window_partition

__all__ = [
    "COSINE_EPS",
    "LOGIT_SCALE_MAX",
    "exact_difference",
    "merge_heads",
    "relative_position_index",
    "shift_region_ids",
    "window_attention",
    "window_attention_logits",
]


# SwinV2 cosine attention: F.normalize's default eps, and the clamp of the learned logit scale
# (timm/HF write log(1/0.01), torchvision log(100): the same double).
COSINE_EPS = 1e-12
LOGIT_SCALE_MAX = math.log(100.0)


def _pair(v) -> Tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """Swin's ``relative_position_index``: ``(N, N)`` int64 into a ``((2wh-1)*(2ww-1), nH)`` table."""
    ys, xs = torch.meshgrid(
        torch.arange(wh, device=device), torch.arange(ww, device=device), indexing="ij"
    )
    coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def shift_region_ids(H: int, W: int, window: Tuple[int, int], shift: Tuple[int, int], device=None) -> torch.Tensor:
    """Swin's shifted-window region label of every position of the *rolled* grid, ``(H, W)`` int64.

    Rows ``[0,H-wh) [H-wh,H-sh) [H-sh,H)`` get 0/1/2 (same for columns) and the label is
    ``3*row_region + col_region``; a pair may attend only within one label.
    """
    (wh, ww), (sh, sw) = window, shift

    def bands(n, w, s):
        ids = torch.zeros(n, dtype=torch.long, device=device)
        if s > 0:
            ids[n - w : n - s] = 1
            ids[n - s :] = 2
        return ids

    return bands(H, wh, sh)[:, None] * 3 + bands(W, ww, sw)[None, :]


def _windows_of(t: torch.Tensor, window, shift) -> torch.Tensor:
    """Roll a ``(G,H,W,K)`` per-position tensor like the tokens and partition it: ``(G*nW, N, K)``."""
    return window_partition(t, window, shift)


def exact_difference(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``a - b`` of int64 tensors and where it overflowed (wrapped): the difference is exact where not."""
    d = a - b  # int64 arithmetic wraps around
    return d, ((a ^ b) & (a ^ d)) < 0  # overflow iff a, b differ in sign and d's sign differs from a's


def _coords_bias(table: torch.Tensor, coords: torch.Tensor, window, shift, coord_range) -> torch.Tensor:
    """Per-window table bias ``(G*nW, nH, N, N)``; 0 where the coordinate difference is out of range (rule 3)."""
    Rh, Rw = coord_range
    c = coords.long()
    if c.dim() == 3:
        c = c.unsqueeze(0)
    cw = _windows_of(c, window, shift)  # (G*nW, N, 2)
    rel, ovf = exact_difference(cw[:, :, None, :], cw[:, None, :, :])  # (G*nW, N, N, 2)
    R = torch.tensor([Rh, Rw], device=c.device)
    inr = (~ovf & (rel > -R) & (rel < R)).all(-1)  # (G*nW, N, N)
    rel = torch.where(inr.unsqueeze(-1), rel, 0)
    idx = (rel[..., 0] + Rh - 1) * (2 * Rw - 1) + (rel[..., 1] + Rw - 1)
    N, nH = idx.shape[-1], table.shape[1]
    bias = table[idx.reshape(-1)].reshape(idx.shape + (nH,))
    # where (not multiply): an Inf/NaN table entry must not leak into out-of-range pairs.
    bias = torch.where(inr.unsqueeze(-1), bias, torch.zeros((), dtype=bias.dtype, device=bias.device))
    return bias.permute(0, 3, 1, 2)


def window_attention_logits(
    qkv: torch.Tensor,
    num_heads: int,
    window_size,
    *,
    shift_size=0,
    rel_pos_bias: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    group: Optional[torch.Tensor] = None,
    coords: Optional[torch.Tensor] = None,
    coord_range=None,
    scale: Optional[float] = None,
    logit_scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The softmax's input and the values of :func:`window_attention` (same arguments).

    Returns ``(logits, v)``: ``logits`` ``(B*nW, nH, N, N)`` = ``scale * q @ k^T`` (cosine mode:
    see :func:`window_attention`'s ``logit_scale``) + biases,
    ``-inf`` at the pairs masked by the shift or ``group`` rule (``masked_fill``: gradient 0
    there); ``v`` ``(B*nW, nH, N, d)``; windows of the rolled grid, row-major. The kernel-level
    backward's contract is stated on these (``P = exp(logits - lse)``).
    """
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    nH = num_heads
    d = C // nH
    wh, ww = _pair(window_size)
    sh, sw = _pair(shift_size)
    N = wh * ww
    nW = (H // wh) * (W // ww)
    if scale is None:
        scale = d ** -0.5

    win = window_partition(qkv, (wh, ww), (sh, sw))  # (B*nW, N, 3C)
    q, k, v = win.reshape(B * nW, N, 3, nH, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, nH, N, d)
    if logit_scale is None:
        attn = (q * scale) @ k.transpose(-2, -1)  # (B*nW, nH, N, N)
    else:  # SwinV2 cosine attention, as timm/torchvision compute it
        attn = F.normalize(q, dim=-1, eps=COSINE_EPS) @ F.normalize(k, dim=-1, eps=COSINE_EPS).transpose(-2, -1)
        head_scale = torch.clamp(logit_scale.reshape(nH), max=LOGIT_SCALE_MAX).exp()
        attn = attn * head_scale.to(attn.dtype).view(1, nH, 1, 1)

    if rel_pos_bias is not None:
        if coords is None:
            idx = relative_position_index(wh, ww, device=qkv.device)  # (N, N)
            bias = rel_pos_bias[idx.reshape(-1)].reshape(N, N, nH).permute(2, 0, 1)
            attn = attn + bias.unsqueeze(0).to(attn.dtype)
        else:
            bias = _coords_bias(rel_pos_bias, coords, (wh, ww), (sh, sw), _pair(coord_range))  # (G*nW, nH, N, N)
            G = bias.shape[0] // nW  # 1 (batch-shared) or B
            attn = (attn.reshape(B // G if G else 0, G * nW, nH, N, N) + bias.to(attn.dtype)).reshape(B * nW, nH, N, N)

    if attn_bias is not None:
        attn = attn + attn_bias.unsqueeze(0).to(attn.dtype)

    allowed = None
    if sh > 0 or sw > 0:
        ids = shift_region_ids(H, W, (wh, ww), (sh, sw), device=qkv.device)
        idw = window_partition(ids[None, :, :, None], (wh, ww)).reshape(nW, N)  # rolled grid: no shift here
        allowed = (idw[:, :, None] == idw[:, None, :]).unsqueeze(0)  # (1, nW, N, N)
    if group is not None:
        g = group.long()
        if g.dim() == 2:
            g = g.unsqueeze(0)
        gw = _windows_of(g.unsqueeze(-1), (wh, ww), (sh, sw)).reshape(g.shape[0], nW, N)  # (G, nW, N)
        same = gw[:, :, :, None] == gw[:, :, None, :]  # (G, nW, N, N)
        allowed = same if allowed is None else (allowed & same)
    if allowed is not None:
        attn = attn.reshape(B, nW, nH, N, N).masked_fill(~allowed.unsqueeze(2), float("-inf"))
        attn = attn.reshape(B * nW, nH, N, N)

    return attn, v


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size,
    *,
    shift_size=0,
    rel_pos_bias: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    group: Optional[torch.Tensor] = None,
    coords: Optional[torch.Tensor] = None,
    coord_range=None,
    scale: Optional[float] = None,
    logit_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mask-aware (shifted) window attention, reference implementation.

    Args:
        qkv: ``(B, H, W, 3C)`` output of the qkv Linear on the un-shifted tokens,
            channels ordered ``(3, nH, d)``.
        num_heads: ``nH``; ``d = C // nH``.
        window_size: ``wh`` or ``(wh, ww)``; ``H % wh == 0`` and ``W % ww == 0``.
        shift_size: Swin cyclic shift ``sh`` or ``(sh, sw)``.
        rel_pos_bias: ``((2Rh-1)*(2Rw-1), nH)`` table (``R = window`` without ``coords``).
        attn_bias: dense ``(nH, N, N)`` bias.
        group: ``(H, W)`` or ``(B, H, W)`` integer/bool labels; pairs attend only within a label
            (labels compared exactly, int64 included).
        coords: ``(H, W, 2)`` or ``(B, H, W, 2)`` integer true positions for the table lookup;
            a pair whose exact difference is outside ``coord_range`` gets no bias and still attends.
        coord_range: ``(Rh, Rw)``, required with ``coords``.
        scale: softmax scale, default ``d ** -0.5`` (unused in cosine mode).
        logit_scale: SwinV2 cosine attention when given: ``(nH,)`` or ``(nH, 1, 1)`` learned
            per-head log scale. The logits are then
            ``normalize(q) @ normalize(k)^T * exp(min(logit_scale, log(100)))`` with q and k
            L2-normalized per head as ``F.normalize`` does (``x / max(||x||, 1e-12)``) and
            the clamp's gradient (zero where ``logit_scale > log(100)``); biases and masks are
            added after, as timm/torchvision SwinV2 do (the continuous position bias
            ``16*sigmoid(cpb_mlp(table))`` is passed as ``rel_pos_bias`` or ``attn_bias``).

    Returns:
        ``(B, H, W, C)`` merged and un-shifted attention output, dtype of ``qkv``; NaN in the
        rows of a query whose every key is masked (rule 2 of the module docstring).
    """
    attn, v = window_attention_logits(
        qkv, num_heads, window_size, shift_size=shift_size, rel_pos_bias=rel_pos_bias, attn_bias=attn_bias,
        group=group, coords=coords, coord_range=coord_range, scale=scale, logit_scale=logit_scale)
    attn = attn.softmax(dim=-1)
    return merge_heads(attn @ v, window_size, qkv.shape[1], qkv.shape[2], shift_size)


def merge_heads(x: torch.Tensor, window_size, H: int, W: int, shift_size=0) -> torch.Tensor:
    """``(B*nW, nH, N, d)`` per-window, per-head rows -> ``(B, H, W, nH*d)`` tokens (un-shifted)."""
    Bw, nH, N, d = x.shape
    return window_merge(x.transpose(1, 2).reshape(Bw, N, nH * d), _pair(window_size), H, W, _pair(shift_size))
