"""The CUDA window-attention kernels (csrc/cuda), run on the CPU by the SIMT emulator, against the
float64 reference: forward, dqkv and the bias gradients, the fused and the legacy kernels.

No GPU involved: the kernel sources are compiled by g++ (tests/_cuda_emu.py); warp collectives,
mma.sync / ldmatrix fragments and cp.async follow the PTX ISA definitions in the emulator, and
threads run in a shuffled order between barriers. What this cannot show: timing, races that need
true concurrency inside a warp step, and the compiler's handling of the real PTX.
"""
from __future__ import annotations

import os

import pytest
import torch

from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x

import _cuda_emu as E

_SKIP = E.unavailable()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


def _inputs(B, H, W, nh, d, win, shift, rpb, ab, group, dtype, coords=False, R=(6, 5), gdtype=None):
    qkv = torch.randn(B, H, W, 3 * nh * d, dtype=dtype)
    N = win[0] * win[1]
    kw = dict(shift_size=shift)
    RR = R if coords else win
    if rpb:
        kw["rel_pos_bias"] = torch.randn((2 * RR[0] - 1) * (2 * RR[1] - 1), nh)
    if ab:
        kw["attn_bias"] = torch.randn(nh, N, N)
    if group == "shared":
        kw["group"] = torch.randint(0, 2, (H, W))
    elif group == "per_image":
        kw["group"] = torch.randint(0, 3, (B, H, W), dtype=torch.int32)
    if gdtype is not None and "group" in kw:
        kw["group"] = kw["group"].to(gdtype)
    if coords:
        kw["coords"] = torch.stack([torch.randint(0, R[0], (B, H, W)), torch.randint(0, R[1], (B, H, W))], -1)
        kw["coord_range"] = R
    return qkv, kw


def _call(qkv, nh, win, kw):
    return E.Call(qkv, nh, win, kw.get("shift_size", (0, 0)), kw.get("rel_pos_bias"), kw.get("attn_bias"),
                  kw.get("group"), kw.get("coords"), kw.get("coord_range"))


def _ref(qkv, nh, win, kw, dout, cast):
    x = cast(qkv).detach().requires_grad_(True)
    kw2, leaves = dict(kw), [x]
    for k in ("rel_pos_bias", "attn_bias"):
        if k in kw2:
            kw2[k] = (kw2[k].double() if x.dtype == torch.float64 else kw2[k]).detach().requires_grad_(True)
            leaves.append(kw2[k])
    out = ref.window_attention(x, nh, win, **kw2)
    return [out] + list(torch.autograd.grad(out, leaves, dout.to(out.dtype)))


def _rule3(kw, coords):
    """Reference arguments for rule 3 (out-of-range coordinate differences add no bias) on a
    reference that indexes the table directly: the table padded with zeros to a range covering every
    difference, and `coords` (an equivalent of kw's, small enough to index). Returns (kwargs, slicer
    mapping the padded table's gradient back to the original entries)."""
    (Rh, Rw), t = kw["coord_range"], kw["rel_pos_bias"]
    span = int(coords.max() - coords.min()) + 1
    Eh, Ew = max(Rh, span), max(Rw, span)
    dy = torch.arange(-(Rh - 1), Rh)[:, None]
    dx = torch.arange(-(Rw - 1), Rw)[None, :]
    idx = ((dy + Eh - 1) * (2 * Ew - 1) + (dx + Ew - 1)).reshape(-1)
    big = torch.zeros((2 * Eh - 1) * (2 * Ew - 1), t.shape[1], dtype=t.dtype)
    big[idx] = t
    return dict(kw, rel_pos_bias=big, coords=coords, coord_range=(Eh, Ew)), lambda g: g[idx]


def _check(qkv, nh, win, kw, deterministic=False, backward=True, ref_coords=None, sums=True):
    B, H, W, C3 = qkv.shape
    c = _call(qkv, nh, win, kw)
    out, lse = c.forward()
    got = [out]
    dout = torch.randn(B, H, W, C3 // 3, dtype=qkv.dtype)
    if backward:
        dqkv, drpb, dbias = c.backward(dout, out, lse, deterministic=deterministic, sums=sums)
        got += [dqkv] + [g for g in (drpb, dbias) if g is not None]
    back = None
    if ref_coords is not None:
        kw, back = _rule3(kw, ref_coords)
    r64 = _ref(qkv, nh, win, kw, dout, lambda t: t.double())
    same = _ref(qkv, nh, win, kw, dout, lambda t: t)
    if back is not None and "rel_pos_bias" in kw and backward:
        r64[2], same[2] = back(r64[2]), back(same[2])
    names = ["out", "dqkv"] + [k for k in ("rel_pos_bias", "attn_bias") if k in kw]
    for n, g, r, s in zip(names, got, r64, same):
        assert g.dtype == s.dtype, n
        assert_close_2x(g, r, s, name=n)
    return got, lse


# (B, H, W, heads, head_dim, window, shift, rpb, attn_bias, group) -- the fused kernels unless noted
CASES = [
    ("mixmim_w7", 2, 14, 14, 2, 32, (7, 7), (0, 0), True, False, "per_image"),
    ("swin_shift", 3, 14, 14, 2, 32, (7, 7), (3, 3), True, False, "none"),
    ("w14_shift_group", 1, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "shared"),
    ("odd_window", 2, 6, 10, 3, 16, (3, 5), (1, 2), False, False, "none"),
    ("d64", 2, 14, 14, 2, 64, (7, 7), (3, 3), True, False, "per_image"),
    ("d128", 1, 8, 16, 1, 128, (8, 8), (0, 4), True, False, "per_image"),
    ("row_window", 2, 4, 16, 2, 16, (1, 8), (0, 3), True, False, "per_image"),
    ("n256", 1, 16, 16, 1, 32, (16, 16), (8, 8), True, False, "shared"),
    ("attn_bias", 2, 12, 12, 2, 32, (6, 6), (2, 3), True, True, "per_image"),  # fused fwd, legacy bwd
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_matches_reference(case, dtype):
    _, B, H, W, nh, d, win, shift, rpb, ab, group = case
    qkv, kw = _inputs(B, H, W, nh, d, win, shift, rpb, ab, group, dtype)
    _check(qkv, nh, win, kw)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=lambda c: c[0])
def test_fast_bias_gradient_without_persistent_sums(case):
    """Fast mode without the stream's persistent sums (a CUDA graph capture): the bias gradient is added
    into the memset-zeroed output instead of being copied out by the last CTA (the default path above)."""
    _, B, H, W, nh, d, win, shift, rpb, ab, group = case
    qkv, kw = _inputs(B, H, W, nh, d, win, shift, rpb, ab, group, torch.bfloat16)
    _check(qkv, nh, win, kw, sums=False)


def test_float32_runs_legacy_kernels():
    qkv, kw = _inputs(2, 12, 12, 2, 32, (6, 6), (2, 3), True, True, "per_image", torch.float32)
    _check(qkv, 2, (6, 6), kw)


@pytest.mark.parametrize("coords64", [False, True], ids=["int32", "int64"])
def test_coords(coords64):
    qkv, kw = _inputs(2, 8, 8, 2, 32, (4, 4), (2, 2), True, False, "shared", torch.bfloat16, coords=True)
    if coords64:
        kw["coords"] = kw["coords"].long()
    _check(qkv, 2, (4, 4), kw)


def test_out_of_range_coords_get_no_bias():
    # Coordinates spread beyond coord_range: those pairs attend without a table entry (rule 3).
    qkv, kw = _inputs(2, 8, 8, 2, 32, (4, 4), (0, 0), True, False, "none", torch.bfloat16, coords=True, R=(3, 3))
    kw["coords"] = torch.randint(0, 9, (2, 8, 8, 2))
    _check(qkv, 2, (4, 4), kw, ref_coords=kw["coords"])


def test_huge_int64_coords_stay_exact():
    # Coordinates near +-2**62 in one window: no truncation may fake an in-range difference, and
    # true small differences between huge values must keep their table entries.
    qkv, kw = _inputs(1, 4, 8, 2, 32, (4, 4), (0, 0), True, False, "none", torch.bfloat16, coords=True, R=(3, 3))
    base = torch.randint(0, 3, (1, 4, 8, 2)).long()
    c, small = base.clone(), base.clone()
    c[0, :2, :4] += torch.tensor([2 ** 62, -(2 ** 62)])  # window 0: half its tokens far off, close to each other
    small[0, :2, :4] += torch.tensor([40, -40])          # the same pattern at a distance the reference can index
    c[0, 2:, 4:] -= 2 ** 33  # window 1: half its tokens 2**33 away (int32 truncation would bring them back)
    small[0, 2:, 4:] -= 40
    kw["coords"] = c
    _check(qkv, 2, (4, 4), kw, ref_coords=small)


def test_backward_coords_box_and_its_fallback(monkeypatch):
    # The fast backward's coords box plan with a budget of ~50 of the 99 table entries (a lower shared
    # memory limit): image 0's packs (x in {0, 1}; y spread past the range: capped, out-of-range pairs)
    # need 11 x 3 box entries and run box-local tables; packs holding image 1's windows need the whole
    # table and run the two-pass fallback over it. Both against the reference, rule 3 included.
    from mixkernels.bench import wattn_workload as ww

    qkv, kw = _inputs(2, 16, 16, 2, 32, (8, 8), (0, 0), True, False, "none", torch.bfloat16, coords=True)
    c = torch.randint(0, 9, (2, 16, 16, 2))
    c[0, ..., 1] = torch.randint(0, 2, (16, 16))
    kw["coords"] = c
    limit = ww.bwd_box_bytes(192, 50, 32, 2)  # 3 windows of 64 per pack: cap 192
    assert 33 <= ww.bwd_box_tmax(192, 11 * 9, 32, 2, limit)[0] < 11 * 9
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", str(limit))
    _check(qkv, 2, (8, 8), kw, ref_coords=c)


@pytest.mark.parametrize("ipc", [0, 4], ids=["plan", "ranges4"])
@pytest.mark.parametrize("cdtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_forward_coords_box_and_its_fallback(cdtype, ipc, monkeypatch):
    # The forward's coords box tables (window_attention_box.cuh) at a budget of 100 entries (a lower shared
    # memory limit): image 0's windows (coordinates in 0..2: box <= 9 x 9) run box-local tables; the packs
    # holding image 1's (0..8: spans past coord_range (6, 5), boxes up to 33 x 33 with out-of-range entries)
    # exceed it and run the exact path on the whole table in global memory. ranges4: CTAs walk 4 of the 9
    # items (3 packs, the last of 2 windows, x 3 heads): ranges start mid-pack and cross from a box pack
    # to fallback packs. Against the reference, rule 3 included.
    from mixkernels.bench import wattn_workload as ww

    qkv, kw = _inputs(2, 16, 16, 3, 32, (8, 8), (0, 0), True, False, "none", torch.bfloat16, coords=True)
    c = torch.randint(0, 9, (2, 16, 16, 2))
    c[0] = torch.randint(0, 3, (16, 16, 2))
    kw["coords"] = c.to(cdtype)
    pl = ww.plan("fwd", 2, 16, 16, 3, 32, 8, 8, 6, 5, 2, True, coords=True)
    if ipc:
        monkeypatch.setenv("MIXKERNELS_WATTN_FWD_IPC", str(ipc))
    nbuf = 2 if (ipc or pl["ipc"]) > 1 else 1
    limit = ww.layout_bytes(pl["cap"], 100, 32, 2, 3, nbuf, False, 0)
    assert 100 <= ww.fwd_box_tmax(pl["cap"], 32, 2, nbuf, 8, 8, limit) < 121  # 9 x 9 fits, 11 x 11 does not
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", str(limit))
    _check(qkv, 3, (8, 8), kw, backward=False, ref_coords=c)


@pytest.mark.parametrize("ipc", [0, 3], ids=["plan", "ranges3"])
def test_forward_coords_one_window_packs(ipc, monkeypatch):
    # One-window packs (window 14: aligned segments, shift regions) with batch-shared int32 coordinates
    # spanning past coord_range (9, 9): box tables of up to 45 x 45 entries, out-of-range ones 0. ranges3:
    # CTAs of 3 items over 2 heads, so ranges start mid-pack.
    if ipc:
        monkeypatch.setenv("MIXKERNELS_WATTN_FWD_IPC", str(ipc))
    qkv, kw = _inputs(2, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "shared", torch.bfloat16, coords=True,
                      R=(9, 9))
    kw["coords"] = torch.randint(0, 12, (28, 28, 2), dtype=torch.int32)
    _check(qkv, 2, (14, 14), kw, backward=False, ref_coords=kw["coords"])


@pytest.mark.parametrize("fallback", [False, True], ids=["box_change", "fallback"])
def test_backward_persistent_box_tables(fallback, monkeypatch):
    # One SM: the coords box plan runs all 3 packs in one CTA with persistent box tables (each head's box
    # bias and gradient sum kept over the CTA's packs, flushed to drpb when the box changes and after the
    # last pack). box_change: image 0's packs (x in {0, 1}) and the others have different boxes, all fit.
    # fallback (window 4, coord_range 10: want 17 x 17 < T = 19 x 19): a lower shared memory limit leaves
    # ~300 entries; image 1's packs (spread past the range) need the whole table and run the two-pass
    # fallback after image 0's pack flushed its tables. Both against the reference, rule 3 included.
    from mixkernels.bench import wattn_workload as ww

    monkeypatch.setenv("MIXKERNELS_EMU_SMS", "1")
    if fallback:
        win, R = (4, 4), (10, 10)
        qkv, kw = _inputs(2, 16, 16, 2, 32, win, (0, 0), True, False, "none", torch.bfloat16, coords=True, R=R)
        c = torch.randint(0, 21, (2, 16, 16, 2))
        c[0] = torch.randint(0, 5, (16, 16, 2))  # spans <= 8: box 17 x 17
        limit = ww.bwd_box_bytes(208, 300, 32, 2, ph=2)  # 13 windows of 16 per pack: cap 208
        monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", str(limit))
    else:
        win, R = (8, 8), (6, 5)
        qkv, kw = _inputs(2, 16, 16, 2, 32, win, (0, 0), True, False, "none", torch.bfloat16, coords=True, R=R)
        c = torch.randint(0, 9, (2, 16, 16, 2))
        c[0, ..., 1] = torch.randint(0, 2, (16, 16))
        limit = None
    pl = ww.plan("bwd", 2, 16, 16, 2, 32, *win, *R, 2, True, False, n_sm=1, coords=True,
                 **({} if limit is None else {"smem_limit": limit}))
    assert pl["pers"] and pl["nslots"] == 1 and pl["npacks"] == 3 and pl["hg"] == 2
    assert pl["tmax"] < pl["T"] if fallback else pl["tmax"] == pl["T"]
    kw["coords"] = c
    _check(qkv, 2, win, kw, ref_coords=c)


# One SM: the launch plans give each CTA all heads (the forward's double-buffered head loop, odd and
# even buffers, the table scaled per buffer, the coords box loaded per head).
HEADS_CASES = [
    ("mixmim_w7", 2, 14, 14, 3, 32, (7, 7), (0, 0), True, "per_image", False),
    ("w14_shift_group", 1, 28, 28, 3, 32, (14, 14), (7, 7), True, "shared", False),
    ("coords", 2, 8, 8, 3, 32, (4, 4), (2, 2), True, "shared", True),
]


@pytest.mark.parametrize("case", HEADS_CASES, ids=lambda c: c[0])
def test_heads_sharing_a_cta(case, monkeypatch):
    _, B, H, W, nh, d, win, shift, rpb, group, coords = case
    monkeypatch.setenv("MIXKERNELS_EMU_SMS", "1")
    qkv, kw = _inputs(B, H, W, nh, d, win, shift, rpb, False, group, torch.bfloat16, coords=coords)
    _check(qkv, nh, win, kw, backward=False)


@pytest.mark.parametrize("scale", [0.37, -0.3, 0.0], ids=["positive", "negative", "zero"])
def test_forward_scale(scale):
    # The fused forward keeps biases in units of 1/scale (needs a normal scale > 0); other scales run
    # the legacy kernels. Either way the output is the reference's.
    qkv, kw = _inputs(2, 14, 14, 2, 32, (7, 7), (3, 3), True, False, "per_image", torch.bfloat16)
    c = E.Call(qkv, 2, (7, 7), (3, 3), kw["rel_pos_bias"], None, kw["group"], scale=scale)
    out, _ = c.forward()
    r64 = ref.window_attention(qkv.double(), 2, (7, 7), scale=scale, **{k: v.double() if v.is_floating_point() else v
                                                                         for k, v in kw.items() if k != "shift_size"},
                               shift_size=(3, 3))
    same = ref.window_attention(qkv, 2, (7, 7), scale=scale, **kw)
    assert_close_2x(out, r64, same, name="out")


def test_int64_group_labels_compare_at_full_width():
    # Labels 5 and 5 + 2**32 are different groups (a cast to int32 would merge them).
    qkv, kw = _inputs(2, 14, 14, 2, 32, (7, 7), (0, 0), True, False, "per_image", torch.bfloat16)
    g = torch.randint(0, 2, (2, 14, 14), dtype=torch.int64) * (2 ** 32) + 5
    kw["group"] = g
    _check(qkv, 2, (7, 7), kw)


def test_fully_masked_rows_are_nan():
    # A relative-position table of -inf except the zero offset's entry for head 0: rows whose
    # allowed keys are all -inf appear once an image's group leaves a token alone... simpler: make
    # every entry -inf for head 1, so every row of head 1 is fully masked (rule 2: NaN, not zeros).
    qkv, kw = _inputs(2, 14, 14, 2, 32, (7, 7), (0, 0), True, False, "none", torch.bfloat16)
    kw["rel_pos_bias"][:, 1] = float("-inf")
    c = _call(qkv, 2, (7, 7), kw)
    out, lse = c.forward()
    want = ref.window_attention(qkv.double(), 2, (7, 7), rel_pos_bias=kw["rel_pos_bias"].double())
    assert torch.isnan(out[..., 32:]).all() and torch.isnan(want[..., 32:]).all()
    assert torch.isfinite(out[..., :32]).all()
    assert torch.isneginf(lse[:, 1]).all()


@pytest.mark.parametrize("where", ["v_masked_key", "q"])
def test_nan_inputs_propagate_like_the_reference(where):
    # NaN in V of a token that other groups cannot see: the reference's P @ V still multiplies it by
    # 0 (NaN) for every row of the window; the kernel must give the same NaN pattern.
    qkv, kw = _inputs(2, 14, 14, 2, 32, (7, 7), (0, 0), True, False, "per_image", torch.bfloat16)
    C = 64
    if where == "v_masked_key":
        qkv[0, 3, 4, 2 * C + 5] = float("nan")  # head 0, channel 5 of V
    else:
        qkv[1, 9, 9, 40] = float("nan")  # head 1 of Q
    out, _ = _call(qkv, 2, (7, 7), kw).forward()
    want = ref.window_attention(qkv.double(), 2, (7, 7), **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    ok = ~torch.isnan(want)
    same = ref.window_attention(qkv, 2, (7, 7), **kw)
    assert_close_2x(out[ok], want[ok], same[ok])


def _aligned_group():
    """(2, 28, 28) labels for windows 14: image 0's windows split 70 / 126 (segments padded to 16-slot
    starts fit the 208 slots: the forward's aligned layout), image 1's window 0 splits 2 / 194 (16 + 208
    slots do not fit: the prologue's layout) and its window 1 is one segment."""
    g = torch.zeros(2, 28, 28, dtype=torch.int64)
    g[0] = (torch.arange(28) % 14 >= 5).long()[None, :]
    g[1, 0, 0:2] = 1
    fits = []
    for b in range(2):
        for wy in range(2):
            for wx in range(2):
                _, n = g[b, 14 * wy:14 * wy + 14, 14 * wx:14 * wx + 14].unique(return_counts=True)
                fits.append(int(((n + 15) // 16 * 16).sum()) <= 208)
    assert any(fits) and not all(fits)  # both layouts run
    return g


@pytest.mark.parametrize("variant", ["rpb", "attn_bias", "shift"])
def test_aligned_segment_packs(variant):
    # One-window packs whose segments start at multiples of 16 slots (align_segments), next to packs
    # that keep the prologue's layout; padding slots inside the pack are never stored.
    qkv, kw = _inputs(2, 28, 28, 2, 32, (14, 14), (0, 0), True, variant == "attn_bias", "none", torch.bfloat16)
    kw["group"] = _aligned_group()
    if variant == "shift":
        kw["shift_size"] = (0, 7)
    _check(qkv, 2, (14, 14), kw)


def test_aligned_segment_packs_nan_and_masked_rows():
    # NaN in V (the exact path over an aligned pack's slots) and all -inf rows (NaN, lse -inf).
    qkv, kw = _inputs(2, 28, 28, 2, 32, (14, 14), (0, 0), True, False, "none", torch.bfloat16)
    kw["group"] = _aligned_group()
    qkv[0, 3, 4, 2 * 64 + 5] = float("nan")  # head 0 of V, image 0 window 0
    kw["rel_pos_bias"][:, 1] = float("-inf")  # head 1: every row fully masked
    out, lse = _call(qkv, 2, (14, 14), kw).forward()
    want = ref.window_attention(qkv.double(), 2, (14, 14), **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.isnan(out[..., 32:]).all() and torch.isneginf(lse[:, 1]).all()
    ok = ~torch.isnan(want)
    same = ref.window_attention(qkv, 2, (14, 14), **kw)
    assert_close_2x(out[ok], want[ok], same[ok])


def _tail_group(window, sizes_list, seed=0):
    """(B, wh, ww) int32 labels, one window per image: image b's window holds segments of sizes_list[b]
    tokens (label i for segment i) at random positions."""
    wh, ww = window
    gen = torch.Generator().manual_seed(seed)
    g = torch.empty(len(sizes_list), wh * ww, dtype=torch.int32)
    for b, sizes in enumerate(sizes_list):
        assert sum(sizes) == wh * ww
        lab = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), torch.tensor(sizes))
        g[b] = lab[torch.randperm(wh * ww, generator=gen)]
    return g.reshape(-1, wh, ww)


# One-window packs (window = image) whose segments end 1..15 keys into a 16-key block: a segment's last
# 1..8 keys are an 8-key block of the walk (one_walk: Q = 8, or 24 after a masked prefix), 9..15 a
# 16-key one. (name, window, segment sizes per image); the size mod 16 is the segment's tail.
TAIL_CASES = [
    # N 225 (cap 240: pads up to 15 fit the aligned layout): tails 1 | 0 (7 full blocks: odd middle),
    # 3 | 14 | 0 (a 3-key segment: u = 0)
    ("w15_tails_1_3_14", (15, 15), [[113, 112], [3, 14, 208]]),
    # N 210 (cap 224): tails 2 | 0 (6 full blocks: even middle), 2 (3 full blocks) | 0
    ("w14x15_tail_2", (14, 15), [[98, 112], [50, 160]]),
    # N 196 (cap 208, pads up to 12): tails 8 | 12, 9 | 11, 5 | 15, 6 | 14, 7 | 13, 4 | 0
    ("w14_tails_4_to_15", (14, 14), [[88, 60, 48], [73, 75, 48], [21, 95, 80], [6, 78, 112], [7, 13, 176],
                                     [100, 96]]),
    # rounded segments that do not fit (the prologue's layout): tiles inside the big segment have a masked
    # prefix and an 8-key suffix (tails 2 and 4 with odd / even full blocks: Q = 8 and 24)
    ("w14_unaligned", (14, 14), [[17, 17, 162], [17, 17, 146, 16]]),
]


# Both head dims take the 8-key loop (one-window kernels: one CTA per SM, 255 registers; window_attention_fwd.cuh
# kEight, fwd_two_ctas); the masked 16-key blocks at end - 8 that replace it in the cosine kernels (and
# below sm_90) are test_segment_tails_fallbacks_and_cosine's "cosine" case.
@pytest.mark.parametrize("d", [32, 64], ids=["d32", "d64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", TAIL_CASES, ids=lambda c: c[0])
def test_segment_tails(case, dtype, d):
    if d == 64 and dtype == torch.float16:
        pytest.skip("the 8-key loop: bf16 covers it (the fp16 kernels share the walk)")
    _, win, sizes = case
    qkv, kw = _inputs(len(sizes), win[0], win[1], 2, d, win, (0, 0), True, False, "none", dtype)
    kw["group"] = _tail_group(win, sizes)
    _check(qkv, 2, win, kw, backward=dtype == torch.bfloat16)  # the backward reads the forward's lse


@pytest.mark.parametrize("variant", ["nan_rows", "online", "cosine", "large_v", "huge_v"])
def test_segment_tails_fallbacks_and_cosine(variant):
    # The 8-key tail block in the online walk (a tile whose fixed reference fails: scores x9 put later
    # keys far above the probe's; NaN rows: there a masked 16-key block at end - 8 takes such a tail), next
    # to NaN and fully masked rows, and in cosine mode (its kernels: the 16-key block in both walks). bf16
    # V of 2^56 keeps the fixed reference with no O check (p <= 2^32 times it stays finite), V of 2^70
    # takes the exact path (v_unsafe), both with scores x9.
    win, sizes = (14, 14), [[88, 60, 48], [73, 75, 48], [7, 13, 176], [100, 96]]
    dtype = torch.float16 if variant == "online" else torch.bfloat16
    qkv, kw = _inputs(len(sizes), 14, 14, 2, 32, win, (0, 0), True, False, "none", dtype)
    kw["group"] = _tail_group(win, sizes, seed=1)
    if variant in ("online", "large_v", "huge_v"):
        x = qkv.float()
        x[..., :128] *= 3.0
        x[..., 128:] *= {"online": 1.0, "large_v": 2.0 ** 56, "huge_v": 2.0 ** 70}[variant]
        _check(x.to(dtype), 2, win, kw, backward=False)
        return
    if variant == "cosine":
        ls = torch.tensor([2.0, 3.5])
        c = E.Call(qkv, 2, win, (0, 0), kw["rel_pos_bias"], None, kw["group"], logit_scale=ls)
        out, _ = c.forward()
        want = ref.window_attention(qkv.double(), 2, win, logit_scale=ls.double(), **kw)
        same = ref.window_attention(qkv, 2, win, logit_scale=ls.to(dtype), **kw)
        assert_close_2x(out, want, same)
        return
    qkv[0, 3, 4, 40] = float("nan")  # head 1 of Q: one NaN row of image 0 (its tile walks again online)
    kw["rel_pos_bias"][:, 0] = float("-inf")  # head 0: every row fully masked (NaN, lse -inf)
    out, lse = _call(qkv, 2, win, kw).forward()
    want = ref.window_attention(qkv.double(), 2, win, **kw)
    assert torch.equal(torch.isnan(out), torch.isnan(want)) and torch.isnan(out[..., :32]).all()
    assert torch.isneginf(lse[:, 0]).all() and int(torch.isnan(out[..., 32:]).sum()) == 32
    ok = ~torch.isnan(want)
    same = ref.window_attention(qkv, 2, win, **kw)
    assert_close_2x(out[ok], want[ok], same[ok])


@pytest.mark.parametrize("gain", [4.0, 12.0], ids=["x4", "x12"])
def test_large_scores_move_the_softmax_reference(gain):
    # Scores spread over tens to hundreds of units: row maxima pass the forward's rescale threshold
    # (2^8) in later key blocks, so O and l rescale mid-row; small gains keep the first reference.
    qkv, kw = _inputs(1, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "shared", torch.bfloat16)
    _check((qkv.float() * gain).to(torch.bfloat16), 2, (14, 14), kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fixed_reference_falls_back_online(dtype):
    # Window-14 tiles sum p against a fixed reference (the largest of the segment's first 8 keys) and
    # walk again online when a stored row's sum of p leaves [LMIN, LMAX] (fp16: [0.5, 2^15]): scores
    # spread x9 put later keys ~10-20 units above the probe's (fp16 fails the sum check). bf16 V near
    # 2^113, whose p * v could overflow fp32 while the sum check passes, takes the exact path (v_unsafe).
    qkv, kw = _inputs(1, 28, 28, 2, 32, (14, 14), (0, 0), True, False, "shared", dtype)
    x = qkv.float()
    x[..., :128] *= 3.0  # q and k: scores x9
    if dtype == torch.bfloat16:
        x[..., 128:] *= 2.0 ** 112
    _check(x.to(dtype), 2, (14, 14), kw, backward=False)


def test_deterministic_bias_gradient_is_bit_identical():
    qkv, kw = _inputs(3, 14, 14, 2, 32, (7, 7), (3, 3), True, False, "per_image", torch.bfloat16)
    c = _call(qkv, 2, (7, 7), kw)
    out, lse = c.forward()
    dout = torch.randn(3, 14, 14, 64, dtype=torch.bfloat16)
    runs = []
    for seed in (1, 2):
        E.seed(seed)  # a different thread order
        runs.append(c.backward(dout, out, lse, deterministic=True))
    for a, b in zip(runs[0], runs[1]):
        assert (a is None and b is None) or torch.equal(a, b)
    _check(qkv, 2, (7, 7), kw, deterministic=True)


def test_legacy_kernels_under_a_small_smem_limit(monkeypatch):
    # MIXKERNELS_WATTN_SMEM_LIMIT below what the fused kernels need: the legacy kernels run, with K/V
    # streamed in column chunks.
    cap, ld, T = 224, (32 + 8) * 2, 27 * 27
    base = ld * (2 * 16 + 2 * 32) + 52 * cap  # legacy make_plan: 2 row tiles of 16, 2 column tiles of 32
    qkv, kw = _inputs(1, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "shared", torch.bfloat16)
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", str(base + 4 * T))
    _check(qkv, 2, (14, 14), kw)
    monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT", str(base + 4 * (T + 32)))
    _check(qkv, 2, (14, 14), kw, deterministic=True)


def test_outputs_fully_written_and_thread_order_independent():
    qkv, kw = _inputs(2, 12, 12, 2, 32, (6, 6), (2, 3), True, False, "per_image", torch.bfloat16)
    c = _call(qkv, 2, (6, 6), kw)
    E.seed(7)
    a = c.forward()
    E.seed(8)
    b = c.forward()
    for x, y in zip(a, b):  # outputs start as NaN poison: unwritten elements would show
        assert torch.isfinite(x).all() and torch.equal(x, y)


@pytest.mark.skipif(os.environ.get("MIXKERNELS_EMU_FULL") != "1", reason="MIXKERNELS_EMU_FULL=1 for more shapes")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_deterministic_matches_reference(case):
    _, B, H, W, nh, d, win, shift, rpb, ab, group = case
    qkv, kw = _inputs(B, H, W, nh, d, win, shift, rpb, ab, group, torch.bfloat16)
    _check(qkv, nh, win, kw, deterministic=True)


def _two_pass_limit(B, H, W, d, win, T):
    """A shared-memory limit that fits the fused backward's two-pass layout but not the one-pass one
    (the dS^T matrix on top): wattn_workload mirrors plan_backward."""
    from mixkernels.bench import wattn_workload as ww

    N = win[0] * win[1]
    nwin = B * (H // win[0]) * (W // win[1])
    cap = ww._round16(ww.pick_pack(N, nwin) * N)
    two = ww.layout_bytes(cap, T, d, 2, 5, 1, True, T + 1)
    assert two + cap * (cap + 8) * 2 > two + 16
    return two


# The backward's two plans: one pass (S, dP and exp once per pair, dS^T kept in shared memory; the
# default where it fits) and two passes (a limit between the two layouts). One SM: every CTA walks
# all heads, and each head's key pass rewrites the dS^T blocks its query pass reads.
@pytest.mark.parametrize("plan", ["one_pass", "two_pass"])
@pytest.mark.parametrize("case", HEADS_CASES, ids=lambda c: c[0])
def test_backward_plans_with_heads_sharing_a_cta(case, plan, monkeypatch):
    _, B, H, W, nh, d, win, shift, rpb, group, coords = case
    monkeypatch.setenv("MIXKERNELS_EMU_SMS", "1")
    qkv, kw = _inputs(B, H, W, nh, d, win, shift, rpb, False, group, torch.bfloat16, coords=coords)
    if plan == "two_pass":
        R = kw.get("coord_range", win)
        monkeypatch.setenv("MIXKERNELS_WATTN_SMEM_LIMIT",
                           str(_two_pass_limit(B, H, W, d, win, (2 * R[0] - 1) * (2 * R[1] - 1))))
    _check(qkv, nh, win, kw, deterministic=plan == "one_pass" and coords)


def test_backward_of_fully_masked_rows_is_nan():
    # Rule 2 in the backward: head 1's rows are all -inf, so its gradients are NaN exactly where the
    # reference's are, and head 0's stay finite and exact.
    qkv, kw = _inputs(2, 14, 14, 2, 32, (7, 7), (0, 0), True, False, "per_image", torch.bfloat16)
    kw["rel_pos_bias"][:, 1] = float("-inf")
    c = _call(qkv, 2, (7, 7), kw)
    out, lse = c.forward()
    dout = torch.randn(2, 14, 14, 64, dtype=torch.bfloat16)
    dqkv, drpb, _ = c.backward(dout, out, lse)
    r64 = _ref(qkv, 2, (7, 7), kw, dout, lambda t: t.double())
    same = _ref(qkv, 2, (7, 7), kw, dout, lambda t: t)
    for g, r, s in ((dqkv, r64[1], same[1]), (drpb, r64[2], same[2])):
        assert torch.equal(torch.isnan(g), torch.isnan(r)) and torch.isnan(r).any()
        ok = ~torch.isnan(r)
        assert_close_2x(g[ok], r[ok], s[ok])
