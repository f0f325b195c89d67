"""CUDA side of the static report: compile ``csrc/cuda/*.cu`` for sm_90 and capture real launches.

* :func:`cuda_home` finds the real toolkit (the folder whose ``include/`` has ``cuda_runtime.h``;
  the ``nvcc`` on PATH may be a wrapper script elsewhere, DESIGN.md section 5).
* :func:`build` compiles every torch-free ``.cu`` file with the flags of ``setup.py``
  (``-O3 -std=c++17 --expt-relaxed-constexpr -lineinfo``, sm_90) plus ``-Xptxas -v``, extracts the
  sm_90 cubin of each object, and links the objects with ``static_cuda_harness.cpp`` and
  ``static_cuda_stub.cpp`` (a recording stand-in for the CUDA runtime) into a host program.
* :func:`capture` runs that program on call lines (see the harness) and returns, per call, the
  launches our own host code makes: kernel (mangled) name, grid, block, dynamic shared memory and
  the kernel's arguments decoded as integers (sizes from the cubin's KPARAM_INFO).

Builds are cached under the cache directory by a hash of the sources and flags.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .. import _buildcfg

__all__ = ["cuda_home", "Build", "CudaLaunch", "build", "capture", "FLAGS"]

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_HERE = os.path.dirname(os.path.abspath(__file__))
# The shipped nvcc flags (csrc/flags.txt) for sm_90, plus ptxas' per-kernel log. MIXKERNELS_NVCC_WERROR=1
# adds flags.txt's CI-only warnings-as-errors (scripts/static_gate.sh: CI's sm_90 compile check is this build).
_FLAGS_TXT = _buildcfg.read_flags(os.path.join(_ROOT, "csrc"))
FLAGS = _FLAGS_TXT["nvcc"] + ["-arch=sm_90", "-Xptxas", "-v"]
if os.environ.get("MIXKERNELS_NVCC_WERROR") == "1":
    FLAGS += _FLAGS_TXT["nvcc_ci"]


def cuda_home() -> Optional[str]:
    """The CUDA toolkit folder (``include/cuda_runtime.h`` and ``bin/nvcc``), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nv = shutil.which("nvcc")
    if nv:
        real = os.path.realpath(nv)
        cands.append(os.path.dirname(os.path.dirname(real)))
        try:  # a wrapper script such as `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
            with open(nv, errors="replace") as f:
                head = f.read(4096)
            cands += [os.path.dirname(os.path.dirname(m)) for m in re.findall(r"(/\S+/bin/nvcc)\b", head)]
        except OSError:
            pass
    cands += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(c, "bin", "nvcc")):
            return c
    return None


@dataclass
class Build:
    dir: str
    exe: str
    cubins: Dict[str, str]  # source stem -> cubin path
    ptxas_log: str  # all files
    params: Dict[str, List[int]]  # mangled kernel name -> parameter sizes
    kernel_cubin: Dict[str, str] = field(default_factory=dict)  # mangled name -> cubin path
    seconds: float = 0.0


@dataclass
class CudaLaunch:
    name: str  # mangled
    grid: Tuple[int, int, int]
    block: Tuple[int, int, int]
    smem: int
    args: List[int]

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1] * self.block[2]

    @property
    def short(self) -> str:
        return demangle_short(self.name)


def _sources() -> List[str]:
    return sorted(f for f in glob.glob(os.path.join(_ROOT, "csrc", "cuda", "*.cu")))


def _digest(paths: Sequence[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(p.encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:20]


def build(cache_dir: str, jobs: int = 2) -> Build:
    """Compile and link (or reuse a cached build). Raises RuntimeError with the compiler's output."""
    import time

    from .aot import tool

    home = cuda_home()
    if home is None:
        raise RuntimeError("CUDA toolkit not found (no folder with include/cuda_runtime.h and bin/nvcc)")
    nvcc = os.path.join(home, "bin", "nvcc")
    srcs = _sources()
    inc = os.path.join(_ROOT, "csrc", "include")
    deps = srcs + glob.glob(os.path.join(_ROOT, "csrc", "cuda", "*.cuh")) + glob.glob(os.path.join(inc, "mixkernels", "*")) \
        + [os.path.join(_HERE, "static_cuda_stub.cpp"), os.path.join(_HERE, "static_cuda_harness.cpp")]
    key = _digest(deps, " ".join(FLAGS) + nvcc)
    # Absolute: cuobjdump runs with its own cwd (it extracts into the folder it runs in).
    bdir = os.path.join(os.path.abspath(cache_dir), f"cuda-{key}")
    done = os.path.join(bdir, "ptxas.log")
    t0 = time.time()
    if not os.path.exists(done):
        os.makedirs(bdir, exist_ok=True)

        def one(src):
            stem = os.path.splitext(os.path.basename(src))[0]
            obj = os.path.join(bdir, stem + ".o")
            r = subprocess.run([nvcc, "-c", *FLAGS, "-I", inc, "-o", obj, src], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{r.stderr[-6000:]}")
            return stem, r.stderr

        with ThreadPoolExecutor(max(1, jobs)) as ex:
            logs = list(ex.map(one, srcs))
        for stem, _ in logs:  # the sm_90 cubin inside each object
            sub = os.path.join(bdir, stem + ".x")
            os.makedirs(sub, exist_ok=True)
            r = subprocess.run([tool("cuobjdump"), "-xelf", "all", os.path.join(bdir, stem + ".o")], cwd=sub,
                               capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"cuobjdump -xelf failed on {stem}.o (exit {r.returncode}):\n"
                                   f"{(r.stdout + r.stderr)[-3000:]}")
            found = glob.glob(os.path.join(sub, "*sm_90*.cubin"))
            if not found:
                raise RuntimeError(f"no sm_90 cubin in {stem}.o")
            shutil.move(found[0], os.path.join(bdir, stem + ".cubin"))
            shutil.rmtree(sub, ignore_errors=True)
        cxx = shutil.which("g++") or shutil.which("c++")
        exe = os.path.join(bdir, "capture")
        objs = [os.path.join(bdir, s + ".o") for s, _ in logs]
        r = subprocess.run([cxx, "-O1", "-std=c++17", "-I", inc, "-I", os.path.join(home, "include"), "-o", exe,
                            os.path.join(_HERE, "static_cuda_harness.cpp"), os.path.join(_HERE, "static_cuda_stub.cpp"),
                            *objs], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"linking the capture harness failed:\n{r.stderr[-6000:]}")
        with open(done + ".tmp", "w") as f:
            f.write("\n".join(log for _, log in logs))
        os.replace(done + ".tmp", done)
    with open(done) as f:
        log = f.read()
    cubins = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(bdir, "*.cubin"))}
    params: Dict[str, List[int]] = {}
    where: Dict[str, str] = {}
    for path in cubins.values():
        for name, sizes in kparams(path).items():
            params[name], where[name] = sizes, path
    with open(os.path.join(bdir, "params.txt"), "w") as f:
        for name, sizes in params.items():
            f.write(name + " " + " ".join(map(str, sizes)) + "\n")
    return Build(bdir, os.path.join(bdir, "capture"), cubins, log, params, where, round(time.time() - t0, 1))


def kparams(cubin: str) -> Dict[str, List[int]]:
    """Parameter sizes per kernel from ``cuobjdump -elf`` (EIATTR_KPARAM_INFO, ordered by ordinal)."""
    from .aot import tool

    out = subprocess.run([tool("cuobjdump"), "-elf", cubin], capture_output=True, text=True).stdout
    res: Dict[str, Dict[int, int]] = {}
    cur = None
    for line in out.splitlines():
        m = re.match(r"^\.nv\.info\.(\S+)", line)
        if m:
            cur = res.setdefault(m.group(1), {})
            continue
        m = re.search(r"Ordinal\s*:\s*0x([0-9a-f]+)\s+Offset\s*:\s*0x[0-9a-f]+\s+Size\s*:\s*0x([0-9a-f]+)", line)
        if m and cur is not None:
            cur[int(m.group(1), 16)] = int(m.group(2), 16)
    return {k: [v[i] for i in sorted(v)] for k, v in res.items() if v}


def capture(b: Build, lines: Sequence[str]) -> List[Tuple[int, List[CudaLaunch], List[int]]]:
    """Run the harness on call lines; per line: (cudaError_t returned, launches in order, the bytes of
    each cudaMemsetAsync)."""
    env = dict(os.environ, MK_STATIC_PARAMS=os.path.join(b.dir, "params.txt"))
    r = subprocess.run([b.exe], input="\n".join(lines) + "\n", capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"capture harness failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    out: List[Tuple[int, List[CudaLaunch], List[int]]] = []
    cur: List[CudaLaunch] = []
    sets: List[int] = []
    for line in r.stdout.splitlines():
        f = line.split()
        if not f:
            continue
        if f[0] == "CALL":
            cur, sets = [], []
        elif f[0] == "MEMSET":
            sets.append(int(f[1]))
        elif f[0] == "LAUNCH":
            name = f[1]
            g = tuple(int(x) for x in f[2:5])
            bl = tuple(int(x) for x in f[5:8])
            sizes = b.params.get(name, [])
            args = []
            for hx, sz in zip(f[9:], sizes):
                v = int(hx, 16)
                if sz in (4, 8) and v >= 1 << (8 * sz - 1):  # signed
                    v -= 1 << (8 * sz)
                args.append(v)
            cur.append(CudaLaunch(name, g, bl, int(f[8]), args))  # type: ignore[arg-type]
        elif f[0] == "END":
            out.append((int(f[2]), cur, sets))
        elif f[0] == "UNKNOWN":
            raise RuntimeError(f"capture harness: unknown call {f[1]}")
    return out


def demangle_short(name: str) -> str:
    """``wattn_fwd_kernel<__nv_bfloat16, 32>``-style name (c++filt when available)."""
    filt = shutil.which("c++filt")
    if not filt:
        return name
    s = subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name
    if s.endswith(")"):  # drop the parameter list: the last top-level (...)
        depth = 0
        for i in range(len(s) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    s = re.sub(r"^void ", "", s)
    s = s.replace("(anonymous namespace)::", "")
    return re.sub(r"mixkernels::cuda::((wattn|tokens)::)?", "", s)
