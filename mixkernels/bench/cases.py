"""Benchmark cases per suite: shapes (docs/DESIGN.md section 7), inputs, reference, floor bytes.

GPU shapes are the real ones (B=128, 224 px); CPU shapes keep the spatial layout and shrink
the batch, and ``--quick`` shrinks further to a smoke run.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch

import mixkernels as mk
from .. import reference as ref
from ..ops.registry import OPERATORS_REGISTRY, mixmim_mask
from ..ops.registry import randn as _randn
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
# SwinV2-B (swinv2_base_window8_256 / _window16_256): 64x64 tokens at stage 1, head_dim 32.
SWINV2_B = [("swinv2-w8-s1-shift", 64, 128, 4, 8, 4), ("swinv2-w8-s3", 16, 512, 16, 8, 0),
            ("swinv2-w16-s1-shift", 64, 128, 4, 16, 8), ("swinv2-w16-s3-shift", 16, 512, 16, 16, 0)]
TINY_ATTN = [("mixmim-tiny", 14, 64, 2, 7, 0), ("swin-tiny-shift", 14, 64, 2, 7, 3)]
TINY_V2 = [("swinv2-tiny-shift", 16, 64, 2, 8, 4)]
CPU_ATTN = [MIXMIM_B[0], MIXMIM_B[3], SWIN_B[1], SWIN_B[5]]
# Most telling shapes first, so a run cut short by --time-budget still covers every stage kind.
GPU_ATTN = [MIXMIM_B[0], SWIN_B[1], MIXMIM_B[1], SWIN_B[3], MIXMIM_B[2], SWIN_B[5], MIXMIM_B[3], SWIN_B[6],
            SWIN_B[0], SWIN_B[2], SWIN_B[4]]


def _es(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


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
            "group": mixmim_mask(HW, HW, device, gen) if mixmim else None,
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
def ops_cases(settings: Settings, dtypes, batch: int) -> List[Case]:
    """Every registered op with benchmark shapes (``bench`` in mixkernels/ops/registry.py): our
    backends vs the eager reference and its torch.compile. Inputs are the op's arguments by name."""
    tiny = settings.quick and settings.device.type == "cpu"
    cases: List[Case] = []
    for dt in dtypes:
        for mode in _modes():
            for spec in OPERATORS_REGISTRY.values():
                for shape in (spec.bench(batch, tiny, dt) if spec.bench is not None else ()):
                    cases.append(_op_case(settings, spec, shape, dt, mode))
    return cases


def _op_case(settings: Settings, spec, shape, dt, mode) -> Case:
    def reference(i, _ref=spec.reference):
        return _ref(**i)

    def op(i, backend, _fn=spec.fn):
        return _fn(**i, backend=backend)

    provs = peers.mixkernels_providers(op, settings.device) + [
        peers.eager_provider(reference), peers.compiled_provider(reference, settings)]
    return Case("ops", f"{spec.name}:{shape.name}", dt, mode, shape.make, reference, provs, grad=spec.grads,
                bytes_fwd=shape.bytes_fwd, bytes_bwd=shape.bytes_bwd, params=dict(shape.params, op=spec.name))


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
            out += block_cases(settings, dtypes, batch, v2=True)
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


def _mk_block(timm_block: torch.nn.Module, spec: Dict[str, Any], cls_name: str = "SwinBlock") -> torch.nn.Module:
    from .harness import Skip

    try:
        import mixkernels.nn as mknn
    except Exception as e:
        raise Skip(f"mixkernels.nn failed to import ({type(e).__name__}: {e})")
    cls = getattr(mknn, cls_name, None)
    if cls is None:
        raise Skip(f"mixkernels.nn.{cls_name} not available yet")
    blk = cls(**spec).to(next(timm_block.parameters()).device)
    blk.load_state_dict(timm_block.state_dict())  # same names as timm (docs/DESIGN.md section 3)
    return blk


def block_cases(settings: Settings, dtypes, batch: int, v2: bool = False) -> List[Case]:
    """One Swin block forward(+backward), timm eager / compiled vs mixkernels.nn.SwinBlock (``v2``:
    timm's SwinTransformerV2Block vs mixkernels.nn.SwinV2Block, cosine attention and the CPB MLP);
    bf16 runs under autocast with float32 parameters, as in training."""
    from .harness import Provider, Skip

    dev = settings.device
    full, tiny = (SWINV2_B, TINY_V2) if v2 else (SWIN_B, TINY_ATTN[1:])
    shapes = full if dev.type == "cuda" else (tiny if settings.quick else ([full[0]] if v2 else [SWIN_B[1], SWIN_B[5]]))
    if settings.quick and dev.type == "cuda":
        shapes = full[:1] if v2 else [SWIN_B[1]]
    timm_cls, ours = ("SwinTransformerV2Block", "SwinV2Block") if v2 else ("SwinTransformerBlock", "SwinBlock")
    cases = []
    for name, HW, C, nh, w, shift in shapes:
        spec = dict(dim=C, input_resolution=(HW, HW), num_heads=nh, window_size=w, shift_size=shift)
        for dt in dtypes:
            for mode in _modes():
                def make(d, t, g, spec=spec, HW=HW, C=C):
                    try:
                        peers.import_timm()
                        from timm.models import swin_transformer, swin_transformer_v2
                    except Exception as e:
                        raise Skip(f"timm not importable ({type(e).__name__}: {e})")
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=d)))
                    blk = getattr(swin_transformer_v2 if v2 else swin_transformer, timm_cls)(**spec).to(d)
                    return {"x": _randn((batch, HW, HW, C), d, torch.float32, g, grad=True), "block": blk}

                def reference(i):
                    return i["block"](i["x"])

                provs = [
                    Provider("mixkernels", "mixkernels",
                             lambda case, i, spec=spec: _module_runner(_mk_block(i["block"], spec, ours), dev, case.dtype)),
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
