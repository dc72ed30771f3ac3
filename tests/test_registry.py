import pytest
import torch

import vitkit
from vitkit.models import model_config

LISTED = [
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224",
    "vit_base_patch32_224", "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224",
    "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
]


def test_lists_every_required_variant():
    names = vitkit.list_models()
    assert set(LISTED) <= set(names)
    assert vitkit.list_models("deit*distilled*") == sorted(n for n in names if n.startswith("deit") and "distilled" in n)
    assert vitkit.list_models("pico") == [n for n in names if "pico" in n]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vit_smal_patch16_224'.*Did you mean vit_small_patch16_224") as e:
        vitkit.create_model("vit_smal_patch16_224")
    assert "deit_base_patch16_224" in str(e.value)


def test_unknown_override_lists_fields():
    with pytest.raises(ValueError, match="unknown override 'dpeth'.*Valid: .*depth"):
        vitkit.create_model("vit_pico_patch4_28", dpeth=3)


def test_override_type_and_value_errors():
    with pytest.raises(TypeError, match="depth='3'"):
        model_config("vit_pico_patch4_28", depth="3")
    with pytest.raises(TypeError, match="global_pool='max'"):
        model_config("vit_pico_patch4_28", global_pool="max")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        vitkit.create_model("vit_pico_patch4_28", img_size=30)
    with pytest.raises(ValueError, match="needs class_token=True"):
        vitkit.create_model("deit_tiny_patch16_224", class_token=False)


def test_overrides_are_applied():
    m = vitkit.create_model("vit_pico_patch4_28", depth=2, num_classes=3, in_chans=3, drop_path_rate=0.1)
    assert len(m.blocks) == 2 and m.head.out_features == 3 and m.patch_embed.proj.in_channels == 3
    assert m.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)


def test_parameter_names_follow_timm():
    keys = set(vitkit.create_model("deit_tiny_distilled_patch16_224").state_dict())
    for k in ["patch_embed.proj.weight", "cls_token", "dist_token", "pos_embed", "blocks.0.norm1.weight",
              "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight",
              "blocks.0.mlp.fc2.bias", "norm.weight", "head.weight", "head_dist.weight"]:
        assert k in keys


def test_pretrained_from_file_and_head_reset(tmp_path):
    from safetensors.torch import save_file

    src = vitkit.create_model("vit_pico_patch4_28").eval()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    x = torch.randn(2, 1, 28, 28)
    for f in ("w.safetensors", "w.pth"):
        same = vitkit.create_model("vit_pico_patch4_28", pretrained=tmp_path / f).eval()
        assert torch.equal(same(x), src(x))
    with pytest.warns(UserWarning, match="re-initialising the classifier"):
        new = vitkit.create_model("vit_pico_patch4_28", pretrained=tmp_path / "w.safetensors", num_classes=3).eval()
    assert torch.equal(new.forward_features(x), src.forward_features(x))
    with pytest.raises(ValueError, match="do not fit"):
        vitkit.create_model("vit_pico_patch4_28", pretrained=tmp_path / "w.safetensors", depth=5)


def test_pretrained_refuses_pickled_objects(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="cannot read weights"):
        vitkit.create_model("vit_pico_patch4_28", pretrained=tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError):
        vitkit.create_model("vit_pico_patch4_28", pretrained=tmp_path / "missing.safetensors")


def test_lists_from_yaml_become_tuples():
    """A run's config.yaml stores tuples as lists; they must rebuild the same model."""
    m = vitkit.create_model("swin_pico_patch2_window4_32", depths=[1, 1, 1], img_size=[32, 32])
    assert m.cfg.depths == (1, 1, 1) and m.cfg.img_size == (32, 32)
