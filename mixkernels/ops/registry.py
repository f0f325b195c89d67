"""The op registry: one entry per public op (xformers' ``OPERATORS_REGISTRY`` is the model).

Each entry declares, once: name and family (``mixkernels/ops/<family>.py``), the kernel-level
ops it ends in, the dtypes each backend takes and any op-specific limit (the dispatch
predicate, see :mod:`._opspec`), and example calls as keyword dicts of the public op's
arguments: ``samples`` (small valid calls; opcheck, eager-vs-custom-op, info), ``edges``
(valid extremes), ``bad`` (calls that must raise, with the message) and ``bench`` (the ``ops``
benchmark suite's shapes). Who iterates it: ``python -m mixkernels.info``,
tests/test_opcheck.py, tests/test_bad_inputs.py, tests/test_registry.py and
``python -m mixkernels.bench --suite ops|overhead``. Adding an op = adding an entry here
(CONTRIBUTING.md).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from ._dispatch import BackendUnavailable
from ._opspec import Bad, BenchShape, OpSpec
from .limits import CUDA_MAX_LOSS_PATCH, KERNEL_HEAD_DIMS, KERNEL_MAX_WINDOW_TOKENS

__all__ = ["OPERATORS_REGISTRY", "register", "mixmim_mask", "randn"]

OPERATORS_REGISTRY: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in OPERATORS_REGISTRY:
        raise ValueError(f"op {spec.name!r} is registered twice")
    OPERATORS_REGISTRY[spec.name] = spec
    return spec


# The dtypes of the checked tensors per backend (the order is the one error messages list).
_GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_CPU_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOKEN_DTYPES = {"cuda": _GPU_FLOATS, "triton": _GPU_FLOATS, "cpu": _CPU_FLOATS}
_F, _L = torch.float32, torch.long


# ------------------------------------------------------------------------------ input helpers
def randn(shape, device, dtype, gen=None, scale=1.0, grad=False) -> torch.Tensor:
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * scale
    return t.to(dtype).requires_grad_(grad)


def _bits(shape, device, p=0.5, gen=None) -> torch.Tensor:
    return torch.rand(shape, device=device, generator=gen) < p


def _keep(shape, device, gen=None, dtype=torch.uint8) -> torch.Tensor:
    return torch.randint(0, 4, shape, device=device, generator=gen).to(dtype)


def mixmim_mask(H: int, W: int, device, gen, ratio: float = 0.5) -> torch.Tensor:
    """MixMIM's batch-shared mask: ``ratio`` of the 7x7 grid, upsampled to ``(H, W)`` (int32)."""
    perm = torch.randperm(49, generator=gen, device=device)
    m = torch.zeros(49, dtype=torch.int32, device=device)
    m[perm[: int(ratio * 49)]] = 1
    return m.reshape(7, 7).repeat_interleave(H // 7, 0).repeat_interleave(W // 7, 1)


def _es(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def _stage1(tiny: bool):
    """Token grid and channels of MixMIM-B / Swin-B stage 1 (smaller for a CPU smoke run)."""
    return (28, 64) if tiny else (56, 128)


# ------------------------------------------------------------------------------ mixing
def _mix_bench(B, tiny, dt):
    HW, C = _stage1(tiny)  # the encoder input: (B, L, C), batch-shared MixMIM mask
    n = 2 * B * HW * HW * C * _es(dt)
    return [BenchShape("mixmim-s1", lambda d, t, g: {
        "x": randn((B, HW * HW, C), d, t, g, grad=True), "mask": mixmim_mask(HW, HW, d, g).reshape(-1).bool()},
        n, n, dict(batch=B, L=HW * HW, C=C))]


register(OpSpec(
    name="mix_tokens", family="mixing", kernels=("mix_tokens", "mix_tokens_backward"), grads=("x",),
    dtypes=TOKEN_DTYPES,
    samples=lambda d, t: [
        dict(x=randn((3, 5, 4), d, t, grad=True), mask=_bits(5, d)),
        dict(x=randn((2, 3, 4, 4), d, t, grad=True), mask=_bits((2, 3, 4), d).to(torch.uint8)),
    ],
    edges=lambda d, t: [
        ("all-masked", dict(x=randn((3, 5, 4), d, t, grad=True), mask=torch.ones(5, device=d))),
        ("none-masked", dict(x=randn((3, 5, 4), d, t, grad=True), mask=torch.zeros(3, 5, device=d, dtype=_L))),
        ("one-image", dict(x=randn((1, 5, 1), d, t, grad=True), mask=_bits(5, d))),
        ("empty-batch", dict(x=randn((0, 5, 4), d, t, grad=True), mask=_bits(5, d))),
    ],
    bad=lambda: [
        Bad("mix-rank", dict(x=torch.randn(4, 5), mask=torch.ones(5)), ValueError, "x must have 3 or 4 dims"),
        Bad("mix-mask-shape", dict(x=torch.randn(2, 5, 3), mask=torch.ones(4)), ValueError, "mask must have shape (5,)"),
        Bad("mix-mask-type", dict(x=torch.randn(2, 5, 3), mask=[1, 0]), TypeError, "mask must be a torch.Tensor"),
    ],
    bench=lambda B, tiny, dt: _mix_bench(B, tiny, dt),
))


def _unmix_bench(B, tiny, dt):
    Ld, Cd = 49, (64 if tiny else 512)  # the decoder input: 7x7 tokens, decoder dim 512
    n = 3 * B * Ld * Cd * _es(dt)
    return [BenchShape("mixmim-dec", lambda d, t, g: {
        "x": randn((B, Ld, Cd), d, t, g, grad=True), "mask": mixmim_mask(7, 7, d, g).reshape(-1).bool(),
        "mask_token": randn((Cd,), d, t, g, 0.02, grad=True), "pos_embed": randn((1, Ld, Cd), d, t, g, 0.02, grad=True)},
        n, n, dict(batch=B, L=Ld, C=Cd))]


register(OpSpec(
    name="unmix_tokens", family="mixing", kernels=("unmix_tokens", "unmix_tokens_backward"),
    grads=("x", "mask_token", "pos_embed"), dtypes=TOKEN_DTYPES,
    samples=lambda d, t: [
        dict(x=randn((3, 5, 4), d, t, grad=True), mask=_bits(5, d), mask_token=randn(4, d, t, grad=True),
             pos_embed=randn((1, 5, 4), d, t, grad=True)),
        dict(x=randn((3, 5, 4), d, t, grad=True), mask=_bits((3, 5), d), mask_token=randn((1, 1, 4), d, t, grad=True)),
    ],
    edges=lambda d, t: [
        ("all-masked", dict(x=randn((2, 5, 4), d, t, grad=True), mask=torch.ones(5, device=d, dtype=torch.bool),
                            mask_token=randn(4, d, t, grad=True), pos_embed=randn((5, 1), d, t, grad=True))),
        ("pos-broadcast", dict(x=randn((2, 5, 4), d, t, grad=True), mask=_bits((2, 5), d),
                               mask_token=randn(4, d, t, grad=True), pos_embed=randn(4, d, t, grad=True))),
    ],
    bad=lambda: [
        Bad("unmix-token", dict(x=torch.randn(2, 5, 3), mask=torch.ones(5), mask_token=torch.randn(4)), ValueError,
            "mask_token must have 3 elements"),
        Bad("unmix-pos", dict(x=torch.randn(2, 5, 3), mask=torch.ones(5), mask_token=torch.randn(3),
                              pos_embed=torch.randn(1, 4, 3)), ValueError, "pos_embed must broadcast"),
        Bad("unmix-pos-rank", dict(x=torch.randn(2, 5, 3), mask=torch.ones(5), mask_token=torch.randn(3),
                                   pos_embed=torch.randn(1, 1, 5, 3)), ValueError, "pos_embed must broadcast"),
    ],
    bench=_unmix_bench,
))


# ------------------------------------------------------------------------------ windows
def _partition_bench(B, tiny, dt):
    HW, C = _stage1(tiny)
    n = B * HW * HW * C * _es(dt)
    return [BenchShape(nm, lambda d, t, g, w=w, s=s: {
        "x": randn((B, HW, HW, C), d, t, g, grad=True), "window_size": w, "shift_size": s},
        2 * n, 2 * n, dict(batch=B, H=HW, W=HW, C=C, window=w, shift=s))
        for nm, w, s in (("mixmim-s1-w14", 14, 0), ("swin-s1-w7-shift", 7, 3))]


register(OpSpec(
    name="window_partition", family="windows", kernels=("window_partition", "window_merge"), grads=("x",),
    dtypes=TOKEN_DTYPES,
    samples=lambda d, t: [
        dict(x=randn((2, 4, 6, 3), d, t, grad=True), window_size=(2, 3), shift_size=1),
        dict(x=randn((1, 4, 4, 5), d, t, grad=True), window_size=2),
    ],
    edges=lambda d, t: [
        ("one-window", dict(x=randn((2, 3, 5, 2), d, t, grad=True), window_size=(3, 5), shift_size=(2, 4))),
        ("noncontiguous", dict(x=randn((2, 6, 4, 3), d, t).transpose(1, 2).requires_grad_(), window_size=2,
                               shift_size=1)),
        ("empty-batch", dict(x=randn((0, 4, 4, 3), d, t, grad=True), window_size=2)),
    ],
    bad=lambda: [
        Bad("part-window", dict(x=torch.randn(1, 6, 6, 2), window_size=4), ValueError, "must divide"),
        Bad("part-shift", dict(x=torch.randn(1, 8, 8, 2), window_size=4, shift_size=(1, 4)), ValueError,
            "shift_size (1, 4) must be smaller"),
    ],
    bench=_partition_bench,
))


def _merge_bench(B, tiny, dt):
    HW, C = _stage1(tiny)
    nW, n = (HW // 7) ** 2, B * HW * HW * C * _es(dt)
    return [BenchShape("swin-s1-w7-shift", lambda d, t, g: {
        "windows": randn((B * nW, 49, C), d, t, g, grad=True), "window_size": 7, "H": HW, "W": HW, "shift_size": 3},
        2 * n, 2 * n, dict(batch=B, H=HW, W=HW, C=C, window=7, shift=3))]


register(OpSpec(
    name="window_merge", family="windows", kernels=("window_merge", "window_partition"), grads=("windows",),
    dtypes=TOKEN_DTYPES,
    samples=lambda d, t: [
        dict(windows=randn((8, 6, 3), d, t, grad=True), window_size=(2, 3), H=4, W=6, shift_size=(1, 2)),
    ],
    edges=lambda d, t: [
        ("one-window", dict(windows=randn((2, 15, 2), d, t, grad=True), window_size=(3, 5), H=3, W=5, shift_size=2)),
    ],
    bad=lambda: [
        Bad("merge-shape", dict(windows=torch.randn(3, 16, 2), window_size=4, H=8, W=8), ValueError,
            "windows must have shape (B*4, 16, C)"),
        Bad("merge-H", dict(windows=torch.randn(4, 16, 2), window_size=4, H=0, W=8), ValueError, "H must be positive"),
    ],
    bench=_merge_bench,
))


# ------------------------------------------------------------------------------ uniform
def _uniform_bench(B, tiny, dt, scatter):
    HW, C = _stage1(tiny)
    u = 2 if tiny else 4  # 16 px units = 4 tokens at patch 4; 25% secondary masking
    hc, n = HW // (2 * u), B * HW * HW * C * _es(dt)
    cn = n // 4  # compact image bytes
    params = dict(batch=B, H=HW, W=HW, C=C, unit=u)
    if scatter:
        return [BenchShape("ummae-s1", lambda d, t, g: {
            "compact": randn((B, HW // 2, HW // 2, C), d, t, g, grad=True), "keep": _keep((B, hc, hc), d, g),
            "unit": u}, cn + n, 2 * cn, params)]
    return [BenchShape("ummae-s1", lambda d, t, g: {
        "x": randn((B, HW, HW, C), d, t, g, grad=True), "keep": _keep((B, hc, hc), d, g), "unit": u,
        "mask_token": randn((C,), d, t, g, 0.02, grad=True), "secondary": _bits((B, hc, hc), d, 0.25, g)},
        2 * cn, cn + n, params)]


register(OpSpec(
    name="uniform_sample", family="uniform", kernels=("uniform_sample", "uniform_sample_backward"),
    grads=("x", "mask_token"), dtypes=TOKEN_DTYPES,
    samples=lambda d, t: [
        dict(x=randn((2, 8, 8, 3), d, t, grad=True), keep=_keep((2, 2, 2), d), unit=2,
             mask_token=randn(3, d, t, grad=True), secondary=_bits((2, 2, 2), d)),
        dict(x=randn((2, 4, 4, 3), d, t, grad=True), keep=_keep((2, 2, 2), d, dtype=_L), unit=1),
    ],
    edges=lambda d, t: [
        ("all-secondary", dict(x=randn((1, 4, 4, 2), d, t, grad=True), keep=_keep((1, 2, 2), d), unit=1,
                               mask_token=randn(2, d, t, grad=True), secondary=torch.ones(1, 2, 2, device=d, dtype=torch.bool))),
        ("one-cell", dict(x=randn((2, 2, 2, 3), d, t, grad=True), keep=_keep((2, 1, 1), d), unit=1)),
    ],
    bad=lambda: [
        Bad("us-unit", dict(x=torch.randn(1, 6, 6, 2), keep=torch.zeros(1, 1, 1, dtype=_L), unit=2), ValueError,
            "divisible by 2*unit"),
        Bad("us-keep-shape", dict(x=torch.randn(1, 8, 8, 2), keep=torch.zeros(1, 3, 2, dtype=_L), unit=2), ValueError,
            "keep must have shape (1, 2, 2)"),
        Bad("us-keep-range", dict(x=torch.randn(1, 8, 8, 2), keep=torch.full((1, 2, 2), 4), unit=2), ValueError,
            "keep must hold values in 0..3"),
        Bad("us-keep-dtype", dict(x=torch.randn(1, 8, 8, 2), keep=torch.zeros(1, 2, 2), unit=2), TypeError,
            "keep must have dtype"),
        Bad("us-token-missing", dict(x=torch.randn(1, 8, 8, 2), keep=torch.zeros(1, 2, 2, dtype=_L), unit=2,
                                     secondary=torch.zeros(1, 2, 2, dtype=torch.bool)), ValueError,
            "mask_token is required"),
    ],
    bench=lambda B, tiny, dt: _uniform_bench(B, tiny, dt, scatter=False),
))

register(OpSpec(
    name="uniform_scatter", family="uniform", kernels=("uniform_scatter", "uniform_sample"), grads=("compact",),
    dtypes=TOKEN_DTYPES,
    samples=lambda d, t: [dict(compact=randn((2, 4, 4, 3), d, t, grad=True), keep=_keep((2, 2, 2), d), unit=2)],
    edges=lambda d, t: [
        ("keep-3", dict(compact=randn((1, 2, 2, 3), d, t, grad=True), keep=torch.full((1, 2, 2), 3, device=d), unit=1)),
    ],
    bad=lambda: [
        Bad("uscatter-unit", dict(compact=torch.randn(1, 3, 4, 2), keep=torch.zeros(1, 1, 2, dtype=_L), unit=2),
            ValueError, "divisible by unit"),
    ],
    bench=lambda B, tiny, dt: _uniform_bench(B, tiny, dt, scatter=True),
))


# ------------------------------------------------------------------------------ window attention
def _wattn_limit(backend: str, d: int, N: int, variant: Optional[str] = None) -> Optional[str]:
    if backend == "cpu":  # the CPU kernel takes any head dim and window
        return None
    if d not in KERNEL_HEAD_DIMS:
        return f"head_dim {d} not supported by the fused kernels (supported: {KERNEL_HEAD_DIMS})"
    if N > KERNEL_MAX_WINDOW_TOKENS:
        return f"window of {N} tokens exceeds the fused kernels' limit of {KERNEL_MAX_WINDOW_TOKENS}"
    return None


def _qkv(d, t, B=2, H=8, W=8, nH=2, hd=16, grad=False):
    return randn((B, H, W, 3 * nH * hd), d, t, grad=grad)


def _zero_tokens(qkv):
    """q and k of a few tokens exactly 0 (cosine mode: F.normalize's eps branch). No gradient to qkv:
    there it is dq/eps ~ 1e12, beyond an absolute float64 tolerance (tests/test_window_attention_cpu.py
    checks it relative)."""
    qkv = qkv.detach().clone()
    qkv[:, 0, :2] = 0
    return qkv


def _logit_scale(d, t, nH, shape=None, grad=True):
    """SwinV2's per-head log scale around its init log(10), one head past the clamp at log(100)."""
    ls = torch.full((nH,), math.log(10.0)) + 0.3 * torch.randn(nH)
    ls[-1] = math.log(100.0) + 0.5  # clamped: its gradient must be 0
    return ls.reshape(shape or (nH,)).to(device=d, dtype=t).requires_grad_(grad)


def _wattn_bad() -> List[Bad]:
    q = dict(num_heads=2, window_size=4)

    def bad(id, exc, msg, **kw):
        return Bad(id, dict(q, **kw) if "qkv" in kw else dict(q, qkv=_qkv("cpu", _F), **kw), exc, msg)

    return [
        bad("wa-qkv-type", TypeError, "qkv must be a torch.Tensor", qkv=[1.0]),
        bad("wa-qkv-rank", ValueError, "qkv must have 4 dims", qkv=torch.randn(8, 8, 96)),
        bad("wa-qkv-dtype", TypeError, "qkv must be float", qkv=torch.zeros(2, 8, 8, 96, dtype=torch.int32)),
        bad("wa-heads", ValueError, "num_heads=5", num_heads=5),
        bad("wa-heads-type", TypeError, "num_heads must be an int", num_heads=2.0),
        bad("wa-window", ValueError, "window_size (4, 4) must divide", qkv=_qkv("cpu", _F, H=9)),
        bad("wa-window-type", TypeError, "window_size must be an int", window_size="4"),
        bad("wa-shift", ValueError, "shift_size (4, 4) must be smaller", shift_size=4),
        bad("wa-shift-neg", ValueError, "shift_size must be >= 0", shift_size=-1),
        bad("wa-rpb", ValueError, "rel_pos_bias must have shape (49, 2)", rel_pos_bias=torch.randn(49, 3)),
        bad("wa-bias", ValueError, "attn_bias must have shape (2, 16, 16)", attn_bias=torch.randn(2, 16, 15)),
        bad("wa-group", ValueError, "group must have shape (8, 8)", group=torch.zeros(8, 7, dtype=_L)),
        bad("wa-group-dtype", TypeError, "group must have dtype", group=torch.zeros(8, 8)),
        bad("wa-coords-range", ValueError, "coord_range", coords=torch.zeros(8, 8, 2, dtype=_L)),
        bad("wa-coords-shape", ValueError, "coords must have shape", coords=torch.zeros(8, 8, 3, dtype=_L),
            coord_range=8),
        bad("wa-scale", TypeError, "scale must be a float", scale="x"),
        bad("wa-logit-shape", ValueError, "logit_scale must have shape (2,) or (2, 1, 1), got (1, 2)",
            logit_scale=torch.zeros(1, 2)),
        bad("wa-logit-dtype", TypeError, "logit_scale must be float", logit_scale=torch.zeros(2, dtype=_L)),
        bad("wa-logit-scale", ValueError, "scale must be None with logit_scale", logit_scale=torch.zeros(2),
            scale=0.5),
        bad("wa-backend", ValueError, "backend must be one of", backend="fast"),
        bad("wa-headdim", BackendUnavailable, "head_dim 12", qkv=_qkv("cpu", _F, hd=12), backend="triton"),
    ]


register(OpSpec(
    name="window_attention", family="window_attention", kernels=("window_attention", "window_attention_backward"),
    grads=("qkv", "rel_pos_bias", "attn_bias", "logit_scale"),
    dtypes={"cuda": _CPU_FLOATS[:3], "triton": _CPU_FLOATS[:3], "cpu": _CPU_FLOATS}, limit=_wattn_limit,
    variants={"cosine": ("window_attention_cosine", "window_attention_cosine_backward")},  # logit_scale given
    samples=lambda d, t: [
        dict(qkv=_qkv(d, t, H=8, W=4, grad=True), num_heads=2, window_size=4, shift_size=(1, 2),
             rel_pos_bias=randn((49, 2), d, t, grad=True), attn_bias=randn((2, 16, 16), d, t, grad=True),
             group=torch.randint(0, 2, (8, 4), device=d, dtype=torch.int32), scale=0.25, deterministic=True),
        dict(qkv=_qkv(d, t, B=2, H=4, W=4, nH=1, grad=True), num_heads=1, window_size=2,
             rel_pos_bias=randn((25, 1), d, t, grad=True), coords=torch.randint(0, 3, (2, 4, 4, 2), device=d),
             coord_range=(3, 3), group=_bits((2, 4, 4), d)),
        # SwinV2 cosine mode: timm's (nH, 1, 1) logit scale, CPB table as rel_pos_bias, shifted windows
        dict(qkv=_qkv(d, t, H=8, W=4, nH=3, grad=True), num_heads=3, window_size=4, shift_size=2,
             rel_pos_bias=(16 * torch.sigmoid(randn((49, 3), d, t))).requires_grad_(),
             logit_scale=_logit_scale(d, t, 3, (3, 1, 1))),
        dict(qkv=_qkv(d, t, B=1, H=4, W=4, grad=True), num_heads=2, window_size=2, attn_bias=randn((2, 4, 4), d, t, grad=True),
             group=_bits((4, 4), d), logit_scale=_logit_scale(d, t, 2), deterministic=True),
    ],
    edges=lambda d, t: [
        ("token-per-group", dict(qkv=_qkv(d, t, B=1, H=4, W=4, nH=1, grad=True), num_heads=1, window_size=4,
                                 group=torch.arange(16, device=d).reshape(4, 4))),
        ("noncontiguous", dict(qkv=_qkv(d, t, H=4, W=8, nH=1).transpose(1, 2).requires_grad_(), num_heads=1,
                               window_size=(4, 2), shift_size=(2, 1), rel_pos_bias=randn((21, 1), d, t, grad=True))),
        ("cosine-zero-rows", dict(qkv=_zero_tokens(_qkv(d, t, B=1, H=4, W=4, nH=1)), num_heads=1, window_size=4,
                                  rel_pos_bias=randn((49, 1), d, t, grad=True), logit_scale=_logit_scale(d, t, 1))),
        ("cosine-coords", dict(qkv=_qkv(d, t, B=2, H=4, W=4, nH=1, grad=True), num_heads=1, window_size=2,
                               shift_size=1, rel_pos_bias=randn((25, 1), d, t, grad=True),
                               coords=torch.randint(0, 3, (4, 4, 2), device=d), coord_range=(3, 3),
                               logit_scale=_logit_scale(d, t, 1, grad=False))),
    ],
    bad=_wattn_bad,
    bench=None,  # the attention suite (mixkernels/bench/cases.py) times it against SDPA, FlexAttention, timm
    doc="qkv (B,H,W,3C) -> (B,H,W,C)",
))


# ------------------------------------------------------------------------------ losses
def _loss_limit(backend: str, patch_size: int) -> Optional[str]:
    if backend == "cuda" and patch_size > CUDA_MAX_LOSS_PATCH:
        return f"patch_size {patch_size} exceeds the CUDA kernels' limit of {CUDA_MAX_LOSS_PATCH}"
    return None


def _imgs(d, B=2, S=8):
    return torch.randn(B, 3, S, S, device=d)


def _loss_bad(masked: bool) -> List[Bad]:
    n = "ml" if masked else "mm"
    B2 = 2 if masked else 4
    ok = dict(pred=torch.randn(B2, 4, 48), imgs=torch.randn(2, 3, 8, 8), mask=torch.ones(4), patch_size=4)
    common = [
        Bad(f"{n}-width", dict(ok, pred=torch.randn(B2, 4, 47)), ValueError, "patch_size**2 * 3 = 48"),
        Bad(f"{n}-img-div", dict(ok, imgs=torch.randn(2, 3, 9, 8)), ValueError, "divisible by patch_size"),
        Bad(f"{n}-mask-len", dict(ok, mask=torch.ones(5)), ValueError, "mask must have shape (4,)"),
        Bad(f"{n}-reduction", dict(ok, reduction="sum"), ValueError, "reduction must be one of"),
        Bad(f"{n}-channels", dict(ok, imgs=torch.randn(2, 1, 8, 8)), ValueError, "imgs must be (B, 3, H, W)"),
        Bad(f"{n}-patch-type", dict(ok, patch_size=4.0), TypeError, "patch_size must be an int"),
    ]
    if masked:
        return common + [
            Bad("ml-compact", dict(ok, pred=torch.randn(2, 2, 48), mask=torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])),
                ValueError, "mask selects [2, 1]"),
            Bad("ml-batch", dict(ok, pred=torch.randn(3, 4, 48)), ValueError, "pred's batch"),
        ]
    return common + [Bad("mm-odd-batch", dict(ok, pred=torch.randn(3, 4, 48)), ValueError, "pred must have shape (2B, L, D)")]


def _loss_bench(B, tiny, dt, masked):
    img = 64 if tiny else 224
    imgs_b = B * 3 * img * img * 4  # images stay float32 (as under autocast)
    if not masked:
        p, Lp = 32, (img // 32) ** 2
        D = p * p * 3
        return [BenchShape("mixmim-p32", lambda d, t, g: {
            "pred": randn((2 * B, Lp, D), d, t, g, grad=True), "imgs": randn((B, 3, img, img), d, _F, g),
            "mask": mixmim_mask(7, 7, d, g).reshape(-1)[:Lp] if Lp == 49 else _bits(Lp, d, 0.5, g), "patch_size": p},
            2 * B * Lp * D * _es(dt) + imgs_b, 2 * B * Lp * D * _es(dt), dict(batch=B, img=img, patch=p, L=Lp))]
    p, L = 16, (img // 16) ** 2
    D = p * p * 3

    def make(d, t, g):
        noise = torch.rand(B, L, generator=g, device=d)
        return {"pred": randn((B, L, D), d, t, g, grad=True), "imgs": randn((B, 3, img, img), d, _F, g),
                "mask": noise.argsort(1).argsort(1) < int(0.75 * L), "patch_size": p}  # 75% masked per image

    return [BenchShape("ummae-p16", make, B * L * D * _es(dt) + imgs_b, B * L * D * _es(dt),
                       dict(batch=B, img=img, patch=p, L=L, mask_ratio=0.75))]


register(OpSpec(
    name="mixmim_loss", family="losses", kernels=("mixmim_loss", "mixmim_loss_backward"), grads=("pred",),
    dtypes=TOKEN_DTYPES, limit=_loss_limit,
    samples=lambda d, t: [
        dict(pred=randn((4, 4, 48), d, t, grad=True), imgs=_imgs(d), mask=_bits(4, d), patch_size=4),
        dict(pred=randn((4, 4, 48), d, t, grad=True), imgs=_imgs(d), mask=_bits((2, 4), d), patch_size=4,
             norm_pix=False, reduction="per_image"),
    ],
    edges=lambda d, t: [
        ("all-from-partner", dict(pred=randn((2, 1, 12), d, t, grad=True), imgs=_imgs(d, B=1, S=2),
                                  mask=torch.zeros(1, device=d), patch_size=2, reduction="none")),
    ],
    bad=lambda: _loss_bad(masked=False),
    bench=lambda B, tiny, dt: _loss_bench(B, tiny, dt, masked=False),
))

register(OpSpec(
    name="masked_recon_loss", family="losses", kernels=("masked_recon_loss", "masked_recon_loss_backward"),
    grads=("pred",), dtypes=TOKEN_DTYPES, limit=_loss_limit,
    samples=lambda d, t: [
        dict(pred=randn((2, 4, 48), d, t, grad=True), imgs=_imgs(d), mask=_bits((2, 4), d), patch_size=4),
        dict(pred=randn((2, 2, 48), d, t, grad=True), imgs=_imgs(d),
             mask=torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0]], device=d), patch_size=4, reduction="none"),
        dict(pred=randn((2, 4, 48), d, t, grad=True), imgs=_imgs(d), mask=_bits(4, d, 0.9), patch_size=4,
             norm_pix=False, reduction="per_image"),
    ],
    edges=lambda d, t: [
        ("all-masked", dict(pred=randn((2, 4, 48), d, t, grad=True), imgs=_imgs(d), mask=torch.ones(4, device=d),
                            patch_size=4)),
    ],
    bad=lambda: _loss_bad(masked=True),
    bench=lambda B, tiny, dt: _loss_bench(B, tiny, dt, masked=True),
))


def _some_bits(shape, device, images: int = 1) -> torch.Tensor:
    """Random bits with the first one of each of ``images`` images set (a mean over nothing is NaN)."""
    m = _bits(shape, device)
    m.view(images, -1)[:, 0] = True
    return m


def _simmim_bench(B, tiny, dt):
    img, p = (64, 4) if tiny else (192, 4)  # SimMIM: 192 px, Swin patch 4, 32 px mask patches (60%)
    hw = img // p
    n = B * 3 * img * img
    floor = n * _es(dt) + n * 4  # pred + float32 images

    def make(d, t, g):
        noise = torch.rand(B, (img // 32) ** 2, generator=g, device=d)
        m32 = (noise.argsort(1).argsort(1) < int(0.6 * noise.shape[1])).reshape(B, img // 32, img // 32)
        mask = m32.repeat_interleave(8, 1).repeat_interleave(8, 2)  # to the model's patch-4 grid
        return {"pred": randn((B, 3, img, img), d, t, g, grad=True), "imgs": randn((B, 3, img, img), d, _F, g),
                "mask": mask, "patch_size": p}

    return [BenchShape("simmim-192", make, floor, floor + n * _es(dt), dict(batch=B, img=img, patch=p, L=hw * hw))]


register(OpSpec(
    name="simmim_loss", family="losses", kernels=("simmim_loss", "simmim_loss_backward"), grads=("pred",),
    dtypes=TOKEN_DTYPES,
    samples=lambda d, t: [
        dict(pred=randn((2, 3, 8, 12), d, t, grad=True), imgs=torch.randn(2, 3, 8, 12, device=d),
             mask=_some_bits((2, 3), d), patch_size=4),
        dict(pred=randn((2, 2, 6, 6), d, t, grad=True), imgs=torch.randn(2, 2, 6, 6, device=d),
             mask=_some_bits((2, 2, 2), d, 2), patch_size=3, reduction="per_image"),
        dict(pred=randn((3, 1, 4, 4), d, t, grad=True), imgs=torch.randn(3, 1, 4, 4, device=d), mask=_bits((3, 4), d),
             patch_size=2, reduction="none"),
    ],
    edges=lambda d, t: [
        ("all-masked", dict(pred=randn((1, 3, 4, 4), d, t, grad=True), imgs=torch.randn(1, 3, 4, 4, device=d),
                            mask=torch.ones(2, 2, device=d), patch_size=2)),
        ("pixel-patches", dict(pred=randn((2, 3, 3, 5), d, t, grad=True), imgs=torch.randn(2, 3, 3, 5, device=d),
                               mask=_bits((2, 15), d, 0.9), patch_size=1, reduction="none")),
        ("noncontiguous", dict(pred=randn((2, 4, 4, 3), d, t).permute(0, 3, 1, 2).requires_grad_(),
                               imgs=torch.randn(2, 4, 4, 3, device=d).permute(0, 3, 1, 2),
                               mask=torch.tensor([1, 0, 1, 1], device=d), patch_size=2, reduction="per_image")),
    ],
    bad=lambda: [
        Bad("sm-shape", dict(pred=torch.randn(2, 3, 8, 8), imgs=torch.randn(2, 3, 8, 4), mask=torch.ones(4),
                             patch_size=4), ValueError, "imgs must have pred's shape (2, 3, 8, 8)"),
        Bad("sm-div", dict(pred=torch.randn(2, 3, 8, 6), imgs=torch.randn(2, 3, 8, 6), mask=torch.ones(4),
                           patch_size=4), ValueError, "must be divisible by patch_size = 4"),
        Bad("sm-mask", dict(pred=torch.randn(2, 3, 8, 8), imgs=torch.randn(2, 3, 8, 8), mask=torch.ones(3, 2),
                            patch_size=4), ValueError, "mask must have shape (2, 2)"),
        Bad("sm-rank", dict(pred=torch.randn(2, 64, 48), imgs=torch.randn(2, 3, 8, 8), mask=torch.ones(4),
                            patch_size=4), ValueError, "pred must have 4 dims"),
        Bad("sm-reduction", dict(pred=torch.randn(2, 3, 8, 8), imgs=torch.randn(2, 3, 8, 8), mask=torch.ones(4),
                                 patch_size=4, reduction="sum"), ValueError, "reduction must be one of"),
    ],
    bench=_simmim_bench,
))
