"""Build mixkernels: the C++ CPU extension, and the CUDA extension when torch has CUDA.

Two ways to get the compiled extensions (README "Install"):
  pip install --no-build-isolation .   compile now, against the torch installed here
  pip install .                        (build isolation: no torch in the build environment) install the
                                       Python package and the sources; the extensions compile on first
                                       use against the torch that is imported, or ahead of time with
                                       `python -m mixkernels.build`
Knobs (environment):
  MIXKERNELS_CUDA_ARCHS     CUDA archs for _C_cuda, e.g. "90" or "80;90" (default: csrc/flags.txt)
  MIXKERNELS_SKIP_CUDA=1    never build _C_cuda
  MIXKERNELS_SKIP_CPU=1     build no extension at install time (pure Python package)
  MIXKERNELS_REQUIRE_BUILD=1  fail (with the fix) instead of installing without extensions
  MIXKERNELS_SANITIZE=1     CPU extension with ASan + UBSan (flags.txt `sanitize`; scripts/sanitize_cpu.sh)
  CUDA_HOME                 the CUDA toolkit (else found from nvcc / the usual folders)
  MAX_JOBS                  parallel compile jobs (ninja)
Compiler flags: csrc/flags.txt (shared with CMakeLists.txt and mixkernels.build).
"""
import importlib.util
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _load_buildcfg():
    # By path: importing the package would import torch, which an isolated build does not have.
    spec = importlib.util.spec_from_file_location("_mixkernels_buildcfg", os.path.join(ROOT, "mixkernels", "_buildcfg.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cfg = _load_buildcfg()
SRC = os.path.join(ROOT, "csrc")

_NO_TORCH = """
mixkernels: cannot compile the extensions: torch is not importable by the Python running setup.py
  ({why}).
  Fix, either:
    pip install torch            # (if it is not installed), then
    pip install --no-build-isolation .   # compile now against that torch
  or
    pip install .                # Python package + sources only; the extensions compile on first
                                 # use against the torch you import (python -m mixkernels.build
                                 # compiles them ahead of time)
"""


def _rel(paths):
    return [os.path.relpath(p, ROOT) for p in paths]


def _git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _import_torch():
    try:
        import torch

        return torch, None
    except Exception as e:  # ImportError, or a broken install
        return None, f"{type(e).__name__}: {e}"


def _nvcc_major(home):
    try:
        out = subprocess.check_output([os.path.join(home, "bin", "nvcc"), "--version"], text=True)
        return out.rsplit("release ", 1)[1].split(".")[0]
    except Exception:
        return None


def _cuda_extension(torch, flags, info):
    """The _C_cuda Extension, or None with info['cuda_skip_reason'] saying why."""
    if os.environ.get("MIXKERNELS_SKIP_CUDA") == "1":
        info["cuda_skip_reason"] = "MIXKERNELS_SKIP_CUDA=1"
        return None
    if torch.version.cuda is None:
        info["cuda_skip_reason"] = "torch was built without CUDA"
        return None
    tk = cfg.find_cuda_home()
    info["cuda_home"], info["cuda_home_how"] = tk.home, tk.how
    if tk.home is None:
        info["cuda_skip_reason"] = tk.how + "".join(f"; {d} ({how}): {why}" for d, how, why in tk.rejected)
        return None
    major = _nvcc_major(tk.home)
    if major is not None and major != torch.version.cuda.split(".")[0]:
        info["cuda_skip_reason"] = (f"nvcc in {tk.home} is CUDA {major}.x but torch was built with CUDA "
                                    f"{torch.version.cuda}: point CUDA_HOME at a {torch.version.cuda.split('.')[0]}.x toolkit")
        return None
    # torch.utils.cpp_extension reads CUDA_HOME when imported (and would take the folder above a
    # wrapper nvcc on PATH): set it first, and pin the module's copy in case it was imported already.
    os.environ["CUDA_HOME"] = tk.home
    import torch.utils.cpp_extension as cpp

    cpp.CUDA_HOME = tk.home
    archs = cfg.cuda_archs(flags)
    info.update(cuda_built=True, cuda_archs=";".join(archs))
    return cpp.CUDAExtension(
        "mixkernels._C_cuda",
        _rel(cfg.cuda_sources(SRC)),
        include_dirs=[os.path.join(SRC, "include")],
        extra_compile_args={"cxx": flags["cuda_cxx"], "nvcc": flags["nvcc"] + cfg.gencode(archs)},
    )


def _extensions():
    """(ext_modules, cmdclass, build info) for this environment."""
    info = {"built_at_install": False, "cuda_built": False, "cuda_archs": "", "cuda_skip_reason": ""}
    if os.environ.get("MIXKERNELS_SKIP_CPU") == "1":
        info["skip_reason"] = "MIXKERNELS_SKIP_CPU=1 at install time"
        return [], {}, info
    torch, why = _import_torch()
    if torch is None:
        explicit = any(a in ("build_ext", "develop") for a in sys.argv) or os.environ.get("MIXKERNELS_REQUIRE_BUILD") == "1"
        if explicit:
            sys.exit(_NO_TORCH.format(why=why))
        # pip's build isolation: install the package and its sources; the extensions compile on first use.
        print(_NO_TORCH.format(why=why).replace("cannot compile", "not compiling") +
              "  -> installing without compiled extensions (they compile on first use)\n", file=sys.stderr)
        info["skip_reason"] = "torch was not importable at install time (pip build isolation?): " + why
        return [], {}, info
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    flags = cfg.read_flags(SRC)
    cxx, ldflags = flags["cxx"], flags["ldflags"]
    if os.environ.get("MIXKERNELS_SANITIZE") == "1":  # ASan + UBSan, every UB report fatal (sanitize_cpu.sh)
        cxx = [f for f in cxx if not f.startswith("-O")] + ["-O1"] + flags["sanitize"]
        ldflags = ldflags + flags["sanitize"]
    exts = [CppExtension("mixkernels._C", _rel(cfg.cpu_sources(SRC)), include_dirs=[os.path.join(SRC, "include")],
                         extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)]
    info.update(built_at_install=True, torch_version=torch.__version__, torch_cuda=torch.version.cuda)
    cuda = _cuda_extension(torch, flags, info)
    if cuda is not None:
        exts.append(cuda)
    elif torch.version.cuda is not None:
        print(f"mixkernels: not building the CUDA extension: {info['cuda_skip_reason']}", file=sys.stderr)
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}, info


def _write_build_info(info):
    with open(os.path.join(ROOT, "mixkernels", "_build_info.py"), "w") as f:
        f.write("# Generated by setup.py at build time.\n")
        f.write(f"version = {VERSION!r}\ncommit = {_git_commit()!r}\n")
        for k, v in info.items():
            f.write(f"{k} = {v!r}\n")


ext_modules, cmdclass, build_info = _extensions()
_write_build_info(build_info)

_SOURCES = ["*.cpp", "flags.txt", "cpu/*.cpp", "cuda/*.cu", "cuda/*.cpp", "cuda/*.cuh", "include/mixkernels/*.h",
            "include/mixkernels/*.cuh"]

setup(
    name="mixkernels",
    version=VERSION,
    description="Fused kernels for masked-image-modeling pretraining of hierarchical ViTs (MixMIM, UM-MAE, Swin)",
    # The C++/CUDA sources ship as package data (mixkernels/_csrc) for the first-use build.
    packages=find_packages(include=["mixkernels", "mixkernels.*"]) + ["mixkernels._csrc"],
    package_dir={"mixkernels._csrc": "csrc"},
    package_data={"mixkernels._csrc": _SOURCES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    # ninja: torch.utils.cpp_extension.load needs it for the first-use build.
    install_requires=["numpy", "ninja"],
    extras_require={"triton": ["triton"], "timm": ["timm"], "bench": ["matplotlib", "tqdm"]},
)
