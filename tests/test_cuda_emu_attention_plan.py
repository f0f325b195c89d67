"""The CUDA forward's pack plans (window_attention_fwd_pack.cuh), run on the CPU by the SIMT emulator.

With batch-shared group labels (or none) and coordinates, and whole packs per image, the launcher runs
wattn_fwd_plan_kernel (one CTA per pack position of image 0) before the forward, whose CTAs copy their
position's slots and tiles instead of running the pack prologue. Every case checks: whether the plan
applies (workspace bytes, launches: 2 with the plan, 1 without), the output and lse bit for bit against
the same launcher without a workspace (every CTA runs the prologue), and the output against the float64
reference.
"""
from __future__ import annotations

import pytest
import torch

from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x

import _cuda_emu as E
from test_cuda_emu_attention import _call, _inputs

_SKIP = E.unavailable()
pytestmark = pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")


@pytest.fixture(autouse=True)
def _plans_wherever_they_apply(monkeypatch):
    """These shapes put a CTA or two on each of the 132 SMs, too few for the launcher's cost rule:
    MIXKERNELS_WATTN_PLAN=1 takes the plans wherever they apply (test_plan_cost_rule checks the rule)."""
    monkeypatch.setenv("MIXKERNELS_WATTN_PLAN", "1")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _run(c, plan: bool):
    n0 = E.launches()
    out, lse = c.forward(plan=plan)
    return out, lse, E.launches() - n0


def _ref_kw(kw, double: bool):
    if not double:
        return kw
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}


def _plan_check(qkv, nh, win, kw, planned: bool = True, nan: bool = False):
    """Plan path vs the in-kernel prologue (bit for bit) and vs the reference; `planned`: whether the
    pack plans must apply. nan: compare the NaN pattern with the reference's, values where finite."""
    from mixkernels.bench import wattn_workload as ww

    c = _call(qkv, nh, win, kw)
    assert (E.fwd_workspace(c) > 0) == planned
    if planned and "coords" not in kw:  # the static report's model of the launcher's layout
        B, H, W, C3 = qkv.shape
        pl = ww.plan("fwd", B, H, W, nh, C3 // 3 // nh, *win, *win, qkv.element_size())
        assert E.fwd_workspace(c) == (H // win[0]) * (W // win[1]) // pl["P"] * pl["plan_bytes"]
    out, lse, n = _run(c, True)
    assert n == (2 if planned else 1), "the plan kernel did not run" if planned else "unexpected plan launch"
    out0, lse0, n0 = _run(c, False)
    assert n0 == 1
    assert torch.equal(_bits(out), _bits(out0)), "plan and prologue outputs differ"
    assert torch.equal(_bits(lse), _bits(lse0)), "plan and prologue lse differ"
    want = ref.window_attention(qkv.double(), nh, win, **_ref_kw(kw, True))
    same = ref.window_attention(qkv, nh, win, **kw)
    if nan:
        assert torch.equal(torch.isnan(out), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert_close_2x(out[ok], want[ok], same[ok])
    else:
        assert_close_2x(out, want, same, name="out")
    return out, lse


def _labels64(H, W):
    """Batch-shared int64 labels 5 and 5 + 2**32 (an int32 cast would merge the two groups)."""
    return torch.randint(0, 2, (H, W), dtype=torch.int64) * (2 ** 32) + 5


# (B, H, W, heads, head_dim, window, shift, attn_bias, group, dtype): every one takes the plan
PLAN_CASES = [
    ("group_int32_w7", 2, 28, 28, 2, 32, (7, 7), (0, 0), False, "shared", torch.bfloat16),  # 4 windows/pack, 4 positions
    ("group_int64_w7", 2, 28, 28, 2, 32, (7, 7), (0, 0), False, "shared64", torch.bfloat16),
    ("shift_w7", 2, 28, 28, 2, 32, (7, 7), (3, 3), False, "none", torch.bfloat16),
    ("shift_w14", 2, 28, 28, 2, 32, (14, 14), (7, 7), False, "none", torch.bfloat16),  # one-window packs
    ("group_shift_w14", 3, 28, 28, 2, 32, (14, 14), (7, 7), False, "shared64", torch.bfloat16),  # aligned segments
    ("group_shift_w7_bias_fp16", 3, 14, 14, 2, 16, (7, 7), (3, 3), True, "shared", torch.float16),  # 1 position
    ("group_w8_d64", 2, 16, 24, 2, 64, (8, 8), (0, 4), False, "shared", torch.bfloat16),  # 3 windows/pack
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: c[0])
def test_plan_matches_prologue_and_reference(case):
    _, B, H, W, nh, d, win, shift, ab, group, dtype = case
    qkv, kw = _inputs(B, H, W, nh, d, win, shift, True, ab, "shared" if group == "shared64" else group, dtype)
    if group == "shared64":
        kw["group"] = _labels64(H, W)
    _plan_check(qkv, nh, win, kw)


@pytest.mark.parametrize("coords64", [False, True], ids=["int32", "int64"])
def test_plan_with_shared_coords(coords64):
    # Batch-shared coordinates (1, H, W, 2): the plan carries the coords and the table box {ey, ex}.
    # Windows 8x8, 3 per pack, 6 per image: 2 positions.
    B, H, W, R = 2, 24, 16, (6, 5)
    qkv, kw = _inputs(B, H, W, 2, 32, (8, 8), (0, 0), True, False, "shared", torch.bfloat16)
    c = torch.stack([torch.randint(0, R[0], (1, H, W)), torch.randint(0, R[1], (1, H, W))], -1)
    kw["coords"] = c.long() if coords64 else c.int()
    kw["coord_range"] = R
    kw["rel_pos_bias"] = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), 2)
    _plan_check(qkv, 2, (8, 8), kw)


@pytest.mark.parametrize("case", ["heads_w7", "heads_w14"])
def test_plan_with_heads_sharing_a_cta(case, monkeypatch):
    # One SM: each CTA takes all 3 heads (double-buffered head loop) after copying its plan.
    monkeypatch.setenv("MIXKERNELS_EMU_SMS", "1")
    win, shift = ((7, 7), (3, 3)) if case == "heads_w7" else ((14, 14), (7, 7))
    qkv, kw = _inputs(2, 28, 28, 3, 32, win, shift, True, False, "shared", torch.bfloat16)
    _plan_check(qkv, 3, win, kw)


@pytest.mark.parametrize("case", ["uneven_packs", "per_image_group", "per_image_coords", "one_image"])
def test_plan_fallbacks(case):
    # No plan: windows per image not a multiple of the pack (9 windows of 7x7, 4 per pack), per-image
    # labels or coordinates, or one image (no position shared). Same results, one launch.
    if case == "uneven_packs":
        qkv, kw = _inputs(2, 21, 21, 2, 32, (7, 7), (0, 0), True, False, "shared", torch.bfloat16)
        win = (7, 7)
    elif case == "per_image_group":
        qkv, kw = _inputs(2, 28, 28, 2, 32, (7, 7), (3, 3), True, False, "per_image", torch.bfloat16)
        win = (7, 7)
    elif case == "per_image_coords":
        qkv, kw = _inputs(2, 24, 16, 2, 32, (8, 8), (0, 0), True, False, "shared", torch.bfloat16, coords=True)
        win = (8, 8)
    else:
        qkv, kw = _inputs(1, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "shared", torch.bfloat16)
        win = (14, 14)
    _plan_check(qkv, 2, win, kw, planned=False)


@pytest.mark.parametrize("win", [(7, 7), (14, 14)], ids=["w7", "w14"])
def test_plan_nan_and_masked_rows(win):
    # NaN in V of image 1 (the exact path over a planned pack's slots: tok rebased to image 1) and
    # head 1's table all -inf (every row NaN, lse -inf, written at image 1's lse rows too).
    qkv, kw = _inputs(2, 28, 28, 2, 32, win, (0, 0), True, False, "shared", torch.bfloat16)
    kw["group"] = _labels64(28, 28)
    qkv[1, 17, 9, 2 * 64 + 5] = float("nan")  # head 0 of V
    kw["rel_pos_bias"][:, 1] = float("-inf")
    out, lse = _plan_check(qkv, 2, win, kw, nan=True)
    assert torch.isnan(out[..., 32:]).all() and torch.isneginf(lse[:, 1]).all()
    rows = slice(14, 21) if win[0] == 7 else slice(14, 28)  # image 1's window holding the NaN
    assert torch.isnan(out[1, rows, :, :32]).any()


def test_plan_cost_rule(monkeypatch):
    # Without the override the plans run only when the busiest SM has enough CTAs (>= 4 for one-window
    # packs, >= 5 for packs of several windows), as the static report's model (wattn_workload.plan) says;
    # MIXKERNELS_WATTN_PLAN=0 turns them off. 8 packs of one 14x14 window, 2 heads (one CTA each on 1 SM).
    from mixkernels.bench import wattn_workload as ww

    qkv, kw = _inputs(2, 28, 28, 2, 32, (14, 14), (7, 7), True, False, "shared", torch.bfloat16)
    c = _call(qkv, 2, (14, 14), kw)
    monkeypatch.delenv("MIXKERNELS_WATTN_PLAN")
    assert E.fwd_workspace(c) == 0  # 132 SMs: one CTA each
    assert ww.plan("fwd", 2, 28, 28, 2, 32, 14, 14, 14, 14)["ppi"] == 0
    monkeypatch.setenv("MIXKERNELS_EMU_SMS", "1")  # one SM: 8 CTAs
    pl = ww.plan("fwd", 2, 28, 28, 2, 32, 14, 14, 14, 14, n_sm=1)
    assert pl["ppi"] == 4 and E.fwd_workspace(c) == 4 * pl["plan_bytes"]
    out, _, n = _run(c, True)
    assert n == 2
    monkeypatch.setenv("MIXKERNELS_WATTN_PLAN", "0")
    assert E.fwd_workspace(c) == 0
    # packs of several windows: 4 CTAs on one SM do not pay for the plan, 5 would
    qkv7, kw7 = _inputs(2, 28, 28, 2, 32, (7, 7), (3, 3), True, False, "none", torch.bfloat16)
    monkeypatch.delenv("MIXKERNELS_WATTN_PLAN")
    pl7 = ww.plan("fwd", 2, 28, 28, 2, 32, 7, 7, 7, 7, n_sm=1)
    assert pl7["npacks"] * pl7["nhg"] == 8 and pl7["ppi"] == 4  # 8 CTAs: plans
    assert E.fwd_workspace(_call(qkv7, 2, (7, 7), kw7)) == 4 * pl7["plan_bytes"]
    pl7 = ww.plan("fwd", 2, 28, 28, 2, 32, 7, 7, 7, 7, n_sm=2)  # 4 CTAs per SM: none
    assert pl7["ppi"] == 0
