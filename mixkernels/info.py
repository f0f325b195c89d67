"""``python -m mixkernels.info``: versions, what was built, devices, and the backend per op."""
from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import _ext
from .ops import _dispatch, losses, mixing, uniform, windows

# The package re-exports the function under the module's name; take the module itself.
wattn = importlib.import_module("mixkernels.ops.window_attention")

_ENV = ("MIXKERNELS_BACKEND", "MIXKERNELS_CUDA_AUTO", "MIXKERNELS_DETERMINISTIC", "MIXKERNELS_LOG", "TRITON_INTERPRET")


def _op_checks(device: str) -> List[Tuple[str, Callable[[], Dict[str, Callable[[], Optional[str]]]]]]:
    """Each public op with the backend predicates for a representative bf16 call on ``device``."""
    dt = torch.bfloat16
    x = torch.empty(2, 8, 8, 64, device=device, dtype=dt)
    qkv = torch.empty(2, 14, 14, 3 * 4 * 32, device=device, dtype=dt)
    pred = torch.empty(4, 49, 32 * 32 * 3, device=device, dtype=dt)
    imgs = torch.empty(2, 3, 224, 224, device=device, dtype=dt)
    ops = [(n, (lambda n=n: mixing._checks(n, x))) for n in ("mix_tokens", "unmix_tokens")]
    ops += [(n, (lambda n=n: windows._checks(n, x))) for n in ("window_partition", "window_merge")]
    ops += [(n, (lambda n=n: uniform._checks(n, x))) for n in ("uniform_sample", "uniform_scatter")]
    ops += [("window_attention", lambda: wattn._checks(qkv, 32, 196))]
    ops += [(n, (lambda n=n: losses._checks(n, pred, imgs))) for n in ("mixmim_loss", "masked_recon_loss")]
    return ops


def backend_table(device: str) -> List[Tuple[str, str, Dict[str, str]]]:
    """``(op, automatic choice, {backend: "ok" | reason})`` for each op on ``device``."""
    rows = []
    for name, make in _op_checks(device):
        checks = make()
        status = {}
        for b in ("cuda", "triton", "cpu"):
            reason = checks[b]() if b in checks else "not implemented"
            if not reason and b == "cuda" and not _dispatch.cuda_auto_enabled(name):
                reason = "ok (explicit only: not verified on a GPU yet)"
            status[b] = reason or "ok"
        status["reference"] = "ok"
        auto = _dispatch.select(name, torch.device(device), checks) if not os.environ.get("MIXKERNELS_BACKEND") else os.environ["MIXKERNELS_BACKEND"]
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
        add(f"backends on {dev} tensors (bf16; automatic choice in brackets):")
        for name, auto, status in backend_table(dev):
            add(f"  {name:<18} [{auto}]")
            for b, s in status.items():
                add(f"      {b:<9} {s}")
    return "\n".join(lines)


def main() -> None:
    with _ext.no_first_use_build():  # report what is built; compiling is `python -m mixkernels.build`
        print(report())


if __name__ == "__main__":
    main()
