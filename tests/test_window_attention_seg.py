"""Triton forward by attention segment (``mixkernels/triton/_wattn_seg.py``) against the float64 reference.

Under the interpreter the path runs for windows of 16+ tokens with a group and/or shift mask (no
attn_bias, no coords), in 16-row tiles and 16-key blocks: segments of several tiles and blocks,
segments shorter than a tile, a single-token segment, 1, 2 and 3+ segments per window. Outputs are
poisoned (NaN) so an unwritten element fails; lse is compared with the all-pairs kernel's (the
backward reads it at the original positions) and the backward runs on the path's out/lse.
"""
from __future__ import annotations

import pytest
import torch

import mixkernels
from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x

tw = pytest.importorskip("mixkernels.triton.window_attention")
seg = pytest.importorskip("mixkernels.triton._wattn_seg")
_rows = pytest.importorskip("mixkernels.triton._rows")
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(tw, "_alloc", lambda shape, dtype, dev: torch.full(shape, float("nan"), dtype=dtype,
                                                                             device=dev))


def _labels(kind, B, H, W):
    if kind == "one":  # one segment per window
        return torch.zeros(B, H, W, dtype=torch.int64)
    if kind == "two":
        return torch.randint(0, 2, (B, H, W))
    if kind == "many":  # 3+ segments, several shorter than a tile
        return torch.randint(0, 5, (B, H, W))
    if kind == "single_token":  # one group holds a single token of the window
        g = torch.zeros(B, H, W, dtype=torch.int64)
        g[:, 1, 2] = 1
        return g
    if kind == "int64":  # labels equal modulo 2**32 stay different (edge rule 1)
        return torch.randint(0, 2, (B, H, W)) * (2 ** 32) + 3
    raise ValueError(kind)


def _run(win, grid, shift, labels, dtype, B=2, nh=2, d=16, rpb=True, per_image=True, qkv=None):
    wh, ww = win
    H, W = grid[0] * wh, grid[1] * ww
    if qkv is None:
        qkv = torch.randn(B, H, W, 3 * nh * d, dtype=torch.float64)
    kw = dict(shift_size=shift)
    if labels is not None:
        g = _labels(labels, B, H, W)
        kw["group"] = g if per_image else g[0]
    if rpb:
        kw["rel_pos_bias"] = torch.randn((2 * wh - 1) * (2 * ww - 1), nh, dtype=torch.float64)
    assert tw._by_segment(wh * ww, *shift, None, kw.get("group"), None)
    cast = {k: (v.float() if v.is_floating_point() else v) for k, v in kw.items() if k != "shift_size"}
    want = ref.window_attention(qkv, nh, win, **kw)
    same = ref.window_attention(qkv.to(dtype), nh, win, shift_size=shift, **cast)
    got = mixkernels.window_attention(qkv.to(dtype), nh, win, backend="triton", shift_size=shift, **cast)
    return got, want, same, qkv, kw, cast


@pytest.mark.parametrize("win,grid,shift,labels,dtype", [
    ((5, 5), (2, 2), (0, 0), "two", F32),
    ((7, 7), (1, 2), (0, 0), "many", BF16),
    ((4, 6), (2, 1), (2, 3), None, F32),  # shift regions only
    ((5, 5), (2, 2), (2, 2), "two", BF16),  # shift + group
    ((6, 5), (1, 2), (0, 0), "one", F32),
    ((5, 4), (2, 1), (0, 0), "single_token", F32),
    ((7, 7), (1, 2), (0, 0), "single_token", BF16),  # 48 tokens: a full tile and a half tile
    ((5, 5), (1, 2), (0, 0), "int64", F32),
    ((7, 7), (1, 2), (0, 0), "many", torch.float16),  # segments shorter than the probe: its keys clamped
    ((5, 5), (2, 2), (2, 2), "single_token", torch.float16),
])
def test_seg_forward_matches_reference(win, grid, shift, labels, dtype):
    got, want, same, *_ = _run(win, grid, shift, labels, dtype)
    assert torch.isfinite(got).all()
    assert_close_2x(got, want, same, name="out")


def test_seg_shared_group_no_rpb_and_cosine():  # cosine takes the all-pairs kernel (``_forward``)
    got, want, same, *_ = _run((5, 5), (2, 1), (0, 0), "many", F32, rpb=False, per_image=False)
    assert_close_2x(got, want, same, name="out")
    qkv = torch.randn(2, 10, 5, 3 * 2 * 16)
    g = torch.randint(0, 2, (2, 10, 5))
    table = torch.randn(81, 2)
    ls = torch.randn(2) + 2.0
    got, _ = tw.window_attention_cosine(qkv, 2, 5, 5, 1, 2, table, None, g, None, 5, 5, ls)
    kw = dict(shift_size=(1, 2), rel_pos_bias=table, group=g, logit_scale=ls)
    want = ref.window_attention(qkv.double(), 2, (5, 5), **{**kw, "rel_pos_bias": table.double(),
                                                            "logit_scale": ls.double()})
    assert_close_2x(got, want, ref.window_attention(qkv, 2, (5, 5), **kw), name="cosine out")


def _torch_tables(H, W, wh, ww, sh, sw, group, bm, device):
    """The tables ``_seg_prep`` computes, specified in torch ops. Per window (and per label map: G =
    group.shape[0] or 1), the tokens sorted stably by segment
    (shift region, then group label, compared at full width) and the segments cut into tiles of
    ``bm`` rows, a segment's last rows in a tile of ``bm // 2`` when they fit one. Returns meta
    (G*nW, 5, N) int32 [grid position, window-local index of each sorted token; tiles' first row,
    segment start, segment end: full tiles, then half tiles (entries past them: 0)], ninfo (G*nW, 3)
    int32 [full tiles, segments, half tiles], and the sorted tokens' window-local indices (G*nW, N)
    int64."""
    N, nWh, nWw = wh * ww, H // wh, W // ww
    ar = torch.arange(N, device=device)
    ly, lx = ar // ww, ar % ww
    wy = torch.arange(nWh, device=device).repeat_interleave(nWw)
    wx = torch.arange(nWw, device=device).repeat(nWh)
    y = (wy[:, None] * wh + ly[None, :] + sh) % H
    x = (wx[:, None] * ww + lx[None, :] + sw) % W
    pos = (y * W + x)[None]  # (1, nW, N)
    keys = []  # least significant first: the label, then the region
    if group is not None:
        keys.append(group.reshape(group.shape[0], H * W)[:, pos[0]])  # (G, nW, N), full width
    if sh > 0 or sw > 0:
        reg = (wy[:, None] * wh >= H - wh) * (3 * (ly >= wh - sh))[None, :] \
            + (wx[:, None] * ww >= W - ww) * (lx >= ww - sw)[None, :]
        keys.append(reg[None])
    G = keys[0].shape[0] if keys else 1
    idx = ar.expand(G, nWh * nWw, N)
    for k in keys:
        k = k.expand(G, -1, -1)
        idx = idx.gather(-1, torch.argsort(k.gather(-1, idx), dim=-1, stable=True))
    new = torch.zeros(idx.shape, dtype=torch.bool, device=device)
    new[..., 0] = True
    for k in keys:
        ks = k.expand(G, -1, -1).gather(-1, idx)
        new[..., 1:] |= ks[..., 1:] != ks[..., :-1]
    lo = torch.cummax(torch.where(new, ar, 0), dim=-1).values
    end = torch.ones_like(new)
    end[..., :-1] = new[..., 1:]
    hi = torch.cummin(torch.where(end, ar + 1, N).flip(-1), dim=-1).values.flip(-1)
    # tiles start every bm rows of a segment; a start with at most bm/2 rows left is a half tile
    first = (ar - lo) % bm == 0
    small = first & (hi - ar <= bm // 2)
    kind = torch.where(first & ~small, 0, torch.where(small, 1, 2)).to(torch.int8)
    order = torch.argsort(kind, dim=-1, stable=True)  # full tiles, then half tiles, in row order
    nbig, nsmall = (first & ~small).sum(-1), small.sum(-1)
    live = ar < (nbig + nsmall)[..., None]
    tr0 = torch.where(live, order, 0)
    meta = torch.stack([pos.expand(G, -1, -1).gather(-1, idx), idx, tr0, torch.where(live, lo.gather(-1, tr0), 0),
                        torch.where(live, hi.gather(-1, tr0), 0)], dim=-2)
    ninfo = torch.stack([nbig, new.sum(-1), nsmall], dim=-1)
    return (meta.reshape(G * nWh * nWw, 5, N).to(torch.int32).contiguous(),
            ninfo.reshape(G * nWh * nWw, 3).to(torch.int32).contiguous(), idx.reshape(G * nWh * nWw, N))


def test_seg_tables_walk_only_segments():
    """The tables: tokens sorted stably by (region, label); tiles of <= bm rows inside one segment, a
    segment's last rows in a half tile when they fit one (full tiles listed first)."""
    g = torch.tensor([[3, 1, 3, 1], [1, 1, 7, 3]]).repeat(2, 2)[None]  # (1, 4, 8): windows 2 x 4 x 2
    meta, ninfo, idx = _torch_tables(4, 8, 2, 4, 0, 0, g, 2, "cpu")
    w0 = g[0, :2, :4].reshape(-1)
    assert idx[0].tolist() == torch.argsort(w0, stable=True).tolist()
    nbig, nseg, nsmall = ninfo[0].tolist()
    assert nseg == 3 and (nbig, nsmall) == (3, 2)  # segments 1 x4, 3 x3, 7 x1 in tiles of 2 (last row: 1)
    nt = nbig + nsmall
    r0, lo, hi = meta[0, 2, :nt], meta[0, 3, :nt], meta[0, 4, :nt]
    assert r0.tolist() == [0, 2, 4, 6, 7] and lo.tolist() == [0, 0, 4, 4, 7] and hi.tolist() == [4, 4, 7, 7, 8]


def test_seg_lse_matches_all_pairs_kernel_and_backward(monkeypatch):
    """lse at the original positions (the backward's contract): equal to the all-pairs kernel's;
    gradients through the path's out/lse match the reference."""
    B, nh, d, win = 2, 2, 16, (5, 5)
    qkv = torch.randn(B, 10, 5, 3 * nh * d)
    g = torch.randint(0, 3, (B, 10, 5))
    table = torch.randn(81, nh)
    args = (qkv, nh, 5, 5, 2, 1, table, None, g, None, 5, 5, d ** -0.5)
    out_s, lse_s = tw.window_attention(*args)
    monkeypatch.setattr(tw, "SEGMENTS", False)
    out_a, lse_a = tw.window_attention(*args)
    monkeypatch.setattr(tw, "SEGMENTS", True)
    torch.testing.assert_close(lse_s, lse_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_s, out_a, atol=1e-5, rtol=1e-5)
    q64 = qkv.double().requires_grad_()
    t64 = table.double().requires_grad_()
    want = ref.window_attention(q64, nh, win, shift_size=(2, 1), rel_pos_bias=t64, group=g)
    dout = torch.randn_like(want)
    gq, gt = torch.autograd.grad(want, (q64, t64), dout)
    qf = qkv.clone().requires_grad_()
    tf = table.clone().requires_grad_()
    got = mixkernels.window_attention(qf, nh, win, shift_size=(2, 1), rel_pos_bias=tf, group=g, backend="triton")
    dq, dt = torch.autograd.grad(got, (qf, tf), dout.float())
    torch.testing.assert_close(dq.double(), gq, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dt.double(), gt, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("win,dtype", [((7, 7), BF16), ((5, 5), F32)])
def test_seg_padded_quarter_block(win, dtype, monkeypatch):
    """The quarter block's P @ V over twice its keys, P and V padded with zeros (PADQ: Triton 3.6's path,
    no 32-bit dot with K = 8): a one-token segment walks one quarter block (4 keys under the interpreter),
    the rest 48 keys (three blocks) or 24 (a block and a half block)."""
    monkeypatch.setattr(seg, "PADQ", True)
    got, want, same, *_ = _run(win, (1, 2), (0, 0), "single_token", dtype)
    assert_close_2x(got, want, same, name="out")


@pytest.mark.parametrize("value,dtype", [(float("nan"), F32), (float("inf"), F32), (float("nan"), BF16),
                                         (float("inf"), torch.float16)])
def test_seg_nonfinite_v_of_a_masked_key_reaches_every_row(value, dtype):
    """Edge rule 2: NaN/Inf in V of a token other segments cannot see still reaches their rows in the
    reference (0 * NaN in P @ V): the path's all-keys walk gives the same NaN pattern."""
    B, nh, d, win = 1, 2, 16, (5, 5)
    qkv = torch.randn(B, 5, 10, 3 * nh * d, dtype=torch.float64)
    qkv[0, 1, 1, 2 * nh * d + 3] = value  # head 0, channel 3 of V, window 0
    got, want, same, *_ = _run(win, (1, 2), (0, 0), "two", dtype, B=B, qkv=qkv)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got[0, :, :5, 3]).any()
    ok = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), ok)
    assert_close_2x(got[ok], want[ok], same[ok], name="finite out")


@pytest.mark.parametrize("value,dtype", [(float("nan"), BF16), (float("inf"), F32)])
def test_seg_nonfinite_v_of_the_last_key_in_one_segment(value, dtype):
    """Keys past N read the last sorted key's V (p = 0): with one segment (no V check) NaN/Inf there
    must give exactly the reference's pattern: NaN, or Inf (p > 0 times Inf), never 0 * Inf from a padded key."""
    B, nh, d, win = 1, 2, 16, (5, 5)
    qkv = torch.randn(B, 5, 10, 3 * nh * d, dtype=torch.float64)
    qkv[0, 4, 4, 2 * nh * d + d + 5] = value  # head 1, channel 5 of V, window 0's last token
    got, want, same, *_ = _run(win, (1, 2), (0, 0), "one", dtype, B=B, qkv=qkv)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert not torch.isfinite(got[0, :, :5, d + 5]).any()
    ok = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), ok)
    assert torch.equal(got[~ok & ~torch.isnan(want)], want[~ok & ~torch.isnan(want)].to(got.dtype))  # same Inf
    assert_close_2x(got[ok], want[ok], same[ok], name="finite out")


@pytest.mark.parametrize("labels,dtype", [("two", BF16), ("one", F32), ("two", F32)])
def test_seg_large_v_takes_the_walk_from_the_true_maxima(labels, dtype):
    """SEMANTICS rule 5: finite |v| up to 2**120 stays finite. The probe's reference can leave p near
    2**29.6 (a +20.5 table entry at the right-hand neighbour, which the bf16/fp32 probe does not see,
    over logits near 0: row sums inside [LMIN, LMAX]), and p * 1.5 * 2**100 overflows fp32: a
    window whose V holds |v| >= 2**96 walks from its rows' true maxima (p <= 1), one segment included."""
    B, nh, d, win = 1, 2, 16, (5, 5)
    qkv = torch.randn(B, 5, 10, 3 * nh * d, dtype=torch.float64)
    qkv[..., :nh * d] *= 0.1
    for y, x, c, s in ((1, 2, 3, 1.5), (2, 3, d + 5, -1.5), (3, 6, 7, 1.5), (4, 8, d, -1.0)):
        qkv[0, y, x, 2 * nh * d + c] = s * 2.0 ** 100
    table = torch.zeros(81, nh, dtype=torch.float64)
    table[4 * 9 + 5] = 20.5  # one horizontal offset: one dominant key a row (no rounding race between two)
    g = _labels(labels, B, 5, 10)
    want = ref.window_attention(qkv, nh, win, rel_pos_bias=table, group=g)
    assert want.abs().max() > 2.0 ** 99 and torch.isfinite(want).all()
    x, t = qkv.to(dtype), table.float()
    same = ref.window_attention(x, nh, win, rel_pos_bias=t, group=g)
    got = mixkernels.window_attention(x, nh, win, backend="triton", rel_pos_bias=t, group=g)
    assert torch.isfinite(got).all()
    assert_close_2x(got, want, same, name="out")


def test_seg_all_masked_rows_are_nan():
    """A head whose table is all -inf: every row NaN (edge rule 2); the other head is exact."""
    nh, d = 2, 16
    qkv = torch.randn(1, 5, 10, 3 * nh * d)
    table = torch.randn(81, nh)
    table[:, 0] = float("-inf")
    g = torch.randint(0, 3, (1, 5, 10))
    out, lse = tw.window_attention(qkv, nh, 5, 5, 0, 0, table, None, g, None, 5, 5, d ** -0.5)
    assert torch.isnan(out[..., :d]).all() and not torch.isfinite(lse[:, 0]).any()
    assert torch.isfinite(out[..., d:]).all() and torch.isfinite(lse[:, 1]).all()
    r64 = ref.window_attention(qkv.double(), nh, (5, 5), rel_pos_bias=table.double(), group=g)
    r_s = ref.window_attention(qkv, nh, (5, 5), rel_pos_bias=table, group=g)
    assert_close_2x(out[..., d:], r64[..., d:], r_s[..., d:], name="out")


@pytest.mark.parametrize("dtype", [F32, BF16, torch.float16])
def test_seg_second_walk_from_the_true_maxima(dtype):
    """The walk's reference is the rows' largest logit over their segment's first keys (the probe): keys
    far above it (p past LMAX: K rows scaled by 60, logits ~60x the others) and rows whose probe keys
    are all -inf but later keys finite (l < 1/2: -inf table entries) take the second walk from the rows'
    true maxima; the result is exact either way."""
    B, nh, d = 2, 2, 16
    qkv = torch.randn(B, 10, 10, 3 * nh * d, dtype=torch.float64)
    qkv[:, 3:, 2::3, nh * d:2 * nh * d] *= 60.0  # K of a third of the tokens, past every window's first rows
    table = torch.randn(81, nh, dtype=torch.float64)
    table[torch.rand(81) < 0.3] = float("-inf")
    g = _labels("two", B, 10, 10)
    want = ref.window_attention(qkv, nh, (5, 5), rel_pos_bias=table, group=g)
    x, t = qkv.to(dtype), table.float()
    same = ref.window_attention(x, nh, (5, 5), rel_pos_bias=t, group=g)
    got = mixkernels.window_attention(x, nh, (5, 5), backend="triton", rel_pos_bias=t, group=g)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = torch.isfinite(want)
    assert ok.float().mean() > 0.9
    assert_close_2x(got[ok], want[ok], same[ok], name="out")


@pytest.mark.parametrize("shift,dtype", [(14.0, torch.float16), (-14.0, torch.float16), (14.0, BF16)])
def test_seg_probe_without_the_table_bias(shift, dtype):
    """The probe's reference leaves the table bias out: a table shifted by a constant (the softmax is the
    same) moves every p by 2**(shift log2 e), here ~2**20. fp16: +14 puts p past fp16's range (P @ V in
    fp16: inf, then NaN, unless l > LMAX sends the tile on the walk from the maxima); -14 puts every p
    among fp16's subnormals (a relative error up to 2**-4 unless l < LMIN does); bf16's [LMIN, LMAX] holds
    both shifts in the first walk."""
    B, nh, d = 1, 2, 16
    qkv = torch.randn(B, 5, 10, 3 * nh * d, dtype=torch.float64)
    table = torch.randn(81, nh, dtype=torch.float64) * 0.5
    g = _labels("two", B, 5, 10)
    x, t = qkv.to(dtype), table.float() + shift
    want = ref.window_attention(qkv, nh, (5, 5), rel_pos_bias=t.double(), group=g)
    same = ref.window_attention(x, nh, (5, 5), rel_pos_bias=t, group=g)
    got = mixkernels.window_attention(x, nh, (5, 5), backend="triton", rel_pos_bias=t, group=g)
    assert torch.isfinite(got).all()
    assert_close_2x(got, want, same, name="out")


@pytest.mark.parametrize("H,w,shift,group", [(28, 14, 0, True), (14, 7, 3, False), (28, 14, 7, True)])
def test_seg_walk_model_matches_the_launcher_tables(H, w, shift, group):
    """The static rules' model of the walk (``wattn_workload.seg_walk``) counts what the launcher's
    tables make the kernel walk: full and half tiles per window, unmasked and masked key blocks per
    tile of each kind (with TAIL: masked full and half blocks; with QUARTER also quarter blocks; with
    WIDE: double and single unmasked blocks)."""
    from mixkernels.bench import wattn_workload as ww

    bm, bn = 32, 32
    g = torch.from_numpy(ww.mixmim_mask(H, H))[None] if group else None
    meta, ninfo, _ = _torch_tables(H, H, w, w, shift, shift, g, bm, "cpu")
    model = ww.seg_walk(H, H, w, shift, group, bm, bn)
    tailed = ww.seg_walk(H, H, w, shift, group, bm, bn, tail=True)
    wide = ww.seg_walk(H, H, w, shift, group, bm, bn, wide=True)
    quart = ww.seg_walk(H, H, w, shift, group, bm, bn, tail=True, quarter=True)
    nbig, nsmall = ninfo[:, 0].tolist(), ninfo[:, 2].tolist()
    for kind, spans in (("big", [(0, b) for b in nbig]), ("small", list(zip(nbig, nsmall)))):
        lo = torch.cat([meta[i, 3, a:a + n] for i, (a, n) in enumerate(spans)])
        hi = torch.cat([meta[i, 4, a:a + n] for i, (a, n) in enumerate(spans)])
        assert sum(n for _, n in spans) / len(spans) == pytest.approx(model[kind])
        if len(lo):
            assert ((hi - lo) // bn).double().mean().item() == pytest.approx(model["full_" + kind])
            assert ((hi - lo) % bn != 0).double().mean().item() == pytest.approx(model["masked_" + kind])
            r = (hi - lo) % bn  # TAIL: the last <= bn/2 keys in a half block, more in a masked full one
            assert (r > bn // 2).double().mean().item() == pytest.approx(tailed["masked_" + kind])
            assert ((r > 0) & (r <= bn // 2)).double().mean().item() == pytest.approx(tailed["tail_" + kind])
            # QUARTER: the last <= bn/4 keys in a quarter block, up to bn/2 in a half one
            assert ((r > 0) & (r <= bn // 4)).double().mean().item() == pytest.approx(quart["quarter_" + kind])
            assert ((r > bn // 4) & (r <= bn // 2)).double().mean().item() == pytest.approx(quart["tail_" + kind])
            assert (r > bn // 2).double().mean().item() == pytest.approx(quart["masked_" + kind])
            # WIDE: unmasked blocks two at a time, then the odd one
            assert ((hi - lo) // (2 * bn)).double().mean().item() == pytest.approx(wide["wide_" + kind])
            assert ((hi - lo) // bn % 2).double().mean().item() == pytest.approx(wide["full_" + kind])


@pytest.mark.parametrize("scale", [0.3, 1e-7])
def test_seg_softmax_scale_paths(scale):
    """Logits in units of 1/scale with the table bias in the MMA accumulator (a plain scale in
    [2**-20, 2**20] / log2 e), or scaled as the all-pairs kernel (a scale outside it, cosine mode)."""
    nh, d = 2, 16
    qkv = torch.randn(2, 10, 5, 3 * nh * d, dtype=torch.float64)
    g = torch.randint(0, 2, (2, 10, 5))
    table = torch.randn(81, nh, dtype=torch.float64) * 3
    kw = dict(shift_size=(2, 1), group=g, scale=scale)
    want = ref.window_attention(qkv, nh, (5, 5), rel_pos_bias=table, **kw)
    same = ref.window_attention(qkv.float(), nh, (5, 5), rel_pos_bias=table.float(), **kw)
    got = mixkernels.window_attention(qkv.float(), nh, (5, 5), rel_pos_bias=table.float(), backend="triton", **kw)
    assert_close_2x(got, want, same, name="out")


@pytest.mark.parametrize("H,W,win,shift,labels,G", [
    (10, 10, (5, 5), (0, 0), "many", 2), (10, 10, (5, 5), (2, 2), "two", 1), (14, 14, (7, 7), (3, 3), None, 1),
    (8, 12, (4, 6), (0, 0), "int64", 1), (10, 15, (5, 5), (1, 3), "all_distinct", 2)])
def test_seg_prep_kernel_matches_the_torch_tables(H, W, win, shift, labels, G, monkeypatch):
    """The pre-kernel's tables (pairwise ranks over several programs a window, the last one's prefix
    sums) equal the torch formulation, labels at full width (int64 labels equal modulo 2**32 stay
    apart)."""
    monkeypatch.setattr(seg, "PREP_ROWS", 8)  # 2-7 programs a window
    if labels is None:
        g = None
    elif labels == "all_distinct":
        g = torch.randperm(G * H * W).reshape(G, H, W)
    else:
        g = _labels(labels, G, H, W)
    for bm in (32, 8):
        m1, n1, idx = _torch_tables(H, W, *win, *shift, g, bm, "cpu")
        m2, n2, sc = seg.seg_prepare(H, W, *win, *shift, g, bm, 16, "cpu")
        assert torch.equal(n1, n2)
        N = win[0] * win[1]
        codes = (idx // win[1]) * (2 * win[1] - 1) + idx % win[1]
        assert torch.equal(sc[:, :N], codes * -4) and not sc[:, N:].any()
        for gw in range(m1.shape[0]):
            nt = int(n1[gw, 0] + n1[gw, 2])
            assert torch.equal(m1[gw, :2], m2[gw, :2]) and torch.equal(m1[gw, 2:, :nt], m2[gw, 2:, :nt])


def test_seg_prep_counters_persist_and_meta_tails_are_written(monkeypatch):
    """No memset: ``_seg_prep``'s per-window counters live across launches (the window's last program
    stores 0 back) and meta's entries past the tiles are written (0), not left from the allocation. A
    first call, then calls with fewer and more windows, other groups and window shapes, all exact on
    tables allocated poisoned (-7) and the one counter buffer, which is all 0 after each call."""
    monkeypatch.setattr(seg, "PREP_ROWS", 8)  # several programs a window count on the counters
    monkeypatch.setattr(seg, "_empty", lambda shape, dtype, dev: torch.full(shape, -7, dtype=dtype, device=dev))
    monkeypatch.setattr(_rows, "_TICKETS", {})
    calls = [(10, 10, (5, 5), (0, 0), _labels("many", 2, 10, 10)),  # 8 windows
             (10, 10, (5, 5), (2, 2), _labels("two", 1, 10, 10)),  # 4: a smaller shape and group after
             (10, 15, (5, 5), (1, 3), _labels("many", 2, 10, 15)),  # 12: the buffer grows
             (14, 14, (7, 7), (3, 3), None)]  # 4, other window (7 programs a window)
    for H, W, win, shift, g in calls:
        m1, n1, _ = _torch_tables(H, W, *win, *shift, g, 8, "cpu")
        m2, n2, _ = seg.seg_prepare(H, W, *win, *shift, g, 8, 16, "cpu")
        assert torch.equal(n1, n2)
        assert torch.equal(m1, m2)  # the tails past the tiles included: 0
        (cnt,) = _rows._TICKETS.values()
        assert cnt.numel() >= m1.shape[0] and not cnt.any()
