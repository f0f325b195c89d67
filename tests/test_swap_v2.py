"""swap_swin on timm and torchvision SwinV2 (cosine attention, CPB MLP, post-norm): same parameters
and state_dict, same outputs and gradients (fp32 on CPU; flash-attn's rule against float64), and the
tools users point at a swapped model (compile, export, fx features, pickle, set_input_size).

The real architectures (timm ``swinv2_tiny_window8_256``, torchvision ``swin_v2_t``) are built
without weights and run on small inputs; the tool matrix uses a two-stage model of the same blocks.
"""
import math

import pytest
import torch

from mixkernels._compat import import_timm

import_timm()
import timm  # noqa: E402
from timm.models.swin_transformer_v2 import SwinTransformerV2Block  # noqa: E402
from torchvision.models import swin_transformer as tvs  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

from mixkernels import swap_swin  # noqa: E402
from mixkernels.nn import SwinV2Block, TorchvisionSwinBlockV2  # noqa: E402

from swap_helpers import assert_matches_fp64_rule, assert_same_run, close, round_trips, run, swapped_copy  # noqa: E402


def timm_v2(img=40, drop_path=0.0, **kw):
    # 40 px, patch 4: 10x10 tokens, window 4 -> stage 1 pads (timm's roll-then-pad path), stage 2 (5x5) too.
    args = dict(pretrained=False, img_size=img, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4,
                num_classes=5, drop_path_rate=drop_path)
    args.update(kw)
    return timm.create_model("swinv2_tiny_window8_256", **args)


def tv_v2(drop_path=0.0):
    return tvs.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=5, stochastic_depth_prob=drop_path, block=tvs.SwinTransformerBlockV2,
                               downsample_layer=tvs.PatchMergingV2)


FAMILIES = {"timm": timm_v2, "torchvision": tv_v2}
FUSED = {"timm": SwinV2Block, "torchvision": TorchvisionSwinBlockV2}


def perturb(m):
    """The libraries init q/v biases to 0 and logit scales to log(10): make both count, one head clamped."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("logit_scale"):
                p.copy_(math.log(10.0) + 0.5 * torch.randn_like(p))
                p.view(-1)[0] = math.log(100.0) + 0.2  # clamped: its gradient is 0 in both
            elif n.endswith(("q_bias", "v_bias", "qkv.bias")):
                p.normal_(0, 0.5)
    return m


def _pair(family, x_shape=(2, 3, 40, 40), **kw):
    m = perturb(FAMILIES[family](**kw)).eval()
    s = swapped_copy(m)
    assert sum(isinstance(b, FUSED[family]) for b in s.modules()) == 4
    return m, s, torch.randn(x_shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_matches_fp64_rule(family):
    m, s, x = _pair(family)
    assert_matches_fp64_rule(m, s, x)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_with_drop_path_matches(family):
    m, s, x = _pair(family, drop_path=0.3)
    assert_same_run(run(m, x, True, 3), run(s, x, True, 3), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip_and_pickle(family):
    m, s, x = _pair(family)
    fresh = FAMILIES[family]()
    fresh.load_state_dict(s.state_dict())  # a swapped checkpoint loads into the plain model (strict)
    s2 = swapped_copy(FAMILIES[family]())
    s2.load_state_dict(m.state_dict())
    close(s2.eval()(x), m(x))
    close(fresh.eval()(x), m(x))
    for c in round_trips(s):
        close(c.eval()(x), m(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_and_export(family):
    torch._dynamo.reset()
    m, s, x = _pair(family)
    c = torch.compile(s, fullgraph=True, backend="aot_eager")
    assert_same_run(run(m, x, False, 0), run(c, x, False, 0), family)
    ep = torch.export.export(s, (x,))
    assert any("mixkernels.window_attention" in str(n.target) for n in ep.graph.nodes)
    close(ep.module()(x), m(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_feature_extraction(family):
    m, s, x = _pair(family)
    stages = ("features.1", "features.3") if family == "torchvision" else ("layers.0", "layers.1")
    nodes = dict(zip(stages, ("p2", "p3")))
    fo, fs = create_feature_extractor(m, return_nodes=nodes), create_feature_extractor(s, return_nodes=nodes)
    assert "window_attention" in fs.code
    yo, ys = fo(x), fs(x)
    for k in nodes.values():
        close(ys[k], yo[k], k)


@pytest.mark.parametrize("window", [None, 6])
def test_timm_set_input_size(window):
    # a new window regenerates the CPB coordinates (nothing to resize: the MLP is continuous)
    m, s, _ = _pair("timm")
    for model in (m, s):
        model.set_input_size(img_size=(48, 56), window_size=window)
    assert [b.window_size for b in s.modules() if isinstance(b, SwinV2Block)] == \
        [b.window_size for b in m.modules() if isinstance(b, SwinTransformerV2Block)]
    x = torch.randn(2, 3, 48, 56)
    assert_same_run(run(m, x, False, 0), run(s, x, False, 0))


def test_real_timm_swinv2_tiny_window8_256():
    # the real architecture (4 stages, 12 blocks, window 8, heads 3-6-12-24), without weights, at 72 px:
    # stages of 18 (padded, shifted), 9 (padded), 5 and 3 tokens (windows clamped as timm does)
    m = perturb(timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=72, num_classes=10)).eval()
    s = swapped_copy(m)
    assert sum(isinstance(b, SwinV2Block) for b in s.modules()) == 12
    x = torch.randn(1, 3, 72, 72)
    assert_same_run(run(m, x, False, 0), run(s, x, False, 0))


def test_real_torchvision_swin_v2_t():
    # swin_v2_t (window 8, heads 3-6-12-24), without weights, on a rectangular input with odd padding
    # (the last stages are padded up to one window, their shift dropped)
    m = perturb(tvs.swin_v2_t(num_classes=10)).eval()
    s = swapped_copy(m)
    assert sum(isinstance(b, TorchvisionSwinBlockV2) for b in s.modules()) == 12
    x = torch.randn(1, 3, 40, 72)
    assert_same_run(run(m, x, False, 0), run(s, x, False, 0))


def test_block_names_and_state_dict_match_timm():
    kw = dict(dim=32, input_resolution=(8, 8), num_heads=2, window_size=4, shift_size=2, pretrained_window_size=6)
    theirs = SwinTransformerV2Block(**kw)
    ours = SwinV2Block(**kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(perturb(theirs).state_dict())
    torch.testing.assert_close(ours.attn.relative_coords_table, theirs.attn.relative_coords_table, rtol=0, atol=0)
    x = torch.randn(2, 8, 8, 32)
    close(ours(x), theirs(x))


def test_unsupported_v2_cr_raises_naming_the_class():
    m = timm.create_model("swinv2_cr_tiny_ns_224", pretrained=False, img_size=32, embed_dim=16, depths=(1,),
                          num_heads=(2,), window_size=4)
    with pytest.raises(TypeError, match="SwinTransformerV2CrBlock"):
        swap_swin(m)
