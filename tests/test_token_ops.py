"""Token ops (mix/unmix, window partition/merge, uniform sample/scatter) on every backend.

Every op x backend x dtype, forward and every gradient against the float64 reference with
flash-attn's 2x rule (pure gathers must equal the same-dtype reference bit for bit), odd
shapes, non-contiguous inputs, poisoned outputs, bad inputs, opcheck and torch.compile.
Triton runs under the interpreter on CPU tensors when there is no GPU (tiny shapes).
"""
import pytest
import torch

import mixkernels as mk
from mixkernels import reference as ref
from mixkernels.ops import _dispatch
from mixkernels.testing import assert_close_2x, noncontiguous

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


def _cases():
    out = [("cpu", d) for d in (F64, F32, F16, BF16)]
    out += [("triton", d) for d in (F32, F16, BF16)]
    out += [pytest.param("cuda", d, marks=gpu) for d in (F32, F16, BF16)]
    return out


CASES = _cases()
IDS = [f"{c[0] if isinstance(c, tuple) else c.values[0]}-{str(c[1] if isinstance(c, tuple) else c.values[1])[6:]}"
       for c in CASES]


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and HAS_CUDA) else "cpu"


def _poison(device, nbytes):
    """Leave NaNs in the memory the next allocation of this size is likely to get (always with the
    CUDA caching allocator, usually with glibc for small CPU blocks), to catch unwritten outputs."""
    t = torch.full((nbytes // 4 + 1,), float("nan"), device=device)
    del t


def _check(fn, ref_fn, inputs, dtype, *, exact=False, poison_bytes=0, device="cpu"):
    """Run fn and ref_fn on `inputs` (tensors requiring grad get gradients), compare all outputs
    and gradients with the 2x rule. Non-float inputs pass through unchanged."""
    def clone(t, dt):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return t.detach().to(dt).requires_grad_(t.requires_grad)

    ins64 = [clone(t, F64) for t in inputs]
    ins_same = [clone(t, dtype) for t in inputs]
    if poison_bytes:
        _poison(device, poison_bytes)
    out = fn(*inputs)
    r64 = ref_fn(*ins64)
    rs = ref_fn(*ins_same)
    assert out.dtype == dtype and out.shape == r64.shape
    assert_close_2x(out, r64, None if dtype == F64 else rs, name="forward")
    if exact:
        assert torch.equal(out.detach(), rs.detach()), "gather must be exact"
    grads_of = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not grads_of:
        return out
    g = torch.randn(out.shape, dtype=dtype, device=out.device)
    if poison_bytes:
        _poison(device, poison_bytes)
    got = torch.autograd.grad(out, [inputs[i] for i in grads_of], g)
    e64 = torch.autograd.grad(r64, [ins64[i] for i in grads_of], g.to(F64))
    es = torch.autograd.grad(rs, [ins_same[i] for i in grads_of], g)
    for i, a, b, c in zip(grads_of, got, e64, es):
        assert a.dtype == inputs[i].dtype, f"grad {i} dtype {a.dtype}"
        assert_close_2x(a, b, None if dtype == F64 else c, name=f"grad of input {i}")
    return out


def _leaf(shape, dtype, device, nc=False):
    t = torch.randn(shape, dtype=dtype, device=device)
    if nc:
        t = noncontiguous(t)
    return t.requires_grad_(True)


# ---------------------------------------------------------------- mix_tokens
@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["BLC-shared", "BLC-per-image", "BHWC-shared", "BHWC-per-image"])
def test_mix_tokens(backend, dtype, layout):
    dev = _device(backend)
    B, C = {"BLC-shared": (1, 7), "BLC-per-image": (3, 13), "BHWC-shared": (5, 16), "BHWC-per-image": (3, 8)}[layout]
    spatial = (11,) if layout.startswith("BLC") else (3, 5)
    x = _leaf((B,) + spatial + (C,), dtype, dev, nc=layout == "BLC-per-image")
    mshape = spatial if layout.endswith("shared") else (B,) + spatial
    mask = torch.rand(mshape, device=dev) < 0.5
    if layout == "BHWC-per-image":
        mask = mask.to(torch.int32)  # 0/1 integer masks are accepted too
    _check(lambda x: mk.mix_tokens(x, mask, backend=backend), lambda x: ref.mix_tokens(x, mask), [x], dtype,
           exact=True, poison_bytes=x.numel() * x.element_size(), device=dev)


# ---------------------------------------------------------------- unmix_tokens
@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("variant", ["shared-pos", "per-image-pos", "per-image-nopos", "shared-pos-nograd"])
def test_unmix_tokens(backend, dtype, variant):
    dev = _device(backend)
    B, L, C = {"shared-pos": (3, 9, 13), "per-image-pos": (5, 6, 16), "per-image-nopos": (1, 7, 7),
               "shared-pos-nograd": (3, 5, 8)}[variant]
    x = _leaf((B, L, C), dtype, dev, nc=variant == "per-image-pos")
    mask = torch.rand((L,) if variant.startswith("shared") else (B, L), device=dev) < 0.5
    tok = _leaf((1, 1, C) if variant == "shared-pos" else (C,), dtype, dev)
    pos = None
    if "nopos" not in variant:
        pos = torch.randn((1, L, C), dtype=dtype, device=dev).requires_grad_(variant != "shared-pos-nograd")
    inputs = [x, tok] + ([pos] if pos is not None else [])

    def run(x, tok, pos=None):
        return mk.unmix_tokens(x, mask, tok, pos, backend=backend)

    def run_ref(x, tok, pos=None):
        return ref.unmix_tokens(x, mask, tok, pos)

    _check(run, run_ref, inputs, dtype, poison_bytes=2 * x.numel() * x.element_size(), device=dev)


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=gpu)])
def test_unmix_backward_deterministic(backend):
    dev = _device(backend)
    B, L, C = 5, 12, 24
    g = torch.randn(2 * B, L, C, device=dev)
    mask = (torch.rand(B, L, device=dev) < 0.5).to(torch.uint8)
    k = _dispatch.kernel("mixing", "unmix_tokens_backward", backend)
    a = k(g, mask, True, True)
    b = k(g, mask, True, True)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    m = mask.bool().unsqueeze(-1)
    torch.testing.assert_close(a[1], torch.where(m, g[:B], g[B:]).sum((0, 1)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[2], g.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("B,L,C,dtype,shared,need", [
    (5, 12, 24, F32, False, (True, True)),  # 5 chunks of 1 image: dpos from the partials
    (3, 7, 70, BF16, True, (True, False)),  # 2 column blocks, the last one partial; dtoken only
    (6, 4, 9, F16, False, (False, True)),  # dpos only (chunked)
    (70, 140, 24, BF16, False, (True, True)),  # one chunk: dpos written directly; 70 images in 2 tiles of 64
])
def test_unmix_backward_triton_tickets(monkeypatch, B, L, C, dtype, shared, need):
    """Triton unmix backward: the one-launch reduction (each column block's last program, through the
    stream's ticket counters, left zero) and the two-launch one (taken during CUDA graph capture) give
    the same bits, and match float64 sums; every need_token/need_pos combination, odd C."""
    from mixkernels.triton import _rows, mixing
    dev = _device("triton")
    g = torch.randn(2 * B, L, C, device=dev).to(dtype)
    mask = (torch.rand(1 if shared else B, L, device=dev) < 0.5).to(torch.uint8)
    _poison(dev, 4 * L * C * 4)
    one = mixing.unmix_tokens_backward(g, mask, *need)
    assert not _rows.stream_tickets(g, 1).any(), "tickets left non-zero"
    monkeypatch.setattr(mixing, "stream_tickets", lambda like, n: None)
    two = mixing.unmix_tokens_backward(g, mask, *need)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    m = mask.bool().unsqueeze(-1)
    assert torch.equal(one[0], torch.where(m, g[B:], g[:B]))
    g64 = g.double()
    if need[0]:
        torch.testing.assert_close(one[1].double(), torch.where(m, g64[:B], g64[B:]).sum((0, 1)), rtol=1e-5, atol=1e-4)
    else:
        assert one[1].numel() == 0
    if need[1]:
        torch.testing.assert_close(one[2].double(), g64.sum(0), rtol=1e-5, atol=1e-4)
    else:
        assert one[2].numel() == 0


# ---------------------------------------------------------------- window partition / merge
WINDOW_GEOMS = [  # (B, H, W, C, window, shift)
    (1, 6, 8, 7, (3, 4), (0, 0)),
    (3, 6, 8, 13, (3, 4), (1, 2)),
    (5, 4, 4, 16, 2, 1),
    (2, 6, 6, 8, (6, 3), (3, 0)),
]


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("geom", range(len(WINDOW_GEOMS)))
def test_window_partition_merge(backend, dtype, geom):
    dev = _device(backend)
    B, H, W, C, ws, ss = WINDOW_GEOMS[geom]
    x = _leaf((B, H, W, C), dtype, dev, nc=geom == 1)
    nbytes = x.numel() * x.element_size()
    win = _check(lambda x: mk.window_partition(x, ws, ss, backend=backend),
                 lambda x: ref.window_partition(x, ws, ss), [x], dtype, exact=True, poison_bytes=nbytes, device=dev)
    w = _leaf(tuple(win.shape), dtype, dev, nc=geom == 2)
    _check(lambda w: mk.window_merge(w, ws, H, W, ss, backend=backend),
           lambda w: ref.window_merge(w, ws, H, W, ss), [w], dtype, exact=True, poison_bytes=nbytes, device=dev)
    # merge inverts partition exactly
    y = mk.window_merge(mk.window_partition(x.detach(), ws, ss, backend=backend), ws, H, W, ss, backend=backend)
    assert torch.equal(y, x.detach())


# ---------------------------------------------------------------- uniform sample / scatter
UNIFORM_GEOMS = [(1, 4, 4, 7, 1), (3, 8, 12, 13, 2), (5, 4, 8, 16, 1), (2, 12, 6, 8, 3)]  # (B, H, W, C, unit)


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("geom", range(len(UNIFORM_GEOMS)))
@pytest.mark.parametrize("with_secondary", [False, True], ids=["plain", "secondary"])
def test_uniform_sample(backend, dtype, geom, with_secondary):
    dev = _device(backend)
    B, H, W, C, u = UNIFORM_GEOMS[geom]
    x = _leaf((B, H, W, C), dtype, dev, nc=geom == 1)
    keep, sec = mk.uniform_masks(B, (H // (2 * u), W // (2 * u)), secondary_ratio=0.5, device=dev)
    keep = keep.to(torch.int64) if geom == 2 else keep
    inputs = [x]
    if with_secondary:
        inputs.append(_leaf((C,), dtype, dev))

    def run(x, tok=None):
        return mk.uniform_sample(x, keep, u, mask_token=tok, secondary=sec if with_secondary else None, backend=backend)

    def run_ref(x, tok=None):
        return ref.uniform_sample(x, keep, u, mask_token=tok, secondary=sec if with_secondary else None)

    nbytes = x.numel() * x.element_size()
    _check(run, run_ref, inputs, dtype, exact=True, poison_bytes=nbytes // 4, device=dev)


@pytest.mark.parametrize("backend,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("geom", range(len(UNIFORM_GEOMS)))
def test_uniform_scatter(backend, dtype, geom):
    dev = _device(backend)
    B, H, W, C, u = UNIFORM_GEOMS[geom]
    c = _leaf((B, H // 2, W // 2, C), dtype, dev, nc=geom == 3)
    keep, _ = mk.uniform_masks(B, (H // (2 * u), W // (2 * u)), device=dev)
    out = _check(lambda c: mk.uniform_scatter(c, keep, u, backend=backend), lambda c: ref.uniform_scatter(c, keep, u),
                 [c], dtype, exact=True, poison_bytes=4 * c.numel() * c.element_size(), device=dev)
    assert (out != 0).sum() <= c.numel()
    back = mk.uniform_sample(out.detach(), keep, u, backend=backend)
    assert torch.equal(back, c.detach())


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=gpu)])
def test_uniform_backward_kernel(backend):
    """Kernel-level backward: keep values above 3 are read as keep & 3; dtoken sums the secondary units."""
    dev = _device(backend)
    B, H, W, C, u = 3, 8, 8, 13, 2
    g = torch.randn(B, H // 2, W // 2, C, device=dev)
    keep, sec = mk.uniform_masks(B, (H // (2 * u), W // (2 * u)), device=dev)
    k = _dispatch.kernel("uniform", "uniform_sample_backward", backend)
    dx, dtok = k(g, keep + 4, u, sec.to(torch.uint8), True)
    dx2, dtok2 = k(g, keep, u, sec.to(torch.uint8), True)
    assert torch.equal(dx, dx2) and torch.equal(dtok, dtok2)
    assert dtok.dtype == torch.float32 and dtok.shape == (C,)
    s = sec.repeat_interleave(u, 1).repeat_interleave(u, 2).unsqueeze(-1)
    torch.testing.assert_close(dtok, torch.where(s, g, 0).sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
    _, none = k(g, keep, u, sec.to(torch.uint8), False)
    assert none.numel() == 0


def test_uniform_masks():
    B, cells = 4, (3, 5)
    gen = torch.Generator().manual_seed(7)
    keep, sec = mk.uniform_masks(B, cells, generator=gen)
    assert keep.shape == (B, 3, 5) and keep.dtype == torch.uint8 and int(keep.max()) <= 3
    assert sec.shape == (B, 3, 5) and sec.dtype == torch.bool
    assert (sec.reshape(B, -1).sum(1) == round(0.25 * 15)).all()
    keep2, sec2 = mk.uniform_masks(B, cells, generator=torch.Generator().manual_seed(7))
    assert torch.equal(keep, keep2) and torch.equal(sec, sec2)
    keep3, sec3 = mk.uniform_masks(B, cells, generator=torch.Generator().manual_seed(8))
    assert not (torch.equal(keep, keep3) and torch.equal(sec, sec3))
    _, s0 = mk.uniform_masks(2, 4, secondary_ratio=0.0)
    assert not s0.any()
    with pytest.raises(ValueError, match="secondary_ratio"):
        mk.uniform_masks(2, 4, secondary_ratio=1.0)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    x = torch.randn(2, 4, 4, 8)
    with pytest.raises(ValueError, match="x"):
        mk.mix_tokens(torch.randn(8, 2), torch.ones(8, dtype=torch.bool))
    with pytest.raises(TypeError, match="x"):
        mk.mix_tokens(torch.ones(2, 3, 4, dtype=torch.int32), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        mk.mix_tokens(x, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        mk.mix_tokens(x, [[1] * 4] * 4)
    xl = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="mask_token"):
        mk.unmix_tokens(xl, torch.ones(5), torch.randn(7))
    with pytest.raises(ValueError, match="pos_embed"):
        mk.unmix_tokens(xl, torch.ones(5), torch.randn(8), torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match="x"):
        mk.unmix_tokens(x, torch.ones(4, 4), torch.randn(8))
    with pytest.raises(ValueError, match="window_size"):
        mk.window_partition(torch.randn(1, 6, 6, 4), 4)
    with pytest.raises(ValueError, match="shift_size"):
        mk.window_partition(torch.randn(1, 6, 6, 4), 3, 3)
    with pytest.raises(ValueError, match="x"):
        mk.window_partition(torch.randn(6, 6, 4), 3)
    with pytest.raises(ValueError, match="windows"):
        mk.window_merge(torch.randn(3, 9, 4), 3, 6, 6)
    keep = torch.zeros(2, 1, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="2\\*unit"):
        mk.uniform_sample(torch.randn(2, 6, 4, 8), keep, 2)
    with pytest.raises(ValueError, match="keep"):
        mk.uniform_sample(x, torch.zeros(2, 2, 1, dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="keep"):
        mk.uniform_sample(x, keep.float(), 2)
    with pytest.raises(ValueError, match="keep"):
        mk.uniform_sample(x, keep + 4, 2)
    with pytest.raises(ValueError, match="mask_token"):
        mk.uniform_sample(x, keep, 2, secondary=torch.ones(2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_token"):
        mk.uniform_sample(x, keep, 2, mask_token=torch.randn(5), secondary=torch.ones(2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="unit"):
        mk.uniform_sample(x, keep, 0)
    with pytest.raises(ValueError, match="unit"):
        mk.uniform_scatter(torch.randn(2, 3, 2, 8), keep, 2)
    with pytest.raises(_dispatch.BackendUnavailable, match="dtype"):
        mk.window_partition(torch.randn(1, 4, 4, 8, dtype=F64), 2, backend="triton")


# ---------------------------------------------------------------- opcheck / compile
def _opcheck_cases(backend):
    dev = _device(backend)
    B, L, C = 3, 4, 8
    x = torch.randn(B, L, C, device=dev, requires_grad=True)
    m1 = (torch.rand(1, L, device=dev) < 0.5).to(torch.uint8)
    mB = (torch.rand(B, L, device=dev) < 0.5).to(torch.uint8)
    tok = torch.randn(C, device=dev, requires_grad=True)
    pos = torch.randn(L, C, device=dev, requires_grad=True)
    g2 = torch.randn(2 * B, L, C, device=dev)
    xi = torch.randn(2, 4, 4, C, device=dev, requires_grad=True)
    win = torch.randn(2 * 4, 4, C, device=dev, requires_grad=True)
    keep = torch.randint(0, 4, (2, 1, 1), device=dev, dtype=torch.uint8)
    sec = torch.tensor([[[1]], [[0]]], device=dev, dtype=torch.uint8)
    comp = torch.randn(2, 2, 2, C, device=dev, requires_grad=True)
    ops = torch.ops.mixkernels
    return [
        (ops.mix_tokens, (x, mB, backend)),
        (ops.mix_tokens_backward, (x.detach(), m1, backend)),
        (ops.unmix_tokens, (x, mB, tok, pos, backend)),
        (ops.unmix_tokens, (x, m1, tok, None, backend)),
        (ops.unmix_tokens_backward, (g2, mB, True, True, backend)),
        (ops.window_partition, (xi, 2, 2, 1, 1, backend)),
        (ops.window_merge, (win, 4, 4, 2, 2, 1, 0, backend)),
        (ops.uniform_sample, (xi, keep, 2, tok, sec, backend)),
        (ops.uniform_sample, (xi, keep, 2, None, None, backend)),
        (ops.uniform_sample_backward, (comp.detach(), keep, 2, sec, True, backend)),
        (ops.uniform_scatter, (comp, keep, 2, backend)),
    ]


@pytest.mark.parametrize("backend", ["cpu", "triton", pytest.param("cuda", marks=gpu)])
def test_opcheck(backend):
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


def test_compile_pipeline():
    """Mix -> shifted partition -> merge -> uniform sample/scatter -> unmix, fullgraph, fwd + bwd on CPU."""
    B, H, W, C = 3, 4, 4, 8
    mask = torch.rand(H, W) < 0.5
    keep, sec = mk.uniform_masks(B, (2, 2))
    tok = torch.randn(C, requires_grad=True)

    def pipe(x, tok):
        y = mk.mix_tokens(x, mask)
        w = mk.window_partition(y, 2, 1) * 2
        y = mk.window_merge(w, 2, H, W, 1)
        c = mk.uniform_sample(y, keep, 1, mask_token=tok, secondary=sec)
        y = mk.uniform_scatter(c, keep, 1) + y
        return mk.unmix_tokens(y.reshape(B, H * W, C), mask.reshape(-1), tok)

    torch._dynamo.reset()
    compiled = torch.compile(pipe, fullgraph=True, backend="aot_eager")
    x = torch.randn(B, H, W, C, requires_grad=True)
    out = compiled(x, tok)
    expect = pipe(x, tok)
    torch.testing.assert_close(out, expect)
    ga = torch.autograd.grad(out.square().sum(), (x, tok))
    gb = torch.autograd.grad(expect.square().sum(), (x, tok))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend,dtype", [c for c in CASES if (c[1] if isinstance(c, tuple) else c.values[1]) != F64],
                         ids=[i for i in IDS if "float64" not in i])
def test_misaligned_pointers(backend, dtype):
    """Contiguous views whose data pointer is off by one element: the vector path must not be taken."""
    dev = _device(backend)
    B, H, W, C = 3, 4, 4, 16
    x = torch.randn(B * H * W * C + 1, dtype=dtype, device=dev)[1:].view(B, H, W, C)
    mask = torch.rand(B, H, W, device=dev) < 0.5
    assert torch.equal(mk.mix_tokens(x, mask, backend=backend), ref.mix_tokens(x, mask))
    assert torch.equal(mk.window_partition(x, 2, 1, backend=backend), ref.window_partition(x, 2, 1))
    keep, sec = mk.uniform_masks(B, (2, 2), device=dev)
    tok = torch.randn(C + 1, dtype=dtype, device=dev)[1:]
    assert torch.equal(mk.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec, backend=backend),
                       ref.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec))
    xl = x.view(B, H * W, C)
    m = mask.reshape(B, -1)
    got = mk.unmix_tokens(xl, m, tok, tok.view(1, 1, C), backend=backend)
    assert_close_2x(got, ref.unmix_tokens(xl.double(), m, tok.double(), tok.double().view(1, 1, C)),
                    ref.unmix_tokens(xl, m, tok, tok.view(1, 1, C)))


# ---------------------------------------------------------------- CUDA-only: access widths, sizes, empties
def _offset(t, k):
    """A contiguous copy of ``t`` whose data pointer sits ``k`` elements past an aligned allocation."""
    buf = torch.empty(t.numel() + k, dtype=t.dtype, device=t.device)
    out = buf[k:].view(t.shape)
    out.copy_(t)
    return out


@gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("C", [2, 6, 12, 1024, 1030])
@pytest.mark.parametrize("off", [0, 1], ids=["aligned", "misaligned"])
def test_cuda_access_widths(dtype, C, off):
    """Rows of 16/8/4/2-byte accesses (C*elem % 16 != 0 for C = 2, 6, 12, 1030), rows wider than one
    block row (C = 1024: 256 vectors > 128 threads), misaligned base pointers; forward gathers and
    the kernel-level backwards (fed directly, so a misaligned grad reaches the kernel)."""
    dev = "cuda"
    B, H, W, ws, ss = 3, 4, 6, (2, 3), (1, 2)
    x = _offset(torch.randn(B, H, W, C, dtype=dtype, device=dev), off)
    mask = torch.rand(B, H, W, device=dev) < 0.5
    assert torch.equal(mk.mix_tokens(x, mask, backend="cuda"), ref.mix_tokens(x, mask))
    win = mk.window_partition(x, ws, ss, backend="cuda")
    assert torch.equal(win, ref.window_partition(x, ws, ss))
    assert torch.equal(mk.window_merge(_offset(win, off), ws, H, W, ss, backend="cuda"), x)
    keep, sec = mk.uniform_masks(B, (2, 3), device=dev)
    tok = _offset(torch.randn(C, dtype=dtype, device=dev), off)
    assert torch.equal(mk.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec, backend="cuda"),
                       ref.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec))
    comp = _offset(torch.randn(B, H // 2, W // 2, C, dtype=dtype, device=dev), off)
    assert torch.equal(mk.uniform_scatter(comp, keep, 1, backend="cuda"), ref.uniform_scatter(comp, keep, 1))
    L = H * W
    xl, m = x.view(B, L, C), mask.reshape(B, L)
    pos = _offset(torch.randn(1, L, C, dtype=dtype, device=dev), off)
    for p in (pos, None):
        got = mk.unmix_tokens(xl, m, tok, p, backend="cuda")
        p64 = None if p is None else p.double()
        assert_close_2x(got, ref.unmix_tokens(xl.double(), m, tok.double(), p64), ref.unmix_tokens(xl, m, tok, p))

    m8 = m.to(torch.uint8)
    g = _offset(torch.randn(B, L, C, dtype=dtype, device=dev), off)
    dx = _dispatch.kernel("mixing", "mix_tokens_backward", "cuda")(g, m8)
    x64, xs = xl.double().requires_grad_(), xl.clone().requires_grad_()
    (want,) = torch.autograd.grad(ref.mix_tokens(x64, m), x64, g.double())
    (want_s,) = torch.autograd.grad(ref.mix_tokens(xs, m), xs, g)
    assert_close_2x(dx, want, want_s)
    g2 = _offset(torch.randn(2 * B, L, C, dtype=dtype, device=dev), off)
    dx, dtok, dpos = _dispatch.kernel("mixing", "unmix_tokens_backward", "cuda")(g2, m8, True, True)
    mm = m.unsqueeze(-1)
    assert torch.equal(dx, torch.where(mm, g2[B:], g2[:B]))
    torch.testing.assert_close(dtok.double(), torch.where(mm, g2[:B], g2[B:]).double().sum((0, 1)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dpos.double(), g2.double().sum(0), rtol=1e-5, atol=1e-4)
    gc = _offset(torch.randn(B, H // 2, W // 2, C, dtype=dtype, device=dev), off)
    dx, dtok = _dispatch.kernel("uniform", "uniform_sample_backward", "cuda")(gc, keep, 1, sec.to(torch.uint8), True)
    assert torch.equal(dx, ref.uniform_scatter(torch.where(sec.unsqueeze(-1), 0, gc), keep, 1))
    torch.testing.assert_close(dtok.double(), torch.where(sec.unsqueeze(-1), gc, 0).double().sum((0, 1, 2)),
                               rtol=1e-5, atol=1e-4)


@gpu
def test_cuda_large_shapes():
    """Swin/MixMIM-sized grids (B=128, 56x56 tokens): grid-stride loops, and the deterministic
    single-launch reductions (uniform dtoken over 100352 rows; unmix over 3136 positions)."""
    dev = "cuda"
    B, H, W, C = 128, 56, 56, 40
    x = torch.randn(B, H, W, C, dtype=BF16, device=dev)
    win = mk.window_partition(x, 7, 3, backend="cuda")
    assert torch.equal(win, ref.window_partition(x, 7, 3))
    assert torch.equal(mk.window_merge(win, 7, H, W, 3, backend="cuda"), x)
    mask = torch.rand(B, H, W, device=dev) < 0.5
    assert torch.equal(mk.mix_tokens(x, mask, backend="cuda"), ref.mix_tokens(x, mask))
    keep, sec = mk.uniform_masks(B, (H // 2, W // 2), device=dev)
    tok = torch.randn(C, dtype=BF16, device=dev)
    assert torch.equal(mk.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec, backend="cuda"),
                       ref.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec))
    gc = torch.randn(B, H // 2, W // 2, C, device=dev)
    k = _dispatch.kernel("uniform", "uniform_sample_backward", "cuda")
    _, dtok = k(gc, keep, 1, sec.to(torch.uint8), True)
    want = torch.where(sec.unsqueeze(-1), gc, 0).double().sum((0, 1, 2))
    torch.testing.assert_close(dtok.double(), want, rtol=1e-5, atol=2e-3)
    assert torch.equal(k(gc, keep, 1, sec.to(torch.uint8), True)[1], dtok)  # deterministic
    ku = _dispatch.kernel("mixing", "unmix_tokens_backward", "cuda")
    for L in (H * W, 49):
        g2 = torch.randn(2 * B, L, C, device=dev)
        m8 = (torch.rand(B, L, device=dev) < 0.5).to(torch.uint8)
        dx, dtok, dpos = ku(g2, m8, True, True)
        mm = m8.bool().unsqueeze(-1)
        assert torch.equal(dx, torch.where(mm, g2[B:], g2[:B]))
        torch.testing.assert_close(dtok.double(), torch.where(mm, g2[:B], g2[B:]).double().sum((0, 1)),
                                   rtol=1e-5, atol=5e-3)
        torch.testing.assert_close(dpos.double(), g2.double().sum(0), rtol=1e-5, atol=1e-3)
        assert all(torch.equal(a, b) for a, b in zip(ku(g2, m8, True, True), (dx, dtok, dpos)))


@gpu
def test_cuda_one_launch_reductions_streams_and_graphs():
    """The backward reductions done in one launch (the last CTA, with the calling stream's tickets)
    give the same bits on every call, on another stream, and as the two-launch path that a CUDA
    graph capture takes (odd B, C not a multiple of the 16 B vector)."""
    dev = "cuda"
    B, L, C = 33, 49, 70
    g = torch.randn(2 * B, L, C, dtype=BF16, device=dev)
    m8 = (torch.rand(B, L, device=dev) < 0.5).to(torch.uint8)
    ku = _dispatch.kernel("mixing", "unmix_tokens_backward", "cuda")
    Bu, H, W, Cu = 3, 36, 36, 24
    keep, sec = mk.uniform_masks(Bu, (H // 2, W // 2), device=dev)
    gc = torch.randn(Bu, H // 2, W // 2, Cu, dtype=BF16, device=dev)
    kw = _dispatch.kernel("uniform", "uniform_sample_backward", "cuda")
    for call in (lambda: ku(g, m8, True, True), lambda: kw(gc, keep, 1, sec.to(torch.uint8), True)):
        first = call()
        for _ in range(20):
            assert all(torch.equal(a, b) for a, b in zip(call(), first))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            other = call()
        torch.cuda.current_stream().wait_stream(side)
        assert all(torch.equal(a, b) for a, b in zip(other, first))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = call()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(captured, first))
        assert all(torch.equal(a, b) for a, b in zip(call(), first))  # eager again after the graph


@gpu
def test_cuda_empty_inputs():
    """B = 0 (and L = 0) must not launch invalid grids; empty reductions are zeros."""
    dev = "cuda"
    C = 8
    x = torch.randn(0, 4, 4, C, device=dev, requires_grad=True)
    mask = torch.ones(4, 4, dtype=torch.bool, device=dev)
    assert mk.mix_tokens(x, mask, backend="cuda").shape == x.shape
    w = mk.window_partition(x, 2, 1, backend="cuda")
    assert w.shape == (0, 4, C)
    (gx,) = torch.autograd.grad(w.sum(), x)
    assert gx.shape == x.shape
    keep, sec = mk.uniform_masks(0, (2, 2), device=dev)
    tok = torch.randn(C, device=dev)
    assert mk.uniform_sample(x, keep, 1, mask_token=tok, secondary=sec, backend="cuda").shape == (0, 2, 2, C)
    _, dtok = _dispatch.kernel("uniform", "uniform_sample_backward", "cuda")(
        torch.zeros(0, 2, 2, C, device=dev), keep, 1, sec.to(torch.uint8), True)
    assert torch.equal(dtok, torch.zeros(C, device=dev))
    for B, L in ((0, 5), (2, 0)):
        g2 = torch.randn(2 * B, L, C, device=dev)
        m8 = torch.ones(1, L, dtype=torch.uint8, device=dev)
        dx, dtok, dpos = _dispatch.kernel("mixing", "unmix_tokens_backward", "cuda")(g2, m8, True, True)
        assert dx.shape == (B, L, C) and torch.equal(dtok, torch.zeros(C, device=dev))
        assert torch.equal(dpos, torch.zeros(L, C, device=dev))
    with pytest.raises(ValueError, match="non-empty"):
        mk.window_partition(torch.randn(2, 0, 4, C, device=dev), 2, backend="cuda")
