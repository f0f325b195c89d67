"""Compatibility matrix, timm and torchvision Swin (v1): every tool users point at a swapped model
gives what it gives on the unswapped one (fp32, CPU; tiny models built without weights).

transformers Swin/Swinv2 have their own file (tests/test_compat_hf.py). Tools, per family:
forward/backward (eval: flash-attn's rule against float64; train: same RNG, drop path on),
other resolutions / ``set_input_size``, gradient checkpointing, ``torch.compile(fullgraph=True)``,
``torch.export``, fx feature extraction (torchvision's ``create_feature_extractor``, timm's fx
features), deepcopy / pickle, state_dict round trips; timm ``features_only`` and
``forward_intermediates``. The unswapped models compile with fullgraph and export too (checked
by hand; not re-run here to keep CI short).
"""
import copy
import subprocess
import sys

import pytest
import torch

from mixkernels._compat import import_timm

import_timm()
import timm  # noqa: E402
from timm.models import FeatureGraphNet  # noqa: E402
from timm.models import create_feature_extractor as timm_feature_extractor  # noqa: E402
from torchvision.models import swin_transformer as tvs  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402
from torchvision.ops import FeaturePyramidNetwork  # noqa: E402

from mixkernels import swap_swin  # noqa: E402
from mixkernels.nn import SwinBlock, TorchvisionSwinBlock  # noqa: E402

from swap_helpers import (  # noqa: E402
    assert_matches_fp64_rule, assert_same_run, close, round_trips, run, swapped_copy,
)

TIMM_KW = dict(pretrained=False, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=5)


def timm_model(img=40, drop_path=0.0, **kw):
    # 40 px, patch 4: 10x10 tokens, window 4 -> stage 1 pads (and shifts: timm's roll-then-pad path),
    # stage 2 (5x5) pads too.
    args = dict(TIMM_KW, img_size=img, drop_path_rate=drop_path)
    args.update(kw)
    return timm.create_model("swin_tiny_patch4_window7_224", **args)


def tv_model(drop_path=0.0):
    # any input size: torchvision pads the token grid to window multiples itself
    return tvs.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                               num_classes=5, stochastic_depth_prob=drop_path)


FAMILIES = {"timm": (timm_model, (2, 3, 40, 40)), "torchvision": (tv_model, (2, 3, 40, 40))}
FUSED = {"timm": SwinBlock, "torchvision": TorchvisionSwinBlock}


def _pair(family, **kw):
    build, shape = FAMILIES[family]
    m = build(**kw).eval()
    with torch.no_grad():  # the libraries init bias tables at std 0.02: make the bias count
        for n, p in m.named_parameters():
            if "relative_position_bias_table" in n:
                p.normal_(0, 0.5)
    s = swapped_copy(m)
    assert sum(isinstance(b, FUSED[family]) for b in s.modules()) == 4
    return m, s, torch.randn(shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_backward_matches_fp64_rule(family):
    m, s, x = _pair(family)
    assert_matches_fp64_rule(m, s, x)


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_with_drop_path_matches(family):
    m, s, x = _pair(family, drop_path=0.3)
    assert_same_run(run(m, x, True, 3), run(s, x, True, 3), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip(family):
    m, s, x = _pair(family)
    fresh = FAMILIES[family][0]()
    fresh.load_state_dict(s.state_dict())  # a swapped checkpoint loads into the plain model (strict)
    s2 = swapped_copy(FAMILIES[family][0]())
    s2.load_state_dict(m.state_dict())  # and a plain checkpoint into a swapped model
    close(s2.eval()(x), m(x))
    close(fresh.eval()(x), m(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_deepcopy_and_pickle(family):
    m, s, x = _pair(family)
    for c in round_trips(s):
        assert sum(isinstance(b, FUSED[family]) for b in c.modules()) == 4
        close(c.eval()(x), m(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_fullgraph_forward_backward(family):
    torch._dynamo.reset()
    m, s, x = _pair(family)
    c = torch.compile(s, fullgraph=True, backend="aot_eager")
    assert_same_run(run(m, x, False, 0), run(c, x, False, 0), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_export(family):
    m, s, x = _pair(family)
    ep = torch.export.export(s, (x,))
    assert any("mixkernels.window_attention" in str(n.target) for n in ep.graph.nodes)
    close(ep.module()(x), m(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_feature_extraction_torchvision(family):
    # torchvision's fx tracer (behind its detection backbones): the fused op is one leaf call
    m, s, x = _pair(family)
    stages = ("features.1", "features.3") if family == "torchvision" else ("layers.0", "layers.1")
    nodes = dict(zip(stages, ("p2", "p3")))
    fo, fs = create_feature_extractor(m, return_nodes=nodes), create_feature_extractor(s, return_nodes=nodes)
    code = fs.code
    assert "window_attention" in code and "pad_to_windows" in code
    yo, ys = fo(x), fs(x)
    for k in nodes.values():
        close(ys[k], yo[k], k)
    # an FPN on top (what BackboneWithFPN builds): NHWC stage outputs -> NCHW pyramid
    fpn = FeaturePyramidNetwork([32, 64], 16).eval()
    po = fpn({k: v.permute(0, 3, 1, 2) for k, v in yo.items()})
    ps = fpn({k: v.permute(0, 3, 1, 2) for k, v in ys.items()})
    for k in po:
        close(ps[k], po[k], f"fpn {k}")
    ys["p3"].sum().backward()  # the traced module trains


def test_fx_full_size_swin_t_traces():
    with torch.device("meta"):  # real swin_t, traced only (symbolic: no compute)
        m = tvs.swin_t()
    swap_swin(m)
    fe = create_feature_extractor(m, return_nodes={f"features.{i}": f"c{i}" for i in (1, 3, 5, 7)})
    assert fe.code.count("window_attention(") == 12


def test_timm_fx_features():
    m, s, x = _pair("timm")
    nodes = {"layers.0": "a", "layers.1": "b"}
    yo, ys = timm_feature_extractor(m, nodes)(x), timm_feature_extractor(s, nodes)(x)
    for k in nodes.values():
        close(ys[k], yo[k], k)
    # features_only with feature_cls="fx": trace the swapped model (a traced model has no blocks left to swap)
    go, gs = FeatureGraphNet(m, out_indices=(0, 1)), FeatureGraphNet(s, out_indices=(0, 1))
    for a, b in zip(go(x), gs(x)):
        close(b, a)
    with pytest.raises(TypeError, match="swap before"):
        swap_swin(FeatureGraphNet(timm_model(), out_indices=(0, 1)))


def test_timm_features_only_and_forward_intermediates():
    f = timm_model(features_only=True, out_indices=(0, 1), num_classes=0).eval()
    fs = swapped_copy(f)
    x = torch.randn(2, 3, 40, 40)
    for a, b in zip(f(x), fs(x)):
        close(b, a, "features_only")
    m, s, _ = _pair("timm")
    (fo, io), (fs_, is_) = m.forward_intermediates(x), s.forward_intermediates(x)
    close(fs_, fo, "final")
    for a, b in zip(io, is_):
        close(b, a, "intermediate")
    io = m.forward_intermediates(x, indices=1, intermediates_only=True)
    is_ = s.forward_intermediates(x, indices=1, intermediates_only=True)
    close(is_[0], io[0])
    # prune_intermediate_layers keeps swapped blocks
    m.prune_intermediate_layers(indices=1, prune_head=True)
    s.prune_intermediate_layers(indices=1, prune_head=True)
    close(s(x), m(x))


@pytest.mark.parametrize("window", [None, 6])
def test_timm_set_input_size(window):
    # after swap_swin: same window (shift/resolution bookkeeping) or a new window (bias table resized as timm does)
    m, s, _ = _pair("timm")
    for model in (m, s):
        model.set_input_size(img_size=(48, 56), window_size=window)
    assert [b.window_size for b in s.modules() if isinstance(b, SwinBlock)] == \
        [b.window_size for b in m.modules() if type(b).__name__ == "SwinTransformerBlock"]
    x = torch.randn(2, 3, 48, 56)
    assert_same_run(run(m, x, False, 0), run(s, x, False, 0))


def test_timm_dynamic_img_size():
    m, s, _ = _pair("timm", dynamic_img_size=True)  # any input size, masks built per forward
    for hw in [(56, 48), (36, 44), (20, 20)]:
        x = torch.randn(1, 3, *hw)
        assert_same_run(run(m, x, False, 0), run(s, x, False, 0), str(hw))


def test_torchvision_other_resolutions():
    m, s, _ = _pair("torchvision")
    for hw in [(24, 24), (56, 40), (36, 68)]:  # smaller than a window (shift dropped), odd padding, rectangular
        x = torch.randn(1, 3, *hw)
        assert_same_run(run(m, x, False, 0), run(s, x, False, 0), str(hw))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing(family):
    m, s, x = _pair(family, drop_path=0.2)
    if family == "timm":
        m.set_grad_checkpointing(True)
        s.set_grad_checkpointing(True)
        model_s = s
    else:  # torchvision has no switch: checkpoint each stage, as users do
        from torch.utils.checkpoint import checkpoint

        class Ckpt(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return checkpoint(self.inner, x, use_reentrant=False)

        model_s = copy.deepcopy(s)
        for i in (1, 3):
            model_s.features[i] = Ckpt(model_s.features[i])
    ro, rs = run(m, x, True, 7), run(model_s, x, True, 7)
    assert_same_run(ro, (rs[0], rs[1], {k.replace(".inner.", "."): v for k, v in rs[2].items()}))


def test_triton_interpreter_backend():
    # one tiny model through the Triton kernels (the interpreter without a GPU): forward and backward;
    # 24 px: stage 1 pads 6x6 -> 8x8 (shifted), stage 2 is one padded window
    m, _, _ = _pair("torchvision")
    s = swapped_copy(m, backend="triton")
    x = torch.randn(1, 3, 24, 24)
    assert_same_run(run(m, x, False, 0), run(s, x, False, 0), "triton")


def test_mixkernels_needs_no_transformers():
    # transformers stays optional: import, swap and run timm / torchvision models with it blocked
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch\n"
        "from mixkernels._compat import import_timm; import_timm()\n"
        "import timm, mixkernels\n"
        "from torchvision.models import swin_transformer as tvs\n"
        "m = timm.create_model('swin_tiny_patch4_window7_224', img_size=32, embed_dim=32, depths=(1,), "
        "num_heads=(2,), window_size=4)\n"
        "mixkernels.swap_swin(m)(torch.randn(1, 3, 32, 32))\n"
        "t = tvs.SwinTransformer([4, 4], 32, [2], [2], [4, 4])\n"
        "mixkernels.swap_swin(t)(torch.randn(1, 3, 32, 32))\n"
        "assert 'mixkernels.nn.hf_swin' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
