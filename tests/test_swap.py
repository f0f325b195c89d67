"""swap_swin on timm and torchvision Swin (v1): same parameters, same outputs and gradients."""
import copy

import pytest
import torch

from mixkernels._compat import import_timm, import_torchvision

import_timm()
tv = import_torchvision()
import timm  # noqa: E402
from timm.models.swin_transformer import SwinTransformer  # noqa: E402
from torchvision.models import swin_transformer as tvs  # noqa: E402

from mixkernels import swap_swin  # noqa: E402
from mixkernels.nn import SwinBlock  # noqa: E402
from mixkernels.swap import TorchvisionSwinBlock  # noqa: E402

from swap_helpers import swapped_copy  # noqa: E402


def _timm_model(**kw):
    args = dict(img_size=64, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                num_classes=10, drop_path_rate=0.0)
    args.update(kw)
    return SwinTransformer(**args)


def _tv_model(window=8, **kw):
    return tvs.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                               window_size=[window, window], num_classes=10, stochastic_depth_prob=0.0, **kw)


def _check_same(orig, swapped, x, train):
    orig.train(train)
    swapped.train(train)
    xo = x.clone().requires_grad_(True)
    xs = x.clone().requires_grad_(True)
    yo, ys = orig(xo), swapped(xs)
    torch.testing.assert_close(ys, yo, rtol=1e-5, atol=1e-5)
    go = torch.randn_like(yo)
    yo.backward(go)
    ys.backward(go)
    torch.testing.assert_close(xs.grad, xo.grad, rtol=1e-5, atol=1e-5)
    po, ps = dict(orig.named_parameters()), dict(swapped.named_parameters())
    assert list(po) == list(ps)
    for n in po:
        if po[n].grad is None:
            assert ps[n].grad is None, n
            continue
        torch.testing.assert_close(ps[n].grad, po[n].grad, rtol=1e-5, atol=1e-5, msg=lambda s, n=n: f"{n}: {s}")


def _swap_copy(model):
    return swapped_copy(model)  # same Parameter objects, same state_dict keys and values


@pytest.mark.parametrize("train", [False, True])
def test_timm_swin_matches(train):
    m = _timm_model()
    s = _swap_copy(m)
    assert sum(isinstance(b, SwinBlock) for b in s.modules()) == 4
    assert not any(type(b).__name__ == "SwinTransformerBlock" for b in s.modules())
    _check_same(m, s, torch.randn(2, 3, 64, 64), train)


def test_timm_swin_padding_and_state_dict_round_trip():
    # 40 px -> 10x10 tokens, window 4: padding (+ shift) in stage 1; stage 2 (5x5) pads too.
    m = _timm_model(img_size=40)
    s = _swap_copy(m)
    _check_same(m, s, torch.randn(2, 3, 40, 40), True)
    fresh = _timm_model(img_size=40)
    fresh.load_state_dict(s.state_dict())  # swapped checkpoint loads into plain timm (strict)
    s.load_state_dict(m.state_dict())


def test_timm_create_model_and_optimizer_keeps_working():
    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                          depths=(1, 1), num_heads=(2, 4), num_classes=5, drop_path_rate=0.0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = copy.deepcopy(m)
    swap_swin(m)
    x = torch.randn(2, 3, 56, 56)
    m(x).sum().backward()
    opt.step()  # the optimizer holds the very parameters the swapped model uses
    changed = [not torch.equal(a, b) for a, b in zip(m.parameters(), before.parameters())]
    assert all(changed)


@pytest.mark.parametrize("size", [40, 24])
@pytest.mark.parametrize("train", [False, True])
def test_torchvision_swin_matches(size, train):
    # window 8: at 24 px the 6x6 stage-1 map is smaller than the window (padded, shift dropped);
    # at 40 px 10x10 pads to 16x16 and keeps the shift.
    m = _tv_model()
    s = _swap_copy(m)
    assert sum(isinstance(b, TorchvisionSwinBlock) for b in s.modules()) == 4
    assert "features.1.0.attn.relative_position_index" in s.state_dict()
    _check_same(m, s, torch.randn(2, 3, size, size), train)


def test_torchvision_swin_t_builder():
    with torch.device("meta"):  # full-size swin_t: skip the slow init
        m = tv.models.swin_t(weights=None)
        s = copy.deepcopy(m)
    swap_swin(s)
    assert sum(isinstance(b, TorchvisionSwinBlock) for b in s.modules()) == 12
    assert list(s.state_dict()) == list(m.state_dict())


def test_compile_fullgraph_swapped_torchvision_block():
    # (the timm path is SwinBlock itself, compiled in tests/test_nn.py)
    torch._dynamo.reset()
    t = swap_swin(_tv_model())
    tb = t.features[1][1]
    x = torch.randn(2, 10, 10, 32, requires_grad=True)
    ct = torch.compile(tb, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(ct(x), tb(x), rtol=1e-5, atol=1e-5)
    ct(x).sum().backward()


def test_unsupported_models_raise_naming_the_class():
    with pytest.raises(TypeError, match="ResNet"):
        with torch.device("meta"):
            swap_swin(tv.models.resnet18())
    # SwinV2 is supported (tests/test_swap_v2.py); timm's swinv2_cr is not
    v2cr = timm.create_model("swinv2_cr_tiny_ns_224", pretrained=False, img_size=32, embed_dim=16, depths=(1,),
                             num_heads=(2,), window_size=4)
    with pytest.raises(TypeError, match="SwinTransformerV2Cr"):
        swap_swin(v2cr)
    with pytest.raises(TypeError, match="bare"):
        swap_swin(_timm_model().layers[0].blocks[0])
    with pytest.raises(TypeError, match="Module"):
        swap_swin("swin")


def test_swap_twice_is_noop_and_backend_reaches_op():
    s = swap_swin(_timm_model(), backend="reference")
    assert swap_swin(s) is s
    blk = s.layers[0].blocks[0]
    assert blk.backend == "reference"
    blk.backend = "nonexistent"
    with pytest.raises(ValueError, match="backend"):
        blk(torch.randn(1, 16, 16, 32))
