"""The CUDA token-op and loss kernels (csrc/cuda), run on the CPU by the SIMT emulator
(tests/_cuda_emu.py), against the references: gathers bit for bit, sums with the 2x rule.

Covers every access width the launchers pick (16/8/4/2-byte vectors from the row size and pointer
alignment), the 1/2/4 vectors-per-lane steps (short and long rows), the fill (mask token) and zero
rows, batch-shared and per-image masks, and poisoned outputs.
"""
from __future__ import annotations

import pytest
import torch

from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x

import _cuda_emu as E

_SKIP = E.unavailable()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ok(err):
    assert err == 0, f"emulated launch returned cudaError {err}"


# (C, pointer offset in elements): row sizes and alignments that select every vector width / unroll
WIDTHS = [(64, 0), (24, 0), (6, 0), (3, 0), (64, 1), (130, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("C,off", WIDTHS, ids=lambda v: str(v))
def test_mix_and_unmix(dtype, C, off):
    B, L = 3, 10
    x = E.aligned(torch.randn(B, L, C).to(dtype), off)
    for shared in (True, False):
        mask = (torch.rand(1 if shared else B, L) < 0.5).to(torch.uint8)
        m = mask[0] if shared else mask
        out = E.empty((B, L, C), dtype)
        _ok(E.call("emu_mix_tokens", x, mask, out, B, L, C, mask.shape[0], DT[dtype]))
        assert torch.equal(out, ref.mix_tokens(x, m.bool()))
        g = E.aligned(torch.randn(B, L, C).to(dtype), off)
        dx = E.empty((B, L, C), dtype)
        _ok(E.call("emu_mix_tokens_backward", g, mask, dx, B, L, C, mask.shape[0], DT[dtype]))
        xr = x.double().requires_grad_(True)
        (want,) = torch.autograd.grad(ref.mix_tokens(xr, m.bool()), xr, g.double())
        xs = x.detach().clone().requires_grad_(True)
        (same,) = torch.autograd.grad(ref.mix_tokens(xs, m.bool()), xs, g)
        assert_close_2x(dx, want, same, name="mix backward")
        tok = E.aligned(torch.randn(C).to(dtype))
        pos = E.aligned(torch.randn(L, C).to(dtype), off)
        for p in (None, pos):
            out2 = E.empty((2 * B, L, C), dtype)
            _ok(E.call("emu_unmix_tokens", x, mask, tok, p, out2, B, L, C, mask.shape[0], DT[dtype]))
            want2 = ref.unmix_tokens(x.double(), m.bool(), tok.double(), None if p is None else p.double())
            same2 = ref.unmix_tokens(x, m.bool(), tok, p)
            if p is None:
                assert torch.equal(out2, same2)
            else:
                assert_close_2x(out2, want2, same2, name="unmix + pos")


# (B, L, C, pointer offset, shared mask): one image chunk (dpos written directly) with 16 B and
# scalar access; several image chunks (B above the image lanes, few positions: dpos from partials)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,L,C,off,shared", [(3, 7, 40, 0, False), (5, 3, 24, 1, True), (70, 3, 64, 0, False),
                                              (67, 2, 8, 0, True)], ids=str)
def test_unmix_backward(dtype, B, L, C, off, shared):
    mask = (torch.rand(1 if shared else B, L) < 0.5).to(torch.uint8)
    g = E.aligned(torch.randn(2 * B, L, C).to(dtype), off)
    dx = E.empty((B, L, C), dtype)
    dtok, dpos = E.empty((C,), torch.float32), E.empty((L, C), torch.float32)
    ws = E.empty((max(1, E.call("emu_unmix_tokens_backward_workspace", B, L, C, 1, 1)),), torch.float32)
    _ok(E.call("emu_unmix_tokens_backward", g, mask, dx, dtok, dpos, ws, B, L, C, mask.shape[0], DT[dtype], _tickets()))
    mask = mask.expand(B, L)
    x = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(C, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(L, C, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(ref.unmix_tokens(x, mask.bool(), tok, pos), (x, tok, pos), g.double())
    assert torch.equal(dx.double(), want[0])  # a selection of grad rows
    torch.testing.assert_close(dtok.double(), want[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dpos.double(), want[2], rtol=1e-5, atol=1e-4)


def _tickets():
    return torch.zeros(E.call("emu_token_tickets"), dtype=torch.int32)


# Odd shapes (B odd; C not a multiple of the 16 B vector: scalar access and a part-filled last row
# slice; several slices; several image chunks): the single-launch reduction (the last CTA of each slice
# group, tickets) gives the two-launch path's bits, the same bits on every call, leaves the tickets
# zero, and matches the float64 reference (2x rule against the float32 reference).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("B,L,C,off,shared", [(9, 5, 70, 0, False), (67, 2, 130, 0, True), (33, 3, 72, 1, False)],
                         ids=str)
def test_unmix_backward_one_launch(dtype, B, L, C, off, shared):
    mask = (torch.rand(1 if shared else B, L) < 0.5).to(torch.uint8)
    g = E.aligned(torch.randn(2 * B, L, C).to(dtype), off)
    nws = max(1, E.call("emu_unmix_tokens_backward_workspace", B, L, C, 1, 1))
    tickets = _tickets()

    def run(t, seed):
        E.seed(seed)  # another thread order
        dx, dtok, dpos = E.empty((B, L, C), dtype), E.empty((C,), torch.float32), E.empty((L, C), torch.float32)
        ws = E.empty((nws,), torch.float32)
        _ok(E.call("emu_unmix_tokens_backward", g, mask, dx, dtok, dpos, ws, B, L, C, mask.shape[0], DT[dtype], t))
        return dx, dtok, dpos

    first = run(tickets, 1)
    assert not tickets.any(), "the last CTA leaves the tickets zero"
    for again in (run(tickets, 2), run(None, 3)):
        assert all(_same_bits(a, b) for a, b in zip(first, again))
    dx, dtok, dpos = first
    m = mask.expand(B, L).bool()
    x = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(C, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(L, C, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(ref.unmix_tokens(x, m, tok, pos), (x, tok, pos), g.double())
    xs, ts, ps = (t.detach().float().requires_grad_(True) for t in (x, tok, pos))
    same = torch.autograd.grad(ref.unmix_tokens(xs, m, ts, ps), (xs, ts, ps), g.float())
    assert torch.equal(dx.double(), want[0])
    assert_close_2x(dtok, want[1], same[1], name="dtoken")
    assert_close_2x(dpos, want[2], same[2], name="dpos")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("win,shift", [((7, 7), (3, 3)), ((4, 6), (0, 5)), ((14, 14), (0, 0))])
@pytest.mark.parametrize("C,off", [(32, 0), (6, 0), (40, 1)], ids=str)
def test_window_partition_merge(dtype, win, shift, C, off):
    B = 2
    H, W = 2 * win[0], 3 * win[1]
    x = E.aligned(torch.randn(B, H, W, C).to(dtype), off)
    nW = (H // win[0]) * (W // win[1])
    out = E.empty((B * nW, win[0] * win[1], C), dtype)
    _ok(E.call("emu_window_partition", x, out, B, H, W, C, win[0], win[1], shift[0], shift[1], DT[dtype]))
    assert torch.equal(out, ref.window_partition(x, win, shift))
    back = E.empty((B, H, W, C), dtype)
    _ok(E.call("emu_window_merge", E.aligned(out, off), back, B, H, W, C, win[0], win[1], shift[0], shift[1], DT[dtype]))
    assert torch.equal(back, x)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("unit", [1, 2])
@pytest.mark.parametrize("C,off", [(16, 0), (5, 0), (24, 1), (300, 1)], ids=str)  # 300: channel chunks in bwd
def test_uniform(dtype, unit, C, off):
    B, H, W = 2, 4 * unit, 8 * unit
    hc, wc = H // (2 * unit), W // (2 * unit)
    x = E.aligned(torch.randn(B, H, W, C).to(dtype), off)
    keep = torch.randint(0, 4, (B, hc, wc), dtype=torch.uint8)
    sec = (torch.rand(B, hc, wc) < 0.3).to(torch.uint8)
    tok = E.aligned(torch.randn(C).to(dtype))
    for s in (None, sec):
        out = E.empty((B, H // 2, W // 2, C), dtype)
        _ok(E.call("emu_uniform_sample", x, keep, s, None if s is None else tok, out, B, H, W, C, unit, DT[dtype]))
        want = ref.uniform_sample(x, keep.long(), unit, mask_token=None if s is None else tok,
                                  secondary=None if s is None else s.bool())
        assert torch.equal(out, want)
        g = E.aligned(torch.randn(B, H // 2, W // 2, C).to(dtype), off)
        dx = E.empty((B, H, W, C), dtype)
        dtok = E.empty((C,), torch.float32)
        ws = E.empty((max(1, E.call("emu_uniform_sample_backward_workspace", B, H, W, C, 1)),), torch.float32)
        _ok(E.call("emu_uniform_sample_backward", g, keep, s, dx, dtok, ws, B, H, W, C, unit, DT[dtype], _tickets()))
        xr = x.double().requires_grad_(True)
        tr = tok.double().requires_grad_(True)
        o = ref.uniform_sample(xr, keep.long(), unit, mask_token=tr, secondary=None if s is None else s.bool())
        gx, gt = torch.autograd.grad(o, (xr, tr), g.double(), allow_unused=True)
        assert torch.equal(dx.double(), gx)
        torch.testing.assert_close(dtok.double(), torch.zeros(C, dtype=torch.float64) if gt is None else gt,
                                   rtol=1e-5, atol=1e-4)
    back = E.empty((B, H, W, C), dtype)
    _ok(E.call("emu_uniform_scatter", E.aligned(out, off), keep, back, B, H, W, C, unit, DT[dtype]))
    assert torch.equal(back, ref.uniform_scatter(out, keep.long(), unit))


def _same_bits(a, b):
    return torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                       b.view(torch.int16 if b.element_size() == 2 else torch.int32))


# Enough token segments for several first-level groups (odd B; C not a multiple of the 16 B vector):
# the single-launch dtoken reduction gives the two-launch bits, the same bits on every call, leaves the
# tickets zero, and matches the float64 reference (2x rule).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("C,off", [(5, 0), (24, 1)], ids=str)
def test_uniform_backward_one_launch(dtype, C, off):
    B, H, W, unit = 3, 36, 36, 1
    hc, wc = H // 2, W // 2
    keep = torch.randint(0, 4, (B, hc, wc), dtype=torch.uint8)
    sec = (torch.rand(B, hc, wc) < 0.3).to(torch.uint8)
    g = E.aligned(torch.randn(B, H // 2, W // 2, C).to(dtype), off)
    nws = max(1, E.call("emu_uniform_sample_backward_workspace", B, H, W, C, 1))
    tickets = _tickets()

    def run(t, seed):
        E.seed(seed)
        dx, dtok, ws = E.empty((B, H, W, C), dtype), E.empty((C,), torch.float32), E.empty((nws,), torch.float32)
        _ok(E.call("emu_uniform_sample_backward", g, keep, sec, dx, dtok, ws, B, H, W, C, unit, DT[dtype], t))
        return dx, dtok

    first = run(tickets, 1)
    assert not tickets.any(), "the last CTAs leave the tickets zero"
    for again in (run(tickets, 2), run(None, 3)):
        assert all(_same_bits(a, b) for a, b in zip(first, again))
    dx, dtok = first
    x = torch.randn(B, H, W, C, dtype=torch.float64, requires_grad=True)
    tok = torch.randn(C, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(ref.uniform_sample(x, keep.long(), unit, mask_token=tok, secondary=sec.bool()), (x, tok),
                               g.double())
    xs, ts = x.detach().float().requires_grad_(True), tok.detach().float().requires_grad_(True)
    same = torch.autograd.grad(ref.uniform_sample(xs, keep.long(), unit, mask_token=ts, secondary=sec.bool()),
                               (xs, ts), g.float())
    assert torch.equal(dx.double(), want[0])
    assert_close_2x(dtok, want[1], same[1], name="dtoken")


# (p, norm_pix, pointer offset in elements) at W = 3p: 8-pixel units (p % 8: one warp at p 8/16, four
# warps at 32), 4-pixel units (p 4/12: W % 8 != 0; or p = 8 with bf16 pointers 8-byte aligned), one
# pixel per unit (odd p, or misaligned pointers: four units per thread, three warps at p = 17)
LOSS_CASES = [(8, True, 0), (16, True, 0), (32, True, 0), (4, False, 0), (12, True, 0), (8, True, 4), (3, True, 0),
              (17, False, 0), (8, True, 1)]


def _loss_inputs(pdt, p, off, rows, B=2):
    H, W = 4 * p, 3 * p
    L = (H // p) * (W // p)
    imgs = E.aligned(torch.randn(B, 3, H, W) * 0.5 + 0.3, off)
    pred = E.aligned(torch.randn(rows * B, L, p * p * 3).to(pdt), off)
    return imgs, pred, B, H, W, L


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("p,norm,off", LOSS_CASES, ids=str)
def test_losses(pdt, p, norm, off):
    imgs, pred, B, H, W, L = _loss_inputs(pdt, p, off, 2)
    mask = (torch.rand(B, L) < 0.5).to(torch.uint8)
    out = E.empty((B, L), torch.float32)
    _ok(E.call("emu_mixmim_loss_fwd", pred, DT[pdt], imgs, 0, mask, L, out, B, H, W, p, int(norm), 1e-6))
    pr = pred.double().requires_grad_(True)
    want = ref.mixmim_loss(pr, imgs.double(), mask.bool(), p, norm_pix=norm, reduction="none")
    same = ref.mixmim_loss(pred.float(), imgs, mask.bool(), p, norm_pix=norm, reduction="none")
    assert_close_2x(out, want, same, name="mixmim loss")
    g = E.aligned(torch.rand(B, L))
    dpred = E.aligned(torch.full(tuple(pred.shape), float("nan")).to(pdt), off)  # poisoned: every row is written
    _ok(E.call("emu_mixmim_loss_bwd", g, pred, DT[pdt], imgs, 0, mask, L, dpred, B, H, W, p, int(norm), 1e-6))
    (gw,) = torch.autograd.grad(want, pr, g.double())
    ps = pred.detach().clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(ref.mixmim_loss(ps, imgs.to(pdt), mask.bool(), p, norm_pix=norm, reduction="none"),
                                ps, g.to(torch.float32))
    assert_close_2x(dpred, gw, gs, name="mixmim loss backward")


@pytest.mark.parametrize("pdt", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("p,norm,off", LOSS_CASES, ids=str)
def test_masked_loss(pdt, p, norm, off):
    """Full-length pred with patch_idx -1 on the uncounted rows (loss 0, gradient 0), per-image masks,
    images in pred's dtype; the last patch of image 0 is constant (norm_pix target exactly 0)."""
    imgs, pred, B, H, W, L = _loss_inputs(pdt, p, off, 1)
    imgs = E.aligned(imgs.to(pdt), off)
    imgs[0, :, H - p:, W - p:] = 0.25
    mask = torch.rand(B, L) < 0.5
    mask[0, -1] = True
    idx = torch.where(mask, torch.arange(L), torch.full((B, L), -1)).contiguous()
    out = E.empty((B, L), torch.float32)
    _ok(E.call("emu_masked_loss_fwd", pred, DT[pdt], imgs, DT[pdt], idx, out, B, L, H, W, p, int(norm), 1e-6))
    pr = pred.double().requires_grad_(True)
    want = ref.masked_recon_loss(pr, imgs.double(), mask, p, norm_pix=norm, reduction="none")
    same = ref.masked_recon_loss(pred.float(), imgs, mask, p, norm_pix=norm, reduction="none")
    assert_close_2x(out, want, same, name="masked loss")
    assert (out[~mask] == 0).all()
    g = E.aligned(torch.rand(B, L))
    dpred = E.aligned(torch.full(tuple(pred.shape), float("nan")).to(pdt), off)
    _ok(E.call("emu_masked_loss_bwd", g, pred, DT[pdt], imgs, DT[pdt], idx, dpred, B, L, H, W, p, int(norm), 1e-6))
    (gw,) = torch.autograd.grad(want, pr, g.double())
    ps = pred.detach().clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(ref.masked_recon_loss(ps, imgs.to(pdt), mask, p, norm_pix=norm, reduction="none"),
                                ps, g)
    assert_close_2x(dpred, gw, gs, name="masked loss backward")
    assert (dpred[~mask] == 0).all()
