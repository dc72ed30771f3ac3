"""Swin Transformer: timm parity, shifted-window masking, any input size and the model contract."""

import pytest
import torch
from torch import nn

import vitkit
from vitkit.models import Intermediates, get_model_entry
from vitkit.models.swin import SwinConfig, SwinTransformerBlock, shifted_window_mask

PICO = "swin_pico_patch2_window4_32"


def test_tiny_matches_timm():
    timm = pytest.importorskip("timm")
    name = "swin_tiny_patch4_window7_224"
    ref = timm.create_model(name, pretrained=False).eval()
    ours = vitkit.create_model(name).eval()
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-4
        assert (ours.forward_features(x) - ref.forward_features(x)).abs().max().item() <= 1e-4


def test_other_divisible_size_matches_timm():
    # timm fixes each stage's window and shift for img_size at construction, so the reference is
    # built at 64 px; ours is the 32 px variant run at 64 px with masks built on the fly.
    timm = pytest.importorskip("timm")
    cfg = get_model_entry(PICO).config
    ref = timm.models.swin_transformer.SwinTransformer(
        img_size=64, patch_size=cfg.patch_size, num_classes=cfg.num_classes, embed_dim=cfg.embed_dim,
        depths=cfg.depths, num_heads=cfg.num_heads, window_size=cfg.window_size,
    ).eval()
    ours = vitkit.create_model(PICO).eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() <= 1e-5


def test_shift_mask_matches_timm_on_divisible_maps():
    timm = pytest.importorskip("timm")
    blk = timm.models.swin_transformer.SwinTransformerBlock(8, (8, 12), num_heads=2, window_size=4, shift_size=2)
    assert torch.equal(shifted_window_mask((8, 12), (4, 4), (2, 2)), blk.attn_mask)
    assert shifted_window_mask((8, 12), (4, 4), (0, 0)) is None


@pytest.mark.parametrize("shift", [0, 2])
def test_windows_leak_neither_across_the_border_nor_into_padding(shift):
    # A (shifted) window block on a 7x7 map (padded to 8x8 for 4x4 windows) must equal, on every
    # window of the paper's partition, the same block run on that window's crop alone: no token
    # sees a padded one, and tokens rolled around the border only see their own region.
    blk = SwinTransformerBlock(8, 2, window_size=4, shift_size=shift).eval()
    nn.init.normal_(blk.attn.relative_position_bias_table)  # a bias that matters
    x = torch.randn(2, 7, 7, 8)
    spans = [(0, 2), (2, 6), (6, 7)] if shift else [(0, 4), (4, 7)]
    with torch.no_grad():
        out, _ = blk(x)
        for r0, r1 in spans:
            for c0, c1 in spans:
                alone, _ = blk(x[:, r0:r1, c0:c1])  # fits in one window: neither split nor shifted
                assert torch.allclose(out[:, r0:r1, c0:c1], alone, atol=1e-5), (r0, c0)


def test_explicit_attention_path_matches_fused():
    model = vitkit.create_model(PICO).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fused = model.forward_intermediates(x)
        explicit = model.forward_intermediates(x, return_attn=True)
    assert fused.attentions == []
    assert torch.allclose(fused.features, explicit.features, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(fused.intermediates, explicit.intermediates))
    # 16x16, 8x8 and 4x4 maps in 4x4 windows: 16, 4 and 1 windows per image.
    assert [a.shape for a in explicit.attentions] == [(32, 3, 16, 16), (8, 6, 16, 16), (2, 12, 16, 16)]
    for a in explicit.attentions:
        assert torch.allclose(a.sum(-1), torch.ones(a.shape[:-1]), atol=1e-5)


def test_any_input_size():
    model = vitkit.create_model(PICO).eval()
    with torch.no_grad():
        # 36 px: 18x18, 9x9 and 5x5 maps, none a multiple of the 4x4 window.
        assert model(torch.randn(1, 3, 36, 36)).shape == (1, 10)
        assert model.forward_features(torch.randn(1, 3, 36, 20)).shape == (1, 5, 3, 192)
        tiny = vitkit.create_model("swin_tiny_patch4_window7_224", num_classes=5).eval()
        assert tiny(torch.randn(1, 3, 256, 256)).shape == (1, 5)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 33, 32))


def test_contract_on_mnist_sized_input():
    model = vitkit.create_model(PICO, img_size=28, in_chans=1).eval()
    assert model.num_blocks == 3 and model.num_features == 192 and model.num_classes == 10
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (3, 4, 4, 192)  # 14 -> 7 -> 4 (odd sides are padded when merging)
        assert torch.equal(model.forward_head(feats), model(x))
        assert model.forward_head(feats, pre_logits=True).shape == (3, 192)
        inter = model.forward_intermediates(x, indices=[0, -1], return_attn=True)
        nlc = model.forward_intermediates(x, indices=1, output_fmt="NLC", norm=True)
    assert isinstance(inter, Intermediates)
    assert torch.allclose(inter.features, feats, atol=1e-6)
    assert [t.shape for t in inter.intermediates] == [(3, 48, 14, 14), (3, 192, 4, 4)]
    assert len(inter.attentions) == 2
    assert [t.shape for t in nlc.intermediates] == [(3, 16, 192)]
    assert torch.allclose(nlc.intermediates[0], feats.flatten(1, 2), atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[3])
    model.reset_classifier(4)
    assert model(x).shape == (3, 4)
    names = [n for n, _ in model.named_parameters()]
    for skip in model.no_weight_decay():
        assert any(n.endswith(skip) for n in names)
    assert sum(n.endswith("relative_position_bias_table") for n in names) == 6


def test_bad_configs_fail_at_the_call():
    with pytest.raises(ValueError, match="window_size"):
        vitkit.create_model(PICO, windw_size=8)
    with pytest.raises(ValueError, match="one entry per stage"):
        SwinConfig(depths=(2, 2), num_heads=(3, 6, 12))
    with pytest.raises(ValueError, match="not divisible by 5 heads"):
        SwinConfig(num_heads=(3, 6, 12, 5))
