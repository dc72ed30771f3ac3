"""Registry-driven model tests: every variant builds, runs forward/backward, and keeps the contract."""

import pytest
import torch

import vitkit
from vitkit.models import Intermediates, get_model_entry
from vitkit.models.layers import resample_abs_pos_embed, sincos_2d_pos_embed


def _tiny_size(name: str) -> int:
    cfg = get_model_entry(name).config
    if get_model_entry(name).family == "cnn":
        return 32
    return 2 * getattr(cfg, "reduction", cfg.patch_size)  # a 2x2 token grid: a tiny sequence


def _tiny_kwargs(name: str) -> dict:
    """A 2x2 token grid at full width; at most 3 blocks where a family's depth is one number (a ViT-L
    or the billion-parameter DINOv2 ViT-g would spend the suite's time and memory on initialisation)."""
    depth = getattr(get_model_entry(name).config, "depth", None)
    fewer = dict(depth=3) if isinstance(depth, int) and depth > 3 else {}
    return dict(num_classes=7, img_size=_tiny_size(name), **fewer)


@pytest.mark.parametrize("name", vitkit.list_models())
def test_every_variant_forward_backward_contract_and_round_trip(name):
    size = _tiny_size(name)
    model = vitkit.create_model(name, **_tiny_kwargs(name))
    in_chans = get_model_entry(name).config.in_chans
    x = torch.randn(2, in_chans, size, size)
    out = model(x)
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.shape == (2, 7) for o in outs)
    sum(o.sum() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    # The contract, in eval mode: head(features) is forward; intermediates; exemptions exist.
    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert torch.allclose(model.forward_head(model.forward_features(x)), logits, atol=1e-6)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
        if get_model_entry(name).family == "cnn":  # teachers: no blocks, and they say so
            with pytest.raises(ValueError, match="no transformer blocks"):
                model.forward_intermediates(x, indices=[0, -1], return_attn=True)
        else:
            inter = model.forward_intermediates(x, indices=[0, -1], return_attn=True)
            assert len(inter.intermediates) == len(inter.attentions) == (1 if model.num_blocks == 1 else 2)
            assert all(t.ndim == 4 and t.shape[0] == 2 for t in inter.intermediates)
        # Save and load: a fresh model with the same weights gives the same logits.
        clone = vitkit.create_model(name, **_tiny_kwargs(name)).eval()
        clone.load_state_dict(model.state_dict())
        assert torch.equal(clone(x), logits)
    # Learned position tables and tokens must be exempt from weight decay wherever a family has them.
    names = {n.split(".")[-1] for n, _ in model.named_parameters()}
    assert (names & {"pos_embed", "cls_token", "dist_token", "reg_token", "latent", "relative_position_bias_table"}
            <= model.no_weight_decay())
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


@pytest.mark.parametrize("name", ["vit_pico_conv4_28", "deit_pico_distilled_conv4_28", "vit_pico_patch4_28"])
def test_contract(name):
    model = vitkit.create_model(name).eval()
    x = torch.randn(3, 1, 28, 28)
    feats = model.forward_features(x)
    assert torch.equal(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    inter = model.forward_intermediates(x, indices=[0, -1], return_attn=True)
    assert isinstance(inter, Intermediates)
    assert torch.allclose(inter.features, feats, atol=1e-6)
    assert [t.shape for t in inter.intermediates] == [(3, 96, 7, 7)] * 2
    n_tok = 49 + model.num_prefix_tokens
    assert [a.shape for a in inter.attentions] == [(3, 4, n_tok, n_tok)] * 2
    assert torch.allclose(inter.attentions[0].sum(-1), torch.ones(3, 4, n_tok), atol=1e-5)
    nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC")
    assert [t.shape for t in nlc.intermediates] == [(3, n_tok, 96)] * 2 and nlc.attentions == []
    with pytest.raises(ValueError, match="out of range"):
        model.forward_intermediates(x, indices=[9])
    model.reset_classifier(3)
    assert model(x).shape == (3, 3)
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()


def test_explicit_attention_path_matches_fused():
    model = vitkit.create_model("vit_pico_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    fused = model.forward_intermediates(x).features
    explicit = model.forward_intermediates(x, return_attn=True)
    assert len(explicit.attentions) == model.num_blocks
    assert torch.allclose(fused, explicit.features, atol=1e-5)


def test_bf16_attention_on_cpu_takes_the_explicit_path_and_agrees_with_fused():
    """bf16 on a CPU uses explicit matmuls (faster there than the fused kernel); same result within bf16 rounding."""
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    from vitkit.models.layers import attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 16) for _ in range(3))
    bias = torch.randn(3, 50, 50)
    drop = torch.nn.Dropout(0.0)
    ref = sdpa(q, k, v, attn_mask=bias)
    out, attn = attend(*(t.bfloat16() for t in (q, k, v)), 16**-0.5, drop, bias)
    assert attn is None and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.05
    out, attn = attend(*(t.bfloat16() for t in (q, k, v)), 16**-0.5, drop, bias, need_weights=True)
    assert attn.shape == (2, 3, 50, 50) and torch.allclose(attn.float().sum(-1), torch.ones(2, 3, 50), atol=1e-2)
    fused, none = attend(q, k, v, 16**-0.5, drop, bias)
    assert none is None and torch.allclose(fused, ref, atol=1e-6)
    model = vitkit.create_model("vit_pico_patch4_28").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert (low.float() - model(x)).abs().max() < 0.1


def test_distilled_heads_train_and_eval():
    model = vitkit.create_model("deit_pico_distilled_conv4_28")
    x = torch.randn(4, 1, 28, 28)
    model.train()
    torch.manual_seed(1)
    cls, dist = model(x)
    assert cls.shape == dist.shape == (4, 10) and not torch.allclose(cls, dist)
    model.eval()
    feats = model.forward_features(x)
    expected = (model.head(model.fc_norm(feats[:, 0])) + model.head_dist(model.fc_norm(feats[:, 1]))) / 2
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_any_input_size_resamples_pos_embed():
    model = vitkit.create_model("vit_tiny_patch16_224", img_size=64, num_classes=5).eval()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    # A 96x48 input: the learned 4x4 table is resampled to a 6x3 grid on the fly.
    assert model(torch.randn(1, 3, 96, 48)).shape == (1, 5)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 70, 64))


def test_resample_abs_pos_embed_matches_timm():
    timm_pe = pytest.importorskip("timm.layers").resample_abs_pos_embed
    pe = torch.randn(1, 1 + 7 * 7, 32)
    ours = resample_abs_pos_embed(pe, (12, 10), num_prefix_tokens=1)
    assert ours.shape == (1, 1 + 120, 32)
    assert torch.equal(ours[:, :1], pe[:, :1])
    assert torch.allclose(ours, timm_pe(pe, (12, 10), num_prefix_tokens=1), atol=1e-6)
    assert resample_abs_pos_embed(pe, (7, 7), num_prefix_tokens=1) is pe


def test_loading_weights_of_another_resolution():
    src = vitkit.create_model("vit_tiny_patch16_224", img_size=64)
    dst = vitkit.create_model("vit_tiny_patch16_224", img_size=96)
    dst.load_state_dict(src.state_dict())
    expected = resample_abs_pos_embed(src.pos_embed.detach(), (6, 6), num_prefix_tokens=1)
    assert torch.allclose(dst.pos_embed, expected)


def test_sincos_embedding():
    pe = sincos_2d_pos_embed((3, 4), 16)
    assert pe.shape == (1, 12, 16)
    # First quarter is sin(x * omega_0) with omega_0 = 1: the column index.
    assert torch.allclose(pe[0, :4, 0], torch.sin(torch.arange(4.0)))
    assert torch.allclose(pe.pow(2).sum(-1), torch.full((1, 12), 8.0))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d_pos_embed((2, 2), 10)


def test_any_number_of_channels():
    model = vitkit.create_model("vit_nano_patch4_32", in_chans=5)
    assert model(torch.randn(2, 5, 32, 32)).shape == (2, 10)
