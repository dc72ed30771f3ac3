"""transformers' DINOv2, DINOv3, CLIP and SigLIP image towers (random init, saved with `save_pretrained`) load
into vitkit with transformers' outputs, as a user calls it: `create_model(pretrained=DIR)`."""

import pytest
import torch
from conftest import perturb

import vitkit
from vitkit.convert import read_checkpoint
from vitkit.models import get_model_entry

transformers = pytest.importorskip("transformers")

TOL = 1e-4
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14)
TOWER = dict(SMALL, intermediate_size=256, image_size=32, patch_size=8)
CASES = {  # key: (class, config class, config, vitkit family)
    "dinov2": ("Dinov2Model", "Dinov2Config", dict(SMALL, layerscale_value=0.5), "dinov2"),
    "dinov2_swiglu": ("Dinov2Model", "Dinov2Config", dict(SMALL, use_swiglu_ffn=True), "dinov2"),
    "dinov2_reg": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", SMALL, "dinov2"),
    "clip": ("CLIPVisionModel", "CLIPVisionConfig", TOWER, "clip"),
    "clip_projection": ("CLIPVisionModelWithProjection", "CLIPVisionConfig", dict(TOWER, projection_dim=48), "clip"),
    "siglip": ("SiglipVisionModel", "SiglipVisionConfig", TOWER, "siglip"),
    "siglip_no_head": ("SiglipVisionModel", "SiglipVisionConfig", dict(TOWER, vision_use_head=False), "siglip"),
    # RoPE on patch centres, 4 registers, LayerScale; and the gated (SwiGLU) MLP of DINOv3 S+/H+
    "dinov3": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(SMALL, intermediate_size=256, num_register_tokens=4,
                                                         layerscale_value=0.5), "dinov3"),
    "dinov3_gated": ("DINOv3ViTModel", "DINOv3ViTConfig", dict(SMALL, intermediate_size=160, use_gated_mlp=True,
                                                               hidden_act="silu", layerscale_value=0.5), "dinov3"),
}


def _pooled(model, x, **kw):
    out = model(pixel_values=x, **kw)
    return out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output


@pytest.mark.parametrize("key", CASES)
def test_hf_backbone_matches_transformers(key, tmp_path):
    cls, cfg, kw, family = CASES[key]
    hf = perturb(getattr(transformers, cls)(getattr(transformers, cfg)(**kw)))
    hf.save_pretrained(tmp_path)
    ckpt = read_checkpoint(tmp_path)
    assert get_model_entry(ckpt.name).family == family
    ours = vitkit.create_model(pretrained=tmp_path).eval()  # the architecture from config.json
    size = kw["image_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
        if key == "siglip_no_head":  # no pooled output in transformers: the normalised tokens are vitkit's features
            assert (ours.forward_features(x) - hidden).abs().max().item() <= TOL
        else:
            assert (ours(x) - _pooled(hf, x)).abs().max().item() <= TOL
        if family in ("dinov2", "dinov3"):  # every token, registers included, in the same order, after the final norm
            assert (ours.forward_features(x) - hidden).abs().max().item() <= TOL
        # Another, larger resolution: both resample the position table on the fly (bicubic).
        big = torch.randn(1, 3, size + 2 * kw["patch_size"], size + kw["patch_size"])
        if key != "siglip_no_head":
            extra = {} if family in ("dinov2", "dinov3") else dict(interpolate_pos_encoding=True)
            assert (ours(big) - _pooled(hf, big, **extra)).abs().max().item() <= TOL


def test_whole_clip_checkpoint_converts_its_image_tower(tmp_path):
    config = transformers.CLIPConfig(vision_config=dict(TOWER), text_config=dict(hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2), projection_dim=24)
    hf = perturb(transformers.CLIPModel(config))
    hf.save_pretrained(tmp_path)
    ours = vitkit.create_model(pretrained=tmp_path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=x)  # transformers 5: an output whose pooler_output is projected
        image = getattr(image, "pooler_output", image)
        assert image.shape == (2, 24) and (ours(x) - image).abs().max().item() <= TOL


def test_unknown_architecture_of_a_backbone_type_is_one_clear_error(tmp_path):
    hf = transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**SMALL, num_labels=3))
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Dinov2ForImageClassification is not supported; for dinov2: Dinov2Model"):
        read_checkpoint(tmp_path)
