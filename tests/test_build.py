"""Build plumbing: the CUDA toolkit finder, the shared flags file, setup.py without torch, and the
first-use build's cache, lock and messages (the compiler itself is faked: CI's install-path step
compiles for real)."""
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest

from mixkernels import _buildcfg as cfg
from mixkernels import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toolkit(path):
    os.makedirs(os.path.join(path, "include"))
    os.makedirs(os.path.join(path, "bin"))
    open(os.path.join(path, "include", "cuda_runtime.h"), "w").close()
    _script(os.path.join(path, "bin", "nvcc"), "echo 'Cuda compilation tools, release 13.0, V13.0.0'")


def _script(path, body):
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def test_cuda_home_follows_a_wrapper_nvcc(tmp_path, monkeypatch):
    real = tmp_path / "opt" / "cuda-13.0"
    _toolkit(str(real))
    wrap = tmp_path / "wrap" / "bin"
    wrap.mkdir(parents=True)
    _script(str(wrap / "nvcc"), f'exec {real}/bin/nvcc "$@"')
    monkeypatch.setenv("PATH", f"{wrap}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_HOME", str(wrap.parent))  # what torch would guess: no headers there
    monkeypatch.delenv("CUDA_PATH", raising=False)
    tk = cfg.find_cuda_home()
    assert tk.home == str(real) and "wrapper" in tk.how
    assert (str(wrap.parent), "$CUDA_HOME", "no include/cuda_runtime.h") in tk.rejected
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert cfg.find_cuda_home() == (str(real), "$CUDA_HOME", ())


def test_flags_file_is_the_one_definition(monkeypatch):
    flags = cfg.read_flags(os.path.join(ROOT, "csrc"))
    assert {"cxx", "ldflags", "cuda_cxx", "nvcc", "cuda_archs", "nvcc_ci"} <= set(flags)
    monkeypatch.delenv("MIXKERNELS_CUDA_ARCHS", raising=False)
    assert cfg.cuda_archs(flags) == flags["cuda_archs"]
    monkeypatch.setenv("MIXKERNELS_CUDA_ARCHS", "8.0;90")
    assert cfg.cuda_archs(flags) == ["80", "90"]
    assert cfg.gencode(["90"]) == ["-gencode", "arch=compute_90,code=sm_90"]
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        cmake = f.read()
    assert "mk_flags(nvcc MK_NVCC_FLAGS)" in cmake and "--expt-relaxed-constexpr" not in cmake


def test_setup_py_without_torch_names_the_fix(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # an environment without torch
        sys.argv = ["setup.py", "build_ext"]
        __file__ = {os.path.join(ROOT, 'setup.py')!r}
        exec(compile(open(__file__).read(), __file__, "exec"))
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "pip install --no-build-isolation ." in r.stderr and "first" in r.stderr


def test_pending_reason_says_how_to_build(monkeypatch):
    monkeypatch.setenv("MIXKERNELS_JIT", "0")
    assert "MIXKERNELS_JIT=0" in _ext._pending_reason("cpu") and "python -m mixkernels.build" in _ext._pending_reason("cpu")
    monkeypatch.setenv("MIXKERNELS_JIT", "1")
    assert "first call that needs them compiles them" in _ext._pending_reason("cuda")
    assert any(line.startswith("first-use compilation: on") for line in _ext.build_report())


_RACER = """
import os, shutil, sys, time
import torch.utils.cpp_extension as cpp
from mixkernels import build
log, lib = sys.argv[1], sys.argv[2]

def fake_load(name, sources, build_directory, **kw):  # the compiler: slow, and it must run once
    with open(log, "a") as f:
        f.write(f"compile {os.getpid()}\\n")
    time.sleep(2)
    shutil.copy(lib, os.path.join(build_directory, name + ".so"))

cpp.load = fake_load
build._check_tools = lambda kind: None
print(build.build("cpu", quiet=True))
"""


def test_concurrent_first_uses_compile_once(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    lib = tmp_path / "empty.so"  # a loadable library standing in for _C
    (tmp_path / "empty.c").write_text("int mixkernels_test_symbol;\n")
    subprocess.run([cc, "-shared", "-fPIC", str(tmp_path / "empty.c"), "-o", str(lib)], check=True)
    cache = tmp_path / "cache"
    env = dict(os.environ, MIXKERNELS_CACHE_DIR=str(cache), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(log), str(lib)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert log.read_text().count("compile") == 1  # one build, the others waited on the lock and loaded it
    paths = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(paths) == 1 and paths.pop().startswith(str(cache))
    folder = next(p for p in cache.iterdir() if p.is_dir())
    assert folder.name.startswith("_C-torch") and (folder / "built.json").is_file()
