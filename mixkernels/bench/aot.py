"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets without a GPU.

Used by ``tests/test_triton_aot.py`` (does every kernel compile for sm_80/sm_90?) and by the
static performance report (``python -m mixkernels.bench --static``: registers, spills, SASS).

1. :func:`capture` runs code that calls our Triton launchers on CPU tensors with ``JITFunction.run``
   replaced by a recorder: nothing launches, every ``kernel[grid](...)`` becomes a :class:`Launch`
   (kernel, arguments, grid). Call the launchers at REAL geometry (batch 128, 56x56 tokens):
   Triton specializes on argument values (an int equal to 1 becomes a constant, ints divisible by
   16 get a hint), so a small test shape compiles different code (a window-7 backward with
   ``B*nW = 1`` uses 157 registers; at batch 128 it uses 255 and spills). Large inputs cost
   nothing: ``torch.empty`` on CPU maps untouched pages, and CPU allocations are 64-byte aligned,
   so pointers get the same divisibility-16 hint as CUDA ones.
   With ``gpu_like=True`` (default) tensors report ``is_cuda`` and ``torch.cuda.device`` is a
   no-op, so launchers take their GPU branches (e.g. how many image chunks a reduction splits into).
2. :func:`specialize` derives (signature, constexprs, attributes, options) exactly as a GPU launch
   would (Triton's own binder; a manual derivation with the same rules as fallback).
3. :func:`compile_launch` compiles one specialization for ``sm_<cc>`` and returns the cubin, shared
   memory and ptxas's ``-v`` log; results are cached on disk by kernel source hash + specialization.

The process must not run with ``TRITON_INTERPRET=1`` (kernels are specialized for the interpreter
at definition time): use :func:`clean_env` to start a worker.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["Launch", "Compiled", "capture", "specialize", "compile_launch", "compile_many", "clean_env",
           "tool", "ptxas_stats", "resource_usage", "default_cache_dir", "SMEM_LIMIT"]

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (A100, H100/H200)


@dataclass
class Launch:
    """One captured ``kernel[grid](*args, **kwargs)``."""

    fn: Any  # triton JITFunction
    args: tuple
    kwargs: dict
    grid: Tuple[int, ...]
    tag: Any = None  # set by the caller of capture() (which config/shape launched it)
    keys: Dict[int, str] = field(default_factory=dict)  # spec_key per arch, memoized

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    @property
    def module(self) -> str:
        return self.fn.fn.__module__.rsplit(".", 1)[-1]

    def named_args(self) -> Dict[str, Any]:
        """Every argument by parameter name (positional, keyword, defaults); launch options excluded."""
        import inspect

        kw = {k: v for k, v in self.kwargs.items() if k in self.fn.arg_names}
        bound = inspect.signature(self.fn.fn).bind(*self.args, **kw)
        bound.apply_defaults()
        return dict(bound.arguments)

    @property
    def num_warps(self) -> int:
        return int(self.kwargs.get("num_warps", 4))

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n


def clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for an AOT worker subprocess: no interpreter, this checkout first on the path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


@contextlib.contextmanager
def _gpu_like():
    import torch

    had = "is_cuda" in torch.Tensor.__dict__
    old_cuda_device = torch.cuda.device
    torch.Tensor.is_cuda = property(lambda self: True)  # launchers take their CUDA branches
    torch.cuda.device = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    try:
        yield
    finally:
        if not had:
            del torch.Tensor.is_cuda
        torch.cuda.device = old_cuda_device


def _shrink(v):
    """A 64-element stand-in for a (large) tensor argument with the same dtype and the same pointer
    alignment mod 16, which is all the specialization reads: captured launches then hold no real-size
    buffers (they would make the compile workers' fork fail for lack of commit memory)."""
    import torch

    if not isinstance(v, torch.Tensor) or v.numel() <= 64:
        return v
    es = v.element_size()
    mis = v.data_ptr() % 16
    base = torch.empty(64 + 16 // es, dtype=v.dtype)
    k = ((mis - base.data_ptr() % 16) % 16) // es if mis % es == 0 else 0
    return base[k:k + 64]


# aten ops that overwrite their first argument without reading it (its bytes count as written only)
_WRITE_ONLY_SELF = frozenset("zero_ fill_ copy_ normal_ uniform_ random_ bernoulli_ exponential_".split())
# aten ops that move no device memory (views, allocation, metadata, host scalars)
_NO_TRAFFIC = frozenset("""view _unsafe_view as_strided expand permute t transpose reshape select slice unsqueeze
    squeeze alias detach empty empty_strided empty_like new_empty new_empty_strided lift_fresh _reshape_alias unbind
    split split_with_sizes chunk narrow diagonal unfold view_as _local_scalar_dense item sym_size sym_stride
    sym_numel sym_storage_offset size stride dim numel is_same_size is_nonzero scalar_tensor""".split())


def _torch_ops(ops: List[Dict[str, Any]]):
    """A dispatch mode appending each aten op that moves device memory to ``ops``: {op, read_bytes,
    write_bytes}, the whole of every tensor argument read (an upper bound for gathers) and every
    tensor result written; an ``out=`` buffer and the destination of a write-only in-place op
    (``zero_``, ``fill_``, ``copy_``) are written, not read. The launcher's own torch work (tables,
    masks, memsets), which the static report prices as separate memory-bound launches."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def nbytes(xs):
        return sum(x.numel() * x.element_size() for x in xs if isinstance(x, torch.Tensor))

    class Rec(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func.overloadpacket.__name__
            if name not in _NO_TRAFFIC:
                outs = out if isinstance(out, (tuple, list)) else (out,)
                ins = list((*args[1 if name in _WRITE_ONLY_SELF else 0:],
                            *(v for k, v in kwargs.items() if k != "out")))
                ins += [x for a in ins if isinstance(a, (tuple, list)) for x in a]  # cat, stack, index
                w = nbytes(outs)
                ops.append(dict(op=name, read_bytes=nbytes(ins), write_bytes=w))
            return out

    return Rec()


def capture(call: Callable[[], Any], tag: Any = None, gpu_like: bool = True,
            torch_ops: Optional[List[Dict[str, Any]]] = None) -> List[Launch]:
    """Run ``call()`` with every Triton launch recorded instead of executed; returns the launches.
    ``torch_ops``: a list that receives the aten ops ``call()`` runs that move memory (see :func:`_torch_ops`)."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "AOT capture must run without TRITON_INTERPRET"
    from triton.runtime.jit import JITFunction

    launches: List[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        g = grid(dict(zip(self.arg_names, args), **kwargs)) if callable(grid) else grid
        g = tuple(int(x) for x in (g if isinstance(g, (tuple, list)) else (g,)))
        launches.append(Launch(self, tuple(_shrink(a) for a in args),
                               {k: _shrink(v) for k, v in kwargs.items()}, g, tag))
        return None

    old = JITFunction.run
    JITFunction.run = record
    try:
        with (_gpu_like() if gpu_like else contextlib.nullcontext()), \
                (_torch_ops(torch_ops) if torch_ops is not None else contextlib.nullcontext()):
            call()
    finally:
        JITFunction.run = old
    return launches


# ----------------------------------------------------------------------------- specialization

_PTR = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32",
        "int64": "i64", "uint8": "u8", "int8": "i8", "int16": "i16", "bool": "i1"}


def _manual_spec(fn, args, kwargs):
    """Triton's launch specialization by hand (fallback when the binder API differs)."""
    import inspect

    import torch

    bound = inspect.signature(fn.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    sig, const, attrs = {}, {}, {}
    for i, (name, v) in enumerate(bound.arguments.items()):
        if i in fn.constexprs or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], const[(i,)] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _PTR[str(v.dtype).split(".")[-1]]
            attrs[(i,)] = [["tt.divisibility", 16]] if v.data_ptr() % 16 == 0 else []
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else ("i64" if -2**63 <= v < 2**63 else "u64")
            attrs[(i,)] = [["tt.divisibility", 16]] if v % 16 == 0 else []
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.fn.__name__}: cannot specialize {name}={v!r}")
    opts = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    return sig, const, attrs, opts


def specialize(fn, args, kwargs, cc: int = 90):
    """(signature, constexprs, attrs, options dict) exactly as ``JITFunction.run`` would build them."""
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cc, 32)
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        backend = make_backend(target)
        kw = dict(kwargs)
        kw.setdefault("debug", False)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, spec, opts = binder(*args, **kw)
        options, sig, const, attrs = fn._pack_args(backend, kw, bound, spec, opts)
        return sig, const, attrs, {k: getattr(options, k) for k in ("num_warps", "num_stages", "num_ctas")}
    except (ImportError, AttributeError, TypeError):
        return _manual_spec(fn, args, kwargs)


def spec_key(launch: Launch, cc: int = 90) -> str:
    """A string identifying the compiled code of a launch (kernel source hash + specialization)."""
    import triton

    if cc in launch.keys:
        return launch.keys[cc]
    sig, const, attrs, opts = specialize(launch.fn, launch.args, launch.kwargs, cc)
    blob = json.dumps([launch.fn.cache_key, str(sig), str(sorted(const.items())), str(sorted(attrs.items())),
                       str(sorted(opts.items())), cc, triton.__version__], default=str)
    launch.keys[cc] = hashlib.sha256(blob.encode()).hexdigest()[:24]
    return launch.keys[cc]


def named_consts(fn, const) -> Dict[str, Any]:
    names = fn.arg_names
    return {names[p[0]]: v for p, v in sorted(const.items()) if len(p) == 1}


# ----------------------------------------------------------------------------- compiling


@dataclass
class Compiled:
    kernel: str
    module: str
    cc: int
    key: str
    spec: str = ""
    error: Optional[str] = None
    shared: int = 0
    num_warps: int = 0
    seconds: float = 0.0
    cached: bool = False
    ptxas_log: str = ""
    cubin_path: Optional[str] = None  # in the cache directory
    extra: Dict[str, Any] = field(default_factory=dict)

    def cubin(self) -> bytes:
        with open(self.cubin_path, "rb") as f:
            return f.read()


def default_cache_dir() -> str:
    return os.environ.get("MIXKERNELS_AOT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mixkernels", "aot")


def compile_launch(launch: Launch, cc: int = 90, cache_dir: Optional[str] = None) -> Compiled:
    """Compile one launch for ``sm_<cc>`` (or load it from ``cache_dir``; None: no cache)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.fn
    t0 = time.time()
    res = Compiled(kernel=launch.name, module=launch.module, cc=cc, key="")
    try:
        sig, const, attrs, opts = specialize(fn, launch.args, launch.kwargs, cc)
        res.key = spec_key(launch, cc)
        consts = {k: v for k, v in named_consts(fn, const).items() if k.isupper()}
        res.spec = ", ".join(f"{k}={v}" for k, v in consts.items()) + \
            f", ptrs={sorted({v for v in sig.values() if str(v).startswith('*')})}, warps={opts.get('num_warps')}"
        entry = os.path.join(cache_dir, f"{launch.name}-{res.key}") if cache_dir else None
        if entry and os.path.exists(entry + ".json") and os.path.exists(entry + ".cubin"):
            with open(entry + ".json") as f:
                meta = json.load(f)
            res.shared, res.num_warps, res.ptxas_log = meta["shared"], meta["num_warps"], meta["ptxas_log"]
            res.cubin_path, res.cached = entry + ".cubin", True
            return res
        log = io.StringIO()
        with tempfile.TemporaryDirectory() as tcache, _ptxas_log_to(log), _env(TRITON_CACHE_DIR=tcache):
            # a fresh Triton cache: really compile, so that ptxas runs and prints its -v log
            k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", cc, 32), options=opts)
        res.shared = int(k.metadata.shared)
        res.num_warps = int(k.metadata.num_warps)
        res.ptxas_log = log.getvalue()[-20000:]
        cubin = k.asm["cubin"]
        if entry:
            os.makedirs(cache_dir, exist_ok=True)
            with open(entry + ".cubin.tmp", "wb") as f:
                f.write(cubin)
            os.replace(entry + ".cubin.tmp", entry + ".cubin")
            with open(entry + ".json.tmp", "w") as f:
                json.dump(dict(shared=res.shared, num_warps=res.num_warps, ptxas_log=res.ptxas_log,
                               kernel=launch.name, spec=res.spec, triton=triton.__version__), f)
            os.replace(entry + ".json.tmp", entry + ".json")
            res.cubin_path = entry + ".cubin"
        else:
            fd, path = tempfile.mkstemp(suffix=".cubin")
            with os.fdopen(fd, "wb") as f:
                f.write(cubin)
            res.cubin_path = path
    except Exception:  # noqa: BLE001 - reported with the specialization that failed
        res.error = traceback.format_exc(limit=3)[-6000:]
    finally:
        res.seconds = round(time.time() - t0, 2)
    return res


@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _ptxas_log_to(buf):
    """Triton prints ptxas's ``-v`` log when ``dump_ptxas_log`` is on (Triton >= 3.4); catch it."""
    try:
        from triton import knobs

        old = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
    except (ImportError, AttributeError):
        knobs, old = None, None
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        if knobs is not None:
            knobs.nvidia.dump_ptxas_log = old


_ITEMS: List[Tuple[Launch, int, Optional[str]]] = []  # set before forking the compile workers


def _compile_index(i: int) -> Compiled:
    launch, cc, cache = _ITEMS[i]
    return compile_launch(launch, cc, cache)


def compile_many(items: List[Tuple[Launch, int]], cache_dir: Optional[str] = None, jobs: Optional[int] = None,
                 progress: Optional[Callable[[Compiled], None]] = None) -> List[Compiled]:
    """Compile (launch, cc) pairs with ``jobs`` forked processes (default: MIXKERNELS_AOT_JOBS or 2)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = int(jobs or os.environ.get("MIXKERNELS_AOT_JOBS", min(2, os.cpu_count() or 1)))
    out: List[Compiled] = []
    if jobs <= 1 or len(items) <= 1:
        for launch, cc in items:
            out.append(compile_launch(launch, cc, cache_dir))
            if progress:
                progress(out[-1])
        return out
    _ITEMS[:] = [(launch, cc, cache_dir) for launch, cc in items]
    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:  # children inherit _ITEMS
        for r in ex.map(_compile_index, range(len(items))):
            out.append(r)
            if progress:
                progress(r)
    _ITEMS.clear()
    return out


# ----------------------------------------------------------------------------- tools + parsing


def tool(name: str) -> str:
    """Path of ``ptxas``/``cuobjdump``/``nvdisasm``: the copies in the Triton wheel, else the CUDA toolkit."""
    if name == "ptxas":
        try:  # the ptxas Triton itself uses for sm_90 (3.9: ptxas-blackwell, CUDA 13.x)
            from triton.backends.nvidia.compiler import get_ptxas

            return get_ptxas(90).path
        except (ImportError, TypeError, AttributeError):
            pass
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    from .static_cuda import cuda_home  # the real toolkit (the nvcc on PATH may be a wrapper)

    home = cuda_home()
    if home and os.path.exists(os.path.join(home, "bin", name)):
        return os.path.join(home, "bin", name)
    raise FileNotFoundError(f"{name} not found (Triton wheel or CUDA toolkit)")


def ptxas_stats(log: str, function: Optional[str] = None) -> Dict[str, int]:
    """Registers / spill stores / spill loads / stack / static shared memory (``smem``: arrays a kernel
    declares itself, e.g. in inline asm; Triton's own buffers are dynamic) from a ``ptxas -v`` log (-1
    where absent).

    ``function``: the (mangled) name whose block to read when the log covers several functions.
    """
    if function:
        m = re.search(r"Compiling entry function '" + re.escape(function) + r"'(.*?)(?=Compiling entry function|\Z)",
                      log, re.S)
        log = m.group(1) if m else ""
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else -1  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_st=num(r"(\d+) bytes spill stores"),
                spill_ld=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"),
                smem=num(r"(\d+) bytes smem"))


def resource_usage(cubin_path: str) -> Dict[str, Dict[str, int]]:
    """``cuobjdump --dump-resource-usage``: per function REG, STACK, SHARED (static), LOCAL."""
    r = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", cubin_path], capture_output=True, text=True)
    out: Dict[str, Dict[str, int]] = {}
    cur = None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        if cur is not None:
            for k, v in re.findall(r"(\w+):(\d+)", line):
                cur[k] = int(v)
    return out


