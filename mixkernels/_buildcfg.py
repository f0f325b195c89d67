"""Build configuration shared by setup.py, ``python -m mixkernels.build`` and ``info``.

Torch-free and import-free on purpose: setup.py loads this file by path in a build environment
that may have no torch (pip's build isolation). Compiler flags live in ``csrc/flags.txt``
(also read by CMakeLists.txt).
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import shutil
from typing import Dict, List, NamedTuple, Optional, Tuple

__all__ = ["source_root", "read_flags", "cuda_archs", "gencode", "cpu_sources", "cuda_sources", "sources_hash",
           "find_cuda_home", "Toolkit"]

_PKG = os.path.dirname(os.path.abspath(__file__))


def source_root() -> Optional[str]:
    """The C++/CUDA sources: ``mixkernels/_csrc`` in an installed package, ``<checkout>/csrc``
    in a source checkout (editable install); None when neither exists."""
    for d in (os.path.join(_PKG, "_csrc"), os.path.join(os.path.dirname(_PKG), "csrc")):
        if os.path.isfile(os.path.join(d, "ops.cpp")):
            return d
    return None


def read_flags(src: str) -> Dict[str, List[str]]:
    """``csrc/flags.txt`` as ``{key: [flag, ...]}``."""
    out: Dict[str, List[str]] = {}
    with open(os.path.join(src, "flags.txt")) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                key, _, val = line.partition("=")
                out[key.strip()] = shlex.split(val)
    return out


def cuda_archs(flags: Dict[str, List[str]]) -> List[str]:
    """GPU archs to build: ``MIXKERNELS_CUDA_ARCHS`` (``"90"``, ``"80;90"``, ``"8.0,9.0"``) or the default."""
    spec = os.environ.get("MIXKERNELS_CUDA_ARCHS") or " ".join(flags.get("cuda_archs", ["80;90"]))
    return [a.replace(".", "") for a in re.split(r"[;,\s]+", spec) if a.strip()]


def gencode(archs: List[str]) -> List[str]:
    out: List[str] = []
    for a in archs:
        out += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    return out


def cpu_sources(src: str) -> List[str]:
    return [os.path.join(src, "ops.cpp")] + sorted(glob.glob(os.path.join(src, "cpu", "*.cpp")))


def cuda_sources(src: str) -> List[str]:
    return sorted(glob.glob(os.path.join(src, "cuda", "*.cu")) + glob.glob(os.path.join(src, "cuda", "*.cpp")))


def sources_hash(src: str, extra: str = "") -> str:
    """Hash of every source, header and the flags file (plus ``extra``): the first-use cache key."""
    h = hashlib.sha256(extra.encode())
    files = sorted(glob.glob(os.path.join(src, "**", "*"), recursive=True))
    for p in files:
        if os.path.isfile(p) and p.endswith((".cpp", ".cu", ".cuh", ".h", ".txt")):
            h.update(os.path.relpath(p, src).encode())
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ CUDA toolkit
class Toolkit(NamedTuple):
    home: Optional[str]  # folder with include/cuda_runtime.h and bin/nvcc, or None
    how: str  # how it was found, or why none was
    rejected: Tuple[Tuple[str, str, str], ...]  # (folder, source, why not)


def _why_not(d: str) -> Optional[str]:
    if not os.path.isdir(d):
        return "no such folder"
    if not os.path.isfile(os.path.join(d, "include", "cuda_runtime.h")):
        return "no include/cuda_runtime.h"
    if not os.path.isfile(os.path.join(d, "bin", "nvcc")):
        return "no bin/nvcc"
    return None


def _wrapper_targets(nvcc: str) -> List[str]:
    """Absolute paths to another ``nvcc`` named inside a small wrapper script."""
    try:
        if os.path.getsize(nvcc) > 65536:
            return []  # a real binary
        with open(nvcc, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [m for m in re.findall(r"(/[^\s\"'`;|&()]*/bin/nvcc)\b", text) if os.path.realpath(m) != os.path.realpath(nvcc)]


def _version_key(path: str):
    m = re.search(r"(\d+)\.(\d+)$", path)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_cuda_home() -> Toolkit:
    """The real CUDA toolkit: ``CUDA_HOME``/``CUDA_PATH`` if valid, the folder above the real
    ``nvcc`` on PATH (following symlinks and wrapper scripts that ``exec`` another nvcc), then
    ``/usr/local/cuda``, ``/usr/local/cuda-*`` (newest first), ``/opt/cuda``. Valid means
    ``include/cuda_runtime.h`` and ``bin/nvcc`` are there. torch alone takes the folder above
    the first ``nvcc`` on PATH, which for a wrapper in e.g. ``/usr/local/bin`` is not a toolkit."""
    cands: List[Tuple[str, str]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append((os.environ[var], f"${var}"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append((os.path.dirname(os.path.dirname(real)),
                      f"nvcc on PATH ({nvcc}{' -> ' + real if real != nvcc else ''})"))
        for t in _wrapper_targets(real):
            cands.append((os.path.dirname(os.path.dirname(os.path.realpath(t))), f"target of the nvcc wrapper {nvcc} ({t})"))
    std = ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True) + ["/opt/cuda"]
    cands += [(d, "standard install folder") for d in std]
    rejected = []
    seen = set()
    for d, how in cands:
        d = os.path.abspath(d)
        why = _why_not(d)
        if why is None:
            return Toolkit(d, how, tuple(rejected))
        if (d, how) not in seen:
            seen.add((d, how))
            if how != "standard install folder" or os.path.exists(d):
                rejected.append((d, how, why))
    return Toolkit(None, "no CUDA toolkit found (no folder with include/cuda_runtime.h and bin/nvcc; set CUDA_HOME)",
                   tuple(rejected))


if __name__ == "__main__":  # `python3 mixkernels/_buildcfg.py cuda-home`: scripts/gpu_check.sh
    import sys

    tk = find_cuda_home()
    print(tk.home or "")
    print(f"CUDA toolkit: {tk.home} ({tk.how})" + "".join(f"; skipped {d} ({how}): {why}" for d, how, why in tk.rejected),
          file=sys.stderr)
