"""Versions for scripts/gpu_check.sh: GPU, driver, toolkit, Python packages vs scripts/gpu_stack.txt.

    python3 scripts/gpu_env.py ENV_JSON COMMIT      (prints the same JSON)
"""
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata


def _run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"{cmd[0]}: {type(e).__name__}"


def main(path, commit):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cuda_home = os.environ.get("CUDA_HOME")
    env = {"commit": commit, "cuda_home": cuda_home, "python_path": sys.executable, "cpus": os.cpu_count(),
           "nvidia_smi": _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                               "--format=csv,noheader"]),
           "nvcc": _run([os.path.join(cuda_home, "bin", "nvcc"), "--version"]).splitlines()[-1:] if cuda_home else None,
           "versions": {}}
    v = env["versions"]
    v["python"] = platform.python_version()
    for m in ("torch", "triton", "numpy", "timm", "pytest-xdist", "pytest", "pytest-benchmark", "ninja", "pybind11",
              "matplotlib", "torchvision"):
        try:  # installed distributions, without importing them (timm needs a shim on CPU torch)
            v[m] = metadata.version(m)
        except metadata.PackageNotFoundError:
            v[m] = "missing"
    try:
        import torch

        v["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0), gpu_sm=f"{p.major}.{p.minor}", gpu_sms=p.multi_processor_count,
                       gpu_memory_GiB=round(p.total_memory / 2**30, 1))
    except Exception as e:
        env["torch_error"] = repr(e)
    want = {}
    with open(os.path.join(root, "scripts", "gpu_stack.txt")) as f:
        for line in f:
            m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(==|>=)\s*([0-9][^\s#,;]*)", line)
            if m:
                want[m.group(1).lower()] = m.group(2) + m.group(3)
    env["stack_expected"] = want
    env["stack_mismatch"] = {k: f"expected {w}, found {v.get(k)}" for k, w in want.items()
                             if w.startswith("==") and not str(v.get(k, "")).startswith(w[2:].rstrip("*"))}
    with open(path, "w") as f:
        json.dump(env, f, indent=1)
    print(json.dumps(env, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
