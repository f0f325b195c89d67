"""``python -m mixkernels.info``: versions, what was built, devices, and the backend per op."""
from __future__ import annotations

import os
import platform
import sys
from typing import Dict, List, Tuple

import torch

from . import _ext
from .ops import _dispatch
from .ops.registry import OPERATORS_REGISTRY

_ENV = ("MIXKERNELS_BACKEND", "MIXKERNELS_CUDA_AUTO", "MIXKERNELS_DETERMINISTIC", "MIXKERNELS_LOG", "TRITON_INTERPRET")


def backend_table(device: str) -> List[Tuple[str, str, Dict[str, str]]]:
    """``(op, automatic choice, {backend: "ok" | reason})`` for each registered op on ``device``.

    Each op's first registry sample, in bf16 on ``device``, goes through the op's own
    validation up to its backend choice (``OpSpec.dispatch_key``), so the table shows the
    predicate the op really uses, with its reasons."""
    rows = []
    for spec in OPERATORS_REGISTRY.values():
        samples = spec.samples(torch.device(device), torch.bfloat16)
        keys = [(spec.name, spec.dispatch_key(samples[0]))]
        for variant in spec.variants:  # e.g. window_attention's cosine mode: its own kernels, its own status
            key = next((k for k in map(spec.dispatch_key, samples) if k[2][-1] == variant), None)
            if key is not None:
                keys.append((f"{spec.name} ({variant})", key))
        for name, key in keys:
            status = spec.status(*key)
            env = os.environ.get("MIXKERNELS_BACKEND")
            auto = env if env else _dispatch.choose(spec.name, key[0], spec.reason, None, *key)
            rows.append((name, auto, status))
    return rows


def report() -> str:
    lines = []
    add = lines.append
    from . import __version__

    add(f"mixkernels {__version__}")
    add(f"python {platform.python_version()} ({sys.executable})")
    add(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    try:
        import triton

        add(f"triton {triton.__version__}")
    except Exception as e:
        add(f"triton: not importable ({type(e).__name__})")
    add("")
    add("build:")
    for line in _ext.build_report():
        add(f"  {line}")
    add("")
    add("devices:")
    add(f"  cpu: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            add(f"  cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        add("  cuda: none")
    env = [f"{k}={os.environ[k]}" for k in _ENV if k in os.environ]
    add("")
    add("environment: " + (", ".join(env) if env else "(no MIXKERNELS_* overrides)"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        add("")
        add(f"backends on {dev} tensors (bf16; automatic choice in brackets; Triton launchers: "
            f"mixkernels.triton.<family>.<kernel>):")
        for name, auto, status in backend_table(dev):
            op, _, variant = name.partition(" (")
            kernels = OPERATORS_REGISTRY[op].kernel_names("cpu", variant.rstrip(")") or None)
            add(f"  {name:<18} [{auto}]  kernels: {', '.join(kernels)}")
            for b, s in status.items():
                add(f"      {b:<9} {s}")
    return "\n".join(lines)


def main() -> None:
    with _ext.no_first_use_build():  # report what is built; compiling is `python -m mixkernels.build`
        print(report())


if __name__ == "__main__":
    main()
