"""Fuzzer for the kernel-level ops ``torch.ops.mixkernels_C.*`` (schemas: csrc/ops.cpp).

Run as a script (tests/test_fuzz_kernels.py starts it in a subprocess, so a crash fails the
test instead of killing pytest; scripts/sanitize_cpu.sh and scripts/fuzz_cuda_sanitizer.sh run
it under ASan/UBSan and compute-sanitizer):

    python tests/fuzz_kernels.py --device cpu --budget 60 [--seed S] [--case I] [--verbose]

Every case is drawn from ``(seed, case)`` alone and printed before it runs, so the last line
of a crashed run names the input to replay with ``--seed S --case I``. A case is a well-formed
call (half the time) or one with 1-2 mutations: a tensor made non-contiguous, cast to another
dtype, given another rank or size, emptied, dropped or added (optional tensors), an integer
argument or an index tensor set to an out-of-range value. The kernel-level spec below (the
``_ref_*`` functions, built on ``mixkernels.reference``) decides what must happen:

* a call that breaks the schema's contract must raise a clear error (RuntimeError/ValueError/
  TypeError/IndexError with a message), never crash or return;
* a well-formed call must match the spec (values, shapes, dtypes, NaN positions);
* a non-contiguous input may be rejected (the schemas ask for contiguous inputs) or handled.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mixkernels import reference as ref  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FLOATS = (F16, BF16, F32, F64)
DTYPES = FLOATS + (torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool)
HUGE = (2**31 - 1, 2**31, 2**32 + 1, 2**62, -(2**31), -1, 0)


class Invalid(Exception):
    """The call breaks the kernel-level contract: the kernel must raise."""


class StickyCudaError(Exception):
    """A CUDA error (illegal address, device assert): the context is unusable, the run stops."""


class Lenient(Exception):
    """The kernel may reject this call (e.g. a non-contiguous input) or compute the spec's result."""


# ---------------------------------------------------------------- contract helpers
def need(cond: bool, what: str) -> None:
    if not cond:
        raise Invalid(what)


def tens(name: str, t, *, dtypes=None, ndim=None, shape=None, optional=False):
    """Contract of one tensor argument: Invalid for a wrong kind/dtype/rank/shape; contiguity
    is checked by :func:`contiguous_or_lenient` once everything else holds."""
    if t is None:
        need(optional, f"{name} is required")
        return None
    need(isinstance(t, torch.Tensor), f"{name} must be a tensor")
    if dtypes is not None:
        need(t.dtype in dtypes, f"{name} dtype {t.dtype}")
    if ndim is not None:
        need(t.dim() == ndim, f"{name} rank {t.dim()}")
    if shape is not None:
        need(tuple(t.shape) == tuple(shape), f"{name} shape {tuple(t.shape)} != {tuple(shape)}")
    return t


def contiguous_or_lenient(*ts) -> None:
    if any(t is not None and not t.is_contiguous() for t in ts):
        raise Lenient("non-contiguous input")


def acc_of(dtype):
    return F64 if dtype == F64 else F32


def geometry(H, W, wh, ww, sh, sw):
    need(H > 0 and W > 0 and wh > 0 and ww > 0 and H % wh == 0 and W % ww == 0, "window geometry")
    need(0 <= sh < wh and 0 <= sw < ww, "shift")
    need(H * W < 2**63, "H*W fits in int64")


def grad_of(fn, inputs: Dict[str, torch.Tensor], dout: torch.Tensor, wanted: List[str]):
    """float64 vjp of ``fn(**inputs)`` for the inputs named in ``wanted``."""
    leaves = {k: (v.detach().double().requires_grad_() if k in wanted else v) for k, v in inputs.items()}
    out = fn(**leaves)
    gs = torch.autograd.grad(out, [leaves[k] for k in wanted], dout.double(), allow_unused=True)
    return [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(wanted, gs)]


# ---------------------------------------------------------------- kernel-level spec
def _ref_mix(x, mask):
    tens("x", x, ndim=3)
    B, L, C = x.shape
    tens("mask", mask, dtypes=(torch.uint8,), ndim=2)
    need(mask.shape[1] == L and mask.shape[0] in (1, B), "mask shape")
    contiguous_or_lenient(x, mask)
    return (torch.where(mask.bool().unsqueeze(-1), x.flip(0), x),)


def _ref_mix_bwd(grad, mask):
    tens("grad", grad, dtypes=FLOATS, ndim=3)
    _ref_mix(grad, mask)
    m = mask.expand(grad.shape[0], -1)
    return (grad_of(lambda x: ref.mix_tokens(x, m), {"x": grad}, grad, ["x"])[0].to(grad.dtype),)


def _ref_unmix(x, mask, tok, pos):
    tens("x", x, dtypes=FLOATS, ndim=3)
    B, L, C = x.shape
    tens("mask", mask, dtypes=(torch.uint8,), ndim=2)
    need(mask.shape[1] == L and mask.shape[0] in (1, B), "mask shape")
    tens("mask_token", tok, dtypes=(x.dtype,))
    need(tok.numel() == C, "mask_token numel")
    tens("pos_embed", pos, dtypes=(x.dtype,), optional=True)
    need(pos is None or pos.numel() == L * C, "pos_embed numel")
    contiguous_or_lenient(x, mask, tok, pos)
    m = mask.expand(B, L)
    p = None if pos is None else pos.reshape(1, L, C).double()
    return (ref.unmix_tokens(x.double(), m, tok.double(), p).to(x.dtype),)


def _ref_unmix_bwd(grad, mask, need_token, need_pos):
    tens("grad", grad, dtypes=FLOATS, ndim=3)
    need(grad.shape[0] % 2 == 0, "grad batch even")
    B, L, C = grad.shape[0] // 2, grad.shape[1], grad.shape[2]
    tens("mask", mask, dtypes=(torch.uint8,), ndim=2)
    need(mask.shape[1] == L and mask.shape[0] in (1, B), "mask shape")
    contiguous_or_lenient(grad, mask)
    m = mask.expand(B, L)
    dx, dt, dp = grad_of(lambda x, t, p: ref.unmix_tokens(x, m, t, p),
                         {"x": grad.new_zeros(B, L, C), "t": grad.new_zeros(C), "p": grad.new_zeros(1, L, C)},
                         grad, ["x", "t", "p"])
    acc = acc_of(grad.dtype)
    return (dx.to(grad.dtype), dt.to(acc) if need_token else torch.empty(0, dtype=acc),
            dp.reshape(L, C).to(acc) if need_pos else torch.empty(0, dtype=acc))


def _ref_partition(x, wh, ww, sh, sw):
    tens("x", x, ndim=4)
    geometry(x.shape[1], x.shape[2], wh, ww, sh, sw)
    contiguous_or_lenient(x)
    return (ref.window_partition(x, (wh, ww), (sh, sw)),)


def _ref_merge(win, H, W, wh, ww, sh, sw):
    tens("windows", win, ndim=3)
    geometry(H, W, wh, ww, sh, sw)
    nW = (H // wh) * (W // ww)
    need(win.shape[1] == wh * ww and win.shape[0] % nW == 0, "windows shape")
    need(H * W * max(win.shape[2], 1) < 2**63, "the (B, H, W, C) output's strides fit in int64")
    contiguous_or_lenient(win)
    return (ref.window_merge(win, (wh, ww), H, W, (sh, sw)),)


def _uniform_geom(x, keep, unit, compact=False):
    tens("x", x, ndim=4)
    need(unit > 0, "unit")
    B, H, W, C = x.shape
    if compact:
        need(H % unit == 0 and W % unit == 0, "compact grid")
        hc, wc = H // unit, W // unit
    else:
        need(H % (2 * unit) == 0 and W % (2 * unit) == 0, "grid")
        hc, wc = H // (2 * unit), W // (2 * unit)
    tens("keep", keep, dtypes=(torch.uint8,), shape=(B, hc, wc))
    return B, C, (hc, wc)


def _ref_sample(x, keep, unit, tok, sec):
    B, C, hw = _uniform_geom(x, keep, unit)
    tens("secondary", sec, dtypes=(torch.uint8,), shape=(B,) + hw, optional=True)
    if sec is not None:
        tens("mask_token", tok, dtypes=(x.dtype,))
        need(tok.numel() == C, "mask_token numel")
    contiguous_or_lenient(x, keep, sec, tok if sec is not None else None)
    k = keep.long() & 3
    return (ref.uniform_sample(x, k, unit, mask_token=tok if sec is not None else None, secondary=sec),)


def _ref_sample_bwd(grad, keep, unit, sec, need_token):
    tens("grad", grad, dtypes=FLOATS, ndim=4)
    B, h, w, C = grad.shape
    need(unit > 0 and h % unit == 0 and w % unit == 0, "grid")
    tens("keep", keep, dtypes=(torch.uint8,), shape=(B, h // unit, w // unit))
    tens("secondary", sec, dtypes=(torch.uint8,), shape=(B, h // unit, w // unit), optional=True)
    contiguous_or_lenient(grad, keep, sec)
    k = keep.long() & 3
    dx, dt = grad_of(lambda x, t: ref.uniform_sample(x, k, unit, mask_token=t if sec is not None else None,
                                                     secondary=sec),
                     {"x": grad.new_zeros(B, 2 * h, 2 * w, C), "t": grad.new_zeros(C)}, grad, ["x", "t"])
    acc = acc_of(grad.dtype)
    return dx.to(grad.dtype), dt.to(acc) if need_token else torch.empty(0, dtype=acc)


def _ref_scatter(c, keep, unit):
    _uniform_geom(c, keep, unit, compact=True)
    contiguous_or_lenient(c, keep)
    return (ref.uniform_scatter(c, keep.long() & 3, unit),)


def _wattn_contract(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw):
    tens("qkv", qkv, dtypes=FLOATS, ndim=4)
    B, H, W, C3 = qkv.shape
    need(nH > 0 and C3 % (3 * nH) == 0, "num_heads")
    geometry(H, W, wh, ww, sh, sw)
    need(rh > 0 and rw > 0, "coord range")
    need(coords is not None or (rh == wh and rw == ww), "rh/rw without coords")
    need(rpb is None or (2 * rh - 1) * (2 * rw - 1) < 2**31, "a relative-position table of < 2**31 rows")
    acc = acc_of(qkv.dtype)
    N = wh * ww
    tens("rpb", rpb, dtypes=(acc,), shape=((2 * rh - 1) * (2 * rw - 1), nH), optional=True)
    tens("attn_bias", ab, dtypes=(acc,), shape=(nH, N, N), optional=True)
    for name, t, tail in (("group", group, ()), ("coords", coords, (2,))):
        tens(name, t, dtypes=(torch.int32, torch.int64), ndim=3 + len(tail), optional=True)
        if t is not None:
            need(t.shape[0] in (1, B) and tuple(t.shape[1:]) == (H, W) + tail, f"{name} shape")
    contiguous_or_lenient(qkv, rpb, ab, group, coords)
    return B, H, W, C3 // 3, N, acc


def _wattn_fn(nH, wh, ww, sh, sw, group, coords, rh, rw, scale):
    def f(qkv, rpb=None, ab=None):
        return ref.window_attention(qkv, nH, (wh, ww), shift_size=(sh, sw), rel_pos_bias=rpb, attn_bias=ab,
                                    group=group, coords=coords, coord_range=(rh, rw), scale=scale)
    return f


def _ref_wattn(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, scale):
    B, H, W, C, N, acc = _wattn_contract(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw)
    f = _wattn_fn(nH, wh, ww, sh, sw, group, coords, rh, rw, scale)
    out = f(qkv.double(), None if rpb is None else rpb.double(), None if ab is None else ab.double())
    nW = (H // wh) * (W // ww)
    return out.to(qkv.dtype), _Shape((B * nW, nH, N), acc)  # lse: checked through the backward


def _ref_wattn_bwd(dout, qkv, out, lse, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, scale,
                   need_drpb, need_dbias, det):
    B, H, W, C, N, acc = _wattn_contract(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw)
    nW = (H // wh) * (W // ww)
    tens("dout", dout, dtypes=(qkv.dtype,), shape=(B, H, W, C))
    tens("out", out, dtypes=(qkv.dtype,), shape=(B, H, W, C))
    tens("lse", lse, dtypes=(acc,))
    need(lse.numel() == B * nW * nH * N, "lse numel")
    need(rpb is not None or not need_drpb, "need_drpb without rpb")
    need(ab is not None or not need_dbias, "need_dbias without attn_bias")
    contiguous_or_lenient(dout, out, lse)
    f = _wattn_fn(nH, wh, ww, sh, sw, group, coords, rh, rw, scale)
    ins = {"qkv": qkv, "rpb": rpb, "ab": ab}
    wanted = ["qkv"] + (["rpb"] if need_drpb else []) + (["ab"] if need_dbias else [])
    gs = dict(zip(wanted, grad_of(f, {k: v for k, v in ins.items() if v is not None}, dout, wanted)))
    return (gs["qkv"].to(qkv.dtype), gs["rpb"].to(acc) if need_drpb else torch.empty(0, dtype=acc),
            gs["ab"].to(acc) if need_dbias else torch.empty(0, dtype=acc))


def _loss_contract(pred, imgs, p):
    tens("pred", pred, dtypes=FLOATS, ndim=3)
    tens("imgs", imgs, dtypes=FLOATS, ndim=4)
    need(imgs.shape[1] == 3 and p > 0 and imgs.shape[2] % p == 0 and imgs.shape[3] % p == 0, "image geometry")
    need(pred.shape[2] == p * p * 3, "pred width")
    return imgs.shape[0], (imgs.shape[2] // p) * (imgs.shape[3] // p), acc_of(torch.promote_types(pred.dtype, imgs.dtype))


def _mixmim_fn(imgs, mask, p, norm_pix, eps):
    return lambda pred: ref.mixmim_loss(pred, imgs.double(), mask, p, norm_pix=norm_pix, eps=eps, reduction="none")


def _ref_mixmim(pred, imgs, mask, p, norm_pix, eps):
    B, L, acc = _loss_contract(pred, imgs, p)
    need(tuple(pred.shape[:2]) == (2 * B, L), "pred shape")
    tens("mask", mask, dtypes=(torch.uint8,), ndim=2)
    need(mask.shape[1] == L and mask.shape[0] in (1, B), "mask shape")
    contiguous_or_lenient(pred, imgs, mask)
    return (_mixmim_fn(imgs, mask.expand(B, L), p, norm_pix, eps)(pred.double()).to(acc),)


def _ref_mixmim_bwd(grad, pred, imgs, mask, p, norm_pix, eps):
    (loss,) = _ref_mixmim(pred, imgs, mask, p, norm_pix, eps)
    tens("grad", grad, dtypes=(loss.dtype,))
    need(grad.numel() == loss.numel(), "grad numel")  # read as the (B, L) loss it is the gradient of
    contiguous_or_lenient(grad)
    B, L = loss.shape
    return (grad_of(_mixmim_fn(imgs, mask.expand(B, L), p, norm_pix, eps), {"pred": pred}, grad.reshape(B, L),
                    ["pred"])[0]
            .to(pred.dtype),)


def _masked_fn(imgs, idx, p, norm_pix, eps):
    def f(pred):
        t = ref.patch_targets(imgs.double(), p, norm_pix, eps)  # (B, L, D)
        live = idx >= 0
        if t.shape[1] == 0:  # no patches: every row is uncounted (negative index)
            t = t.new_zeros(t.shape[0], 1, t.shape[2])
        rows = t.gather(1, idx.clamp(min=0).unsqueeze(-1).expand(-1, -1, t.shape[-1]))
        e = torch.where(live.unsqueeze(-1), pred - rows, 0.0)
        return (e * e).mean(-1)
    return f


def _ref_masked(pred, imgs, idx, p, norm_pix, eps):
    B, L, acc = _loss_contract(pred, imgs, p)
    need(pred.shape[0] == B, "pred batch")
    tens("patch_idx", idx, dtypes=(torch.int64,))
    need(idx.numel() == B * pred.shape[1], "patch_idx numel")
    need(bool((idx < L).all()), "patch index out of range")  # negative = not counted
    contiguous_or_lenient(pred, imgs, idx)
    return (_masked_fn(imgs, idx.reshape(B, pred.shape[1]), p, norm_pix, eps)(pred.double()).to(acc),)


def _ref_masked_bwd(grad, pred, imgs, idx, p, norm_pix, eps):
    (loss,) = _ref_masked(pred, imgs, idx, p, norm_pix, eps)
    tens("grad", grad, dtypes=(loss.dtype,))
    need(grad.numel() == loss.numel(), "grad numel")
    contiguous_or_lenient(grad)
    B = loss.shape[0]
    g = grad.reshape(loss.shape)
    return (grad_of(_masked_fn(imgs, idx.reshape(B, pred.shape[1]), p, norm_pix, eps), {"pred": pred}, g, ["pred"])[0]
            .to(pred.dtype),)


# Backward ops whose result is only defined for the forward's own outputs: a mutated call is
# checked for a clear error or the right shapes/dtypes, not for values.
SHAPE_ONLY_WHEN_MUTATED = ("window_attention_backward",)


class _Shape:
    """An expected output checked by shape and dtype only."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


# ---------------------------------------------------------------- case generation
def _rand(rng, shape, dtype):
    g = torch.Generator().manual_seed(rng.getrandbits(62))
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g, dtype=F64).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    hi = {torch.uint8: 256, torch.int8: 128}.get(dtype, 1000)
    lo = 0 if dtype == torch.uint8 else -hi
    return torch.randint(lo, hi, shape, generator=g).to(dtype)


def _fdt(rng):
    return rng.choice((F32, F32, F32, F16, BF16, F64))


def _mask(rng, G, L, values=(0, 1)):
    return torch.tensor([[rng.choice(values) for _ in range(L)] for _ in range(G)], dtype=torch.uint8).reshape(G, L)


def gen_mix(rng, backward=False):
    B, L, C = rng.choice((0, 1, 2, 3)), rng.choice((0, 1, 3, 5)), rng.choice((0, 1, 4, 7))
    G = rng.choice((1, B)) if B else 1
    x = _rand(rng, (B, L, C), _fdt(rng))
    return [x, _mask(rng, G, L, (0, 1, 1, 2, 255))]


def gen_unmix(rng):
    x = gen_mix(rng)[0]
    B, L, C = x.shape
    G = rng.choice((1, B)) if B else 1
    pos = _rand(rng, (L, C), x.dtype) if rng.random() < 0.6 else None
    return [x, _mask(rng, G, L), _rand(rng, (C,), x.dtype), pos]


def gen_unmix_bwd(rng):
    x, mask, _, _ = gen_unmix(rng)
    B, L, C = x.shape
    return [_rand(rng, (2 * B, L, C), x.dtype), mask, rng.random() < 0.7, rng.random() < 0.5]


def _win_geom(rng):
    wh, ww = rng.choice((1, 2, 3, 4)), rng.choice((1, 2, 3))
    H, W = wh * rng.choice((1, 2)), ww * rng.choice((1, 2, 3))
    return H, W, wh, ww, rng.randrange(wh), rng.randrange(ww)


def gen_partition(rng):
    H, W, wh, ww, sh, sw = _win_geom(rng)
    return [_rand(rng, (rng.choice((0, 1, 2)), H, W, rng.choice((0, 1, 3))), _fdt(rng)), wh, ww, sh, sw]


def gen_merge(rng):
    H, W, wh, ww, sh, sw = _win_geom(rng)
    nW = (H // wh) * (W // ww)
    return [_rand(rng, (rng.choice((0, 1, 2)) * nW, wh * ww, rng.choice((0, 1, 3))), _fdt(rng)), H, W, wh, ww, sh, sw]


def gen_sample(rng):
    u = rng.choice((1, 2))
    B, hc, wc, C = rng.choice((0, 1, 2)), rng.choice((1, 2)), rng.choice((1, 2, 3)), rng.choice((0, 1, 3))
    dt = _fdt(rng)
    keep = torch.tensor([rng.choice((0, 1, 2, 3, 4, 7, 255)) for _ in range(B * hc * wc)], dtype=torch.uint8)
    sec = _rand(rng, (B, hc, wc), torch.uint8) % 2 if rng.random() < 0.5 else None
    return [_rand(rng, (B, 2 * u * hc, 2 * u * wc, C), dt), keep.reshape(B, hc, wc), u,
            _rand(rng, (C,), dt) if sec is not None or rng.random() < 0.2 else None, sec]


def gen_sample_bwd(rng):
    x, keep, u, _, sec = gen_sample(rng)
    B, H, W, C = x.shape
    return [_rand(rng, (B, H // 2, W // 2, C), x.dtype), keep, u, sec, rng.random() < 0.7]


def gen_scatter(rng):
    x, keep, u, _, _ = gen_sample(rng)
    B, H, W, C = x.shape
    return [_rand(rng, (B, H // 2, W // 2, C), x.dtype), keep, u]


def gen_wattn(rng):
    H, W, wh, ww, sh, sw = _win_geom(rng)
    B, nH, d = rng.choice((0, 1, 2)), rng.choice((1, 2, 3)), rng.choice((1, 2, 4, 8))
    dt = rng.choice((F32, F32, F16, BF16, F64))
    acc = acc_of(dt)
    N = wh * ww
    coords = None
    rh, rw = wh, ww
    if rng.random() < 0.4:
        G = rng.choice((1, B)) if B else 1
        coords = _rand(rng, (G, H, W, 2), rng.choice((torch.int32, torch.int64))) % 7
        if rng.random() < 0.3:
            coords = coords.to(torch.int64) * rng.choice((2**31, 2**40, -(2**62)))
        rh, rw = rng.choice((1, 2, 3, 5)), rng.choice((1, 2, 4))
    group = None
    if rng.random() < 0.4:
        G = rng.choice((1, B)) if B else 1
        group = _rand(rng, (G, H, W), rng.choice((torch.int32, torch.int64))) % 3
        if rng.random() < 0.3 and group.dtype == torch.int64:
            group = group * 2**32 + 7
    rpb = _rand(rng, ((2 * rh - 1) * (2 * rw - 1), nH), acc) if rng.random() < 0.6 else None
    ab = _rand(rng, (nH, N, N), acc) if rng.random() < 0.4 else None
    if ab is not None and rng.random() < 0.2:
        ab[0, rng.randrange(N)] = float("-inf")  # a fully masked row: NaN by the spec
    scale = rng.choice((d ** -0.5, 0.0, -1.0, 3.0))
    return [_rand(rng, (B, H, W, 3 * nH * d), dt), nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, scale]


def gen_wattn_bwd(rng):
    a = gen_wattn(rng)
    try:
        out, lse = torch.ops.mixkernels_C.window_attention(*a)
    except Exception:  # noqa: BLE001 - the forward case reports forward failures
        B, H, W, C3 = a[0].shape
        out = torch.zeros(B, H, W, C3 // 3, dtype=a[0].dtype)
        lse = torch.zeros(B * (H // a[2]) * (W // a[3]), a[1], a[2] * a[3], dtype=acc_of(a[0].dtype))
    dout = _rand(rng, out.shape, out.dtype)
    return [dout, a[0], out, lse, *a[1:], a[6] is not None and rng.random() < 0.8,
            a[7] is not None and rng.random() < 0.8, rng.random() < 0.5]


def _imgs(rng, B, p, dt):
    h, w = rng.choice((1, 2)), rng.choice((1, 2, 3))
    return _rand(rng, (B, 3, h * p, w * p), dt), h * w


def gen_mixmim(rng):
    p, B = rng.choice((1, 2, 4)), rng.choice((0, 1, 2))
    imgs, L = _imgs(rng, B, p, _fdt(rng))
    G = rng.choice((1, B)) if B else 1
    return [_rand(rng, (2 * B, L, p * p * 3), _fdt(rng)), imgs, _mask(rng, G, L, (0, 1, 3)), p, rng.random() < 0.7,
            rng.choice((1e-6, 0.0, 1.0))]


def gen_mixmim_bwd(rng):
    a = gen_mixmim(rng)
    acc = acc_of(torch.promote_types(a[0].dtype, a[1].dtype))
    return [_rand(rng, (a[1].shape[0], a[0].shape[1]), acc), *a]


def gen_masked(rng):
    p, B = rng.choice((1, 2, 4)), rng.choice((0, 1, 2))
    imgs, L = _imgs(rng, B, p, _fdt(rng))
    Lp = rng.choice((0, 1, L))
    idx = torch.tensor([rng.choice((-1, -7) + tuple(range(L))) for _ in range(B * Lp)], dtype=torch.int64)
    return [_rand(rng, (B, Lp, p * p * 3), _fdt(rng)), imgs, idx.reshape(B, Lp), p, rng.random() < 0.7,
            rng.choice((1e-6, 0.0))]


def gen_masked_bwd(rng):
    a = gen_masked(rng)
    acc = acc_of(torch.promote_types(a[0].dtype, a[1].dtype))
    return [_rand(rng, tuple(a[0].shape[:2]), acc), *a]


OPS: Dict[str, Tuple[Callable, Callable, Tuple[int, ...]]] = {
    # name: (generator, spec, positions of index-like args whose values may go out of range)
    "mix_tokens": (gen_mix, _ref_mix, (1,)),
    "mix_tokens_backward": (gen_mix, _ref_mix_bwd, (1,)),
    "unmix_tokens": (gen_unmix, _ref_unmix, (1,)),
    "unmix_tokens_backward": (gen_unmix_bwd, _ref_unmix_bwd, (1,)),
    "window_partition": (gen_partition, _ref_partition, (1, 2, 3, 4)),
    "window_merge": (gen_merge, _ref_merge, (1, 2, 3, 4, 5, 6)),
    "uniform_sample": (gen_sample, _ref_sample, (1, 2, 4)),
    "uniform_sample_backward": (gen_sample_bwd, _ref_sample_bwd, (1, 2, 3)),
    "uniform_scatter": (gen_scatter, _ref_scatter, (1, 2)),
    "window_attention": (gen_wattn, _ref_wattn, (1, 2, 3, 4, 5, 8, 9, 10, 11)),
    "window_attention_backward": (gen_wattn_bwd, _ref_wattn_bwd, (4, 5, 6, 7, 8, 11, 12, 13, 14)),
    "mixmim_loss": (gen_mixmim, _ref_mixmim, (2, 3)),
    "mixmim_loss_backward": (gen_mixmim_bwd, _ref_mixmim_bwd, (3, 4)),
    "masked_recon_loss": (gen_masked, _ref_masked, (2, 3)),
    "masked_recon_loss_backward": (gen_masked_bwd, _ref_masked_bwd, (3, 4)),
}


# ---------------------------------------------------------------- mutations
def _mutate_tensor(rng, t: torch.Tensor) -> Tuple[torch.Tensor, str]:
    kind = rng.choice(("noncontig", "dtype", "rank", "size", "empty", "expand"))
    if kind == "noncontig" and t.numel() > 1:
        return torch.stack([t, t], -1)[..., 0], "non-contiguous"
    if kind == "dtype":
        dt = rng.choice([d for d in DTYPES if d != t.dtype])
        return t.to(dt), f"dtype {dt}"
    if kind == "rank":
        if t.dim() and rng.random() < 0.5:
            return t.reshape(-1) if rng.random() < 0.5 else t[0] if t.shape[0] else t.reshape(-1), "rank down"
        return t.unsqueeze(rng.randrange(t.dim() + 1)), "rank up"
    if kind == "size" and t.dim():
        d = rng.randrange(t.dim())
        if t.shape[d] and rng.random() < 0.5:
            return t.narrow(d, 0, t.shape[d] - 1).contiguous(), f"dim {d} - 1"
        return torch.cat([t, t.narrow(d, 0, min(1, t.shape[d]))], d) if t.shape[d] else t, f"dim {d} + 1"
    if kind == "expand" and t.dim() and t.shape[0] == 1:
        return t.expand(3, *t.shape[1:]), "stride-0 batch"
    return t.new_empty((0,)), "empty"


def _mutate_value(rng, v: Any) -> Tuple[Any, str]:
    if isinstance(v, bool):
        return (not v), "flag flipped"
    if isinstance(v, int):
        nv = rng.choice((0, -1, v + 1, v - 1, 2 * v) + HUGE)
        return nv, f"int {nv}"
    if isinstance(v, float):
        nv = rng.choice((float("nan"), float("inf"), -0.0, 1e30))
        return nv, f"float {nv}"
    if isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and v.numel():
        t = v.clone()
        flat = t.view(-1)
        i = rng.randrange(flat.numel())
        info = torch.iinfo(t.dtype) if t.dtype != torch.bool else None
        choices = (-1, 4, 255, 2**31 - 1, -(2**31), 2**40) if info is None or info.bits > 8 else (4, 7, 255, -1)
        val = rng.choice(choices)
        if info is not None:
            val = max(info.min, min(info.max, val))
        flat[i] = val
        return t, f"value {val} at {i}"
    return v, "unchanged"


def make_case(seed: int, case: int, ops=None):
    """(op name, args, description, mutated) drawn from (seed, case) (and the op subset) only."""
    rng = random.Random(seed * 1_000_003 + case)
    name = rng.choice(sorted(ops or OPS))
    gen, _, index_args = OPS[name]
    args = gen(rng)
    what = []
    if rng.random() < 0.5:
        for _ in range(rng.choice((1, 1, 2))):
            i = rng.randrange(len(args))
            a = args[i]
            if isinstance(a, torch.Tensor) and (i not in index_args or rng.random() < 0.5):
                args[i], w = _mutate_tensor(rng, a)
            elif a is None:
                args[i], w = _rand(rng, (rng.choice((0, 1, 3)),) * rng.choice((1, 2)), rng.choice(DTYPES)), "added"
            elif isinstance(a, torch.Tensor) and rng.random() < 0.2:
                args[i], w = None, "dropped"
            else:
                args[i], w = _mutate_value(rng, a)
            what.append(f"arg {i}: {w}")
    return name, args, "; ".join(what) or "well-formed", bool(what)


# ---------------------------------------------------------------- checking
_CLEAR = (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError)


def _describe(args) -> str:
    def one(a):
        if isinstance(a, torch.Tensor):
            return f"T{tuple(a.shape)}:{str(a.dtype)[6:]}{'' if a.is_contiguous() else ':nc'}"
        return repr(a)
    return "(" + ", ".join(one(a) for a in args) + ")"


def _tol(dtypes):
    if any(d in (F16, BF16) for d in dtypes):
        return 3e-2, 3e-2
    if all(d == F64 for d in dtypes):
        return 1e-7, 1e-9
    return 2e-3, 2e-4


def _compare(got, want, rtol, atol) -> Optional[str]:
    if not isinstance(got, (tuple, list)):
        got = (got,)
    if len(got) != len(want):
        return f"{len(got)} outputs, spec {len(want)}"
    for k, (g, w) in enumerate(zip(got, want)):
        if tuple(g.shape) != tuple(w.shape) or g.dtype != w.dtype:
            return f"output {k}: {tuple(g.shape)} {g.dtype}, spec {tuple(w.shape)} {w.dtype}"
        if isinstance(w, _Shape) or not g.numel():
            continue
        gd, wd = g.detach().cpu().double(), w.detach().double()
        if not torch.equal(gd.isnan(), wd.isnan()):
            return f"output {k}: NaN positions differ ({int(gd.isnan().sum())} here, {int(wd.isnan().sum())} in the spec)"
        fin = torch.isfinite(wd)
        if not torch.equal(gd[~fin & ~wd.isnan()], wd[~fin & ~wd.isnan()]):
            return f"output {k}: Inf values differ"
        if not fin.any():
            continue
        scale = max(1.0, float(wd[fin].abs().max()))  # sums of rounded half-precision terms: relative to the output
        err = (gd[fin] - wd[fin]).abs() - (atol * scale + rtol * wd[fin].abs())
        if err.max() > 0:
            return (f"output {k}: max error {float((gd[fin] - wd[fin]).abs().max()):.3e} beyond rtol {rtol} "
                    f"atol {atol} x {scale:.3g}")
    return None


def run_case(seed: int, case: int, device: str, verbose: bool, ops=None) -> Tuple[str, Optional[str]]:
    """(op name, None if the case passed else what went wrong)."""
    if verbose:
        print(f"seed {seed} case {case}", flush=True)  # generating may call a kernel too
    name, args, what, mutated = make_case(seed, case, ops)
    desc = f"seed {seed} case {case}: {name}{_describe(args)} [{what}]"
    if verbose:
        print(desc, flush=True)
    return name, _check(name, args, desc, device, shape_only=mutated and name in SHAPE_ONLY_WHEN_MUTATED)


def _check(name, args, desc, device, shape_only=False) -> Optional[str]:
    _, spec, _ = OPS[name]
    try:
        want = spec(*args)
        verdict = "match"
    except Invalid as e:
        want, verdict = None, f"raise ({e})"
    except Lenient:
        want, verdict = None, "raise or match"
    if verdict == "match" and device == "cuda":
        # The CUDA kernels support fewer shapes/dtypes (no float64, fused head dims only) and say
        # so with an error; under compute-sanitizer the point is memory safety of what they accept.
        verdict = "raise or match"
    if verdict == "raise or match":  # compute what a kernel that handles it must return
        try:
            want = spec(*[a.contiguous() if isinstance(a, torch.Tensor) else a for a in args])
        except (Invalid, Lenient):
            verdict = "raise"
    dev_args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    try:
        got = getattr(torch.ops.mixkernels_C, name)(*dev_args)
        if device == "cuda":
            torch.cuda.synchronize()
    except _CLEAR as e:
        msg = str(e).strip()
        if "CUDA error" in msg or "illegal memory access" in msg or "device-side assert" in msg:
            raise StickyCudaError(f"{desc}\n  {msg.splitlines()[0]}") from None  # the context is gone: stop
        if not msg or "INTERNAL ASSERT" in msg:
            return f"{desc}\n  unclear error: {type(e).__name__}: {msg[:300]!r}"
        if verdict == "match":
            return f"{desc}\n  raised on a well-formed call: {type(e).__name__}: {msg.splitlines()[0][:300]}"
        return None
    except Exception as e:  # noqa: BLE001
        return f"{desc}\n  raised {type(e).__name__} (not a clear error type): {e}"
    if verdict.startswith("raise") and verdict != "raise or match":
        return f"{desc}\n  returned, but the call breaks the contract: must {verdict}"
    dts = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.dtype.is_floating_point]
    if shape_only:
        want = [_Shape(w.shape, w.dtype) for w in want]
    bad = _compare(got, want, *_tol(dts))
    return None if bad is None else f"{desc}\n  {bad}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of fuzzing")
    ap.add_argument("--max-cases", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=None, help="default: random, printed")
    ap.add_argument("--case", type=int, default=None, help="replay one case")
    ap.add_argument("--verbose", action="store_true", help="print every case before it runs")
    ap.add_argument("--ops", default=None, help="regex: fuzz only the ops whose name matches (replay needs the same)")
    a = ap.parse_args(argv)
    import re

    warnings.filterwarnings("ignore", message=r"var\(\): degrees of freedom")  # the spec on empty patches

    ops = sorted(n for n in OPS if a.ops is None or re.search(a.ops, n))
    if not ops:
        ap.error(f"--ops {a.ops!r} matches no op of {sorted(OPS)}")
    import mixkernels  # noqa: F401  (loads the extension and registers the kernels)
    from mixkernels import _ext

    if a.device == "cpu" and _ext.cpu_error:
        print(f"fuzz: no CPU extension: {_ext.cpu_error}")
        return 2
    if a.device == "cuda" and (not torch.cuda.is_available() or _ext.cuda_error):
        print(f"fuzz: no CUDA extension/device: {_ext.cuda_error}")
        return 2
    key = "CPU" if a.device == "cpu" else "CUDA"
    missing = [n for n in ops if not _ext.has_kernel(n, key)]
    if missing:
        print(f"fuzz: no {key} kernel for {missing}: not fuzzed")
        ops = [n for n in ops if n not in missing]
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(2**31)
    sel = "" if a.ops is None else f" --ops {a.ops!r}"
    print(f"fuzz: device {a.device} seed {seed} budget {a.budget:.0f} s (replay: --seed {seed}{sel} --case N)",
          flush=True)
    cases = [a.case] if a.case is not None else range(a.max_cases)
    t0, n, failures, per_op = time.monotonic(), 0, [], {}
    for case in cases:
        if a.case is None and time.monotonic() - t0 > a.budget:
            break
        try:
            name, err = run_case(seed, case, a.device, a.verbose or a.case is not None, ops)
        except StickyCudaError as e:
            print(f"FAIL {e}", flush=True)
            failures.append(str(e))
            break
        except Exception:  # a bug in the fuzzer itself
            name, err = "?", f"seed {seed} case {case}: fuzzer error\n{traceback.format_exc()}"
        n += 1
        per_op[name] = per_op.get(name, 0) + 1
        if err:
            failures.append(err)
            print("FAIL " + err, flush=True)
            if len(failures) >= 20:
                break
    dt = time.monotonic() - t0
    print(f"fuzz: {n} cases in {dt:.1f} s, {len(failures)} failures; per op: "
          + ", ".join(f"{k} {v}" for k, v in sorted(per_op.items())), flush=True)
    if failures:
        print(f"fuzz: FAILED (seed {seed}); replay a case with --seed {seed}{sel} --case N", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
