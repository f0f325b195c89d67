"""Compile the extensions against the torch that is imported: on first use, or ahead of time.

    python -m mixkernels.build              # CPU kernels, and CUDA kernels when torch has CUDA
    python -m mixkernels.build --no-cuda    # CPU kernels only
    python -m mixkernels.build --cuda --archs 90 --force --verbose

A package installed with ``pip install .`` (build isolation: no torch at install time) ships its
C++/CUDA sources; the first call that needs a compiled backend builds them here (or run this
module ahead of time, e.g. in a Dockerfile). ``pip install --no-build-isolation .`` builds them
at install time instead and nothing is compiled later.

Cache: ``$MIXKERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/mixkernels`` (``~/.cache/mixkernels``);
one folder per extension x torch version x CUDA version x Python x machine/GPU archs x source
hash, so a build never loads into another torch and a changed source compiles again. A file lock
per folder serializes concurrent first uses (one process compiles, the others wait and load).
``MIXKERNELS_JIT=0`` disables compiling on first use (``info`` then says how to build).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

from . import _buildcfg as cfg
from ._ext import NAMES, _plan, cache_root, cached, jit_enabled

# jit_enabled / cache_root / cached live in _ext (loading needs them without importing this module)
__all__ = ["BuildError", "jit_enabled", "cache_root", "cached", "build", "main"]

_THREAD_LOCK = threading.Lock()


class BuildError(RuntimeError):
    """An extension cannot be compiled here; the message names the fix."""


def _check_tools(kind: str) -> None:
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        raise BuildError("ninja is needed to compile the extensions: `pip install ninja`") from None
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler ({cxx!r} not on PATH): install g++ (e.g. `apt-get install g++`) or set CXX")


def _cuda_home() -> str:
    import torch
    from torch.utils import cpp_extension

    tk = cfg.find_cuda_home()
    if tk.home is None:
        raise BuildError(tk.how)
    major = torch.version.cuda.split(".")[0]
    nvcc_version = os.popen(f"'{os.path.join(tk.home, 'bin', 'nvcc')}' --version").read()
    if f"release {major}." not in nvcc_version:
        raise BuildError(f"the CUDA toolkit in {tk.home} is not CUDA {major}.x, which this torch was built with "
                         f"({torch.version.cuda}): set CUDA_HOME to a CUDA {major}.x toolkit")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported; a wrapper nvcc on PATH makes
    # it guess a folder without headers. Point both at the real toolkit.
    os.environ["CUDA_HOME"] = tk.home
    cpp_extension.CUDA_HOME = tk.home
    return tk.home


def build(kind: str, *, force: bool = False, verbose: bool = False, quiet: bool = False) -> str:
    """Compile (or find) the ``kind`` extension for the imported torch and load it; returns its path.
    Raises :class:`BuildError` with the fix when it cannot be built here."""
    import torch
    from filelock import FileLock  # a dependency of torch; released if the process dies
    from torch.utils import cpp_extension

    if kind == "cuda" and torch.version.cuda is None:
        raise BuildError("this torch was built without CUDA")
    folder, src, sources, flags, archs = _plan(kind)
    lib = os.path.join(folder, NAMES[kind] + ".so")
    os.makedirs(folder, exist_ok=True)
    with _THREAD_LOCK, FileLock(folder + ".lock"):
        if force or cached(kind) is None:
            _check_tools(kind)
            home = _cuda_home() if kind == "cuda" else None
            what = "CPU" if kind == "cpu" else f"CUDA (sm_{', sm_'.join(archs)}, toolkit {home})"
            if not quiet:
                print(f"mixkernels: compiling the {what} kernels for torch {torch.__version__} (once per torch version "
                      f"and source change; a few minutes) into {folder} ...", file=sys.stderr, flush=True)
            # A build killed mid-way leaves torch's own lock file behind and the next build would wait on
            # it forever; our file lock is held, so no other mixkernels build is using this folder.
            if os.path.exists(os.path.join(folder, "lock")):
                os.remove(os.path.join(folder, "lock"))
            t0 = time.time()
            kw = dict(name=NAMES[kind], sources=sources, extra_include_paths=[os.path.join(src, "include")],
                      build_directory=folder, verbose=verbose, is_python_module=False)
            if kind == "cpu":
                cpp_extension.load(extra_cflags=flags["cxx"], extra_ldflags=flags["ldflags"], **kw)
            else:
                cpp_extension.load(extra_cflags=flags["cuda_cxx"], extra_cuda_cflags=flags["nvcc"] + cfg.gencode(archs),
                                   with_cuda=True, **kw)
            with open(os.path.join(folder, "built.json"), "w") as f:
                json.dump({"torch": torch.__version__, "cuda": torch.version.cuda, "archs": archs,
                           "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
            if not quiet:
                print(f"mixkernels: {NAMES[kind]} built in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            return lib  # cpp_extension.load has loaded it
    torch.ops.load_library(lib)
    return lib


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixkernels.build", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--cuda", action="store_true", help="also build the CUDA kernels, failing if that is impossible")
    g.add_argument("--no-cuda", action="store_true", help="CPU kernels only")
    p.add_argument("--archs", default=None, help="CUDA archs, e.g. 90 or '80;90' (default: this machine's GPUs, "
                                                 "else csrc/flags.txt)")
    p.add_argument("--force", action="store_true", help="compile again even when a build is cached")
    p.add_argument("--verbose", action="store_true", help="show the compiler commands")
    a = p.parse_args(argv)
    if a.archs:
        os.environ["MIXKERNELS_CUDA_ARCHS"] = a.archs
    os.environ["MIXKERNELS_JIT"] = "0"  # the import below must not start a build of its own
    import torch

    from . import _ext

    kinds = ["cpu"]
    if a.cuda or (not a.no_cuda and torch.version.cuda is not None):
        kinds.append("cuda")
    rc = 0
    for kind in kinds:
        if _ext.loaded_from(kind) == "install" and not a.force:
            print(f"{NAMES[kind]}: already installed with the package (built at install time); nothing to do")
            continue
        try:
            path = build(kind, force=a.force, verbose=a.verbose)
            print(f"{NAMES[kind]}: {path}")
        except BuildError as e:
            print(f"{NAMES[kind]}: cannot build: {e}", file=sys.stderr)
            rc = 1 if (kind == "cpu" or a.cuda) else rc
        except Exception as e:  # a compiler error: its output is above
            print(f"{NAMES[kind]}: build failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1 if (kind == "cpu" or a.cuda) else rc
    print(f"cache: {cache_root()}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
