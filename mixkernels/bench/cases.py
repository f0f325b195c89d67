"""Benchmark cases per suite: shapes (DESIGN.md section 7), inputs, reference, floor bytes.

GPU shapes are the real ones (B=128, 224 px); CPU shapes keep the spatial layout and shrink
the batch, and ``--quick`` shrinks further to a smoke run.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

import mixkernels as mk
from .. import reference as ref
from . import peers
from .harness import Case, Settings

__all__ = ["build_cases", "SUITES", "MIXMIM_B", "SWIN_B"]

SUITES = ("attention", "ops", "block", "model")

# (name, H=W, C, heads, window, shift); head_dim 32 everywhere.
MIXMIM_B = [("mixmim-s1", 56, 128, 4, 14, 0), ("mixmim-s2", 28, 256, 8, 14, 0),
            ("mixmim-s3", 14, 512, 16, 14, 0), ("mixmim-s4", 7, 1024, 32, 7, 0)]
SWIN_B = [("swin-s1", 56, 128, 4, 7, 0), ("swin-s1-shift", 56, 128, 4, 7, 3),
          ("swin-s2", 28, 256, 8, 7, 0), ("swin-s2-shift", 28, 256, 8, 7, 3),
          ("swin-s3", 14, 512, 16, 7, 0), ("swin-s3-shift", 14, 512, 16, 7, 3),
          ("swin-s4", 7, 1024, 32, 7, 0)]  # stage 4: the window covers the grid, no shift
TINY_ATTN = [("mixmim-tiny", 14, 64, 2, 7, 0), ("swin-tiny-shift", 14, 64, 2, 7, 3)]
CPU_ATTN = [MIXMIM_B[0], MIXMIM_B[3], SWIN_B[1], SWIN_B[5]]
# Most telling shapes first, so a run cut short by --time-budget still covers every stage kind.
GPU_ATTN = [MIXMIM_B[0], SWIN_B[1], MIXMIM_B[1], SWIN_B[3], MIXMIM_B[2], SWIN_B[5], MIXMIM_B[3], SWIN_B[6],
            SWIN_B[0], SWIN_B[2], SWIN_B[4]]


def _es(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def _mixmim_mask(H: int, W: int, device, gen, ratio: float = 0.5) -> torch.Tensor:
    """MixMIM's batch-shared mask: ``ratio`` of the 7x7 grid, upsampled to ``(H, W)`` (int32)."""
    n = 49
    perm = torch.randperm(n, generator=gen, device=device)
    m = torch.zeros(n, dtype=torch.int32, device=device)
    m[perm[: int(ratio * n)]] = 1
    m = m.reshape(7, 7)
    return m.repeat_interleave(H // 7, 0).repeat_interleave(W // 7, 1)


def _randn(shape, device, dtype, gen, scale=1.0, grad=False):
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=gen) * scale
    return t.to(dtype).requires_grad_(grad)


def _modes():
    return ("fwd", "fwd+bwd")


# ------------------------------------------------------------------------------ attention
def attention_cases(settings: Settings, dtypes, batch: int) -> List[Case]:
    dev = settings.device
    shapes = GPU_ATTN if dev.type == "cuda" else (TINY_ATTN if settings.quick else CPU_ATTN)
    if settings.quick and dev.type == "cuda":
        shapes = [MIXMIM_B[0], SWIN_B[1]]
    cases = []
    for name, HW, C, nh, w, shift in shapes:
        for dt in dtypes:
            for mode in _modes():
                cases.append(_attention_case(name, batch, HW, C, nh, w, shift, dt, mode, settings))
    return cases


def _attention_case(name, B, HW, C, nh, w, shift, dt, mode, settings) -> Case:
    mixmim = name.startswith("mixmim")

    def make(device, dtype, gen) -> Dict[str, Any]:
        return {
            "qkv": _randn((B, HW, HW, 3 * C), device, dtype, gen, grad=True),
            "rpb": _randn(((2 * w - 1) ** 2, nh), device, torch.float32, gen, scale=0.5, grad=True),
            "group": _mixmim_mask(HW, HW, device, gen) if mixmim else None,
            "nh": nh, "window": (w, w), "shift": (shift, shift),
        }

    def reference(i):
        return ref.window_attention(i["qkv"], i["nh"], i["window"], shift_size=i["shift"],
                                    rel_pos_bias=i["rpb"], group=i["group"])

    def op(i, backend):
        return mk.window_attention(i["qkv"], i["nh"], i["window"], shift_size=i["shift"],
                                   rel_pos_bias=i["rpb"], group=i["group"], backend=backend)

    io = B * HW * HW * C * _es(dt)  # one of q, k, v, o
    N = w * w
    provs = peers.mixkernels_providers(op, settings.device) + [
        peers.eager_provider(reference), peers.compiled_provider(reference, settings),
        peers.sdpa_provider(settings.device), peers.flex_provider(settings.device, settings),
        peers.xformers_provider(), peers.natten_provider(), peers.flash_attn_provider(),
    ]
    return Case("attention", name, dt, mode, make, reference, provs, grad=("qkv", "rpb"),
                bytes_fwd=4 * io, bytes_bwd=4 * io,
                flops_fwd=4.0 * B * HW * HW * N * C, flops_bwd=10.0 * B * HW * HW * N * C,
                params=dict(batch=B, H=HW, W=HW, C=C, heads=nh, window=w, shift=shift, group=mixmim))


# ------------------------------------------------------------------------------ token ops + losses
def _op_case(settings, op_name, shape_name, dt, mode, make, reference, op, grad, bytes_fwd, bytes_bwd, params):
    provs = peers.mixkernels_providers(op, settings.device) + [
        peers.eager_provider(reference), peers.compiled_provider(reference, settings)]
    return Case("ops", f"{op_name}:{shape_name}", dt, mode, make, reference, provs, grad=grad,
                bytes_fwd=bytes_fwd, bytes_bwd=bytes_bwd, params=dict(params, op=op_name))


def ops_cases(settings: Settings, dtypes, batch: int) -> List[Case]:
    B = batch
    tiny = settings.quick and settings.device.type == "cpu"
    HW, C = (28, 64) if tiny else (56, 128)  # MixMIM-B / Swin-B stage 1 token grid
    L = HW * HW
    img = 64 if tiny else 224
    cases: List[Case] = []
    for dt in dtypes:
        es = _es(dt)
        for mode in _modes():
            def add(*a, **k):
                cases.append(_op_case(settings, *a, dt=dt, mode=mode, **k))

            # mix_tokens at the encoder input: (B, L, C), batch-shared MixMIM mask
            add("mix_tokens", "mixmim-s1",
                make=lambda d, t, g: {"x": _randn((B, L, C), d, t, g, grad=True),
                                      "mask": _mixmim_mask(HW, HW, d, g).reshape(-1).bool()},
                reference=lambda i: ref.mix_tokens(i["x"], i["mask"]),
                op=lambda i, b: mk.mix_tokens(i["x"], i["mask"], backend=b), grad=("x",),
                bytes_fwd=2 * B * L * C * es, bytes_bwd=2 * B * L * C * es, params=dict(batch=B, L=L, C=C))
            # unmix_tokens at the decoder input: 7x7 tokens, decoder dim 512
            Ld, Cd = 49, (64 if tiny else 512)
            add("unmix_tokens", "mixmim-dec",
                make=lambda d, t, g: {"x": _randn((B, Ld, Cd), d, t, g, grad=True),
                                      "mask": _mixmim_mask(7, 7, d, g).reshape(-1).bool(),
                                      "tok": _randn((Cd,), d, t, g, 0.02, grad=True),
                                      "pos": _randn((1, Ld, Cd), d, t, g, 0.02, grad=True)},
                reference=lambda i: ref.unmix_tokens(i["x"], i["mask"], i["tok"], i["pos"]),
                op=lambda i, b: mk.unmix_tokens(i["x"], i["mask"], i["tok"], i["pos"], backend=b), grad=("x", "tok", "pos"),
                bytes_fwd=3 * B * Ld * Cd * es, bytes_bwd=3 * B * Ld * Cd * es, params=dict(batch=B, L=Ld, C=Cd))
            n = B * L * C * es
            for nm, w, s in (("mixmim-s1-w14", 14, 0), ("swin-s1-w7-shift", 7, 3)):
                add("window_partition", nm,
                    make=lambda d, t, g: {"x": _randn((B, HW, HW, C), d, t, g, grad=True)},
                    reference=lambda i, w=w, s=s: ref.window_partition(i["x"], w, s),
                    op=lambda i, b, w=w, s=s: mk.window_partition(i["x"], w, s, backend=b), grad=("x",),
                    bytes_fwd=2 * n, bytes_bwd=2 * n, params=dict(batch=B, H=HW, W=HW, C=C, window=w, shift=s))
            nW = (HW // 7) ** 2
            add("window_merge", "swin-s1-w7-shift",
                make=lambda d, t, g: {"win": _randn((B * nW, 49, C), d, t, g, grad=True)},
                reference=lambda i: ref.window_merge(i["win"], 7, HW, HW, 3),
                op=lambda i, b: mk.window_merge(i["win"], 7, HW, HW, 3, backend=b), grad=("win",),
                bytes_fwd=2 * n, bytes_bwd=2 * n, params=dict(batch=B, H=HW, W=HW, C=C, window=7, shift=3))
            # UM-MAE uniform sampling: 16 px units = 4 tokens at patch 4; 25% secondary masking
            u = 2 if tiny else 4
            hc = HW // (2 * u)
            cn = n // 4  # compact image bytes

            def make_keep(d, g):
                keep, sec = mk.uniform_masks(B, (hc, hc), generator=g, device=d)
                return keep, sec

            def make_sample(d, t, g):
                keep, sec = make_keep(d, g)
                return {"x": _randn((B, HW, HW, C), d, t, g, grad=True), "keep": keep, "sec": sec,
                        "tok": _randn((C,), d, t, g, 0.02, grad=True)}

            add("uniform_sample", "ummae-s1",
                make=make_sample,
                reference=lambda i: ref.uniform_sample(i["x"], i["keep"], u, mask_token=i["tok"], secondary=i["sec"]),
                op=lambda i, b: mk.uniform_sample(i["x"], i["keep"], u, mask_token=i["tok"], secondary=i["sec"], backend=b),
                grad=("x", "tok"), bytes_fwd=2 * cn, bytes_bwd=cn + n, params=dict(batch=B, H=HW, W=HW, C=C, unit=u))

            def make_scatter(d, t, g):
                keep, _ = make_keep(d, g)
                return {"c": _randn((B, HW // 2, HW // 2, C), d, t, g, grad=True), "keep": keep}

            add("uniform_scatter", "ummae-s1",
                make=make_scatter,
                reference=lambda i: ref.uniform_scatter(i["c"], i["keep"], u),
                op=lambda i, b: mk.uniform_scatter(i["c"], i["keep"], u, backend=b), grad=("c",),
                bytes_fwd=cn + n, bytes_bwd=2 * cn, params=dict(batch=B, H=HW, W=HW, C=C, unit=u))
            # losses: pred in the compute dtype, images float32 (as under autocast)
            p32, Lp = 32, (img // 32) ** 2
            D = p32 * p32 * 3
            imgs_b = B * 3 * img * img * 4
            add("mixmim_loss", "mixmim-p32",
                make=lambda d, t, g: {"pred": _randn((2 * B, Lp, D), d, t, g, grad=True),
                                      "imgs": _randn((B, 3, img, img), d, torch.float32, g),
                                      "mask": _mixmim_mask(7, 7, d, g).reshape(-1)[:Lp] if Lp == 49 else
                                      (torch.rand(Lp, generator=g, device=d) < 0.5)},
                reference=lambda i: ref.mixmim_loss(i["pred"], i["imgs"], i["mask"], p32),
                op=lambda i, b: mk.mixmim_loss(i["pred"], i["imgs"], i["mask"], p32, backend=b), grad=("pred",),
                bytes_fwd=2 * B * Lp * D * es + imgs_b, bytes_bwd=2 * B * Lp * D * es,
                params=dict(batch=B, img=img, patch=p32, L=Lp))
            p16, L16 = 16, (img // 16) ** 2
            D16 = p16 * p16 * 3

            def make_masked(d, t, g):
                noise = torch.rand(B, L16, generator=g, device=d)
                mask = noise.argsort(1).argsort(1) < int(0.75 * L16)  # 75% masked per image
                return {"pred": _randn((B, L16, D16), d, t, g, grad=True),
                        "imgs": _randn((B, 3, img, img), d, torch.float32, g), "mask": mask}

            add("masked_recon_loss", "ummae-p16",
                make=make_masked,
                reference=lambda i: ref.masked_recon_loss(i["pred"], i["imgs"], i["mask"], p16),
                op=lambda i, b: mk.masked_recon_loss(i["pred"], i["imgs"], i["mask"], p16, backend=b), grad=("pred",),
                bytes_fwd=B * L16 * D16 * es + imgs_b, bytes_bwd=B * L16 * D16 * es,
                params=dict(batch=B, img=img, patch=p16, L=L16, mask_ratio=0.75))
    return cases


def build_cases(suites, settings: Settings, dtypes) -> List[Case]:
    gpu = settings.device.type == "cuda"
    batch = 128 if gpu else (2 if settings.quick else 4)
    out: List[Case] = []
    for s in suites:
        if s == "attention":
            out += attention_cases(settings, dtypes, batch)
        elif s == "ops":
            out += ops_cases(settings, dtypes, batch)
        elif s == "block":
            out += block_cases(settings, dtypes, batch)
        elif s == "model":
            out += model_cases(settings, dtypes, batch)
        else:
            raise ValueError(f"unknown suite {s!r} (choose from {SUITES})")
    return out


# ------------------------------------------------------------------------------ Swin block
def _autocast(device: torch.device, dtype: torch.dtype):
    import contextlib

    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _module_runner(module: torch.nn.Module, device, dtype, note: str = ""):
    from .harness import Runner

    def fn(i):
        with _autocast(device, dtype):
            return module(i["x"])

    return Runner(fn, params=[p for p in module.parameters() if p.requires_grad], note=note)


def _mk_block(timm_block: torch.nn.Module, spec: Dict[str, Any]) -> torch.nn.Module:
    from .harness import Skip

    try:
        import mixkernels.nn as mknn
    except Exception as e:
        raise Skip(f"mixkernels.nn failed to import ({type(e).__name__}: {e})")
    cls = getattr(mknn, "SwinBlock", None)
    if cls is None:
        raise Skip("mixkernels.nn.SwinBlock not available yet")
    blk = cls(**spec).to(next(timm_block.parameters()).device)
    blk.load_state_dict(timm_block.state_dict())  # same names as timm (DESIGN.md section 3)
    return blk


def block_cases(settings: Settings, dtypes, batch: int) -> List[Case]:
    """One Swin block forward(+backward), timm eager / compiled vs mixkernels.nn.SwinBlock;
    bf16 runs under autocast with float32 parameters, as in training."""
    from .harness import Provider, Skip

    dev = settings.device
    shapes = SWIN_B if dev.type == "cuda" else (TINY_ATTN[1:] if settings.quick else [SWIN_B[1], SWIN_B[5]])
    if settings.quick and dev.type == "cuda":
        shapes = [SWIN_B[1]]
    cases = []
    for name, HW, C, nh, w, shift in shapes:
        spec = dict(dim=C, input_resolution=(HW, HW), num_heads=nh, window_size=w, shift_size=shift)
        for dt in dtypes:
            for mode in _modes():
                def make(d, t, g, spec=spec, HW=HW, C=C):
                    try:
                        peers.import_timm()
                        from timm.models.swin_transformer import SwinTransformerBlock
                    except Exception as e:
                        raise Skip(f"timm not importable ({type(e).__name__}: {e})")
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=d)))
                    blk = SwinTransformerBlock(**spec).to(d)
                    return {"x": _randn((batch, HW, HW, C), d, torch.float32, g, grad=True), "block": blk}

                def reference(i):
                    return i["block"](i["x"])

                provs = [
                    Provider("mixkernels", "mixkernels",
                             lambda case, i, spec=spec: _module_runner(_mk_block(i["block"], spec), dev, case.dtype)),
                    Provider("timm-eager", "peer", lambda case, i: _module_runner(i["block"], dev, case.dtype)),
                    Provider("timm-compiled", "peer", lambda case, i: _compiled_module(i["block"], dev, case.dtype, settings)),
                ]
                cases.append(Case("block", name, dt, mode, make, reference, provs, grad=("x",),
                                  params=dict(batch=batch, H=HW, W=HW, C=C, heads=nh, window=w, shift=shift)))
    return cases


def _compiled_module(module, device, dtype, settings):
    from .harness import Skip

    if settings.skip_compile:
        raise Skip(settings.compile_reason or "torch.compile peers disabled")
    r = _module_runner(module, device, dtype)
    r.fn = peers.compile_fn(r.fn)
    return r


# ------------------------------------------------------------------------------ MixMIM-B training step
_STEP_SEED = 1234


def _loss_of(out) -> torch.Tensor:
    if isinstance(out, dict):
        out = out["loss"]
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


def model_cases(settings: Settings, dtypes, batch: int) -> List[Case]:
    """One MixMIM-B training step (fwd + bwd + AdamW; bf16 autocast on GPU): fused model vs its
    ``reference=True`` twin (official-style eager) and that twin under torch.compile."""
    from .harness import Provider, Runner, Skip

    dev = settings.device
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32

    def make(d, t, g):
        if settings.quick and d.type == "cpu":
            raise Skip("skipped in --quick on CPU (a MixMIM-B step takes seconds here)")
        try:
            import mixkernels.models as models
        except Exception as e:
            raise Skip(f"mixkernels.models failed to import ({type(e).__name__}: {e})")
        ctor = getattr(models, "mixmim_base", None)
        if ctor is None:
            raise Skip("mixkernels.models.mixmim_base not available yet")
        torch.manual_seed(_STEP_SEED)
        state = ctor(reference=True).state_dict()
        return {"imgs": _randn((batch, 3, 224, 224), d, torch.float32, g), "ctor": ctor, "state": state}

    def reference(i):  # float64 loss of the reference twin with the same weights and masks
        m = i["ctor"](reference=True)
        m.load_state_dict(i["state"])
        m = m.to(device=dev, dtype=torch.float64).train()
        torch.manual_seed(_STEP_SEED)
        with torch.no_grad():
            return _loss_of(m(i["imgs"].double())).detach()

    def provider(name, kind, reference_twin, compiled):
        def build(case, i):
            if compiled and settings.skip_compile:
                raise Skip(settings.compile_reason or "torch.compile peers disabled")
            m = i["ctor"](reference=reference_twin)
            m.load_state_dict(i["state"])
            m = m.to(dev).train()
            run = peers.compile_fn(m) if compiled else m
            opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

            def step(inp):
                torch.manual_seed(_STEP_SEED)  # the same masks for every provider
                with _autocast(dev, case.dtype):
                    loss = _loss_of(run(inp["imgs"]))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach()

            return Runner(step, note="fwd+bwd+AdamW")

        return Provider(name, kind, build)

    provs = [provider("mixkernels", "mixkernels", False, False), provider("eager", "peer", True, False),
             provider("compiled", "peer", True, True)]
    return [Case("model", "mixmim-b", dt, "step", make, reference, provs,
                 params=dict(batch=batch, img=224, model="MixMIM-B"), unit="img/s")]
