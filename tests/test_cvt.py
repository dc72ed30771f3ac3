"""CvT: parity with transformers' CvtForImageClassification, the converter, both attention paths,
any input size and the model contract."""

import dataclasses

import pytest
import torch
from torch import nn

import vitkit
from vitkit.convert.hf_cvt import convert_hf_cvt, cvt_config_from_hf
from vitkit.models import Intermediates, get_model_entry
from vitkit.models.cvt import Cvt, CvtConfig

PICO = "cvt_pico_28"
# Stage depths >= 1, 2, 3: transformers' CvtStage indexes its per-block drop-path list by the stage.
SMALL_HF = dict(embed_dim=[16, 32, 48], depth=[1, 2, 3], num_heads=[1, 2, 3], num_labels=5)


@torch.no_grad()
def _randomise(model: nn.Module) -> nn.Module:
    """Weights at unit-variance scale and non-trivial norms, so logits are O(1) and no bug hides."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            m.weight.normal_(0, m.weight[0].numel() ** -0.5)
            if m.bias is not None:
                m.bias.normal_(0, 0.1)
    for name, p in model.named_parameters():
        if name.endswith("cls_token"):
            p.normal_()
    return model.eval()


def _hf_pair(**hf_kwargs):
    """A randomised transformers CvT and the vitkit model built and loaded from it by the converter."""
    transformers = pytest.importorskip("transformers")
    ref = _randomise(transformers.CvtForImageClassification(transformers.CvtConfig(**hf_kwargs)))
    ours = Cvt(CvtConfig(**cvt_config_from_hf(ref.config.to_dict())))
    converted = convert_hf_cvt(ref.state_dict())
    ours.load_state_dict(converted)  # strict: every name and shape matches
    return ref, ours.eval(), converted


@torch.no_grad()
def test_small_config_matches_transformers_at_several_sizes():
    ref, ours, _ = _hf_pair(**SMALL_HF)
    for size in [(64, 64), (200, 176)]:
        x = torch.randn(2, 3, *size)
        expected = ref(pixel_values=x).logits
        assert expected.std() > 0.1  # a real signal, not a vanishing one
        assert (ours(x) - expected).abs().max().item() <= 1e-4, size


@torch.no_grad()
def test_cvt13_matches_transformers_and_the_registered_variant():
    ref, ours, converted = _hf_pair(num_labels=1000)  # transformers' defaults are CvT-13
    x = torch.randn(1, 3, 224, 224)
    assert (ours(x) - ref(pixel_values=x).logits).abs().max().item() <= 1e-4
    registered = vitkit.create_model("cvt_13").state_dict()
    assert {k: v.shape for k, v in registered.items()} == {k: v.shape for k, v in converted.items()}


def test_config_from_a_hub_style_diff_reproduces_the_variant():
    # A config.json saved with `use_diff` lists only what differs from transformers' defaults.
    fields = cvt_config_from_hf({"depth": [1, 4, 16], "id2label": {str(i): str(i) for i in range(1000)}})
    assert dataclasses.replace(get_model_entry("cvt_21").config, **fields) == get_model_entry("cvt_21").config
    with pytest.raises(ValueError, match="dw_bn"):
        cvt_config_from_hf({"qkv_projection_method": ["avg", "avg", "avg"]})
    with pytest.raises(ValueError, match="stride_q"):
        cvt_config_from_hf({"stride_q": [2, 1, 1]})


def test_converter_rejects_unknown_keys_and_wrong_shapes():
    # A partial state dict is enough: only names and shapes matter.
    embed = "cvt.encoder.stages.0.embedding.convolution_embeddings.projection"
    norm1 = "cvt.encoder.stages.0.layers.0.layernorm_before"
    hf = {f"{embed}.weight": torch.zeros(32, 1, 3, 3), f"{norm1}.weight": torch.zeros(32)}
    assert set(convert_hf_cvt(hf)) == {"stages.0.patch_embed.proj.weight", "stages.0.blocks.0.norm1.weight"}
    # A made-up module, and a LayerNorm with a BatchNorm buffer.
    extra = {**hf, "cvt.encoder.stages.0.pos_embed": torch.zeros(1), f"{norm1}.running_mean": torch.zeros(32)}
    with pytest.raises(ValueError, match=r"2 key\(s\).*layernorm_before\.running_mean.*stages\.0\.pos_embed"):
        convert_hf_cvt(extra)
    with pytest.raises(ValueError, match=r"layernorm_before\.weight: shape \(31,\), expected \(32,\)"):
        convert_hf_cvt({**hf, f"{norm1}.weight": torch.zeros(31)})


@torch.no_grad()
def test_explicit_attention_path_matches_fused():
    model = _randomise(vitkit.create_model(PICO))
    x = torch.randn(2, 1, 28, 28)
    fused = model.forward_intermediates(x)
    explicit = model.forward_intermediates(x, return_attn=True)
    assert fused.attentions == []
    assert torch.allclose(fused.features, explicit.features, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused.intermediates, explicit.intermediates))
    # 14x14, 7x7 and 4x4 maps; keys on 7x7, 4x4 and 2x2; the class token joins in the last stage.
    assert [a.shape for a in explicit.attentions] == [(2, 1, 196, 49), (2, 2, 49, 16), (2, 4, 17, 5)]
    for a in explicit.attentions:
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)


@torch.no_grad()
def test_any_input_size():
    small = vitkit.create_model("cvt_13", **cvt_config_from_hf({**SMALL_HF, "num_labels": 5})).eval()
    for size in [(160, 160), (200, 176)]:
        assert small(torch.randn(1, 3, *size)).shape == (1, 5)
    pico = vitkit.create_model(PICO).eval()
    for side in (28, 32):
        assert pico(torch.randn(2, 1, side, side)).shape == (2, 10)
        assert pico.forward_intermediates(torch.randn(1, 1, side, side)).intermediates[-1].shape == (1, 128, 4, 4)


@torch.no_grad()
def test_contract():
    model = vitkit.create_model(PICO).eval()
    x = torch.randn(3, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape == (3, 1 + 16, 128)  # normalised last-stage tokens, class token first
    assert torch.equal(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    assert model.num_blocks == 3 and model.num_classes == 10 and model.num_features == 128

    inter = model.forward_intermediates(x, indices=[0, -1])
    assert isinstance(inter, Intermediates) and torch.allclose(inter.features, feats, atol=1e-6)
    assert [t.shape for t in inter.intermediates] == [(3, 32, 14, 14), (3, 128, 4, 4)]
    nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True)
    assert [t.shape for t in nlc.intermediates] == [(3, 17, 128)]
    assert torch.allclose(nlc.intermediates[0], feats, atol=1e-6)  # `norm` applies the final norm
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])

    model.reset_classifier(3)
    assert model(x).shape == (3, 3)
    model.reset_classifier(0)
    assert model(x).shape == (3, 128)
    leaves = {name.split(".")[-1] for name, _ in model.named_parameters()}
    assert model.no_weight_decay() and model.no_weight_decay() <= leaves


def test_config_validation():
    with pytest.raises(ValueError, match="num_heads .* one entry per stage"):
        CvtConfig(num_heads=(1, 3))
    with pytest.raises(ValueError, match="kernel_qkv must be odd"):
        CvtConfig(kernel_qkv=(3, 4, 3))
    with pytest.raises(ValueError, match="not divisible by 4 heads"):
        CvtConfig(num_heads=(1, 3, 4), embed_dim=(64, 192, 390))
    assert CvtConfig().patch_size == 16 and get_model_entry(PICO).config.patch_size == 8
