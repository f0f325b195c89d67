"""CPU window attention: the compiled ``cpu`` kernel vs the eager reference at equal dtype.

Usage::

    PYTHONPATH=. python benchmarks/cpu_window_attention.py [--threads N] [--dtype float32] [--reps 20]

Prints one row per (shape, pass): best-of-reps wall-clock ms of the reference (roll /
partition / gathered bias / dense mask / softmax / merge, autograd for backward) and of the
kernel, the speedup and the max abs error of the kernel against the float64 reference.
Best-of (not median) because shared machines make medians noisy; --threads 1 is the most
stable comparison there.
"""
from __future__ import annotations

import argparse
import time

import torch

import mixkernels
from mixkernels.reference import window_attention as ref_wattn

# (name, B, H, W, nH, d, window, shift, rpb, group)
SHAPES = [
    ("swin 28x28 w7 shift+group", 4, 28, 28, 4, 32, 7, 3, True, "per_image"),
    ("swin 28x28 w7 plain", 4, 28, 28, 4, 32, 7, 0, True, None),
    ("mixmim 14x14 w14 group", 4, 14, 14, 8, 32, 14, 0, True, "shared"),
    ("stage4 7x7 w7", 8, 7, 7, 16, 32, 7, 0, True, None),
]


def _best_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def _inputs(B, H, W, nH, d, win, rpb, group, dtype):
    C = nH * d
    qkv = torch.randn(B, H, W, 3 * C, dtype=dtype)
    table = torch.randn((2 * win - 1) ** 2, nH, dtype=dtype) * 0.1 if rpb else None
    g = None
    if group == "shared":
        g = torch.rand(H, W) < 0.5
    elif group == "per_image":
        g = torch.rand(B, H, W) < 0.5
    return qkv, table, g


def run(dtype: torch.dtype, reps: int) -> None:
    print(f"threads={torch.get_num_threads()} dtype={dtype}")
    print(f"{'shape':32s} {'pass':8s} {'ref ms':>9s} {'cpu ms':>9s} {'speedup':>8s} {'max err':>9s}")
    for name, B, H, W, nH, d, win, shift, rpb, group in SHAPES:
        qkv, table, g = _inputs(B, H, W, nH, d, win, rpb, group, dtype)
        kw = dict(shift_size=shift, group=g)

        def fwd(backend, q=qkv, t=table):
            return mixkernels.window_attention(q, nH, win, rel_pos_bias=t, backend=backend, **kw)

        q64 = qkv.double()
        t64 = None if table is None else table.double()
        ref64 = ref_wattn(q64, nH, win, rel_pos_bias=t64, **kw)
        with torch.no_grad():
            err = (fwd("cpu").double() - ref64).abs().max().item()
            t_ref = _best_ms(lambda: fwd("reference"), reps)
            t_cpu = _best_ms(lambda: fwd("cpu"), reps)
        print(f"{name:32s} {'fwd':8s} {t_ref:9.2f} {t_cpu:9.2f} {t_ref / t_cpu:7.2f}x {err:9.2e}")

        qg = qkv.clone().requires_grad_()
        tg = None if table is None else table.clone().requires_grad_()
        dout = torch.randn(B, H, W, nH * d, dtype=dtype)

        def fwd_bwd(backend):
            out = fwd(backend, qg, tg)
            out.backward(dout)
            qg.grad = None
            if tg is not None:
                tg.grad = None

        t_ref = _best_ms(lambda: fwd_bwd("reference"), reps)
        t_cpu = _best_ms(lambda: fwd_bwd("cpu"), reps)
        print(f"{name:32s} {'fwd+bwd':8s} {t_ref:9.2f} {t_cpu:9.2f} {t_ref / t_cpu:7.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    run(getattr(torch, a.dtype), a.reps)


if __name__ == "__main__":
    main()
