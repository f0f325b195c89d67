"""Triton kernels: fused reconstruction losses (MixMIM dual reconstruction, MAE/UM-MAE masked, SimMIM L1).

One program per patch. A patch is held as one ``(BP, BK)`` tile, ``BP = next_pow2(p)`` rows
of ``BK = next_pow2(3p)`` values: tile element ``(i, k)`` is pred value ``i*3p + k`` (MAE's
``(p, p, 3)`` order) and image pixel ``imgs[b, k % 3, y0+i, x0 + k // 3]``, so the target is
read straight from the image (no patchified copy). Mean and unbiased variance are tile
reductions in float32; nothing is accumulated across programs (no atomics, deterministic).
Inputs arrive contiguous and validated (see csrc/ops.cpp); pred and imgs may differ in dtype.

SimMIM's L1 on full-resolution images works on row bands instead: program ``(b, ph, qb)``
covers ``QB`` patches of patch row ``ph`` as a ``(BP, BW)`` tile of ``P`` image rows by ``QB*P``
contiguous columns (coalesced rows whatever ``P``), loops over channels, skips unmasked
patches (masked-off loads), and sums each patch's columns with a one-hot ``(BQ, BW)`` reduction.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["mixmim_loss", "mixmim_loss_backward", "masked_recon_loss", "masked_recon_loss_backward", "simmim_loss",
           "simmim_loss_backward"]


@triton.jit
def _tile(P: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr):
    """Row index i (BP,1), in-row index k (1,BK) and the in-patch validity of the tile."""
    i = tl.arange(0, BP)[:, None]
    k = tl.arange(0, BK)[None, :]
    return i, k, (i < P) & (k < 3 * P)


@triton.jit
def _target(imgs, b, patch, H, W, nw, eps, ld, i, k, valid,
            P: tl.constexpr, NORM: tl.constexpr):
    """Target patch ``patch`` of image ``b`` as a float32 tile (0 outside the patch or where ``ld`` is off)."""
    D: tl.constexpr = 3 * P * P
    j = k // 3
    c = k - 3 * j
    y = (patch // nw) * P + i
    x = (patch % nw) * P + j
    off = (b.to(tl.int64) * 3 + c) * H * W + y * W + x  # plane index in int64: B*3*H*W may pass 2**31
    t = tl.load(imgs + off, mask=ld, other=0.0).to(tl.float32)
    if NORM:
        mean = tl.sum(tl.sum(t, axis=1), axis=0) / D
        cen = tl.where(valid, t - mean, 0.0)
        var = tl.sum(tl.sum(cen * cen, axis=1), axis=0) / (D - 1)  # unbiased, as torch.var
        t = cen / tl.sqrt(var + eps)
    return t


@triton.jit
def _mixmim_patch(imgs, mask, B, L, mask_stride, H, W, nw, eps,
                  P: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    """Program (b, l) of the MixMIM loss: pid, b, l, the mask value m, the pred row src it reads
    (row b of the first half where m, else row 2B-1-b), the tile (i, k, valid) and the target t."""
    pid = tl.program_id(0)
    b = pid // L
    l = pid - b * L
    m = tl.load(mask + b * mask_stride + l)
    src = tl.where(m != 0, b, 2 * B - 1 - b)
    i, k, valid = _tile(P, BP, BK)
    t = _target(imgs, b, l, H, W, nw, eps, valid, i, k, valid, P, NORM)
    return pid, b, l, m, src, i, k, valid, t


@triton.jit
def _masked_patch(imgs, patch_idx, Lp, H, W, nw, eps,
                  P: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    """Program (pred row pid) of the masked loss: pid, whether it counts (patch_idx >= 0), the tile
    (i, k, valid), its load mask ld (nothing loaded for an uncounted row) and the target t."""
    pid = tl.program_id(0)
    b = pid // Lp
    idx = tl.load(patch_idx + pid)
    live = idx >= 0
    patch = tl.maximum(idx, 0)
    i, k, valid = _tile(P, BP, BK)
    ld = valid & ((i * 0 + k * 0 + idx) >= 0)  # tile-shaped load mask (scalar masks trip the interpreter)
    t = _target(imgs, b, patch, H, W, nw, eps, ld, i, k, valid, P, NORM)
    return pid, live, i, k, valid, ld, t


@triton.jit
def _mixmim_fwd_kernel(pred, imgs, mask, out, B, L, mask_stride, H, W, nw, eps,
                       P: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    # Program (b, l): image b's prediction of patch l is row b of the first half where
    # mask[b, l], else row 2B-1-b (the flipped second half): only one row is read.
    pid, b, l, m, src, i, k, valid, t = _mixmim_patch(imgs, mask, B, L, mask_stride, H, W, nw, eps, P, BP, BK, NORM)
    D: tl.constexpr = 3 * P * P
    roff = (src.to(tl.int64) * L + l) * D + i * (3 * P) + k
    u = tl.load(pred + roff, mask=valid, other=0.0).to(tl.float32)
    e = tl.where(valid, u - t, 0.0)
    tl.store(out + pid, tl.sum(tl.sum(e * e, axis=1), axis=0) / D)


@triton.jit
def _mixmim_bwd_kernel(grad, pred, imgs, mask, dpred, B, L, mask_stride, H, W, nw, eps,
                       P: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    # Every pred row feeds exactly one patch loss, so program (b, l) owns rows b and 2B-1-b
    # of patch l: the gradient goes to the row that was used, zeros to the other one.
    pid, b, l, m, src, i, k, valid, t = _mixmim_patch(imgs, mask, B, L, mask_stride, H, W, nw, eps, P, BP, BK, NORM)
    D: tl.constexpr = 3 * P * P
    other = tl.where(m != 0, 2 * B - 1 - b, b)
    inner = i * (3 * P) + k
    soff = (src.to(tl.int64) * L + l) * D + inner
    u = tl.load(pred + soff, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(grad + pid).to(tl.float32)
    du = (g * 2.0 / D) * (u - t)
    tl.store(dpred + soff, du.to(dpred.dtype.element_ty), mask=valid)
    ooff = (other.to(tl.int64) * L + l) * D + inner
    tl.store(dpred + ooff, tl.zeros([BP, BK], dtype=dpred.dtype.element_ty), mask=valid)


@triton.jit
def _masked_fwd_kernel(pred, imgs, patch_idx, out, Lp, H, W, nw, eps,
                       P: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    # Program per pred row; rows with patch_idx < 0 do not count: no loads, loss 0.
    pid, live, i, k, valid, ld, t = _masked_patch(imgs, patch_idx, Lp, H, W, nw, eps, P, BP, BK, NORM)
    D: tl.constexpr = 3 * P * P
    u = tl.load(pred + pid.to(tl.int64) * D + i * (3 * P) + k, mask=ld, other=0.0).to(tl.float32)
    e = tl.where(valid, u - t, 0.0)
    loss = tl.sum(tl.sum(e * e, axis=1), axis=0) / D
    tl.store(out + pid, tl.where(live, loss, 0.0))


@triton.jit
def _masked_bwd_kernel(grad, pred, imgs, patch_idx, dpred, Lp, H, W, nw, eps,
                       P: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr):
    pid, live, i, k, valid, ld, t = _masked_patch(imgs, patch_idx, Lp, H, W, nw, eps, P, BP, BK, NORM)
    D: tl.constexpr = 3 * P * P
    off = pid.to(tl.int64) * D + i * (3 * P) + k
    u = tl.load(pred + off, mask=ld, other=0.0).to(tl.float32)
    g = tl.load(grad + pid).to(tl.float32)
    du = tl.where(live, (g * 2.0 / D) * (u - t), 0.0)  # select: t of an unloaded tile is NaN when eps == 0
    tl.store(dpred + off, du.to(dpred.dtype.element_ty), mask=valid)


@triton.jit
def _simmim_band(mask, nh, nw, mask_stride,
                 P: tl.constexpr, QB: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr):
    """This program's band (b, ph, qb); tile rows i (BP,1), columns x (1,BW), each column's patch
    index pw, whether the column is in the image and whether its patch is masked."""
    pid = tl.program_id(0)
    nq = tl.cdiv(nw, QB)
    qb = pid % nq
    ph = (pid // nq) % nh
    b = pid // (nq * nh)
    i = tl.arange(0, BP)[:, None]
    xl = tl.arange(0, BW)[None, :]
    pw = qb * QB + xl // P
    x = qb * (QB * P) + xl
    incol = (xl < QB * P) & (pw < nw)
    m = tl.load(mask + b * mask_stride + ph * nw + pw, mask=incol, other=0)
    return b, ph, qb, i, xl, x, pw, incol, incol & (m != 0) & (i < P)


@triton.jit
def _simmim_fwd_kernel(pred, imgs, mask, out, H, W, nh, nw, mask_stride,
                       C: tl.constexpr, P: tl.constexpr, QB: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr,
                       BQ: tl.constexpr):
    b, ph, qb, i, xl, x, pw, incol, live = _simmim_band(mask, nh, nw, mask_stride, P, QB, BP, BW)
    acc = tl.zeros((BP, BW), dtype=tl.float32)
    for c in range(C):
        off = ((b.to(tl.int64) * C + c) * H + ph * P + i) * W + x
        u = tl.load(pred + off, mask=live, other=0.0).to(tl.float32)
        t = tl.load(imgs + off, mask=live, other=0.0).to(tl.float32)
        acc += tl.where(live, tl.abs(u - t), 0.0)
    col = tl.sum(acc, axis=0)  # (BW,) per column
    q = tl.arange(0, BQ)[:, None]
    per = tl.sum(tl.where(xl // P == q, col[None, :], 0.0), axis=1)  # (BQ,) per patch
    qs = tl.arange(0, BQ)
    pws = qb * QB + qs
    tl.store(out + (b.to(tl.int64) * nh + ph) * nw + pws, per / (C * P * P), mask=(qs < QB) & (pws < nw))


@triton.jit
def _simmim_bwd_kernel(grad, pred, imgs, mask, dpred, H, W, nh, nw, mask_stride,
                       C: tl.constexpr, P: tl.constexpr, QB: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr):
    # dpred = sign(pred - imgs) * grad[patch] / (C*P*P) on masked patches (sign(NaN) = 0, as torch), 0 elsewhere.
    b, ph, qb, i, xl, x, pw, incol, live = _simmim_band(mask, nh, nw, mask_stride, P, QB, BP, BW)
    g = tl.load(grad + (b.to(tl.int64) * nh + ph) * nw + pw, mask=incol, other=0.0).to(tl.float32) / (C * P * P)
    inside = incol & (i < P)
    for c in range(C):
        off = ((b.to(tl.int64) * C + c) * H + ph * P + i) * W + x
        u = tl.load(pred + off, mask=live, other=0.0).to(tl.float32)
        t = tl.load(imgs + off, mask=live, other=0.0).to(tl.float32)
        e = u - t
        sgn = (e > 0).to(tl.float32) - (e < 0).to(tl.float32)
        tl.store(dpred + off, tl.where(live, sgn * g, 0.0).to(dpred.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------- launchers
def _meta(imgs: torch.Tensor, p: int, norm_pix: bool):
    BP = triton.next_power_of_2(p)
    BK = triton.next_power_of_2(3 * p)
    warps = max(1, min(8, (BP * BK) // 512))
    return dict(P=p, BP=BP, BK=BK, NORM=bool(norm_pix), num_warps=warps)


def _geometry(imgs: torch.Tensor, p: int):
    B, _, H, W = imgs.shape
    return B, H, W, W // p, (H // p) * (W // p)


def _device(t: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def mixmim_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
                eps: float) -> torch.Tensor:
    """pred ``(2B, L, p*p*3)``, imgs ``(B, 3, H, W)``, mask uint8 ``(G, L)`` -> per-patch loss float32 ``(B, L)``."""
    B, H, W, nw, L = _geometry(imgs, patch_size)
    out = torch.empty((B, L), device=pred.device, dtype=torch.float32)
    if out.numel():
        with _device(pred):
            _mixmim_fwd_kernel[(B * L,)](pred, imgs, mask, out, B, L, 0 if mask.shape[0] == 1 else L, H, W, nw,
                                         float(eps), **_meta(imgs, patch_size, norm_pix))
    return out


def mixmim_loss_backward(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                         patch_size: int, norm_pix: bool, eps: float) -> torch.Tensor:
    """grad float32 ``(B, L)`` -> dpred like pred ``(2B, L, p*p*3)`` (every element written)."""
    B, H, W, nw, L = _geometry(imgs, patch_size)
    dpred = torch.empty_like(pred)
    if B * L:
        with _device(pred):
            _mixmim_bwd_kernel[(B * L,)](grad, pred, imgs, mask, dpred, B, L, 0 if mask.shape[0] == 1 else L, H, W,
                                         nw, float(eps), **_meta(imgs, patch_size, norm_pix))
    return dpred


def masked_recon_loss(pred: torch.Tensor, imgs: torch.Tensor, patch_idx: torch.Tensor, patch_size: int,
                      norm_pix: bool, eps: float) -> torch.Tensor:
    """pred ``(B, Lp, p*p*3)``, patch_idx int64 ``(B, Lp)`` (-1 = not counted) -> float32 ``(B, Lp)``."""
    B, H, W, nw, _ = _geometry(imgs, patch_size)
    Lp = pred.shape[1]
    out = torch.empty((B, Lp), device=pred.device, dtype=torch.float32)
    if out.numel():
        with _device(pred):
            _masked_fwd_kernel[(B * Lp,)](pred, imgs, patch_idx, out, Lp, H, W, nw, float(eps),
                                          **_meta(imgs, patch_size, norm_pix))
    return out


def masked_recon_loss_backward(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, patch_idx: torch.Tensor,
                               patch_size: int, norm_pix: bool, eps: float) -> torch.Tensor:
    """grad float32 ``(B, Lp)`` -> dpred like pred (rows with patch_idx < 0 get zeros)."""
    B, H, W, nw, _ = _geometry(imgs, patch_size)
    Lp = pred.shape[1]
    dpred = torch.empty_like(pred)
    if B * Lp:
        with _device(pred):
            _masked_bwd_kernel[(B * Lp,)](grad, pred, imgs, patch_idx, dpred, Lp, H, W, nw, float(eps),
                                          **_meta(imgs, patch_size, norm_pix))
    return dpred


def _simmim_launch(pred: torch.Tensor, patch_size: int):
    """``(grid, nh, nw, meta)`` of the SimMIM kernels: one program per QB patches of a patch row."""
    B, C, H, W = pred.shape
    nh, nw = H // patch_size, W // patch_size
    QB = max(1, 128 // patch_size)  # ~128 contiguous columns per row
    BP, BW = triton.next_power_of_2(patch_size), triton.next_power_of_2(QB * patch_size)
    meta = dict(C=C, P=patch_size, QB=QB, BP=BP, BW=BW, num_warps=max(1, min(8, (BP * BW) // 512)))
    return (B * nh * triton.cdiv(nw, QB),), nh, nw, meta


def simmim_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """pred, imgs ``(B, C, H, W)``, mask uint8 ``(G, L)`` -> per-patch mean L1 float32 ``(B, L)`` (0 where unmasked)."""
    grid, nh, nw, meta = _simmim_launch(pred, patch_size)
    out = torch.empty((pred.shape[0], nh * nw), device=pred.device, dtype=torch.float32)
    if out.numel():
        with _device(pred):
            _simmim_fwd_kernel[grid](pred, imgs, mask, out, pred.shape[2], pred.shape[3], nh, nw,
                                     0 if mask.shape[0] == 1 else nh * nw, BQ=triton.next_power_of_2(meta["QB"]),
                                     **meta)
    return out


def simmim_loss_backward(grad: torch.Tensor, pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor,
                         patch_size: int) -> torch.Tensor:
    """grad float32 ``(B, L)`` -> dpred like pred (every element written)."""
    grid, nh, nw, meta = _simmim_launch(pred, patch_size)
    dpred = torch.empty_like(pred)
    if dpred.numel():
        with _device(pred):
            _simmim_bwd_kernel[grid](grad, pred, imgs, mask, dpred, pred.shape[2], pred.shape[3], nh, nw,
                                     0 if mask.shape[0] == 1 else nh * nw, **meta)
    return dpred
