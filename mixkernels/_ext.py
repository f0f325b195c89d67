"""Loading of the compiled extensions, with the reason when one is missing.

Where the kernels come from, first hit wins:
  1. ``mixkernels._C`` / ``mixkernels._C_cuda`` built at install time
     (``pip install --no-build-isolation .``, or ``setup.py build_ext --inplace``);
  2. a build in the cache made by an earlier first use or ``python -m mixkernels.build``
     (keyed by torch version, CUDA version, arch and source hash: see ``mixkernels.build``);
  3. not built yet: the first call that needs the compiled backend compiles it (a message
     says so; a file lock makes concurrent first uses wait for one build), unless
     ``MIXKERNELS_JIT=0``. Until an extension exists, ``python -m mixkernels.info`` and a one-time
     warning say which backends run instead and how to build.
``import mixkernels`` never compiles and never fails because of an extension. ``cpu_error`` and
``cuda_error`` are ``None`` when loaded, else the reason; reading one while its extension is
still unbuilt is what triggers the first-use build.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import platform
import sys
import warnings
from typing import Dict, List, Optional

import torch

from . import _buildcfg

__all__ = ["cpu_error", "cuda_error", "has_kernel", "require", "build_info", "loaded_from", "build_report",
           "no_first_use_build"]

# ------------------------------------------------------------------------------ the first-use cache
NAMES = {"cpu": "_C", "cuda": "_C_cuda"}


def jit_enabled() -> bool:
    return os.environ.get("MIXKERNELS_JIT", "1") != "0"


def cache_root() -> str:
    if os.environ.get("MIXKERNELS_CACHE_DIR"):
        return os.path.abspath(os.environ["MIXKERNELS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mixkernels")


def _archs(flags) -> List[str]:
    if os.environ.get("MIXKERNELS_CUDA_ARCHS"):
        return _buildcfg.cuda_archs(flags)
    if torch.cuda.is_available():  # just this machine's GPUs: half the compile time of two archs
        return sorted({f"{p.major}{p.minor}" for p in map(torch.cuda.get_device_properties, range(torch.cuda.device_count()))})
    return _buildcfg.cuda_archs(flags)


def _plan(kind: str):
    """(cache folder, source root, sources, flags, archs) of the ``kind`` ("cpu" | "cuda") build for
    this torch: the folder name carries torch and CUDA versions, Python, machine/archs and a hash of
    every source, header and the flags file."""
    src = _buildcfg.source_root()
    if src is None:
        raise _build_error("the C++/CUDA sources are not installed (mixkernels/_csrc missing); reinstall "
                           "mixkernels from a source checkout or sdist")
    flags = _buildcfg.read_flags(src)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    if kind == "cpu":
        archs: List[str] = []
        extra = " ".join(flags["cxx"] + flags["ldflags"])
        tag = platform.machine()
        sources = _buildcfg.cpu_sources(src)
    else:
        archs = _archs(flags)
        extra = " ".join(flags["nvcc"] + flags["cuda_cxx"] + archs)
        tag = f"cu{torch.version.cuda}-sm{'_'.join(archs)}"
        sources = _buildcfg.cuda_sources(src)
    h = _buildcfg.sources_hash(src, extra + torch.__version__)
    folder = os.path.join(cache_root(), f"{NAMES[kind]}-torch{torch.__version__.replace('+', '_')}-{py}-{tag}-{h}")
    return folder, src, sources, flags, archs


def cached(kind: str) -> Optional[str]:
    """Path of an already built ``kind`` extension for this torch and these sources, or None."""
    try:
        folder = _plan(kind)[0]
    except Exception:
        return None
    lib = os.path.join(folder, NAMES[kind] + ".so")
    return lib if os.path.isfile(lib) and os.path.isfile(os.path.join(folder, "built.json")) else None


def _build_error(msg: str) -> Exception:
    from .build import BuildError

    return BuildError(msg)


_HOW = "run `python -m mixkernels.build` (or `pip install --no-build-isolation .` in a source checkout)"
_errors: Dict[str, Optional[str]] = {}  # kind -> None (loaded) or the reason; absent = not built yet
_source: Dict[str, str] = {}  # kind -> "install" | "cache:<path>" | "first use:<path>"
_install_error: Dict[str, str] = {}
_warned: set = set()
_quiet = 0  # > 0 inside no_first_use_build()


def _load_installed(kind: str) -> bool:
    name = "_C" if kind == "cpu" else "_C_cuda"
    try:
        importlib.import_module(f"mixkernels.{name}")
        _errors[kind], _source[kind] = None, "install"
        return True
    except Exception as e:  # not built, or built against another torch (undefined symbols)
        if not (isinstance(e, ModuleNotFoundError) and e.name == f"mixkernels.{name}"):
            _install_error[kind] = f"mixkernels.{name} failed to load ({type(e).__name__}: {e})"
        return False


def _load_cached(kind: str) -> bool:
    path = cached(kind)
    if path is None:
        return False
    try:
        torch.ops.load_library(path)
        _errors[kind], _source[kind] = None, f"cache:{path}"
        return True
    except Exception as e:
        _install_error[kind] = f"cached build {path} failed to load ({type(e).__name__}: {e})"
        return False


def _cuda_precondition() -> Optional[str]:
    if torch.version.cuda is None:
        return "this torch was built without CUDA"
    err = _state("cpu")
    return None if err is None else "needs mixkernels._C, which is not loaded"


def _pending_reason(kind: str) -> str:
    what = "CPU" if kind == "cpu" else "CUDA"
    prior = f" ({_install_error[kind]})" if kind in _install_error else ""
    if os.environ.get("MIXKERNELS_JIT", "1") == "0":
        return f"the compiled {what} kernels are not built{prior}; MIXKERNELS_JIT=0 disables compiling them on first use: {_HOW}"
    return f"the compiled {what} kernels are not built yet{prior}; the first call that needs them compiles them, or {_HOW}"


def _fallback_warning(kind: str, reason: str) -> None:
    if kind in _warned or _quiet:
        return
    _warned.add(kind)
    instead = "the pure-PyTorch reference backend (slow)" if kind == "cpu" else "Triton (or the reference) instead"
    warnings.warn(f"mixkernels: {reason}. {'CPU' if kind == 'cpu' else 'CUDA'} tensors run {instead}.",
                  RuntimeWarning, stacklevel=4)


def _state(kind: str) -> Optional[str]:
    """None when the ``kind`` extension is loaded, else the reason; builds it on first use if allowed."""
    if kind in _errors:
        return _errors[kind]
    if kind == "cuda":
        pre = _cuda_precondition()
        if pre is not None:
            if _quiet:
                return pre
            _errors[kind] = pre
            return pre
    if _quiet or torch.compiler.is_compiling() or os.environ.get("MIXKERNELS_JIT", "1") == "0":
        reason = _pending_reason(kind)
        if not _quiet and not torch.compiler.is_compiling():
            _errors[kind] = reason
            _fallback_warning(kind, reason)
        return reason
    from . import build

    try:
        path = build.build(kind)
        _errors[kind], _source[kind] = None, f"first use:{path}"
    except Exception as e:
        reason = f"the first-use build of the compiled {'CPU' if kind == 'cpu' else 'CUDA'} kernels failed " \
                 f"({type(e).__name__}: {e}); {_HOW} to see why"
        _errors[kind] = reason
        _fallback_warning(kind, reason)
    _KERNELS.clear()
    return _errors[kind]


def _init() -> None:
    if not (_load_installed("cpu") or _load_cached("cpu")):
        return  # both wait for a first use (the CUDA extension needs the CPU one's schemas)
    if torch.version.cuda is None:
        _errors["cuda"] = "this torch was built without CUDA"
    else:
        _load_installed("cuda") or _load_cached("cuda")


_init()


def __getattr__(name: str):  # PEP 562: cpu_error / cuda_error resolve (and build) on first read
    if name == "cpu_error":
        return _state("cpu")
    if name == "cuda_error":
        return _state("cuda")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextlib.contextmanager
def no_first_use_build():
    """Report extension states without compiling anything (``info`` uses it)."""
    global _quiet
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1


_KERNELS: Dict[tuple, bool] = {}


@torch.compiler.assume_constant_result  # Dynamo cannot trace the dispatcher query; it is fixed per process
def has_kernel(name: str, key: str) -> bool:
    """Whether ``mixkernels_C::name`` has a kernel for dispatch key ``"CPU"`` or ``"CUDA"``."""
    hit = _KERNELS.get((name, key))
    if hit is None:
        hit = _state("cpu") is None and torch._C._dispatch_has_kernel_for_dispatch_key(f"mixkernels_C::{name}", key)
        _KERNELS[(name, key)] = hit
    return hit


def require(name: str):
    """The compiled kernel-level op, or an error saying how to get it."""
    err = _state("cpu")
    if err is not None:
        raise RuntimeError(f"compiled kernel mixkernels_C::{name} unavailable: {err}")
    return getattr(torch.ops.mixkernels_C, name)


def loaded_from(kind: str) -> Optional[str]:
    """"install", "cache" or "first use" when the ``kind`` extension is loaded, else None (never builds)."""
    src = _source.get(kind)
    return src.split(":", 1)[0] if src else None


def build_info() -> Dict[str, object]:
    try:
        from . import _build_info as b

        return {k: getattr(b, k) for k in dir(b) if not k.startswith("_")}
    except ImportError:
        return {}


def build_report() -> List[str]:
    """The build section of ``python -m mixkernels.info`` (never compiles)."""
    out = []
    info = build_info()
    if info.get("built_at_install") or info.get("torch_version"):
        out.append(f"built at install with torch {info.get('torch_version')} at commit {info.get('commit')}"
                   + (f", CUDA archs {info.get('cuda_archs')}" if info.get("cuda_built") else
                      f"; CUDA extension not built: {info.get('cuda_skip_reason') or 'unknown'}"))
    elif info.get("skip_reason"):
        out.append(f"no extension built at install ({info['skip_reason']})")
    tk = _buildcfg.find_cuda_home()
    if info.get("cuda_home"):
        out.append(f"CUDA toolkit: {info['cuda_home']} (at build time: {info.get('cuda_home_how')})")
    elif tk.home:
        out.append(f"CUDA toolkit: {tk.home} ({tk.how})")
    else:
        out.append(f"CUDA toolkit: none ({tk.how})")
    with no_first_use_build():
        for kind, label in (("cpu", "mixkernels._C (CPU kernels)"), ("cuda", "mixkernels._C_cuda (CUDA kernels)")):
            err = _state(kind)
            src = _source.get(kind, "")
            where = {"install": "built at install", "cache": "first-use build in the cache",
                     "first use": "compiled on first use in this process"}.get(src.split(":", 1)[0], "")
            path = f", {src.split(':', 1)[1]}" if ":" in src else ""
            out.append(f"{label}: " + (f"loaded ({where}{path})" if err is None else err))
    out.append(f"first-use compilation: {'on' if jit_enabled() else 'off (MIXKERNELS_JIT=0)'}; cache {cache_root()}")
    return out

