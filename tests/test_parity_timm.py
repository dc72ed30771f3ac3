"""vitkit models loaded with timm's state dicts give timm's logits (random init, no downloads)."""

import pytest
import torch

import vitkit

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["vit_small_patch16_224", "deit_small_distilled_patch16_224", "vit_base_patch32_224"])
def test_logits_match_timm(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False).eval()
    ours = vitkit.create_model(name).eval()
    ours.load_state_dict(ref.state_dict())  # strict: every key has the same name and shape
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max().item() <= 1e-5


def test_global_pool_variant_matches_timm():
    kw = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=2, num_heads=4,
              mlp_ratio=2.0, class_token=False, global_pool="avg")
    ref = timm.models.vision_transformer.VisionTransformer(**kw).eval()
    ours = vitkit.create_model("vit_nano_patch4_32", pos_embed="learn", **kw).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5
