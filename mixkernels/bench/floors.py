"""Device floors measured at the start of a run: copy bandwidth and matmul rate.

Every case's "% of floor" is the time the floor bytes (docs/DESIGN.md section 7) would take at the
measured copy bandwidth, divided by the measured time, so it is relative to what this device
actually sustains, not to a datasheet number.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["measure_floors", "floor_seconds"]


def measure_floors(device: torch.device, quick: bool = False) -> Dict[str, object]:
    from .harness import time_fn  # the same timing rules as every case

    if device.type == "cuda":
        n = (256 if quick else 1024) << 20  # bytes per buffer; far beyond L2
        src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        ms = time_fn(lambda i: dst.copy_(src), device, flush=False, quick=quick)
        copy_gbps = 2 * n / (ms * 1e-3) / 1e9
        del src, dst
        m = 8192
        a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        ms = time_fn(lambda i: a @ b, device, flush=False, quick=quick)
        tflops = 2 * m**3 / (ms * 1e-3) / 1e12
        del a, b
        torch.cuda.empty_cache()
        return {"copy_GBps": copy_gbps, "matmul_TFLOPs": tflops, "matmul_dtype": "bfloat16",
                "copy_bytes": 2 * n, "matmul_shape": [m, m, m]}
    n = (32 if quick else 256) << 20
    src = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = time_fn(lambda i: dst.copy_(src), device, quick=quick)
    copy_gbps = 2 * n / (ms * 1e-3) / 1e9
    m = 512 if quick else 1024
    a, b = torch.randn(m, m), torch.randn(m, m)
    ms = time_fn(lambda i: a @ b, device, quick=quick)
    return {"copy_GBps": copy_gbps, "matmul_TFLOPs": 2 * m**3 / (ms * 1e-3) / 1e12, "matmul_dtype": "float32",
            "copy_bytes": 2 * n, "matmul_shape": [m, m, m], "threads": torch.get_num_threads()}


def floor_seconds(floors: Dict[str, object], nbytes: float, flops: float = 0.0) -> float:
    """Lower bound on the time of a case: its floor bytes at copy bandwidth (or its FLOPs at the
    matmul rate if that is larger; window attention at head_dim 32 stays memory-bound)."""
    t_mem = nbytes / (float(floors["copy_GBps"]) * 1e9)
    t_fl = flops / (float(floors["matmul_TFLOPs"]) * 1e12) if flops else 0.0
    return max(t_mem, t_fl)
