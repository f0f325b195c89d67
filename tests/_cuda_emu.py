"""Build and call the CUDA kernels of csrc/cuda on the CPU through the SIMT emulator (tests/cuda_emu).

The kernel sources are compiled unchanged by g++ with ``MIXKERNELS_SIMT_EMU``: every CUDA thread is
a green thread, warp collectives (shuffles, mma.sync, ldmatrix) are resolved by the emulator from
the PTX ISA definitions, cp.async lands only at its wait, and threads run in a shuffled order
between synchronization points. Tensors are CPU tensors standing in for device memory. The library
is built once per source hash under ``build/cuda_emu`` (about a minute on two cores at the default
-O0; ``MIXKERNELS_EMU_OPT=-O1`` compiles 4x slower and runs faster).
"""
from __future__ import annotations

import ctypes
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
# Every kernel file (torch-free, csrc/cuda/*.cu: the forward's per-(dtype, head_dim) instance files too) and
# the emulator's runtime.
SOURCES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) + [
    "tests/cuda_emu/emu_runtime.cpp",
    "tests/cuda_emu/emu_api.cpp",
]
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_include() -> Optional[str]:
    """The CUDA toolkit's include folder (headers only: cuda_runtime.h, cuda_bf16.h), or None."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    cands += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in cands:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime.h")):
            return os.path.join(c, "include")
    return None


def _deps():
    files = [os.path.join(ROOT, s) for s in SOURCES]
    files += glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cuh")) + glob.glob(os.path.join(ROOT, "csrc", "include", "mixkernels", "*"))
    files += glob.glob(os.path.join(EMU, "*.h"))
    return sorted(files)


_LIB = None


def library() -> ctypes.CDLL:
    """The emulator library (built on first use). Raises RuntimeError if it cannot be built."""
    global _LIB
    if _LIB is not None:
        return _LIB
    inc = cuda_include()
    cxx = shutil.which("g++")
    if inc is None or cxx is None:
        raise RuntimeError("needs g++ and the CUDA headers (cuda_runtime.h)")
    flags = [os.environ.get("MIXKERNELS_EMU_OPT", "-O0"), "-g0", "-std=c++20", "-fPIC", "-fno-strict-aliasing", "-DMIXKERNELS_SIMT_EMU",
             "-include", os.path.join(EMU, "simt_emu.h"), "-I", EMU, "-I", os.path.join(ROOT, "csrc", "include"),
             "-I", os.path.join(ROOT, "csrc", "cuda"), "-isystem", inc, "-Wno-attributes"]
    h = hashlib.sha256(" ".join(flags).encode())
    for f in _deps():
        h.update(f.encode())
        with open(f, "rb") as fh:
            h.update(fh.read())
    bdir = os.path.join(ROOT, "build", "cuda_emu", h.hexdigest()[:16])
    lib = os.path.join(bdir, "libmk_emu.so")
    os.makedirs(bdir, exist_ok=True)
    # One builder per folder: pytest-xdist workers that need the library together wait for the first.
    with open(os.path.join(bdir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(lib):
            _build(cxx, flags, bdir, lib)
    _LIB = ctypes.CDLL(lib)
    return _LIB


def _build(cxx, flags, bdir, lib):
    """Compile SOURCES into bdir (MAX_JOBS at a time) and link lib."""
    def one(src):
        obj = os.path.join(bdir, os.path.basename(src) + ".o")
        lang = ["-x", "c++"] if src.endswith(".cu") else []
        r = subprocess.run(["nice", "-n", "10", cxx, *flags, *lang, "-c", os.path.join(ROOT, src), "-o", obj],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator build failed on {src}:\n{r.stderr[-8000:]}")
        return obj

    with ThreadPoolExecutor(int(os.environ.get("MAX_JOBS", "2"))) as ex:
        objs = list(ex.map(one, SOURCES))
    r = subprocess.run([cxx, "-shared", "-o", lib + ".tmp", *objs], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulator link failed:\n{r.stderr[-4000:]}")
    os.replace(lib + ".tmp", lib)


def unavailable() -> Optional[str]:
    """Why the emulator cannot be built here (None when it can): the tests skip with this reason."""
    try:
        library()
        return None
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"CUDA emulator unavailable: {e}"


class EmuWattn(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("B", "H", "W", "nH", "d", "wh", "ww", "sh", "sw", "rh", "rw", "dtype")] + [
        ("scale", ctypes.c_float), ("qkv", ctypes.c_void_p), ("rpb", ctypes.c_void_p), ("attn_bias", ctypes.c_void_p),
        ("group", ctypes.c_void_p), ("coords", ctypes.c_void_p), ("group_batch", ctypes.c_int32),
        ("coords_batch", ctypes.c_int32), ("group_int64", ctypes.c_int32), ("coords_int64", ctypes.c_int32),
        ("logit_scale", ctypes.c_void_p)]


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _aligned_empty(shape, dtype, fill=float("nan")) -> torch.Tensor:
    """A 16-byte aligned CPU tensor filled with `fill` (poison: unwritten elements show up)."""
    n = 1
    for s in shape:
        n *= s
    es = torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(n + 16, dtype=dtype)
    off = (-raw.data_ptr() % 16) // es
    t = raw[off: off + n].view(shape)
    if dtype.is_floating_point:
        t.fill_(fill)
    else:
        t.fill_(-1)
    return t


def _aligned(t: torch.Tensor) -> torch.Tensor:
    out = _aligned_empty(t.shape, t.dtype)
    out.copy_(t)
    return out


class Call:
    """One window-attention call's arguments, kept alive for the C side."""

    def __init__(self, qkv, nh, window, shift=(0, 0), rpb=None, attn_bias=None, group=None, coords=None,
                 coord_range=None, scale=None, logit_scale=None):
        B, H, W, C3 = qkv.shape
        d = C3 // 3 // nh
        wh, ww = window
        rh, rw = coord_range if coords is not None else window
        self.qkv = _aligned(qkv.contiguous())
        self.rpb = None if rpb is None else rpb.float().contiguous()
        self.ab = None if attn_bias is None else attn_bias.float().contiguous()
        self.group = None if group is None else group.reshape(-1, H, W).contiguous()
        self.coords = None if coords is None else coords.reshape(-1, H, W, 2).contiguous()
        if self.group is not None and self.group.dtype not in (torch.int32, torch.int64):
            self.group = self.group.to(torch.int32)
        self.ls = None if logit_scale is None else logit_scale.float().reshape(nh).contiguous()  # cosine mode
        if self.ls is not None:
            scale = 1.0
        self.p = EmuWattn(B, H, W, nh, d, wh, ww, shift[0], shift[1], rh, rw, DTYPE[qkv.dtype],
                          float(d ** -0.5 if scale is None else scale), _ptr(self.qkv), _ptr(self.rpb), _ptr(self.ab),
                          _ptr(self.group), _ptr(self.coords),
                          1 if self.group is None else self.group.shape[0],
                          1 if self.coords is None else self.coords.shape[0],
                          int(self.group is not None and self.group.dtype == torch.int64),
                          int(self.coords is not None and self.coords.dtype == torch.int64), _ptr(self.ls))
        self.shape = (B, H, W, C3 // 3)
        self.nW = (H // wh) * (W // ww)
        self.N = wh * ww
        self.nh = nh

    def forward(self, plan=True):
        """plan: pass the launcher the pack plans' workspace, as the binding does (False: none, every CTA
        runs the pack prologue)."""
        lib = library()
        B, H, W, C = self.shape
        out = _aligned_empty((B, H, W, C), self.qkv.dtype)
        lse = _aligned_empty((B * self.nW, self.nh, self.N), torch.float32)
        err = lib.emu_wattn_forward(ctypes.byref(self.p), _ptr(out), _ptr(lse), ctypes.c_int(int(plan)))
        assert err == 0, f"emulated forward returned cudaError {err}"
        return out, lse

    def backward(self, dout, out, lse, need_drpb=True, need_dbias=True, deterministic=False, sums=True):
        """sums (fast mode): add the bias / logit-scale gradients into persistent zeroed sums that the
        last CTA copies out and zeroes again, as the binding does (checked: left zero); False: memsets."""
        lib = library()
        need_drpb = need_drpb and self.rpb is not None
        need_dbias = need_dbias and self.ab is not None
        lib.emu_wattn_bwd_workspace.restype = ctypes.c_int64
        ws_bytes = lib.emu_wattn_bwd_workspace(ctypes.byref(self.p), int(need_drpb), int(need_dbias), int(deterministic))
        ws = _aligned_empty((max(ws_bytes, 16),), torch.uint8)
        dqkv = _aligned_empty(tuple(self.qkv.shape), self.qkv.dtype)
        drpb = _aligned_empty(tuple(self.rpb.shape), torch.float32) if need_drpb else None
        dbias = _aligned_empty(tuple(self.ab.shape), torch.float32) if need_dbias else None
        dout, out, lse = _aligned(dout.contiguous()), _aligned(out.contiguous()), _aligned(lse.contiguous())
        acc = None
        if sums and not deterministic:
            lib.emu_wattn_bwd_sums_floats.restype = ctypes.c_int64
            acc = _aligned_empty((lib.emu_wattn_bwd_sums_floats(ctypes.byref(self.p)),), torch.float32, 0.0)
        res = self._backward(lib, dout, out, lse, dqkv, drpb, dbias, ws, need_drpb, need_dbias, deterministic, acc)
        assert acc is None or not acc.any(), "the persistent sums were not left zero"
        return res

    def _backward(self, lib, dout, out, lse, dqkv, drpb, dbias, ws, need_drpb, need_dbias, deterministic, acc):
        if self.ls is not None:  # cosine mode: (dqkv, drpb, dbias, raw logit-scale sums (nH,))
            dls = _aligned_empty((self.nh,), torch.float32)
            err = lib.emu_wattn_backward_cos(ctypes.byref(self.p), _ptr(dout), _ptr(out), _ptr(lse), _ptr(dqkv),
                                             _ptr(drpb), _ptr(dbias), _ptr(dls), _ptr(ws), int(need_drpb),
                                             int(need_dbias), int(deterministic), _ptr(acc))
            assert err == 0, f"emulated backward returned cudaError {err}"
            return dqkv, drpb, dbias, dls
        err = lib.emu_wattn_backward(ctypes.byref(self.p), _ptr(dout), _ptr(out), _ptr(lse), _ptr(dqkv), _ptr(drpb),
                                     _ptr(dbias), _ptr(ws), int(need_drpb), int(need_dbias), int(deterministic),
                                     _ptr(acc))
        assert err == 0, f"emulated backward returned cudaError {err}"
        return dqkv, drpb, dbias


def fwd_workspace(c: "Call") -> int:
    """Bytes of the forward's pack-plan workspace for the call (0: no plan applies)."""
    lib = library()
    lib.emu_wattn_fwd_workspace.restype = ctypes.c_int64
    return lib.emu_wattn_fwd_workspace(ctypes.byref(c.p))


def launches() -> int:
    """Kernel launches the emulator has run so far."""
    lib = library()
    lib.emu_launches.restype = ctypes.c_longlong
    return lib.emu_launches()


def seed(s: int) -> None:
    library().emu_seed(ctypes.c_uint64(s))


# ---- token ops and losses: thin ctypes signatures of tests/cuda_emu/emu_api.cpp
_P, _I, _i, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGS = {
    "emu_mix_tokens": [_P, _P, _P, _I, _I, _I, _I, _i],
    "emu_mix_tokens_backward": [_P, _P, _P, _I, _I, _I, _I, _i],
    "emu_unmix_tokens": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _i],
    "emu_token_tickets": [],
    "emu_unmix_tokens_backward_workspace": [_I, _I, _I, _i, _i],
    "emu_unmix_tokens_backward": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _i, _P],
    "emu_window_partition": [_P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _i],
    "emu_window_merge": [_P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _i],
    "emu_uniform_sample": [_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _i],
    "emu_uniform_sample_backward_workspace": [_I, _I, _I, _I, _i],
    "emu_uniform_sample_backward": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _i, _P],
    "emu_uniform_scatter": [_P, _P, _P, _I, _I, _I, _I, _I, _i],
    "emu_mixmim_loss_fwd": [_P, _i, _P, _i, _P, _I, _P, _I, _I, _I, _i, _i, _f],
    "emu_mixmim_loss_bwd": [_P, _P, _i, _P, _i, _P, _I, _P, _I, _I, _I, _i, _i, _f],
    "emu_masked_loss_fwd": [_P, _i, _P, _i, _P, _P, _I, _I, _I, _I, _i, _i, _f],
    "emu_masked_loss_bwd": [_P, _P, _i, _P, _i, _P, _P, _I, _I, _I, _I, _i, _i, _f],
    "emu_simmim_loss_fwd": [_P, _i, _P, _i, _P, _I, _P, _I, _I, _I, _I, _i],
    "emu_simmim_loss_bwd": [_P, _P, _i, _P, _i, _P, _I, _P, _I, _I, _I, _I, _i],
}


def call(name: str, *args) -> int:
    """Call an emulated launcher: tensors (or None) pass as pointers, the rest as the signature says."""
    fn = getattr(library(), name)
    fn.argtypes = _SIGS[name]
    fn.restype = ctypes.c_int64 if name.endswith(("_workspace", "_tickets")) else ctypes.c_int
    conv = [_ptr(a) if isinstance(a, torch.Tensor) or a is None else a for a in args]
    return fn(*conv)


def aligned(t: torch.Tensor, offset_elems: int = 0) -> torch.Tensor:
    """A contiguous copy of t at a 16-byte aligned address plus `offset_elems` elements."""
    out = _aligned_empty((t.numel() + offset_elems,), t.dtype)[offset_elems:].view(t.shape)
    out.copy_(t)
    return out


def empty(shape, dtype) -> torch.Tensor:
    """A 16-byte aligned tensor poisoned with NaN (floats) or -1 (integers)."""
    return _aligned_empty(tuple(shape), dtype)
