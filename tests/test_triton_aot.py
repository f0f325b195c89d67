"""Ahead-of-time compile check of every Triton kernel for sm_80 and sm_90 (no GPU needed).

The other Triton tests run under the interpreter, which checks none of the real compiler's
rules (tl.dot shapes/dtypes, layouts, constexpr typing, shared memory). Here a subprocess
WITHOUT ``TRITON_INTERPRET`` (conftest sets it to 1 in this process when there is no GPU;
kernels are specialized for the interpreter at definition time) calls every launcher in
``mixkernels/triton/*.py`` on CPU tensors at REAL geometry (batch 128, 56x56 / 7x7 token grids:
Triton folds an int argument equal to 1 into a constant and specializes on divisibility by 16, so
a toy shape compiles different code; ``torch.empty`` costs nothing here). The machinery lives in
``mixkernels/bench/aot.py`` (shared with the static report, ``python -m mixkernels.bench --static``):
launches are captured instead of run (launchers take their CUDA branches), each distinct
specialization is derived with Triton's own binder and compiled with ``triton.compile`` for
``sm_80``/``sm_90`` and the launcher's num_warps/num_stages.

Checks: every compile succeeds, every ``*_kernel`` in the package compiles on both archs, shared
memory fits the arch (sm_80: 163 KB, sm_90: 227 KB per block), and ptxas's ``-v`` report of each
sm_90 attention kernel was read (registers and spills are printed, not asserted here: the spill
gate is ``python -m mixkernels.bench --static --check``). ``python tests/test_triton_aot.py``
prints the tables.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARCHS = (80, 90)
# MIXKERNELS_AOT_FULL=1: the whole configuration grid (~500 specializations, ~700 compiles; tens
# of minutes on 2 cores). Default: every kernel, every dtype family and the main configs.
_FULL = os.environ.get("MIXKERNELS_AOT_FULL") == "1"
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (A100, H100)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- pytest side


def _run_worker(tmp_dir):
    sys.path.insert(0, _ROOT)
    from mixkernels.bench.aot import clean_env

    report = os.path.join(tmp_dir, "report.json")
    # A fresh cache: every specialization really compiles (ptxas runs) on every test run.
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--report", report,
                        "--cache", os.path.join(tmp_dir, "aot_cache")], env=clean_env(),
                       capture_output=True, text=True, timeout=1800)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-8000:]
    with open(report) as f:
        return json.load(f)


def test_every_triton_kernel_compiles_for_sm80_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    rep = _run_worker(str(tmp_path))
    errors = [f"{e['kernel']} sm_{e['cc']} {e['spec']}:\n{e['error']}" for e in rep["results"] if e["error"]]
    assert not errors, "\n\n".join(errors[:5]) + f"\n({len(errors)} failed compiles)"
    for cc in ARCHS:
        done = {e["kernel"] for e in rep["results"] if e["cc"] == cc}
        missing = sorted(set(rep["kernels"]) - done)
        assert not missing, f"sm_{cc}: kernels never compiled: {missing}"
    big = [e for e in rep["results"] if e["shared"] > SMEM_LIMIT[e["cc"]]]
    assert not big, "shared memory over the per-block limit: " + "; ".join(
        f"{e['kernel']} sm_{e['cc']} {e['shared']} B {e['spec']}" for e in big)
    attn = [e for e in rep["results"] if e["module"].startswith("window_attention") and e["cc"] == 90]
    assert attn, "no sm_90 attention compile"
    unread = [e for e in attn if e["ptxas"]["regs"] <= 0]
    assert not unread, f"ptxas -v log not read for {unread[0]['kernel']} {unread[0]['spec']}"
    # Real geometry: the MixMIM-B stage-4 launch (B*nW = 128) must not be folded to a constant.
    assert rep["real_geometry"], "no capture at batch 128"


# ----------------------------------------------------------------------------- worker side


def _launch_everything():
    """Call every launcher at the configurations a GPU run would use (captured, not launched)."""
    import torch

    from mixkernels.triton import losses, mixing, uniform, windows
    from mixkernels.triton import window_attention as wa

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32

    # -- window attention: MixMIM-B / Swin-B geometry (head_dim 32, windows 7 and 14), other d.
    # Real geometry, batch 128 (nothing is allocated for real: torch.empty on CPU maps no pages).
    def attn(dtype, win, d, nh=None, hw=None, shift=False, rpb=True, bias=False, group=False, coords=False,
             bwd=True, modes=((True, False, False),), cosine=False):
        B = 128
        hw = hw or 56 // win  # stage 1: 56x56 tokens
        nh = nh or max(2, 128 // d)  # C = 128 as MixMIM-B / Swin-B stage 1 (2 heads at d 128: NH > 1)
        H = W = win * hw
        C = nh * d
        qkv = torch.empty(B, H, W, 3 * C, dtype=dtype)
        N = win * win
        r = 64 if coords else win  # UM-MAE: true coordinates of the 64x64 grid
        t_rpb = torch.empty((2 * r - 1) ** 2, nh) if rpb else None
        t_bias = torch.empty(nh, N, N) if bias else None
        t_grp = torch.empty(1, H, W, dtype=torch.int32) if group else None
        t_crd = torch.empty(B, H, W, 2, dtype=torch.int32) if coords else None
        sh = win // 2 if shift else 0
        if cosine:  # SwinV2: (nH,) fp32 logit scale in place of the softmax scale; its gradient too
            args = (nh, win, win, sh, sh, t_rpb, t_bias, t_grp, t_crd, r, r, torch.empty(nh))
            out, lse = wa.window_attention_cosine(qkv, *args)
            for need_drpb, need_dbias, det in modes if bwd else ():
                wa.window_attention_cosine_backward(torch.empty_like(out), qkv, out, lse, *args,
                                                    need_drpb and rpb, need_dbias and bias, True, det)
            return
        args = (nh, win, win, sh, sh, t_rpb, t_bias, t_grp, t_crd, r, r, d ** -0.5)
        out, lse = wa.window_attention(qkv, *args)
        if bwd:
            for need_drpb, need_dbias, det in modes:
                wa.window_attention_backward(torch.empty_like(out), qkv, out, lse, *args,
                                             need_drpb and rpb, need_dbias and bias, det)

    every_mode = tuple((a, b, c) for a in (True, False) for b in (True, False) for c in (True, False))
    if _FULL:
        for dtype in (f16, bf16, f32):
            # MixMIM-B: group mask, rpb, no shift; stage 4 (7x7, 32 heads), stages 1-3 (14x14).
            attn(dtype, 7, 32, nh=32, hw=1, group=True, modes=every_mode)
            attn(dtype, 14, 32, nh=4, group=True, modes=every_mode)
            # Swin-B shifted windows; attn_bias (SwinV2-style CPB); UM-MAE coords + shift + group.
            attn(dtype, 7, 32, shift=True, modes=((True, False, False), (True, False, True)))
            attn(dtype, 14, 32, rpb=False, bias=True, modes=((False, True, False), (False, True, True)))
            attn(dtype, 7, 32, shift=True, coords=True, group=True, modes=every_mode)
            # Other head dims: everything on (the heaviest specialization) and everything off.
            for d in (16, 64, 128):
                for win in (7, 14):
                    attn(dtype, win, d, shift=True, bias=True, group=True, modes=((True, True, False),))
                    attn(dtype, win, d, rpb=False, modes=((False, False, True),))
    else:
        # One core compiles a window-7 specialization in 2-10 s, a window-14 one in 10-40 s
        # (fp16/bf16) or 1-5 min (fp32: FMA dot): window 14 at the MixMIM config only, the
        # flag/mode/head-dim variety at window 7.
        for dtype in (f16, bf16, f32):
            attn(dtype, 7, 32, nh=32, hw=1, group=True, modes=((True, False, False), (True, False, True)))
        attn(f16, 14, 32, nh=4, group=True, modes=((True, False, False),))
        attn(f16, 7, 32, shift=True, bias=True, modes=((True, True, False), (True, True, True), (False, False, False)))
        attn(bf16, 7, 32, shift=True, coords=True, group=True, modes=((True, False, False), (True, False, True)))
        for d in (16, 64, 128):
            attn(f16, 7, d, shift=True, bias=True, group=True, modes=((True, True, False),))
    # SwinV2 cosine mode: window 8 (single tile; SwinV2-T stage 1, 256 px), fast and deterministic
    # gradients; window 16 (multi-tile forward, two-phase backward) in the full grid and fp32.
    attn(bf16, 8, 32, nh=3, hw=8, shift=True, cosine=True, modes=((True, False, False), (True, False, True)))
    attn(f16, 8, 32, nh=3, hw=8, bias=True, group=True, cosine=True, modes=((True, True, False),))
    for dtype in (f16, bf16, f32) if _FULL else (bf16,):
        attn(dtype, 16, 32, nh=4, hw=4, shift=True, cosine=True,
             modes=((True, False, False), (True, False, True)) if _FULL else ((True, False, False),))

    full = _FULL
    E = torch.empty  # values never matter: nothing runs
    # -- token ops at MixMIM-B / Swin-B stage 1 (B 128, 56x56): C in {128, 512, 7} (7: masked
    # columns, no 16-divisibility), windows 7 / 14, UM-MAE units of 4 tokens.
    for dtype in (f16, bf16, f32):
        for C in ((128, 512, 7) if dtype == f16 or full else (128,)):
            B, H, W = 128, 56, 56
            L = H * W
            x = E(B, L, C, dtype=dtype)
            for G in ((1, B) if full or C == 128 else (1,)):
                m = E(G, L, dtype=torch.uint8)
                mixing.mix_tokens(x, m)
                mixing.mix_tokens_backward(x, m)
                mixing.unmix_tokens(x, m, E(C, dtype=dtype), E(L, C, dtype=dtype) if G == 1 else None)
                g2 = E(2 * B, L, C, dtype=dtype)
                for nt, npos in (((True, True), (False, False), (True, False)) if full else ((True, True),)):
                    mixing.unmix_tokens_backward(g2, m, nt, npos)
            xi = x.reshape(B, H, W, C)
            for win, s in (((14, 0), (7, 3)) if full else ((7, 3),)):
                wins = windows.window_partition(xi, win, win, s, s)
                windows.window_merge(wins, H, W, win, win, s, s)
            for u in ((1, 4) if full else (4,)):
                keep = E(B, H // (2 * u), W // (2 * u), dtype=torch.uint8)
                sec = E(keep.shape, dtype=torch.uint8)
                cmp_ = uniform.uniform_sample(xi, keep, u, E(C, dtype=dtype), sec)
                uniform.uniform_sample(xi, keep, u, None, None)
                uniform.uniform_sample_backward(cmp_, keep, u, sec, True)
                if full:
                    uniform.uniform_sample_backward(cmp_, keep, u, sec, False)
                uniform.uniform_scatter(cmp_, keep, u)
    # -- unmix backward at the MixMIM-B decoder (L 49, C 512) and on a short sequence (batch chunks:
    # dpos from the partials), in one launch (stream tickets) and as the two a CUDA graph capture takes
    tickets = mixing.stream_tickets
    for no_tickets in (False, True):
        if no_tickets:
            mixing.stream_tickets = lambda like, n: None
        for L, C in ((49, 512), (4, 128)):
            mixing.unmix_tokens_backward(E(256, L, C, dtype=bf16), E(1, L, dtype=torch.uint8), True, True)
    mixing.stream_tickets = tickets

    # -- losses at 224 px, batch 128: patch 4 (MixMIM/UM-MAE tokens), 16 (MAE), 32 (MixMIM targets)
    for pdt, idt in ((f16, f32), (bf16, bf16), (f32, f32)):
        for p in ((4, 16, 32) if pdt == f16 or full else (16,)):
            B, H = 128, 224
            L = (H // p) ** 2
            D = p * p * 3
            imgs = E(B, 3, H, H, dtype=idt)
            for norm in ((True, False) if full or p == 16 else (True,)):
                for G in ((1, B) if full else (B,)):
                    m = E(G, L, dtype=torch.uint8)
                    pred = E(2 * B, L, D, dtype=pdt)
                    lo = losses.mixmim_loss(pred, imgs, m, p, norm, 1e-6)
                    losses.mixmim_loss_backward(torch.empty_like(lo), pred, imgs, m, p, norm, 1e-6)
                Lp = L * 3 // 4
                idx = E(B, Lp, dtype=torch.int64)
                pred = E(B, Lp, D, dtype=pdt)
                lo = losses.masked_recon_loss(pred, imgs, idx, p, norm, 1e-6)
                losses.masked_recon_loss_backward(torch.empty_like(lo), pred, imgs, idx, p, norm, 1e-6)

    # -- SimMIM's loss on full-resolution predictions: 192 px (SimMIM's pretraining size), batch 128,
    #    the mask at the model patch size 4 (the loss's patch), per image (and batch-shared in the full grid)
    for pdt, idt in ((f16, f32), (bf16, bf16), (f32, f32)):
        B, H, p = 128, 192, 4
        pred, imgs = E(B, 3, H, H, dtype=pdt), E(B, 3, H, H, dtype=idt)
        for G in ((1, B) if full else (B,)):
            m = E(G, (H // p) ** 2, dtype=torch.uint8)
            lo = losses.simmim_loss(pred, imgs, m, p)
            losses.simmim_loss_backward(lo, pred, imgs, m, p)


def _int64_pass():
    """The INT64 index path of the row kernels (tensors >= 2**31 elements; forced, not allocated)."""
    import torch

    from mixkernels.triton import mixing, uniform, windows

    E = torch.empty
    for mod in (mixing, uniform, windows):
        mod.needs_int64 = lambda *t: True
    for dtype in (torch.float16, torch.float32) if _FULL else (torch.float16,):
        B, H, W, C = 128, 56, 56, 128
        x = E(B, H * W, C, dtype=dtype)
        m = E(1, H * W, dtype=torch.uint8)
        mixing.mix_tokens(x, m)
        mixing.mix_tokens_backward(x, m)
        mixing.unmix_tokens(x, m, E(C, dtype=dtype), None)
        mixing.unmix_tokens_backward(E(2 * B, H * W, C, dtype=dtype), m, True, True)
        xi = x.reshape(B, H, W, C)
        windows.window_merge(windows.window_partition(xi, 7, 7, 3, 3), H, W, 7, 7, 3, 3)
        keep = E(B, H // 2, W // 2, dtype=torch.uint8)
        cmp_ = uniform.uniform_sample(xi, keep, 1, E(C, dtype=dtype), keep)
        uniform.uniform_sample_backward(cmp_, keep, 1, keep, True)


def _worker(report_path, cache_dir):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the AOT worker must run without the interpreter"
    import inspect
    import time

    import triton
    from triton.runtime.jit import JITFunction

    from mixkernels.bench import aot

    t0 = time.time()
    launches = aot.capture(_launch_everything) + aot.capture(_int64_pass)
    # B*nW is the kernel's BNW argument (the grid is head-fastest and packs windows per program).
    real = any(la.name == "_fwd_kernel" and la.args[la.fn.arg_names.index("BNW")] == 128 for la in launches)
    uniq = {}
    for la in launches:  # one entry per distinct launch specialization (Triton's own binder decides)
        uniq.setdefault(aot.spec_key(la, 90), la)

    import mixkernels.triton as pkg
    kernels = []
    for name in ("window_attention", "_cosine", "mixing", "windows", "uniform", "losses"):
        mod = __import__(f"{pkg.__name__}.{name}", fromlist=["x"])
        assert not getattr(mod, "_INTERPRET", False)
        kernels += [n for n, v in inspect.getmembers(mod) if isinstance(v, JITFunction) and n.endswith("_kernel")]

    # sm_90: every captured specialization; sm_80: every attention one, the row/loss kernels once each.
    items, seen80 = [], set()
    for la in uniq.values():
        attn = la.module.startswith("window_attention")  # forward and backward modules
        items.append((la, 90))
        fam = (la.name, str(aot.specialize(la.fn, la.args, la.kwargs)[0])) if _FULL or attn else la.name
        if fam not in seen80:
            seen80.add(fam)
            items.append((la, 80))
    t1 = time.time()

    def progress(r):
        if r.error or os.environ.get("MIXKERNELS_AOT_VERBOSE") == "1":
            print(f"{'FAILED' if r.error else 'ok':<6} {r.seconds:6.1f}s {r.kernel} sm_{r.cc} {r.spec}",
                  file=sys.stderr, flush=True)

    compiled = aot.compile_many(items, cache_dir, progress=progress)
    t2 = time.time()
    results = []
    for r in compiled:
        e = dict(kernel=r.kernel, module=r.module, cc=r.cc, spec=r.spec, error=r.error, shared=r.shared,
                 seconds=r.seconds)
        if r.module.startswith("window_attention") and r.cc == 90 and not r.error:
            e["ptxas"] = aot.ptxas_stats(r.ptxas_log)
        results.append(e)
    n_err = sum(bool(r["error"]) for r in results)
    print(f"triton {triton.__version__}: {len(uniq)} specializations captured in {t1 - t0:.1f}s, "
          f"{len(results)} compiles in {t2 - t1:.1f}s, {n_err} failed")
    for cc in ARCHS:
        rs = [r for r in results if r["cc"] == cc]
        print(f"sm_{cc}: {len(rs)} compiles, max shared {max(r['shared'] for r in rs)} B "
              f"({max(rs, key=lambda r: r['shared'])['kernel']})")
    print("\nsm_90 attention kernels at batch 128 (ptxas -v): regs, spill stores/loads bytes, shared bytes")
    for r in results:
        if "ptxas" in r:
            p = r["ptxas"]
            print(f"  {r['kernel']:<20} regs={p['regs']:>3} spill={p['spill_st']:>5}/{p['spill_ld']:<5} "
                  f"smem={r['shared']:>6}  {r['spec']}")
    for r in results:
        if r["error"]:
            print(f"\nFAILED {r['kernel']} sm_{r['cc']} {r['spec']}\n{r['error']}")
    with open(report_path, "w") as f:
        json.dump(dict(kernels=sorted(set(kernels)), results=results, real_geometry=real), f)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=os.devnull)
    ap.add_argument("--cache", default=None, help="compile cache directory (default: a temporary one)")
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _worker(a.report, a.cache or os.path.join(tmp, "aot_cache"))
