"""Every op family at the headline shapes (MixMIM-B / Swin-B / UM-MAE), every dtype, every backend.

The first correctness evidence ``scripts/gpu_check.sh`` collects on a GPU: the same layer
geometry as the benchmarks (batch reduced so the float64 reference stays cheap), forward and
every gradient against the float64 reference with flash-attn's 2x rule. Without a GPU (or with
``MIXKERNELS_HEADLINE_TINY=1``) the shapes shrink to a few windows so the Triton interpreter and
the compiled CPU kernels run the same checks (the gpu_check dry run, and CI);
``MIXKERNELS_HEADLINE_FULL=1`` keeps the GPU shapes on CPU.

Test ids are ``<op>-<shape>-<backend>-<dtype>``: the gpu_check summary reads them as its
family x backend x dtype matrix. A backend that cannot run here skips with the reason.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

import mixkernels as mk
from mixkernels import BackendUnavailable
from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x, tolerance

GPU = torch.cuda.is_available()
# MIXKERNELS_HEADLINE_FULL=1: the GPU shapes on CPU too (slow; to check the cases themselves).
FULL = (GPU and os.environ.get("MIXKERNELS_HEADLINE_TINY") != "1") or os.environ.get("MIXKERNELS_HEADLINE_FULL") == "1"
DEVICE = "cuda" if GPU else "cpu"
BACKENDS = ("triton", "cuda") if GPU else ("triton", "cpu")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
F64 = torch.float64

# Attention: (name, H=W, C, heads, window, shift, MixMIM group mask, batch); head_dim 32.
if FULL:
    ATTN = [("mixmim-s1", 56, 128, 4, 14, 0, True, 8), ("mixmim-s2", 28, 256, 8, 14, 0, True, 16),
            ("mixmim-s3", 14, 512, 16, 14, 0, True, 32), ("mixmim-s4", 7, 1024, 32, 7, 0, True, 64),
            ("swin-s1-shift", 56, 128, 4, 7, 3, False, 8)]
    B, HW, C, IMG, UNIT, DEC_C = 8, 56, 128, 224, 4, 512
else:
    ATTN = [("mixmim-tiny", 14, 64, 2, 7, 0, True, 1), ("swin-tiny-shift", 14, 64, 2, 7, 3, False, 1)]
    B, HW, C, IMG, UNIT, DEC_C = 2, 8, 16, 64, 2, 16


def _randn(shape, scale=1.0):
    return (torch.randn(shape, dtype=F64, device=DEVICE) * scale).requires_grad_()


def _mixmim_mask(H: int, W: int) -> torch.Tensor:
    """Half of a 7x7 grid (or of the H x W grid when it is smaller), upsampled to (H, W)."""
    g = 7 if H % 7 == 0 and W % 7 == 0 else 1
    n = (H // g) * (W // g) if g == 1 else 49
    m = torch.zeros(n, dtype=torch.int32, device=DEVICE)
    m[torch.randperm(n, device=DEVICE)[: n // 2]] = 1
    if g == 1:
        return m.reshape(H, W)
    return m.reshape(7, 7).repeat_interleave(H // 7, 0).repeat_interleave(W // 7, 1)


# ------------------------------------------------------------------------------ cases
# Each case: (op, shape, make) with make() -> (leaves {name: float64 leaf}, dtypes {name: "x" | "f32"},
# run(tensors, backend | None) -> output; backend None = the reference).
Case = Tuple[str, str, Callable[[], Tuple[Dict[str, torch.Tensor], Dict[str, str], Callable[..., torch.Tensor]]]]


def _attention(name, hw, c, nh, w, shift, group, batch):
    def make():
        leaves = {"qkv": _randn((batch, hw, hw, 3 * c)), "rpb": _randn(((2 * w - 1) ** 2, nh), 0.5)}
        g = _mixmim_mask(hw, hw) if group else None

        def run(t, backend):
            kw = dict(shift_size=shift, rel_pos_bias=t["rpb"], group=g)
            if backend is None:
                return ref.window_attention(t["qkv"], nh, w, **kw)
            return mk.window_attention(t["qkv"], nh, w, backend=backend, **kw)

        return leaves, {"qkv": "x", "rpb": "f32"}, run

    return ("window_attention", name, make)


def _token_cases() -> List[Case]:
    L = HW * HW
    w_small = 7 if HW % 7 == 0 else 4
    out: List[Case] = []

    def mix():
        mask = _mixmim_mask(HW, HW).reshape(-1).bool()
        return ({"x": _randn((B, L, C))}, {"x": "x"},
                lambda t, b: ref.mix_tokens(t["x"], mask) if b is None else mk.mix_tokens(t["x"], mask, backend=b))

    def unmix():
        mask = _mixmim_mask(7, 7).reshape(-1).bool()
        leaves = {"x": _randn((B, 49, DEC_C)), "tok": _randn((DEC_C,), 0.02), "pos": _randn((1, 49, DEC_C), 0.02)}

        def run(t, b):
            if b is None:
                return ref.unmix_tokens(t["x"], mask, t["tok"], t["pos"])
            return mk.unmix_tokens(t["x"], mask, t["tok"], t["pos"], backend=b)

        return leaves, {"x": "x", "tok": "x", "pos": "x"}, run

    def partition(w, s):
        def make():
            def run(t, b):
                if b is None:
                    return ref.window_partition(t["x"], w, s)
                return mk.window_partition(t["x"], w, s, backend=b)

            return {"x": _randn((B, HW, HW, C))}, {"x": "x"}, run

        return make

    def merge():
        w, s = w_small, w_small // 2
        n = (HW // w) ** 2

        def run(t, b):
            if b is None:
                return ref.window_merge(t["win"], w, HW, HW, s)
            return mk.window_merge(t["win"], w, HW, HW, s, backend=b)

        return {"win": _randn((B * n, w * w, C))}, {"win": "x"}, run

    def sample():
        hc = HW // (2 * UNIT)
        keep, sec = mk.uniform_masks(B, (hc, hc), device=DEVICE)

        def run(t, b):
            if b is None:
                return ref.uniform_sample(t["x"], keep, UNIT, mask_token=t["tok"], secondary=sec)
            return mk.uniform_sample(t["x"], keep, UNIT, mask_token=t["tok"], secondary=sec, backend=b)

        return {"x": _randn((B, HW, HW, C)), "tok": _randn((C,), 0.02)}, {"x": "x", "tok": "x"}, run

    def scatter():
        hc = HW // (2 * UNIT)
        keep, _ = mk.uniform_masks(B, (hc, hc), device=DEVICE)

        def run(t, b):
            if b is None:
                return ref.uniform_scatter(t["c"], keep, UNIT)
            return mk.uniform_scatter(t["c"], keep, UNIT, backend=b)

        return {"c": _randn((B, HW // 2, HW // 2, C))}, {"c": "x"}, run

    big = "s1" if FULL else "tiny"
    out += [("mix_tokens", f"mixmim-{big}", mix), ("unmix_tokens", "mixmim-dec", unmix),
            ("window_partition", f"mixmim-{big}-w14" if FULL else "tiny-w4", partition(14 if FULL else 4, 0)),
            ("window_partition", f"swin-{big}-w{w_small}-shift", partition(w_small, w_small // 2)),
            ("window_merge", f"swin-{big}-w{w_small}-shift", merge),
            ("uniform_sample", f"ummae-{big}", sample), ("uniform_scatter", f"ummae-{big}", scatter)]
    return out


def _loss_cases() -> List[Case]:
    def mixmim(compact_mask: bool):
        p = 32 if FULL else 16
        L = (IMG // p) ** 2

        def make():
            mask = _mixmim_mask(7, 7).reshape(-1)[:L] if L == 49 else (torch.rand(L, device=DEVICE) < 0.5)
            imgs = torch.randn(B, 3, IMG, IMG, dtype=F64, device=DEVICE)

            def run(t, b):
                if b is None:
                    return ref.mixmim_loss(t["pred"], t["imgs"], mask, p, reduction="none")
                return mk.mixmim_loss(t["pred"], t["imgs"], mask, p, reduction="none", backend=b)

            return {"pred": _randn((2 * B, L, p * p * 3)), "imgs": imgs}, {"pred": "x", "imgs": "f32"}, run

        return make

    def masked(compact: bool):
        p = 16
        L = (IMG // p) ** 2

        def make():
            noise = torch.rand(B, L, device=DEVICE)
            mask = noise.argsort(1).argsort(1) < int(0.75 * L)  # 75% masked per image (UM-MAE / MAE)
            Lp = int(mask[0].sum()) if compact else L
            imgs = torch.randn(B, 3, IMG, IMG, dtype=F64, device=DEVICE)

            def run(t, b):
                if b is None:
                    return ref.masked_recon_loss(t["pred"], t["imgs"], mask, p, reduction="none")
                return mk.masked_recon_loss(t["pred"], t["imgs"], mask, p, reduction="none", backend=b)

            return {"pred": _randn((B, Lp, p * p * 3)), "imgs": imgs}, {"pred": "x", "imgs": "f32"}, run

        return make

    return [("mixmim_loss", "mixmim-p32" if FULL else "tiny-p16", mixmim(False)),
            ("masked_recon_loss", "ummae-p16", masked(False)), ("masked_recon_loss", "ummae-p16-compact", masked(True))]


CASES: List[Case] = [_attention(*a) for a in ATTN] + _token_cases() + _loss_cases()
PARAMS = [pytest.param(case, backend, dt, id=f"{case[0]}-{case[1]}-{backend}-{dt}")
          for case in CASES for backend in BACKENDS for dt in DTYPES]


def _cast(leaves, kinds, dtype):
    out = {}
    for k, v in leaves.items():
        dt = dtype if kinds[k] == "x" else (F64 if dtype == F64 else torch.float32)
        out[k] = v.detach().to(dt).requires_grad_(k != "imgs")  # images are targets: no gradient
    return out


@pytest.mark.parametrize("case,backend,dt", PARAMS)
def test_headline(case, backend, dt):
    op, _, make = case
    dtype = DTYPES[dt]
    leaves, kinds, run = make()
    ins = _cast(leaves, kinds, dtype)
    try:
        out = run(ins, backend)
    except BackendUnavailable as e:
        pytest.skip(f"{backend} cannot run {op} here: {e}")
    if not op.endswith("_loss"):  # losses return float32 for every input dtype
        assert out.dtype == dtype, f"{op} returned {out.dtype} for {dtype} inputs"
    ins64, ins_s = _cast(leaves, kinds, F64), _cast(leaves, kinds, dtype)
    ref64, ref_s = run(ins64, None), run(ins_s, None)
    assert_close_2x(out, ref64, ref_s, atol=tolerance(dtype), name=f"{op} forward")
    wrt = [k for k, v in ins.items() if v.requires_grad]
    dout = torch.randn(out.shape, dtype=F64, device=DEVICE)
    grads = torch.autograd.grad(out, [ins[k] for k in wrt], dout.to(out.dtype))
    g64 = torch.autograd.grad(ref64, [ins64[k] for k in wrt], dout)
    gs = torch.autograd.grad(ref_s, [ins_s[k] for k in wrt], dout.to(ref_s.dtype))
    for k, a, b, c in zip(wrt, grads, g64, gs):
        assert a.dtype == ins[k].dtype, f"d{k} dtype {a.dtype}"
        # Bias gradients sum over every window of the batch: scale the slack with that count.
        atol = tolerance(dtype) * (8 if k == "rpb" else 1)
        assert_close_2x(a, b, c, atol=atol, name=f"{op} d{k}")
