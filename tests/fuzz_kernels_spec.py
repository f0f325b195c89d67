"""Kernel-level spec of the ops ``torch.ops.mixkernels_C.*`` and random well-formed calls to them,
for the fuzzer tests/fuzz_kernels.py (schemas: csrc/ops.cpp).

Each ``_ref_*`` function states one op's contract (raising :class:`Invalid` when a call breaks
it, :class:`Lenient` when the kernel may reject it, e.g. a non-contiguous input) and computes
what the kernel must return, from ``mixkernels.reference`` in float64 (or, under
:func:`computing_in`, in a lower precision: the fuzzer's error bound is twice the error of the
spec computed in the inputs' dtype, the rule of ``mixkernels.testing``). ``OPS`` maps an op to
its generator, its spec and the arguments whose values may go out of range.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Dict, List, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from mixkernels import reference as ref  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FLOATS = (F16, BF16, F32, F64)

class Invalid(Exception):
    """The call breaks the kernel-level contract: the kernel must raise."""


class StickyCudaError(Exception):
    """A CUDA error (illegal address, device assert): the context is unusable, the run stops."""


class Lenient(Exception):
    """The kernel may reject this call (e.g. a non-contiguous input) or compute the spec's result."""


# ---------------------------------------------------------------- compute dtype
_COMPUTE = [F64]


@contextlib.contextmanager
def computing_in(dtype):
    """Evaluate the spec's arithmetic in ``dtype`` instead of float64 (for the error bound)."""
    _COMPUTE.append(dtype)
    try:
        yield
    finally:
        _COMPUTE.pop()


def hi(t):
    """``t`` in the spec's compute dtype (float64 unless :func:`computing_in` says otherwise)."""
    return None if t is None else t.to(_COMPUTE[-1])


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
    """vjp of ``fn(**inputs)`` (in the compute dtype) for the inputs named in ``wanted``."""
    leaves = {k: (hi(v.detach()).requires_grad_() if k in wanted else v) for k, v in inputs.items()}
    out = fn(**leaves)
    gs = torch.autograd.grad(out, [leaves[k] for k in wanted], hi(dout), allow_unused=True)
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
    p = None if pos is None else hi(pos.reshape(1, L, C))
    return (ref.unmix_tokens(hi(x), m, hi(tok), p).to(x.dtype),)


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


def _wattn_logits(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, scale, ls=None):
    """(logits (B*nW, nH, N, N), v (B*nW, nH, N, d)) of the reference, in the compute dtype
    (cosine mode when the logit scale ``ls`` is given; ``scale`` is then unused)."""
    return ref.window_attention_logits(hi(qkv), nH, (wh, ww), shift_size=(sh, sw), rel_pos_bias=hi(rpb),
                                       attn_bias=hi(ab), group=group, coords=coords, coord_range=(rh, rw),
                                       scale=scale, logit_scale=hi(ls))


def _ref_wattn(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, scale, ls=None):
    B, H, W, C, N, acc = _wattn_contract(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw)
    if ls is not None:
        _logit_scale_contract(ls, nH, acc)
    S, v = _wattn_logits(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, scale, ls)
    out = ref.merge_heads(S.softmax(-1) @ v, (wh, ww), H, W, (sh, sw))
    # lse = m + log(sum(exp(S - m))): NaN in a row with no attendable key (m = -inf); the
    # kernels store NaN or -inf there (both make the backward's row NaN), see _NoKeyNaN.
    m = S.amax(-1, keepdim=True)
    lse = (m + (S - m).exp().sum(-1, keepdim=True).log()).squeeze(-1)
    return out.to(qkv.dtype), _NoKeyNaN(lse.to(acc))


def _logit_scale_contract(ls, nH, acc):
    tens("logit_scale", ls, dtypes=(acc,), shape=(nH,))
    contiguous_or_lenient(ls)


def _ref_wattn_bwd(dout, qkv, out, lse, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw, scale,
                   need_drpb, need_dbias, det, ls=None, need_dls=False):
    """The kernel-level backward's contract, for ANY given ``out`` and ``lse`` (not only the
    forward's own): with the reference's logits ``S`` (shift/group-masked pairs at -inf),
    ``P = exp(S - lse)``, ``delta = rowsum(dout * out)``, ``dS = P * (dout @ v^T - delta)``
    (0 at masked pairs), ``dv = P^T dout``, and dS/dv pulled back to qkv, rpb and attn_bias.
    With the forward's own out/lse this is the reference's autograd gradient (the CUDA, Triton
    and CPU kernels all compute this: they recompute P from lse and delta from out). Cosine mode
    (``ls``, the logit scale, a fourth leaf with ``need_dls``): the gradient at the forward's own
    out/lse, whatever is given (see ``_ref_wattn_cos_bwd``)."""
    B, H, W, C, N, acc = _wattn_contract(qkv, nH, wh, ww, sh, sw, rpb, ab, group, coords, rh, rw)
    if ls is not None:
        _logit_scale_contract(ls, nH, acc)
    nW = (H // wh) * (W // ww)
    tens("dout", dout, dtypes=(qkv.dtype,), shape=(B, H, W, C))
    tens("out", out, dtypes=(qkv.dtype,), shape=(B, H, W, C))
    tens("lse", lse, dtypes=(acc,))
    need(lse.numel() == B * nW * nH * N, "lse numel")
    need(rpb is not None or not need_drpb, "need_drpb without rpb")
    need(ab is not None or not need_dbias, "need_dbias without attn_bias")
    contiguous_or_lenient(dout, out, lse)
    wanted = {"qkv": True, "rpb": need_drpb, "ab": need_dbias, "ls": need_dls}
    leaves = {k: None if t is None else hi(t.detach()).requires_grad_(wanted[k])
              for k, t in (("qkv", qkv), ("rpb", rpb), ("ab", ab), ("ls", ls))}
    S, v = _wattn_logits(leaves["qkv"], nH, wh, ww, sh, sw, leaves["rpb"], leaves["ab"], group, coords, rh, rw,
                         scale, leaves["ls"])
    d = C // nH

    def heads(t):  # (B,H,W,C) -> (B*nW, nH, N, d), the layout of v
        return ref.window_partition(hi(t), (wh, ww), (sh, sw)).reshape(B * nW, N, nH, d).transpose(1, 2)

    dO, O = heads(dout), heads(out)
    lse_used = hi(lse).reshape(B * nW, nH, N, 1)
    if ls is not None:  # cosine: the forward's own P and O (kernels may recompute them, see _ref_wattn_cos_bwd)
        Sd = S.detach()
        m = Sd.amax(-1, keepdim=True)
        lse_used = m + (Sd - m).exp().sum(-1, keepdim=True).log()
        O = (Sd - lse_used).exp() @ v.detach()
    P = (S.detach() - lse_used).exp()
    delta = (dO * O).sum(-1, keepdim=True)
    dS = P * (dO @ v.detach().transpose(-2, -1) - delta)  # masked pairs: masked_fill's backward gives 0
    names = [k for k in wanted if wanted[k]]
    gs = torch.autograd.grad((S, v), [leaves[k] for k in names], (dS, P.transpose(-2, -1) @ dO), allow_unused=True)
    gs = {k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, gs)}
    res = (gs["qkv"].to(qkv.dtype), gs["rpb"].to(acc) if need_drpb else torch.empty(0, dtype=acc),
           gs["ab"].to(acc) if need_dbias else torch.empty(0, dtype=acc))
    if ls is not None:
        res += (gs["ls"].to(acc) if need_dls else torch.empty(0, dtype=acc),)
    if bool((P.nan_to_num(nan=0.0).sum(-1) > 2).any()):
        # An lse more than log 2 below its row's log-sum-exp (e.g. from a forward with another
        # shift, scale or bias: a fuzzer mutation) or a +inf logit: P grows like exp(deficit)
        # and the gradient is a cancellation of huge terms whose rounding (or overflow to Inf
        # vs NaN) depends on the order and precision of the sums, beyond any error bound
        # relative to the result: shapes only. (NaN rows, e.g. no attendable key, are checked.)
        return tuple(_Shape(r.shape, r.dtype) for r in res)
    return res


def _loss_contract(pred, imgs, p):
    tens("pred", pred, dtypes=FLOATS, ndim=3)
    tens("imgs", imgs, dtypes=FLOATS, ndim=4)
    need(imgs.shape[1] == 3 and p > 0 and imgs.shape[2] % p == 0 and imgs.shape[3] % p == 0, "image geometry")
    need(pred.shape[2] == p * p * 3, "pred width")
    return imgs.shape[0], (imgs.shape[2] // p) * (imgs.shape[3] // p), acc_of(torch.promote_types(pred.dtype, imgs.dtype))


def _mixmim_fn(imgs, mask, p, norm_pix, eps):
    return lambda pred: ref.mixmim_loss(pred, hi(imgs), mask, p, norm_pix=norm_pix, eps=eps, reduction="none")


def _ref_mixmim(pred, imgs, mask, p, norm_pix, eps):
    B, L, acc = _loss_contract(pred, imgs, p)
    need(tuple(pred.shape[:2]) == (2 * B, L), "pred shape")
    tens("mask", mask, dtypes=(torch.uint8,), ndim=2)
    need(mask.shape[1] == L and mask.shape[0] in (1, B), "mask shape")
    contiguous_or_lenient(pred, imgs, mask)
    return (_mixmim_fn(imgs, mask.expand(B, L), p, norm_pix, eps)(hi(pred)).to(acc),)


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
        t = ref.patch_targets(hi(imgs), p, norm_pix, eps)  # (B, L, D)
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
    return (_masked_fn(imgs, idx.reshape(B, pred.shape[1]), p, norm_pix, eps)(hi(pred)).to(acc),)


def _ref_masked_bwd(grad, pred, imgs, idx, p, norm_pix, eps):
    (loss,) = _ref_masked(pred, imgs, idx, p, norm_pix, eps)
    tens("grad", grad, dtypes=(loss.dtype,))
    need(grad.numel() == loss.numel(), "grad numel")
    contiguous_or_lenient(grad)
    B = loss.shape[0]
    g = grad.reshape(loss.shape)
    return (grad_of(_masked_fn(imgs, idx.reshape(B, pred.shape[1]), p, norm_pix, eps), {"pred": pred}, g, ["pred"])[0]
            .to(pred.dtype),)


class _Shape:
    """An expected output checked by shape and dtype only."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


class _NoKeyNaN:
    """An expected lse whose NaN (a row with no attendable key) may be NaN or -inf in the kernel's."""

    def __init__(self, t):
        self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype


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


def wattn_bwd_args(rng, a, forward="window_attention", more_flags=0):
    """A backward call for the forward call ``a``: dout, qkv, the forward's out/lse (zeros when it
    raises: the forward case reports that), a's other arguments, need_drpb, need_dbias, ``more_flags``
    further need_* flags, deterministic."""
    try:
        out, lse = getattr(torch.ops.mixkernels_C, forward)(*a)
    except Exception:  # noqa: BLE001 - the forward case reports forward failures
        B, H, W, C3 = a[0].shape
        out = torch.zeros(B, H, W, C3 // 3, dtype=a[0].dtype)
        lse = torch.zeros(B * (H // a[2]) * (W // a[3]), a[1], a[2] * a[3], dtype=acc_of(a[0].dtype))
    dout = _rand(rng, out.shape, out.dtype)
    return [dout, a[0], out, lse, *a[1:], a[6] is not None and rng.random() < 0.8,
            a[7] is not None and rng.random() < 0.8, *[rng.random() < 0.8 for _ in range(more_flags)],
            rng.random() < 0.5]


def gen_wattn_bwd(rng):
    return wattn_bwd_args(rng, gen_wattn(rng))


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


