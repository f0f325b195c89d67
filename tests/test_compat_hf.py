"""Compatibility matrix, Hugging Face transformers Swin and Swinv2 (tiny configs, no downloads).

What transformers tests on its own models, on swapped ones: forward/backward (flash-attn's rule
against float64; train mode with drop path under a fixed RNG), masked image modeling (SimMIM)
loss and reconstruction, classification loss, backbones, other resolutions (padding, clamped
windows) and ``interpolate_pos_encoding``, ``output_hidden_states``, ``output_attentions``
(falls back to transformers' own attention for that call: same attentions), ``head_mask``
(4.x: same), gradient checkpointing, ``torch.compile(fullgraph=True)``, ``torch.export``,
``save_pretrained``/``from_pretrained``, state_dict, deepcopy/pickle. transformers models are not
fx-traceable even unswapped (their forward iterates over traced shapes), so no fx here.
"""
import inspect
import warnings

import pytest
import torch

from mixkernels._compat import import_torchvision

import_torchvision()  # transformers imports torchvision: its CPU-torch shim first
transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    SwinBackbone, SwinConfig, SwinForImageClassification, SwinForMaskedImageModeling, SwinModel, Swinv2Backbone,
    Swinv2Config, Swinv2ForImageClassification, Swinv2ForMaskedImageModeling, Swinv2Model,
)
from transformers.models.swin import modeling_swin  # noqa: E402

from mixkernels import swap_swin  # noqa: E402
from mixkernels.nn.hf_swin import FusedSwinLayer, FusedSwinv2Layer  # noqa: E402

from swap_helpers import (  # noqa: E402
    assert_matches_fp64_rule, assert_same_run, close, round_trips, run, swapped_copy,
)

V1_LEGACY = "head_mask" in inspect.signature(modeling_swin.SwinLayer.forward).parameters

# 40 px, patch 4: 10x10 tokens, window 4 -> stage 1 pads to 12x12 (shifted blocks roll the padded map),
# stage 2 (5x5) pads to 8x8. head_dim 16.
CFG = dict(image_size=40, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4,
           num_labels=5, encoder_stride=8, drop_path_rate=0.0)
CLASSES = {
    "swin": (SwinConfig, SwinModel), "swinv2": (Swinv2Config, Swinv2Model),
    "swin-cls": (SwinConfig, SwinForImageClassification), "swinv2-cls": (Swinv2Config, Swinv2ForImageClassification),
    "swin-mim": (SwinConfig, SwinForMaskedImageModeling), "swinv2-mim": (Swinv2Config, Swinv2ForMaskedImageModeling),
}
FUSED = (FusedSwinLayer, FusedSwinv2Layer)


def hf_model(kind, **kw):
    cfg_cls, model_cls = CLASSES[kind]
    torch.manual_seed(0)
    m = model_cls(cfg_cls(**{**CFG, **kw})).eval()
    with torch.no_grad():  # transformers initializes at std 0.02 with zero bias tables: make every term count
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p), alpha=0.1)
            elif "logit_scale" not in n:
                p.normal_(0, 0.5 if "bias_table" in n else 0.1)
    return m


def _pair(kind, **kw):
    m = hf_model(kind, **kw)
    s = swapped_copy(m)
    assert sum(isinstance(b, FUSED) for b in s.modules()) == 4
    assert not any(type(b) in (modeling_swin.SwinLayer,) for b in s.modules())
    return m, s, torch.randn(2, 3, 40, 40)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_forward_backward_matches_fp64_rule(kind):
    m, s, x = _pair(kind)
    assert_matches_fp64_rule(m, s, x)


@pytest.mark.parametrize("kind", ["swin-cls", "swinv2-cls"])
def test_train_mode_with_drop_path_and_labels(kind):
    m, s, x = _pair(kind, drop_path_rate=0.3)
    labels = torch.tensor([1, 3])
    assert_same_run(run(m, x, True, 3, labels=labels), run(s, x, True, 3, labels=labels), kind)


@pytest.mark.parametrize("kind", ["swin-mim", "swinv2-mim"])
def test_masked_image_modeling(kind):
    # SimMIM: mask tokens in the embedding, loss on masked patches, reconstruction
    m, s, x = _pair(kind)
    mask = torch.rand(2, 100) < 0.5
    ro = run(m, x, False, 0, bool_masked_pos=mask)
    rs = run(s, x, False, 0, bool_masked_pos=mask)
    assert ro[0].dim() == 0  # the loss
    assert_same_run(ro, rs, kind)
    close(s(x, bool_masked_pos=mask).reconstruction, m(x, bool_masked_pos=mask).reconstruction)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_other_resolutions(kind):
    # windows clamp to small grids (Swin: per call; Swinv2: fixed at construction), odd padding, rectangular
    m, s, _ = _pair(kind)
    for hw in ([48, 56], [36, 68]) if kind == "swin" else ([32, 32], [48, 56], [36, 68]):
        x = torch.randn(1, 3, *hw)
        assert_same_run(run(m, x, False, 0), run(s, x, False, 0), str(hw))
    # a config resolution smaller than the window: Swinv2 clamps the window at construction
    if kind == "swinv2":
        m2, s2, _ = _pair(kind, image_size=16)
        x = torch.randn(1, 3, 16, 16)
        assert_same_run(run(m2, x, False, 0), run(s2, x, False, 0), "16 px")


def test_swin_window_clamped_below_table_refuses_like_transformers():
    # transformers' SwinLayer clamps the window to min(H, W) but keeps the table: it fails on such inputs;
    # the swapped layer raises a ValueError that says so (no silent wrong bias).
    m, s, _ = _pair("swin")
    x = torch.randn(1, 3, 24, 24)  # stage 2 is 3x3 < window 4
    with pytest.raises(RuntimeError):
        m(x)
    with pytest.raises(ValueError, match="relative-position table"):
        s(x)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_interpolate_pos_encoding(kind):
    m, s, _ = _pair(kind, use_absolute_embeddings=True)
    x = torch.randn(1, 3, 48, 48)
    try:
        ref = m(x, interpolate_pos_encoding=True).last_hidden_state
    except RuntimeError:  # transformers' own bug in some versions (embeddings assume a class token)
        with pytest.raises(RuntimeError):
            s(x, interpolate_pos_encoding=True)
        return
    close(s(x, interpolate_pos_encoding=True).last_hidden_state, ref)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_output_hidden_states(kind):
    m, s, x = _pair(kind)
    oo, os_ = m(x, output_hidden_states=True), s(x, output_hidden_states=True)
    for name in ("hidden_states", "reshaped_hidden_states"):
        assert len(oo[name]) == len(os_[name]) == 3
        for a, b in zip(oo[name], os_[name]):
            close(b, a, name)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
@pytest.mark.parametrize("via", ["argument", "config"])
def test_output_attentions_falls_back_for_that_call(kind, via):
    m, s, x = _pair(kind, attn_implementation="eager")  # transformers returns attentions in eager mode only
    kw = {"output_attentions": True} if via == "argument" else {}
    for model in (m, s):
        model.config.output_attentions = via == "config"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        oo, os_ = m(x, **kw), s(x, **kw)
    assert any("running transformers' own attention" in str(w.message) for w in rec)
    assert len(oo.attentions) == len(os_.attentions) > 0
    for a, b in zip(oo.attentions, os_.attentions):
        close(b, a, "attentions")
    close(os_.last_hidden_state, oo.last_hidden_state)
    # the next call without attentions runs fused again (no warning)
    for model in (m, s):
        model.config.output_attentions = False
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        y = s(x)
    assert not any("own attention" in str(w.message) for w in rec)
    assert y.attentions in (None, ())
    close(y.last_hidden_state, m(x).last_hidden_state)


@pytest.mark.skipif(not V1_LEGACY, reason="transformers 5.x has no head_mask")
@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_head_mask_falls_back(kind):
    m, s, x = _pair(kind)
    hm = torch.full((2, 2, 1, 1, 1), 0.5)  # (stage, block, ...): transformers indexes it per stage, then per block
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yo, ys = m(x, head_mask=hm).last_hidden_state, s(x, head_mask=hm).last_hidden_state
    close(ys, yo)
    assert (yo - m(x).last_hidden_state).abs().max() > 1e-3  # the mask did something


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_gradient_checkpointing(kind):
    m, s, x = _pair(kind + "-cls", drop_path_rate=0.2)
    for model in (m, s):  # (renamed activation_checkpointing_enable in transformers 5.x)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.train()
    assert any(getattr(b, "gradient_checkpointing", False) for b in s.modules())
    assert_same_run(run(m, x, True, 5), run(s, x, True, 5), kind)


@pytest.mark.parametrize("cls,cfg", [(SwinBackbone, SwinConfig), (Swinv2Backbone, Swinv2Config)])
def test_backbone_feature_maps(cls, cfg):
    # what detection/segmentation heads (UperNet, Mask2Former via AutoBackbone) consume
    kw = dict(CFG, out_features=["stage1", "stage2"])
    kw.pop("num_labels")
    torch.manual_seed(0)
    b = cls(cfg(**kw)).eval()
    bs = swapped_copy(b)
    x = torch.randn(2, 3, 40, 40)
    fo, fs = b(x).feature_maps, bs(x).feature_maps
    assert len(fo) == len(fs) == 2
    for a, c in zip(fo, fs):
        close(c, a, "feature map")


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_compile_fullgraph_forward_backward(kind):
    torch._dynamo.reset()
    m, s, x = _pair(kind)
    c = torch.compile(s, fullgraph=True, backend="aot_eager")
    assert_same_run(run(m, x, False, 0), run(c, x, False, 0), kind)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_export(kind):
    m, s, x = _pair(kind)
    ep = torch.export.export(s, (x,))
    assert any("mixkernels.window_attention" in str(n.target) for n in ep.graph.nodes)
    out = ep.module()(x)
    close(out["last_hidden_state"] if isinstance(out, dict) else out[0], m(x).last_hidden_state)


@pytest.mark.parametrize("kind", ["swin-cls", "swinv2-mim"])
def test_save_pretrained_from_pretrained(kind, tmp_path):
    m, s, x = _pair(kind)
    s.save_pretrained(tmp_path / "swapped")
    m.save_pretrained(tmp_path / "plain")
    cls = CLASSES[kind][1]
    loaded = cls.from_pretrained(tmp_path / "swapped").eval()  # a plain transformers model
    assert not any(isinstance(b, FUSED) for b in loaded.modules())
    sd, ref = loaded.state_dict(), m.state_dict()
    assert list(sd) == list(ref)
    for k in ref:
        assert torch.equal(sd[k], ref[k]), k
    from safetensors.torch import load_file

    a = load_file(tmp_path / "swapped" / "model.safetensors")
    b = load_file(tmp_path / "plain" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    reswapped = swapped_copy(cls.from_pretrained(tmp_path / "plain").eval())
    close(reswapped(x).logits if kind.endswith("cls") else reswapped(x).reconstruction,
          m(x).logits if kind.endswith("cls") else m(x).reconstruction)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_state_dict_deepcopy_pickle(kind):
    m, s, x = _pair(kind)
    fresh = hf_model(kind)
    fresh.load_state_dict(s.state_dict())
    close(fresh(x).last_hidden_state, m(x).last_hidden_state)
    for c in round_trips(s):
        assert sum(isinstance(b, FUSED) for b in c.modules()) == 4
        close(c(x).last_hidden_state, m(x).last_hidden_state)


def test_triton_interpreter_backend_swinv2():
    # cosine attention + CPB table (and their gradients) through the Triton kernels, one tiny case
    from mixkernels.ops.window_attention import _checks

    why = _checks(torch.empty(1, 1, 1, 48), 16, 16, cosine=True)["triton"]()
    if why:
        pytest.skip(f"Triton cannot run cosine attention here: {why}")
    m = hf_model("swinv2", depths=[2], num_heads=[2], image_size=32)
    s = swapped_copy(m, backend="triton")
    x = torch.randn(1, 3, 24, 24)  # 6x6 tokens -> 8x8 padded, shifted
    assert_same_run(run(m, x, False, 0), run(s, x, False, 0), "triton")


def test_refusals_and_idempotence():
    m, s, _ = _pair("swin")
    assert swap_swin(s) is s  # already swapped: no-op
    with pytest.raises(TypeError, match="bare"):
        swap_swin(hf_model("swin").encoder.layers[0].blocks[0])
    # a layout the adapter does not know is refused by name, not half-swapped
    odd = hf_model("swin")
    blk = odd.encoder.layers[0].blocks[0]
    for name in ("q_proj", "query"):
        for holder in (blk.attention, getattr(blk.attention, "self", None)):
            if holder is not None and hasattr(holder, name):
                delattr(holder, name)
    with pytest.raises(TypeError, match="unrecognized SwinAttention layout"):
        swap_swin(odd)
    assert not any(isinstance(b, FUSED) for b in odd.modules())


def test_attention_dropout_in_training_raises():
    m = hf_model("swin", attention_probs_dropout_prob=0.1)
    s = swapped_copy(m)
    x = torch.randn(1, 3, 40, 40)
    close(s(x).last_hidden_state, m(x).last_hidden_state)  # eval: dropout is off, fused path
    with pytest.raises(NotImplementedError, match="attention_probs_dropout_prob"):
        s.train()(x)


@pytest.mark.parametrize("kind", ["swin", "swinv2"])
def test_projection_hooks_and_wrappers_are_called(kind):
    # PEFT/LoRA-style adapters wrap or hook the q/k/v projections: the fused path must call them as modules
    m, s, x = _pair(kind)

    def proj(model):
        a = model.encoder.layers[0].blocks[1].attention
        return a.q_proj if hasattr(a, "q_proj") else a.self.query

    class Lora(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            self.down = torch.nn.Linear(base.in_features, 2, bias=False)
            self.up = torch.nn.Linear(2, base.out_features, bias=False)

        def forward(self, t):
            return self.base(t) + self.up(self.down(t))

    for model in (m, s):
        proj(model).register_forward_hook(lambda mod, inp, out: out * 4 + 0.5)
    close(s(x).last_hidden_state, m(x).last_hidden_state, "hooked")
    torch.manual_seed(1)
    lora = Lora(proj(m))
    torch.nn.init.normal_(lora.up.weight, std=0.5)
    for model in (m, s):  # the same wrapper object in both (shares the base projection of each model)
        blk = model.encoder.layers[0].blocks[1].attention
        holder, name = (blk, "q_proj") if hasattr(blk, "q_proj") else (blk.self, "query")
        wrapped = Lora(getattr(holder, name))
        wrapped.load_state_dict(lora.state_dict())
        setattr(holder, name, wrapped)
    ro, rs = run(m, x, False, 0), run(s, x, False, 0)
    assert_same_run(ro, rs, "lora")
    assert any("down" in n for n in rs[2])  # the adapter trains
