"""Ahead-of-time compile check of every Triton kernel for sm_80 and sm_90 (no GPU needed).

The other Triton tests run under the interpreter, which checks none of the real compiler's
rules (tl.dot shapes/dtypes, layouts, constexpr typing, shared memory). Here a subprocess
WITHOUT ``TRITON_INTERPRET`` (conftest sets it to 1 in this process when there is no GPU;
kernels are specialized for the interpreter at definition time) calls every launcher in
``mixkernels/triton/*.py`` on small CPU tensors at realistic geometry. Nothing launches:
``JITFunction.run`` is replaced by a hook that records (kernel, args, kwargs); no launcher
touches the CUDA driver before ``.run`` for CPU tensors (``is_cuda`` is False, so
``losses._device`` is a null context and ``unmix_tokens_backward`` uses one batch chunk), so
no other patch is needed. Each distinct specialization is then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and the launcher's
num_warps/num_stages. Signature, constexprs and attributes come from Triton's own binder
(``create_function_from_signature`` + ``JITFunction._pack_args``: pointer dtypes, i32/i64 by
magnitude, ints equal to 1 folded to constexpr, divisibility-16 hints, exactly what a GPU
launch would use); a manual derivation with the same rules is the fallback for Triton
versions without that API. Launchers are called with the module-level ``_INTERPRET`` flags
False, so the tile sizes are the GPU ones.

Checks: every compile succeeds, every ``*_kernel`` in the package compiles on both archs,
shared memory fits the arch (sm_80: 163 KB, sm_90: 227 KB per block), and Triton's bundled
``ptxas -v`` reassembles the sm_90 PTX of the attention kernels without errors (registers and
spills are printed, not asserted). ``python tests/test_triton_aot.py`` prints the tables.
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
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["TRITON_CACHE_DIR"] = os.path.join(tmp_dir, "triton_cache")  # really compile, every run
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    report = os.path.join(tmp_dir, "report.json")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--report", report], env=env,
                       capture_output=True, text=True, timeout=1200)
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
    ptx = [e for e in rep["results"] if "ptxas" in e]
    assert ptx, "ptxas -v did not run"
    bad = [e for e in ptx if e["ptxas"]["rc"] != 0]
    assert not bad, bad[0]["ptxas"]["log"]


# ----------------------------------------------------------------------------- worker side


def _launch_everything():
    """Call every launcher at the configurations a GPU run would use (captured, not launched)."""
    import torch

    from mixkernels.triton import losses, mixing, uniform, windows
    from mixkernels.triton import window_attention as wa

    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32

    # -- window attention: MixMIM-B / Swin-B geometry (head_dim 32, windows 7 and 14), other d.
    def attn(dtype, win, d, nh=2, hw=2, shift=False, rpb=True, bias=False, group=False, coords=False,
             bwd=True, modes=((True, False, False),)):
        H = W = win * hw
        C = nh * d
        qkv = torch.randn(1, H, W, 3 * C, dtype=dtype)
        N = win * win
        r = win + 2 if coords else win  # UM-MAE: coord range larger than the window
        t_rpb = torch.randn((2 * r - 1) ** 2, nh) if rpb else None
        t_bias = torch.randn(nh, N, N) if bias else None
        t_grp = torch.randint(0, 2, (1, H, W), dtype=torch.int32) if group else None
        t_crd = torch.randint(0, r, (1, H, W, 2), dtype=torch.int32) if coords else None
        sh = win // 2 if shift else 0
        args = (nh, win, win, sh, sh, t_rpb, t_bias, t_grp, t_crd, r, r, d ** -0.5)
        out, lse = wa.window_attention(qkv, *args)
        if bwd:
            for need_drpb, need_dbias, det in modes:
                wa.window_attention_backward(torch.randn_like(out), qkv, out, lse, *args,
                                             need_drpb and rpb, need_dbias and bias, det)

    every_mode = tuple((a, b, c) for a in (True, False) for b in (True, False) for c in (True, False))
    if _FULL:
        for dtype in (f16, bf16, f32):
            # MixMIM-B: group mask, rpb, no shift; stage 4 (7x7, 32 heads), stages 1-3 (14x14).
            attn(dtype, 7, 32, nh=32, hw=1, group=True, modes=every_mode)
            attn(dtype, 14, 32, group=True, modes=every_mode)
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
        attn(f16, 14, 32, group=True, modes=((True, False, False),))
        attn(f16, 7, 32, shift=True, bias=True, modes=((True, True, False), (True, True, True), (False, False, False)))
        attn(bf16, 7, 32, shift=True, coords=True, group=True, modes=((True, False, False), (True, False, True)))
        for d in (16, 64, 128):
            attn(f16, 7, d, shift=True, bias=True, group=True, modes=((True, True, False),))

    full = _FULL
    # -- token ops: C in {128, 512, 7} (7: masked columns, no 16-divisibility)
    for dtype in (f16, bf16, f32):
        for C in ((128, 512, 7) if dtype == f16 or full else (128,)):
            B, H, W = 2, 8, 8
            L = H * W
            x = torch.randn(B, L, C, dtype=dtype)
            for G in ((1, B) if full or C == 128 else (1,)):
                m = torch.randint(0, 2, (G, L), dtype=torch.uint8)
                mixing.mix_tokens(x, m)
                mixing.mix_tokens_backward(x, m)
                tok = torch.randn(C, dtype=dtype)
                pos = torch.randn(L, C, dtype=dtype)
                mixing.unmix_tokens(x, m, tok, pos if G == 1 else None)
                g2 = torch.randn(2 * B, L, C, dtype=dtype)
                for nt, npos in (((True, True), (False, False), (True, False)) if full else ((True, True),)):
                    mixing.unmix_tokens_backward(g2, m, nt, npos)
            xi = x.reshape(B, H, W, C)
            for win, s in (((4, 0), (4, 2)) if full else ((4, 2),)):
                wins = windows.window_partition(xi, win, win, s, s)
                windows.window_merge(wins, H, W, win, win, s, s)
            for u in ((1, 2) if full else (2,)):
                keep = torch.randint(0, 4, (B, H // (2 * u), W // (2 * u)), dtype=torch.uint8)
                sec = torch.randint(0, 2, keep.shape, dtype=torch.uint8)
                tok = torch.randn(C, dtype=dtype)
                cmp_ = uniform.uniform_sample(xi, keep, u, tok, sec)
                uniform.uniform_sample(xi, keep, u, None, None)
                uniform.uniform_sample_backward(cmp_, keep, u, sec, True)
                if full:
                    uniform.uniform_sample_backward(cmp_, keep, u, sec, False)
                uniform.uniform_scatter(cmp_, keep, u)

    # -- losses: patch 4 (MixMIM/UM-MAE at 224/4), 16 (MAE), 32 (MixMIM targets)
    for pdt, idt in ((f16, f32), (bf16, bf16), (f32, f32)):
        for p in ((4, 16, 32) if pdt == f16 or full else (16,)):
            B, H = 2, 2 * p
            L = (H // p) ** 2
            D = p * p * 3
            imgs = torch.randn(B, 3, H, H, dtype=idt)
            for norm in ((True, False) if full or p == 16 else (True,)):
                for G in ((1, B) if full else (B,)):
                    m = torch.randint(0, 2, (G, L), dtype=torch.uint8)
                    pred = torch.randn(2 * B, L, D, dtype=pdt)
                    lo = losses.mixmim_loss(pred, imgs, m, p, norm, 1e-6)
                    losses.mixmim_loss_backward(torch.ones_like(lo), pred, imgs, m, p, norm, 1e-6)
                idx = torch.tensor([[0, 2, -1], [1, 3, -1]], dtype=torch.int64)
                pred = torch.randn(B, 3, D, dtype=pdt)
                lo = losses.masked_recon_loss(pred, imgs, idx, p, norm, 1e-6)
                losses.masked_recon_loss_backward(torch.ones_like(lo), pred, imgs, idx, p, norm, 1e-6)


def _int64_pass():
    """The INT64 index path of the row kernels (tensors >= 2**31 elements; forced, not allocated)."""
    import torch

    from mixkernels.triton import mixing, uniform, windows

    for mod in (mixing, uniform, windows):
        mod.needs_int64 = lambda *t: True
    for dtype in (torch.float16, torch.float32) if _FULL else (torch.float16,):
        B, H, W, C = 2, 8, 8, 128
        x = torch.randn(B, H * W, C, dtype=dtype)
        m = torch.randint(0, 2, (1, H * W), dtype=torch.uint8)
        mixing.mix_tokens(x, m)
        mixing.mix_tokens_backward(x, m)
        mixing.unmix_tokens(x, m, torch.randn(C, dtype=dtype), None)
        mixing.unmix_tokens_backward(torch.randn(2 * B, H * W, C, dtype=dtype), m, True, True)
        xi = x.reshape(B, H, W, C)
        windows.window_merge(windows.window_partition(xi, 4, 4, 2, 2), H, W, 4, 4, 2, 2)
        keep = torch.randint(0, 4, (B, H // 2, W // 2), dtype=torch.uint8)
        cmp_ = uniform.uniform_sample(xi, keep, 1, torch.randn(C, dtype=dtype), keep & 1)
        uniform.uniform_sample_backward(cmp_, keep, 1, keep & 1, True)


_PTR = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32",
        "int64": "i64", "uint8": "u8", "int8": "i8", "int16": "i16", "bool": "i1"}


def _manual_spec(fn, args, kwargs):
    """Triton's launch specialization by hand (fallback when the binder API differs)."""
    import inspect

    import torch

    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    sig, const, attrs = {}, {}, {}
    for i, (name, v) in enumerate(bound.arguments.items()):
        if i in fn.constexprs or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], const[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _PTR[str(v.dtype).split(".")[-1]]
            attrs[(i,)] = [["tt.divisibility", 16]] if v.data_ptr() % 16 == 0 else []
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else ("i64" if -2**63 <= v < 2**63 else "u64")
            attrs[(i,)] = [["tt.divisibility", 16]] if v % 16 == 0 else []
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot specialize {name}={v!r}")
    opts = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    return sig, const, attrs, opts


def _specialize(fn, args, kwargs, target):
    """(signature, constexprs, attrs, options dict) exactly as JITFunction.run would build them."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        kw = dict(kwargs)
        kw.setdefault("debug", False)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kw)
        options, sig, const, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        return sig, const, attrs, {k: getattr(options, k) for k in ("num_warps", "num_stages", "num_ctas")}
    except (ImportError, AttributeError, TypeError):
        return _manual_spec(fn, args, kwargs)


_ITEMS = []  # filled before forking the compile workers, which get indices


def _compile_one(item):
    if isinstance(item, int):
        item = _ITEMS[item]
    import time
    import traceback

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, args, kwargs, cc, want_ptxas = item
    target = GPUTarget("cuda", cc, 32)
    sig, const, attrs, opts = _specialize(fn, args, kwargs, target)
    spec = ", ".join(f"{k}={v}" for k, v in _named_consts(fn, const).items()) + \
        f", ptrs={sorted({v for v in sig.values() if v.startswith('*')})}, warps={opts.get('num_warps')}"
    res = dict(kernel=fn.fn.__name__, module=fn.fn.__module__.rsplit(".", 1)[-1], cc=cc, spec=spec,
               error=None, shared=0, seconds=0.0)
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn, sig, const, attrs), target=target, options=opts)
        res["shared"] = int(k.metadata.shared)
        if want_ptxas:
            res["ptxas"] = _ptxas(k.asm["ptx"], cc)
    except Exception:  # noqa: BLE001 - reported with the specialization that failed
        res["error"] = traceback.format_exc(limit=3)[-6000:]
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _named_consts(fn, const):
    names = fn.arg_names
    return {names[p[0]]: v for p, v in sorted(const.items()) if len(p) == 1 and names[p[0]].isupper()}


def _ptxas(ptx, cc):
    import re
    import tempfile

    import triton

    try:  # the ptxas Triton itself uses for this arch (3.9: ptxas-blackwell, CUDA 13.x, for sm_90+)
        from triton.backends.nvidia.compiler import get_ptxas

        exe = get_ptxas(cc).path
    except (ImportError, TypeError, AttributeError):
        exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else -1  # noqa: E731
    return dict(rc=r.returncode, arch=arch, regs=num(r"Used (\d+) registers"),
                spill_st=num(r"(\d+) bytes spill stores"), spill_ld=num(r"(\d+) bytes spill loads"),
                stack=num(r"(\d+) bytes stack frame"), log=log[-3000:])


def _progress(r):
    if r["error"] or os.environ.get("MIXKERNELS_AOT_VERBOSE") == "1":
        print(f"{'FAILED' if r['error'] else 'ok':<6} {r['seconds']:6.1f}s {r['kernel']} sm_{r['cc']} {r['spec']}",
              file=sys.stderr, flush=True)
    return r


def _worker(report_path):
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "the AOT worker must run without the interpreter"
    import inspect
    import time
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    import triton
    from triton.runtime.jit import JITFunction

    captured = {}

    def capture(self, *args, grid, warmup, **kwargs):
        # One entry per distinct launch specialization (Triton's own binder decides).
        from triton.backends.compiler import GPUTarget

        sig, const, attrs, opts = _specialize(self, args, kwargs, GPUTarget("cuda", 90, 32))
        key = (self.fn.__module__, self.fn.__name__, str(sig), str(const), str(attrs), str(opts))
        captured.setdefault(key, (self, args, kwargs))
        return None

    JITFunction.run = capture
    t0 = time.time()
    _launch_everything()
    _int64_pass()

    import mixkernels.triton as pkg
    kernels = []
    for name in ("window_attention", "mixing", "windows", "uniform", "losses"):
        mod = __import__(f"{pkg.__name__}.{name}", fromlist=["x"])
        assert not getattr(mod, "_INTERPRET", False)
        kernels += [n for n, v in inspect.getmembers(mod) if isinstance(v, JITFunction) and n.endswith("_kernel")]

    # sm_90: every captured specialization (ptxas -v on the attention ones).
    items, seen80 = [], set()
    for (mod, name, sig, *_), (fn, args, kwargs) in captured.items():
        attn = mod.endswith("window_attention")
        items.append((fn, args, kwargs, 90, attn))
        # sm_80: every attention specialization; the row/loss kernels once each (full: all).
        fam = (name, sig) if _FULL or attn else name
        if fam not in seen80:
            seen80.add(fam)
            items.append((fn, args, kwargs, 80, False))
    t1 = time.time()
    workers = int(os.environ.get("MIXKERNELS_AOT_JOBS", min(2, os.cpu_count() or 1)))
    if workers > 1:  # fork after capture and before any compile: children inherit the captures
        _ITEMS[:] = items
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            results = [_progress(r) for r in ex.map(_compile_one, range(len(items)))]
    else:
        results = [_progress(_compile_one(it)) for it in items]
    t2 = time.time()

    n_err = sum(bool(r["error"]) for r in results)
    print(f"triton {triton.__version__}: {len(captured)} specializations captured in {t1 - t0:.1f}s, "
          f"{len(results)} compiles in {t2 - t1:.1f}s ({workers} procs), {n_err} failed")
    for cc in ARCHS:
        rs = [r for r in results if r["cc"] == cc]
        print(f"sm_{cc}: {len(rs)} compiles, max shared {max(r['shared'] for r in rs)} B "
              f"({max(rs, key=lambda r: r['shared'])['kernel']})")
    print("\nsm_90 attention kernels (ptxas -v): regs, spill stores/loads bytes, shared bytes")
    for r in results:
        if "ptxas" in r:
            p = r["ptxas"]
            print(f"  {r['kernel']:<20} regs={p['regs']:>3} spill={p['spill_st']:>5}/{p['spill_ld']:<5} "
                  f"smem={r['shared']:>6}  {r['spec']}")
    for r in results:
        if r["error"]:
            print(f"\nFAILED {r['kernel']} sm_{r['cc']} {r['spec']}\n{r['error']}")
    with open(report_path, "w") as f:
        json.dump(dict(kernels=sorted(set(kernels)), results=results), f)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", default=os.devnull)
    a = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET")
    _worker(a.report)
