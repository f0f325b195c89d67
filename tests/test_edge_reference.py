"""The reference (the spec) follows the edge-input rules of docs/SEMANTICS.md.

Each rule is checked against an independent formulation (Python integers, dense labels,
explicit dense biases), so the reference cannot drift from the documented rule unnoticed;
tests/test_edge_inputs.py then holds every backend to the reference.
"""
import importlib
import itertools

import pytest
import torch

from mixkernels import reference as ref

I64_MAX, I64_MIN = 2**63 - 1, -(2**63)
NH, D, WIN = 2, 8, 3
N = WIN * WIN


def _qkv(B=1, H=WIN, W=WIN):
    return torch.randn(B, H, W, 3 * NH * D, dtype=torch.float64)


def test_exact_difference_matches_python_integers():
    vals = [I64_MIN, I64_MIN + 1, -(2**62), -5, -1, 0, 1, 7, 2**32, 2**62, I64_MAX - 1, I64_MAX]
    a = torch.tensor([x for x, _ in itertools.product(vals, vals)])
    b = torch.tensor([y for _, y in itertools.product(vals, vals)])
    d, ovf = importlib.import_module("mixkernels.reference.window_attention").exact_difference(a, b)
    for x, y, dv, o in zip(a.tolist(), b.tolist(), d.tolist(), ovf.tolist()):
        exact = x - y
        assert o == (not I64_MIN <= exact <= I64_MAX), (x, y)
        if not o:
            assert dv == exact, (x, y)


def test_group_labels_compare_at_full_width():
    # 0 and 2**32 (and -1 and 2**32-1) are equal in their low 32 bits: they must stay different.
    values = torch.tensor([0, 2**32, -1, 2**32 - 1, 5 + 2**40, I64_MIN, I64_MAX])
    group = values[torch.randint(0, len(values), (2, 6, 6))]
    dense = torch.unique(group, return_inverse=True)[1]
    qkv = _qkv(2, 6, 6)
    table = torch.randn((2 * WIN - 1) ** 2, NH, dtype=torch.float64)
    kw = dict(shift_size=1, rel_pos_bias=table)
    out = ref.window_attention(qkv, NH, WIN, group=group, **kw)
    torch.testing.assert_close(out, ref.window_attention(qkv, NH, WIN, group=dense, **kw), rtol=0, atol=0)
    merged = ref.window_attention(qkv, NH, WIN, group=group.to(torch.int32), **kw)  # what truncation computes
    assert not torch.allclose(out, merged)


def _dense_coords_bias(table, coords, R):
    """(nH, N, N) bias of one window from Python integers: table row if |diff| < R, else 0."""
    c = coords.reshape(N, 2).tolist()
    bias = torch.zeros(NH, N, N, dtype=table.dtype)
    for i, j in itertools.product(range(N), range(N)):
        dy, dx = c[i][0] - c[j][0], c[i][1] - c[j][1]
        if abs(dy) < R[0] and abs(dx) < R[1]:
            bias[:, i, j] = table[(dy + R[0] - 1) * (2 * R[1] - 1) + dx + R[1] - 1]
    return bias


@pytest.mark.parametrize("values", [
    [0, 1, 2, 3, 5, 8, -4],  # ordinary, some out of range
    [0, 1, 2**32, 2**32 + 1, -(2**32)],  # in range only at 32 bits
    [I64_MIN, I64_MIN + 1, I64_MAX, I64_MAX - 1, 0, -1, 1],  # differences overflow int64
], ids=["small", "mod_2_32", "int64_extremes"])
def test_coords_out_of_range_add_no_bias(values):
    R = (2, 3)
    v = torch.tensor(values)
    coords = v[torch.randint(0, len(values), (WIN, WIN, 2))]
    table = torch.randn((2 * R[0] - 1) * (2 * R[1] - 1), NH, dtype=torch.float64, requires_grad=True)
    qkv = _qkv()
    out = ref.window_attention(qkv, NH, WIN, rel_pos_bias=table, coords=coords, coord_range=R)
    want = ref.window_attention(qkv, NH, WIN, attn_bias=_dense_coords_bias(table, coords, R))
    torch.testing.assert_close(out, want)
    # No gradient reaches the table through out-of-range pairs: same as the dense formulation.
    g1, = torch.autograd.grad(out.sum(), table)
    g2, = torch.autograd.grad(want.sum(), table)
    torch.testing.assert_close(g1, g2)


def test_inf_table_entry_does_not_leak_into_out_of_range_pairs():
    R = (1, 1)  # only difference (0, 0) is in range
    table = torch.full((1, NH), float("inf"), dtype=torch.float64)
    coords = torch.arange(N * 2).reshape(WIN, WIN, 2)  # all distinct: only the diagonal is in range
    out = ref.window_attention(_qkv(), NH, WIN, rel_pos_bias=table, coords=coords, coord_range=R)
    assert torch.isnan(out).all()  # each row: +inf on its diagonal only -> softmax NaN (inf - inf)
    table = torch.zeros((1, NH), dtype=torch.float64)
    table[0, 0] = float("-inf")  # head 0: the diagonal is masked, the row still has its other keys
    out = ref.window_attention(_qkv(), NH, WIN, rel_pos_bias=table, coords=coords, coord_range=R)
    assert torch.isfinite(out).all()


def test_fully_masked_row_is_nan_and_only_that_row():
    qkv = _qkv(1, WIN, 2 * WIN)
    bias = torch.zeros(NH, N, N, dtype=torch.float64)
    bias[1, 4, :] = float("-inf")  # head 1, window row 4: every key masked
    out = ref.window_attention(qkv, NH, WIN, attn_bias=bias)  # (1, 3, 6, C)
    nan = torch.isnan(out)
    expect = torch.zeros_like(nan)
    for x0 in (0, WIN):  # the row sits in both windows (the bias is shared)
        expect[0, 4 // WIN, x0 + 4 % WIN, NH * D - D:] = True
    assert torch.equal(nan, expect)


def test_masked_pairs_get_zero_gradient_even_in_a_nan_row():
    qkv = _qkv(1, WIN, WIN).requires_grad_()
    bias = torch.zeros(NH, N, N, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        bias[0, 2, :] = float("-inf")
    group = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    out = ref.window_attention(qkv, NH, WIN, attn_bias=bias, group=group)
    (dbias,) = torch.autograd.grad(out, bias, torch.randn_like(out))
    masked = group.reshape(-1)[:, None] != group.reshape(-1)[None, :]
    assert (dbias[:, masked] == 0).all()
    assert torch.isnan(dbias[0, 2, ~masked[2]]).all()


@pytest.mark.parametrize("shape", ["L", "HW", "BL", "BHW"])
def test_mix_and_unmix_accept_every_mask_shape(shape):
    B, H, W, C = 3, 2, 4, 5
    m = torch.randint(0, 2, (B, H, W)).bool()
    m = m[:1].expand(B, H, W) if shape in ("L", "HW") else m
    arg = {"L": m[0].reshape(-1), "HW": m[0], "BL": m.reshape(B, -1), "BHW": m}[shape]
    x = torch.randn(B, H, W, C)
    want = torch.where(m[..., None], x.flip(0), x)
    torch.testing.assert_close(ref.mix_tokens(x, arg), want, rtol=0, atol=0)
    flat = arg.reshape(-1) if shape in ("L", "HW") else arg.reshape(B, H * W)  # what (B, L, C) accepts
    torch.testing.assert_close(ref.mix_tokens(x.reshape(B, H * W, C), flat), want.reshape(B, H * W, C), rtol=0, atol=0)
    if shape in ("L", "BL"):
        tok = torch.randn(C)
        u = ref.unmix_tokens(x.reshape(B, H * W, C), arg, tok)
        mm = m.reshape(B, H * W, 1)
        torch.testing.assert_close(u[:B], torch.where(mm, tok, x.reshape(B, H * W, C)), rtol=0, atol=0)


def test_selects_do_not_leak_nan_of_the_operand_not_taken():
    B, L, C = 2, 4, 3
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]])
    x = torch.randn(B, L, C)
    x[0, 0, 1] = float("nan")  # masked in image 0: replaced by the token in the first half
    tok = torch.randn(C)
    u = ref.unmix_tokens(x, mask, tok)
    assert torch.isnan(u).sum() == C - 2 and torch.isnan(u[B, 0, 1])  # only where x is taken
    # mixmim_loss: a NaN in the pred row a patch does not use; masked loss: NaN pred where unmasked.
    p = 2
    imgs = torch.randn(B, 3, 4, 4)
    pred = torch.randn(2 * B, L, p * p * 3, requires_grad=True)
    with torch.no_grad():
        pred[B + 1, 0, 0] = float("nan")  # row 2B-1-0 = 3 would serve image 0 patch 0, but mask[0,0] = 1 uses row 0
    loss = ref.mixmim_loss(pred, imgs, mask, p, reduction="none")
    assert torch.isfinite(loss).all()
    (g,) = torch.autograd.grad(loss.sum(), pred)
    assert torch.isfinite(g).all() and (g[B + 1, 0] == 0).all()
    pred = torch.randn(B, L, p * p * 3, requires_grad=True)
    with torch.no_grad():
        pred[0, 1, 0] = float("inf")  # patch 1 of image 0 is not masked: does not count
    loss = ref.masked_recon_loss(pred, imgs, mask, p)
    (g,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(loss) and torch.isfinite(g).all() and (g[0, 1] == 0).all()


def test_uniform_reads_two_low_bits_of_keep():
    x = torch.randn(2, 4, 8, 3)
    keep = torch.randint(0, 4, (2, 1, 2))
    high = keep + 4 * torch.randint(-3, 3, keep.shape)
    torch.testing.assert_close(ref.uniform_sample(x, high, 2), ref.uniform_sample(x, keep, 2), rtol=0, atol=0)
    c = torch.randn(2, 2, 4, 3)
    torch.testing.assert_close(ref.uniform_scatter(c, high, 2), ref.uniform_scatter(c, keep, 2), rtol=0, atol=0)
