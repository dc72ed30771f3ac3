"""Hybrid ViTs (ResNet-V2 backbone + ViT): timm parity, other input sizes, the model contract."""

import pytest
import torch

import vitkit
from vitkit.models import Intermediates, get_model_entry
from vitkit.models.layers.resnet import StdConv2dSame

timm = pytest.importorskip("timm")

HYBRIDS = ["vit_small_r26_s32_224", "vit_base_r50_s16_224"]


def _timm_model(name: str, **kwargs) -> torch.nn.Module:
    """timm's model, random init, with GroupNorm affines randomised so a wrong norm cannot hide."""
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def r26_pair():
    torch.manual_seed(0)
    ref = _timm_model("vit_small_r26_s32_224")
    ours = vitkit.create_model("vit_small_r26_s32_224").eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("name", HYBRIDS)
def test_logits_match_timm(name, r26_pair):
    if name == "vit_small_r26_s32_224":
        ref, ours = r26_pair
    else:
        torch.manual_seed(0)
        ref = _timm_model(name)
        ours = vitkit.create_model(name).eval()
        ours.load_state_dict(ref.state_dict())  # strict: same names and shapes, backbone included
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        # vit_base_r50_s16_224 has no classifier in timm (num_classes=0): its "logits" are the pooled features.
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max().item() <= 1e-4


def test_other_resolution_matches_timm(r26_pair):
    """224 weights at 256 px: timm resamples the position table when loading; so do we, or on the fly."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref224, ours224 = r26_pair
    ref256 = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=256).eval()
    ref256.load_state_dict(checkpoint_filter_fn(ref224.state_dict(), ref256))
    ours256 = vitkit.create_model("vit_small_r26_s32_224", img_size=256).eval()
    ours256.load_state_dict(ours224.state_dict())  # the load hook resamples 7x7 -> 8x8
    assert ours256.grid == (8, 8) and ours256.pos_embed.shape == (1, 65, 384)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = ref256(x)
        assert (ours256(x) - expected).abs().max().item() <= 1e-4
        assert (ours224(x) - expected).abs().max().item() <= 1e-4  # a 256 px input through the 224 model


def test_contract():
    # 64x96 px: a 2x3 token grid, so rows and columns cannot be confused.
    model = vitkit.create_model("vit_small_r26_s32_224", img_size=(64, 96), num_classes=5).eval()
    assert model.grid == (2, 3) and model.patch_embed.reduction == (32, 32)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (2, 384)
        inter = model.forward_intermediates(x, indices=[0, -1])
    assert isinstance(inter, Intermediates)
    assert torch.allclose(inter.features, feats, atol=1e-5)
    assert [t.shape for t in inter.intermediates] == [(2, 384, 2, 3)] * 2
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    with pytest.raises(ValueError, match="not a multiple of the patch size 32x32"):
        model(torch.randn(1, 3, 48, 96))


def test_config_and_registry():
    r26, r50 = (get_model_entry(n) for n in HYBRIDS)
    assert r26.family == r50.family == "hybrid"
    assert get_model_entry("vit_small_patch16_224").family == "vit"
    assert r26.mean == r26.std == (0.5, 0.5, 0.5)
    assert (r26.config.reduction, r50.config.reduction) == (32, 16)
    assert get_model_entry("vit_base_patch32_224").config.reduction == 32
    assert r50.config.num_classes == 0  # as timm: its R50 224 px weights come without a classifier
    with pytest.raises(ValueError, match=r"img_size 240 is not a multiple of 32 \(the backbone's stride"):
        vitkit.create_model("vit_small_r26_s32_224", img_size=240)
    with pytest.raises(ValueError, match="set both or neither"):
        vitkit.create_model("vit_small_r26_s32_224", backbone_layers=())
    with pytest.raises(ValueError, match="set both or neither"):
        vitkit.create_model("vit_pico_patch4_28", backbone_layers=(2, 2))


def test_std_conv_same_padding_matches_timm():
    """Weight standardisation and TF "SAME" padding, on odd and even sides (where TF pads asymmetrically)."""
    from timm.layers import StdConv2dSame as TimmStdConv2dSame

    torch.manual_seed(0)
    for kernel, stride in [(7, 2), (3, 2), (3, 1), (1, 2)]:
        ours = StdConv2dSame(4, 8, kernel, stride=stride)
        ref = TimmStdConv2dSame(4, 8, kernel, stride=stride, eps=1e-8)
        ref.load_state_dict(ours.state_dict())
        for size in [(9, 10), (16, 15)]:
            x = torch.randn(2, 4, *size)
            with torch.no_grad():
                assert torch.allclose(ours(x), ref(x), atol=1e-5), (kernel, stride, size)
