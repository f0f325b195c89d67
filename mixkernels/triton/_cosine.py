"""SwinV2 cosine attention in the Triton window-attention kernels: the pieces forward and backward share.

Cosine mode (``COSINE`` constexpr of ``_fwd_kernel`` / ``_bwd_kernel``): q and k rows are
L2-normalized where they are loaded (``F.normalize``: ``x / max(||x||, 1e-12)``, fp32 sums, the
result back in the input dtype for the MMA), and the head's ``exp(min(logit_scale, log 100))``
is folded into the per-program score scale, so the per-score work is that of the plain kernels.
The backward scales dQ/dK by the head scale where it stored ``scale`` before and maps them back
through the normalization (``_unit_grad``) where they are stored, reloading the raw rows (L1/L2)
rather than keeping them live. The per-row dots ``<q_hat, dq_hat>`` it computes there, summed over
a head, are the logit-scale gradient before the clamp (``_dls_kernel`` sums the per-program
partials in a fixed order and applies the clamp's zero gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dlogit_scale"]

_LOG100 = 4.605170185988092  # SwinV2's clamp of the logit scale, log(100)
_EPS = 1e-12  # F.normalize's default eps (mixkernels.reference COSINE_EPS)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _head_scale(ls, h):
    """exp(min(logit_scale[h], log 100)); a NaN logit scale stays NaN (as torch.clamp)."""
    v = tl.load(ls + h)
    return tl.exp(tl.where(v > 4.605170185988092, 4.605170185988092, v))


@triton.jit
def _unit(x, COSINE: tl.constexpr):
    """Rows of ``x`` divided by max(||row||, 1e-12) (fp32 math, ``x``'s dtype) in cosine mode, else ``x``.
    Zero rows (padded keys) stay zero."""
    if COSINE:
        xf = x.to(tl.float32)
        inv = 1.0 / tl.maximum(tl.sqrt_rn(tl.sum(xf * xf, 1)), 1e-12)
        return (xf * inv[:, None]).to(x.dtype)
    else:
        return x


@triton.jit
def _unit_grad(g, x):
    """Gradient through y = x / max(||x||, eps) per row: ``g`` (fp32) is dL/dy, ``x`` the raw rows.
    Returns (dL/dx, <y, g> per row): dx = (g - y <y, g>) / ||x|| where ||x|| >= eps (clamp_min passes
    the gradient of the norm there), else g / eps."""
    xf = x.to(tl.float32)
    n = tl.sqrt_rn(tl.sum(xf * xf, 1))
    inv = 1.0 / tl.maximum(n, 1e-12)
    y = xf * inv[:, None]
    dot = tl.sum(y * g, 1)
    through = tl.where(n >= 1e-12, dot, 0.0)
    return (g - y * through[:, None]) * inv[:, None], dot


@triton.jit
def _store_unit_grad(dqkv, qkv, off, g, mask):
    """``dqkv[off]`` = the gradient ``g`` (fp32, w.r.t. the normalized rows) through the normalization
    of the raw rows ``qkv[off]`` (re-read here); returns the rows' <y, g>."""
    dx, dot = _unit_grad(g, tl.load(qkv + off, mask=mask, other=0.0))
    tl.store(dqkv + off, dx.to(dqkv.dtype.element_ty), mask=mask)
    return dot


@triton.jit
def _dls_kernel(part, ls, res, NH, n_chunks: tl.constexpr, BLOCK: tl.constexpr):
    """res[h] = sum_c part[c, h] in chunk order, 0 where logit_scale[h] > log 100 (or NaN): the
    clamp's gradient (torch: passed where ``logit_scale <= max``)."""
    offs = tl.arange(0, BLOCK)
    ok = offs < NH
    acc = tl.zeros((BLOCK,), tl.float32)
    for c in range(0, n_chunks):
        acc += tl.load(part + c * NH + offs, mask=ok, other=0.0)
    v = tl.load(ls + offs, mask=ok, other=0.0)
    tl.store(res + offs, tl.where(v <= 4.605170185988092, acc, 0.0), mask=ok)


# ----------------------------------------------------------------------------- launchers


def dlogit_scale(part, logit_scale, alloc):
    """(nH,) fp32 logit-scale gradient from the kernel's (chunks, nH) or (nH,) partial sums."""
    nh = logit_scale.numel()
    res = alloc((nh,), torch.float32, logit_scale.device)
    if nh:
        chunks = part.numel() // nh
        _dls_kernel[(1,)](part, logit_scale, res, nh, n_chunks=chunks, BLOCK=max(16, triton.next_power_of_2(nh)))
    return res
