"""mixkernels.nn.SwinBlock against timm's SwinTransformerBlock: names, state_dict, math, grads."""
import pytest
import torch

from mixkernels._compat import import_timm

import_timm()
from timm.models.swin_transformer import SwinTransformerBlock as TimmBlock  # noqa: E402

from mixkernels import reference as ref  # noqa: E402
from mixkernels.nn import SwinBlock, WindowAttention  # noqa: E402

# (input_resolution, actual H, W, window, shift, always_partition)
CASES = [
    ((8, 8), 8, 8, 4, 2, False),      # shifted, divisible
    ((8, 8), 8, 8, 4, 0, False),      # plain windows
    ((7, 9), 7, 9, 4, 2, False),      # shift + padding (the rolled-then-padded path)
    ((6, 10), 6, 10, 4, 0, False),    # padding only
    ((3, 5), 3, 5, 7, 3, False),      # window clamped to the resolution, shift dropped
    ((3, 3), 3, 3, 4, 2, True),       # always_partition: input smaller than the window
    ((8, 12), 8, 12, (4, 6), (2, 3), False),  # rectangular window and shift
]


def _pair_blocks(res, win, shift, ap, dtype=torch.float64, **kw):
    t = TimmBlock(32, res, num_heads=2, window_size=win, shift_size=shift, always_partition=ap, **kw).to(dtype)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.3)
    m = SwinBlock(32, res, num_heads=2, window_size=win, shift_size=shift, always_partition=ap, **kw).to(dtype)
    m.load_state_dict(t.state_dict())
    return t, m


def test_names_and_state_dict_match_timm():
    t = TimmBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2)
    m = SwinBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2)
    assert list(m.state_dict()) == list(t.state_dict())
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in t.named_parameters()]
    assert list(dict(m.named_buffers())) == []  # nothing persistent or not beyond timm's
    for n in ("norm1.weight", "attn.qkv.weight", "attn.proj.bias", "attn.relative_position_bias_table",
              "norm2.bias", "mlp.fc1.weight", "mlp.fc2.bias"):
        assert n in m.state_dict()
    m.load_state_dict(t.state_dict())  # strict
    t.load_state_dict(m.state_dict())


@pytest.mark.parametrize("res,H,W,win,shift,ap", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_matches_timm_fwd_bwd(res, H, W, win, shift, ap, train):
    t, m = _pair_blocks(res, win, shift, ap)
    assert (t.window_size, t.shift_size) == (m.window_size, m.shift_size)
    t.train(train)
    m.train(train)
    x = torch.randn(2, H, W, 32, dtype=torch.float64, requires_grad=True)
    go = torch.randn(2, H, W, 32, dtype=torch.float64)
    yt = t(x)
    (gxt,) = torch.autograd.grad(yt, x, go, retain_graph=True)
    gt = torch.autograd.grad(yt, list(t.parameters()), go)
    ym = m(x)
    (gxm,) = torch.autograd.grad(ym, x, go, retain_graph=True)
    gm = torch.autograd.grad(ym, list(m.parameters()), go)
    torch.testing.assert_close(ym, yt, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gxm, gxt, rtol=1e-10, atol=1e-10)
    for (n, _), a, b in zip(m.named_parameters(), gm, gt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda s, n=n: f"grad {n}: {s}")


def test_fp32_default_backend_close_to_timm():
    t, m = _pair_blocks((7, 9), 4, 2, False, dtype=torch.float32)
    x = torch.randn(3, 7, 9, 32)
    torch.testing.assert_close(m(x), t(x), rtol=1e-5, atol=1e-5)


def test_group_blocks_information_flow():
    # Tokens of one group never see tokens of the other: perturbing group-1 tokens leaves
    # group-0 outputs unchanged (shift 0, the MLP is per token).
    m = SwinBlock(32, (8, 8), num_heads=2, window_size=4).double()
    group = torch.rand(8, 8) < 0.5
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, group] += torch.randn_like(x2[:, group])
    y, y2 = m(x, group=group), m(x2, group=group)
    torch.testing.assert_close(y[:, ~group], y2[:, ~group], rtol=0, atol=1e-12)
    assert (y[:, group] - y2[:, group]).abs().max() > 1e-3


def test_group_equals_reference_op_per_image():
    m = SwinBlock(32, (8, 8), num_heads=2, window_size=4, shift_size=2).double()
    group = torch.randint(0, 3, (2, 8, 8))
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)
    a = m.attn
    xn = m.norm1(x)
    o = ref.window_attention(a.qkv(xn), 2, (4, 4), shift_size=(2, 2), rel_pos_bias=a.relative_position_bias_table,
                             group=group)
    want = x + a.proj(o)
    want = want + m.mlp(m.norm2(want))
    torch.testing.assert_close(m(x, group=group), want, rtol=1e-12, atol=1e-12)


def test_padding_with_group_and_coords():
    m = SwinBlock(32, (6, 6), num_heads=2, window_size=4, shift_size=2).double()
    x = torch.randn(1, 6, 6, 32, dtype=torch.float64)
    group = torch.zeros(6, 6, dtype=torch.long)
    y = m(x, group=group)  # pad tokens get their own label: differs from the ungrouped timm result
    assert y.shape == x.shape and torch.isfinite(y).all()
    coords = torch.zeros(6, 6, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="coords"):
        m(x, coords=coords, coord_range=(6, 6))


def test_attn_drop_training_raises():
    m = SwinBlock(32, (8, 8), num_heads=2, window_size=4, attn_drop=0.1)
    x = torch.randn(1, 8, 8, 32)
    with pytest.raises(NotImplementedError, match="attn_drop"):
        m(x)
    m.eval()
    assert m(x).shape == x.shape


def test_window_attention_module_alone():
    a = WindowAttention(32, num_heads=2, window_size=4).double()
    x = torch.randn(2, 8, 8, 32, dtype=torch.float64)
    o = ref.window_attention(a.qkv(x), 2, 4, rel_pos_bias=a.relative_position_bias_table)
    torch.testing.assert_close(a(x), a.proj(o), rtol=1e-12, atol=1e-12)


def test_compile_fullgraph_block():
    torch._dynamo.reset()
    m = SwinBlock(32, (7, 9), num_heads=2, window_size=4, shift_size=2)
    x = torch.randn(2, 7, 9, 32, requires_grad=True)
    group = torch.rand(7, 9) < 0.5
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    for g in (None, group):
        y = cm(x, group=g)
        torch.testing.assert_close(y, m(x, group=g), rtol=1e-5, atol=1e-5)
        y.sum().backward()


def test_set_input_size_like_timm():
    t, m = _pair_blocks((8, 8), 4, 2, False)
    t.set_input_size((4, 4), 4)
    m.set_input_size((4, 4), 4)
    assert (m.window_size, m.shift_size) == (t.window_size, t.shift_size) == ((4, 4), (0, 0))
    x = torch.randn(1, 4, 4, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), t(x), rtol=1e-10, atol=1e-10)
    # A window change resizes the bias table exactly as timm does.
    t.set_input_size((2, 2), 4)
    m.set_input_size((2, 2), 4)
    assert (m.window_size, m.shift_size) == (t.window_size, t.shift_size) == ((2, 2), (0, 0))
    torch.testing.assert_close(m.attn.relative_position_bias_table, t.attn.relative_position_bias_table)
    x = torch.randn(1, 2, 2, 32, dtype=torch.float64)
    torch.testing.assert_close(m(x), t(x), rtol=1e-10, atol=1e-10)
