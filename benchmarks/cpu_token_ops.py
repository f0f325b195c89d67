"""CPU benchmark of the token ops: compiled CPU kernels vs the eager PyTorch reference
(and, with --compile, torch.compile of the reference), with effective GB/s.

    PYTHONPATH=. python benchmarks/cpu_token_ops.py [--B 16 --H 56 --W 56 --C 128 --dtype float32 --compile]

Bytes counted per op = tensors that must be read + written once (the copy floor); GB/s =
bytes / median time. Backward rows time only the backward (graph built once, retain_graph).
Self-contained; the GPU suite lives in mixkernels/bench/.
"""
from __future__ import annotations

import argparse
import time

import torch

import mixkernels as mk
from mixkernels import reference as ref


def _median_ms(fn, min_time=0.4, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + min_time
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]


def _bwd(fn, inputs):
    """A callable that runs only the backward of fn(*inputs)."""
    out = fn(*inputs)
    g = torch.randn_like(out)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return lambda: torch.autograd.grad(out, leaves, g, retain_graph=True)


def cases(B, H, W, C, dtype):
    L, es = H * W, torch.finfo(dtype).bits // 8
    n = B * L * C * es  # bytes of one (B,H,W,C) tensor
    x = torch.randn(B, H, W, C, dtype=dtype)
    xl = x.reshape(B, L, C)
    xg = x.clone().requires_grad_(True)
    xlg = xl.clone().requires_grad_(True)
    mask = torch.rand(H, W) < 0.5
    mask_l = mask.reshape(L)
    tok = torch.randn(C, dtype=dtype, requires_grad=True)
    pos = torch.randn(1, L, C, dtype=dtype, requires_grad=True)
    ws, ss, u = 7, 3, 2
    keep, sec = mk.uniform_masks(B, (H // (2 * u), W // (2 * u)))
    compact = torch.randn(B, H // 2, W // 2, C, dtype=dtype)
    win = ref.window_partition(x, ws, ss).contiguous()
    cpu = dict(backend="cpu")
    # name, bytes, kernel fn, reference fn, args (same for both), backward?
    return [
        ("mix_tokens", 2 * n, lambda a: mk.mix_tokens(a, mask, **cpu), lambda a: ref.mix_tokens(a, mask), (x,), False),
        ("mix_tokens bwd", 2 * n, lambda a: mk.mix_tokens(a, mask, **cpu), lambda a: ref.mix_tokens(a, mask), (xg,), True),
        ("unmix_tokens +pos", 3 * n, lambda a, t, p: mk.unmix_tokens(a, mask_l, t, p, **cpu),
         lambda a, t, p: ref.unmix_tokens(a, mask_l, t, p), (xl, tok.detach(), pos.detach()), False),
        ("unmix_tokens bwd", 3 * n, lambda a, t, p: mk.unmix_tokens(a, mask_l, t, p, **cpu),
         lambda a, t, p: ref.unmix_tokens(a, mask_l, t, p), (xlg, tok, pos), True),
        ("window_partition s3", 2 * n, lambda a: mk.window_partition(a, ws, ss, **cpu),
         lambda a: ref.window_partition(a, ws, ss), (x,), False),
        ("window_merge s3", 2 * n, lambda a: mk.window_merge(a, ws, H, W, ss, **cpu),
         lambda a: ref.window_merge(a, ws, H, W, ss), (win,), False),
        ("uniform_sample +sec", n // 2, lambda a, t: mk.uniform_sample(a, keep, u, mask_token=t, secondary=sec, **cpu),
         lambda a, t: ref.uniform_sample(a, keep, u, mask_token=t, secondary=sec), (x, tok.detach()), False),
        ("uniform_sample bwd", n + n // 4, lambda a, t: mk.uniform_sample(a, keep, u, mask_token=t, secondary=sec, **cpu),
         lambda a, t: ref.uniform_sample(a, keep, u, mask_token=t, secondary=sec), (xg, tok), True),
        ("uniform_scatter", n + n // 4, lambda a: mk.uniform_scatter(a, keep, u, **cpu),
         lambda a: ref.uniform_scatter(a, keep, u), (compact,), False),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--H", type=int, default=56)
    ap.add_argument("--W", type=int, default=56)
    ap.add_argument("--C", type=int, default=128)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) of the reference")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# CPU token ops: B={args.B} H={args.H} W={args.W} C={args.C} {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cols = "| op | MB moved | kernel ms | GB/s | eager ms | GB/s | speedup |"
    if args.compile:
        cols += " compiled ms | GB/s |"
    print(cols)
    print("|" + "---|" * (cols.count("|") - 1))
    for name, nbytes, kfn, rfn, inputs, bwd in cases(args.B, args.H, args.W, args.C, dtype):
        with torch.no_grad() if not bwd else torch.enable_grad():
            k = _bwd(kfn, inputs) if bwd else (lambda: kfn(*inputs))
            r = _bwd(rfn, inputs) if bwd else (lambda: rfn(*inputs))
            tk, tr = _median_ms(k), _median_ms(r)
            row = (f"| {name} | {nbytes / 1e6:.1f} | {tk:.3f} | {nbytes / tk / 1e6:.1f} | {tr:.3f} | "
                   f"{nbytes / tr / 1e6:.1f} | {tr / tk:.2f}x |")
            if args.compile:
                cfn = torch.compile(rfn, fullgraph=True)
                c = _bwd(cfn, inputs) if bwd else (lambda: cfn(*inputs))
                tc = _median_ms(c)
                row += f" {tc:.3f} | {nbytes / tc / 1e6:.1f} |"
        print(row)


if __name__ == "__main__":
    main()
