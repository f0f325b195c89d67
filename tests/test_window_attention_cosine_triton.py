"""Triton SwinV2 cosine window attention (``window_attention_cosine[_backward]``) vs float64.

The launchers are called directly (the ops-layer variant lives on the swinv2 branch). The
reference is the cosine formula on main's reference: q and k L2-normalized per head as
``F.normalize`` (eps 1e-12), q times ``exp(min(logit_scale, log 100))``, then
``reference.window_attention`` with scale 1, so autograd gives every gradient (qkv through the
normalization, the table, attn_bias, the logit scale with the clamp's zero gradient).
Interpreter tiles are 16 wide: N < 16 takes the single-tile kernels, N >= 16 the multi-tile
forward and the two-phase backward.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from mixkernels import reference as ref
from mixkernels.testing import assert_close_2x, tolerance

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LOG100 = math.log(100.0)
# Compiled kernels on a GPU; the interpreter (conftest sets it without one) on CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def _tw():
    return pytest.importorskip("mixkernels.triton.window_attention")


def _cosine_qkv(qkv, nh, logit_scale):
    """qkv with q -> normalize(q) * exp(min(logit_scale, log 100)) and k -> normalize(k), per head."""
    B, H, W, C3 = qkv.shape
    q, k, v = qkv.reshape(B, H, W, 3, nh, C3 // (3 * nh)).unbind(3)
    hs = torch.clamp(logit_scale, max=LOG100).exp().to(qkv.dtype)
    q = F.normalize(q, dim=-1, eps=1e-12) * hs.view(nh, 1)
    k = F.normalize(k, dim=-1, eps=1e-12)
    return torch.stack([q, k, v], 3).reshape(B, H, W, C3)


def ref_cosine(qkv, nh, win, logit_scale, **kw):
    return ref.window_attention(_cosine_qkv(qkv, nh, logit_scale), nh, win, scale=1.0, **kw)


def _inputs(dtype, B=2, win=(3, 3), grid=(2, 1), nh=2, d=16, shift=(0, 0), rpb=False, bias=False, group=None,
            coords=None, zero_rows=False):
    """float64 leaves and the launcher arguments' fixed parts."""
    wh, ww = win
    H, W = grid[0] * wh, grid[1] * ww
    N = wh * ww
    R = win
    kw = dict(shift_size=shift)
    launch = dict(group=None, coords=None)
    if coords is not None:
        G = B if coords == "per" else 1
        base = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1)
        c = 2 * base + torch.randint(0, 2, (G, H, W, 2))
        R = (2 * H, 2 * W)
        kw.update(coords=c, coord_range=R)
        launch["coords"] = c.contiguous()
    if group is not None:
        g = torch.randint(0, 2, (B if group == "per" else 1, H, W), dtype=torch.int32)
        kw["group"] = g
        launch["group"] = g.contiguous()
    qkv = torch.randn(B, H, W, 3 * nh * d, dtype=torch.float64)
    if zero_rows:  # F.normalize's eps branch: q of one token and k of another exactly 0 (every head)
        qkv[0, 0, 0, : nh * d] = 0
        qkv[0, 1, 0, nh * d: 2 * nh * d] = 0
    # around SwinV2's init log(10); the last head past the clamp (its gradient is exactly 0)
    ls = (math.log(10.0) + 0.5 * torch.randn(nh)).float()
    ls[-1] = 5.0
    leaves = {"qkv": qkv, "logit_scale": ls.double()}
    if rpb:
        leaves["rel_pos_bias"] = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), nh, dtype=torch.float64)
    if bias:
        leaves["attn_bias"] = torch.randn(nh, N, N, dtype=torch.float64)
    leaves = {k: v.to(DEVICE) for k, v in leaves.items()}
    kw = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kw.items()}
    launch = {k: None if v is None else v.to(DEVICE) for k, v in launch.items()}
    return dict(dtype=dtype, nh=nh, win=win, shift=shift, R=R, kw=kw, launch=launch, leaves=leaves)


def _reference(c, dtype, dout):
    """(out, lse, grads) of the reference with qkv in ``dtype`` (biases, logit scale fp32 or fp64)."""
    side = torch.float64 if dtype == torch.float64 else torch.float32
    ins = {k: v.detach().to(dtype if k == "qkv" else side).requires_grad_() for k, v in c["leaves"].items()}
    biases = {k: v for k, v in ins.items() if k in ("rel_pos_bias", "attn_bias")}
    out = ref_cosine(ins["qkv"], c["nh"], c["win"], ins["logit_scale"], **c["kw"], **biases)
    grads = torch.autograd.grad(out, list(ins.values()), dout.to(out.dtype))
    logits, _ = ref.window_attention_logits(_cosine_qkv(ins["qkv"].detach(), c["nh"], ins["logit_scale"].detach()),
                                            c["nh"], c["win"], scale=1.0, **c["kw"],
                                            **{k: v.detach() for k, v in biases.items()})
    return out, torch.logsumexp(logits, -1), dict(zip(ins, grads))


def _run(c, deterministic=False, need=(True, True, True)):
    tw = _tw()
    L = c["leaves"]
    qkv = L["qkv"].to(c["dtype"]).contiguous()
    rpb = L["rel_pos_bias"].float().contiguous() if "rel_pos_bias" in L else None
    ab = L["attn_bias"].float().contiguous() if "attn_bias" in L else None
    ls = L["logit_scale"].float().contiguous()
    (wh, ww), (sh, sw), (rh, rw) = c["win"], c["shift"], c["R"]
    args = (c["nh"], wh, ww, sh, sw, rpb, ab, c["launch"]["group"], c["launch"]["coords"], rh, rw, ls)
    out, lse = tw.window_attention_cosine(qkv, *args)
    dout = torch.randn(out.shape, dtype=torch.float64).to(DEVICE)
    grads = tw.window_attention_cosine_backward(dout.to(qkv.dtype), qkv, out, lse, *args, need[0] and rpb is not None,
                                                need[1] and ab is not None, need[2], deterministic)
    return out, lse, dout, grads


def _check(c, deterministic=False, zero_rows=False):
    dtype = c["dtype"]
    out, lse, dout, (dqkv, drpb, dbias, dls) = _run(c, deterministic)
    out64, lse64, g64 = _reference(c, torch.float64, dout)
    out_s, lse_s, g_s = _reference(c, dtype, dout)
    assert out.dtype == dtype and dqkv.dtype == dtype
    assert_close_2x(out, out64, out_s, name="out")
    # lse (B*nW, nH, N): natural-log log-sum-exp of the cosine logits, fp32
    assert lse.dtype == F32
    assert_close_2x(lse, lse64, lse_s.float(), name="lse")
    atol8 = tolerance(dtype) * 8  # sums over windows and batch
    if zero_rows:
        # the gradient of a zero q/k row is dx_hat / eps ~ 1e12: checked relative to its size (fp32 only)
        big = c["leaves"]["qkv"] == 0
        assert big.any() and g64["qkv"][big].abs().max() > 1e6
        if dtype == F32:
            rel = (dqkv.double() - g64["qkv"])[big].abs().max() / g64["qkv"][big].abs().max()
            assert rel < 1e-5, rel
        keep = ~big
        assert_close_2x(dqkv[keep], g64["qkv"][keep], g_s["qkv"][keep], name="dqkv")
    else:
        assert_close_2x(dqkv, g64["qkv"], g_s["qkv"], name="dqkv")
    if "rel_pos_bias" in c["leaves"]:
        assert_close_2x(drpb, g64["rel_pos_bias"], g_s["rel_pos_bias"], atol=atol8, name="drpb")
    if "attn_bias" in c["leaves"]:
        assert_close_2x(dbias, g64["attn_bias"], g_s["attn_bias"], atol=atol8, name="dbias")
    assert dls.dtype == F32 and dls.shape == (c["nh"],)
    assert dls[-1].item() == 0.0  # the clamped head
    assert_close_2x(dls, g64["logit_scale"], g_s["logit_scale"], atol=atol8, name="dlogit_scale")
    return dqkv, drpb, dbias, dls


CASES = {
    # single tile (N < 16 under the interpreter): shift, group, table, attn_bias
    "win3x3_shift_group_per_rpb_bias_f32": (F32, dict(shift=(1, 2), group="per", rpb=True, bias=True)),
    "win3x4_group_shared_rpb_bf16": (BF16, dict(win=(3, 4), grid=(2, 2), nh=3, group="shared", rpb=True)),
    "win3x3_coords_per_rpb_d32_f16": (F16, dict(d=32, coords="per", rpb=True)),
    "win2x3_nomask_nobias_f32": (F32, dict(win=(2, 3), grid=(2, 2))),
    # multi tile (N >= 16): two-phase backward with the centered logit-scale sums
    "win5x4_shift_group_per_rpb_bias_f32": (F32, dict(win=(5, 4), B=1, grid=(1, 2), shift=(2, 1), group="per",
                                                      rpb=True, bias=True)),
    "win5x4_coords_per_rpb_bias_bf16": (BF16, dict(win=(5, 4), B=1, grid=(1, 1), nh=1, coords="per", rpb=True,
                                                   bias=True)),
    "win7x5_shift_rpb_d32_f16": (F16, dict(win=(7, 5), B=1, grid=(1, 1), nh=2, d=32, shift=(3, 2), rpb=True)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cosine_forward_backward(name):
    dtype, ckw = CASES[name]
    _check(_inputs(dtype, **ckw))


@pytest.mark.parametrize("win,dtype", [((3, 3), F32), ((5, 4), F32), ((3, 3), BF16)])
def test_cosine_zero_rows(win, dtype):
    c = _inputs(dtype, win=win, B=1, grid=(2, 1), rpb=True, zero_rows=True)
    _check(c, zero_rows=True)


@pytest.mark.parametrize("win,coords", [((3, 4), None), ((5, 4), None), ((5, 4), "per"), ((2, 3), "per")])
def test_cosine_deterministic_bit_identical(win, coords):
    """deterministic=True: every gradient, the logit scale's included, bit-identical across runs
    (single tile: always; multi tile: per-program slots summed in a fixed order)."""
    c = _inputs(F16 if win[0] * win[1] < 16 else BF16, win=win, B=2, grid=(1, 2), shift=(1, 1), group="per",
                rpb=True, bias=True, coords=coords)
    first = _check(c, deterministic=True)
    torch.manual_seed(1234)  # the same dout both times
    again = _run(c, deterministic=True)
    torch.manual_seed(1234)
    base = _run(c, deterministic=True)
    for a, b, n in zip(again[3], base[3], ("dqkv", "drpb", "dbias", "dlogit_scale")):
        assert torch.equal(a, b), n
    assert first[3].shape == base[3][3].shape


def test_cosine_need_flags():
    """need_dlogit_scale / need_drpb / need_dbias off: empty outputs, dqkv unchanged."""
    c = _inputs(F32, rpb=True, bias=True)
    torch.manual_seed(7)
    full = _run(c)
    torch.manual_seed(7)
    none = _run(c, need=(False, False, False))
    assert torch.equal(full[3][0], none[3][0])
    assert all(t.numel() == 0 for t in none[3][1:])


@pytest.mark.parametrize("win", [(3, 3), (5, 4)])
def test_cosine_poisoned_outputs(win, monkeypatch):
    """Every output the launchers allocate starts as NaN: an unwritten element fails."""
    tw = _tw()
    monkeypatch.setattr(tw, "_alloc", lambda shape, dtype, dev: torch.full(shape, float("nan"), dtype=dtype,
                                                                            device=dev))
    for det in (False, True):
        _check(_inputs(F32, win=win, B=1, grid=(1, 2), shift=(1, 1), rpb=True, bias=True), deterministic=det)


def test_cosine_nan_logit_scale_and_huge_scale():
    """A NaN logit scale gives NaN (torch.clamp keeps NaN) and a zero gradient; -inf gives scale 0."""
    c = _inputs(F32, rpb=True)
    c["leaves"]["logit_scale"] = torch.tensor([float("-inf"), float("nan")], dtype=torch.float64, device=DEVICE)
    out, lse, dout, (dqkv, drpb, dbias, dls) = _run(c)
    nh, d = 2, 16
    o = out.reshape(out.shape[:-1] + (nh, d))
    assert torch.isnan(o[..., 1, :]).all() and torch.isfinite(o[..., 0, :]).all()
    assert dls[1].item() == 0.0
    out64 = ref_cosine(c["leaves"]["qkv"], nh, c["win"], c["leaves"]["logit_scale"],
                       rel_pos_bias=c["leaves"]["rel_pos_bias"], **c["kw"])
    torch.testing.assert_close(o[..., 0, :].double(), out64.reshape(o.shape)[..., 0, :], atol=1e-5, rtol=1e-5)
