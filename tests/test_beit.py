"""BEiT: parity with timm (random init, no downloads), resolution changes, attention paths, mask token."""

import pytest
import torch

import vitkit
from vitkit.models.beit import BeitConfig, relative_position_index, resize_rel_pos_bias_table

timm = pytest.importorskip("timm")
from timm.models import beit as timm_beit  # noqa: E402

# timm starts relative position tables and q/v biases at zero, layer scale at a constant and the head
# near zero: a copy with a misplaced table entry, bias or gamma would still match. Randomise them.
_PERTURBED = ("relative_position_bias_table", "gamma_1", "gamma_2", "q_bias", "v_bias")


def _perturb(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(_PERTURBED):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_beit_base_matches_timm():
    ref = _perturb(timm.create_model("beit_base_patch16_224", pretrained=False)).eval()
    ours = vitkit.create_model("beit_base_patch16_224").eval()
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes, no extra keys
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        logits = ref(x)
        assert logits.abs().max() > 0.1  # the perturbed head gives logits that can disagree
        assert _max_diff(ours(x), logits) <= 1e-4
        assert _max_diff(ours.forward_features(x), ref.forward_features(x)) <= 1e-4


@pytest.mark.parametrize(
    "extra, mean_pooling",
    [
        (dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, use_abs_pos_emb=True), True),
        (dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=True, use_abs_pos_emb=False, qkv_bias=False,
              init_values=None), False),
    ],
    ids=["shared-abs-mean", "shared+per-block-token"],
)
def test_tiny_shared_bias_matches_timm(extra, mean_pooling):
    kw = dict(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=4,
              mlp_ratio=2.0, init_values=0.1)
    kw.update(extra)
    ref = _perturb(timm_beit.Beit(**kw, global_pool="avg" if mean_pooling else "token")).eval()
    ours = vitkit.create_model("beit_pico_patch4_28", use_mean_pooling=mean_pooling, **kw).eval()
    ours.load_state_dict(ref.state_dict())
    assert "rel_pos_bias.relative_position_bias_table" in ref.state_dict()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert _max_diff(ours(x), ref(x)) <= 1e-4


def test_relative_position_index_matches_timm():
    for window in [(14, 14), (3, 5), (1, 1)]:
        assert torch.equal(relative_position_index(window), timm_beit.gen_relative_position_index(window))


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's interpolator warns about its own indexing
def test_resize_rel_pos_bias_table_matches_timm():
    table = torch.randn(27 * 27 + 3, 4)  # a 14x14 window, 4 heads
    for new, old in [((16, 16), None), ((2, 2), None), ((9, 5), (14, 14))]:
        rows = (2 * new[0] - 1) * (2 * new[1] - 1) + 3
        ours = resize_rel_pos_bias_table(table, new, old)
        ref = timm.layers.resize_rel_pos_bias_table(table, new, (rows, 4), old)
        assert ours.shape == (rows, 4)
        assert torch.equal(ours[-3:], table[-3:])  # class-token entries are kept
        assert _max_diff(ours, ref) <= 1e-5
    assert resize_rel_pos_bias_table(table, (14, 14)) is table
    with pytest.raises(ValueError, match="infer a square window"):
        resize_rel_pos_bias_table(torch.randn(9 * 5 + 3, 4), (7, 7))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resolution_change_matches_timm():
    # Two blocks of beit_base are enough: the resize is per table, the same in every block.
    name, depth = "beit_base_patch16_224", 2
    ref224 = _perturb(timm.create_model(name, pretrained=False, depth=depth))
    state = ref224.state_dict()
    ref256 = timm.create_model(name, pretrained=False, depth=depth, img_size=256).eval()
    ref256.load_state_dict(timm_beit.checkpoint_filter_fn(state, ref256))
    ours224 = vitkit.create_model(name, depth=depth).eval()
    ours224.load_state_dict(state)
    ours256 = vitkit.create_model(name, depth=depth, img_size=256).eval()
    ours256.load_state_dict(state)  # the load hook resizes every table from 14x14 to 16x16
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        logits = ref256(x)
        assert _max_diff(ours256(x), logits) <= 1e-4
        assert _max_diff(ours224(x), logits) <= 1e-4  # resized on the fly for the 16x16 grid
        assert ours224(torch.randn(1, 3, 160, 96)).shape == (1, 1000)  # non-square grid


def test_fused_and_explicit_attention_agree():
    model = _perturb(vitkit.create_model("beit_pico_patch4_28", use_shared_rel_pos_bias=True)).eval()
    for size, n_tok in [(28, 50), (36, 82)]:  # the configured 7x7 grid and a resized 9x9 one
        x = torch.randn(2, 1, size, size)
        with torch.no_grad():
            fused = model.forward_intermediates(x)
            explicit = model.forward_intermediates(x, return_attn=True)
        assert _max_diff(fused.features, explicit.features) <= 1e-5
        assert [a.shape for a in explicit.attentions] == [(2, 4, n_tok, n_tok)] * model.num_blocks
        assert all(torch.allclose(a.sum(-1), torch.ones(2, 4, n_tok), atol=1e-5) for a in explicit.attentions)


def test_mask_token_replaces_masked_patches():
    model = vitkit.create_model("beit_pico_patch4_28", use_mask_token=True, use_mean_pooling=False).eval()
    assert "mask_token" in model.no_weight_decay()
    x = torch.randn(2, 1, 28, 28)
    everything = torch.ones(2, 49, dtype=torch.bool)
    with torch.no_grad():
        out = model.forward_masked(x, everything)
        assert out.shape == (2, 49, 96)
        # With every patch masked nothing of the image is left: both images give the same output.
        assert _max_diff(out[0], out[1]) <= 1e-5
        # Changing only masked pixels (the top row of patches) changes nothing; unmasked, it does.
        mask = torch.zeros(1, 7, 7, dtype=torch.bool)
        mask[:, 0] = True
        y = x[:1].clone()
        y[..., :4, :] = torch.randn(1, 1, 4, 28)
        assert _max_diff(model.forward_masked(x[:1], mask), model.forward_masked(y, mask)) <= 1e-5
        assert _max_diff(model.forward_features(x[:1]), model.forward_features(y)) > 1e-3
    model.forward_masked(x, everything).sum().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="use_mask_token=True"):
        vitkit.create_model("beit_pico_patch4_28").forward_masked(x, everything)
    with pytest.raises(ValueError, match="positions per image"):
        model.forward_masked(x, torch.ones(2, 48, dtype=torch.bool))


def test_contract():
    model = vitkit.create_model("beit_pico_patch4_28").eval()
    x = torch.randn(3, 1, 28, 28)
    feats = model.forward_features(x)
    assert feats.shape == (3, 50, 96) and model.num_prefix_tokens == 1 and model.num_blocks == 4
    assert torch.equal(model.forward_head(feats), model(x))
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    inter = model.forward_intermediates(x, indices=[0, -1], return_attn=True)
    assert torch.allclose(inter.features, feats, atol=1e-6)
    assert [t.shape for t in inter.intermediates] == [(3, 96, 7, 7)] * 2
    assert [a.shape for a in inter.attentions] == [(3, 4, 50, 50)] * 2
    nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC")
    assert [t.shape for t in nlc.intermediates] == [(3, 50, 96)] * 2 and nlc.attentions == []
    model.reset_classifier(3)
    assert model(x).shape == (3, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (3, 96)
    skip = model.no_weight_decay()
    assert {"pos_embed", "cls_token", "relative_position_bias_table"} <= skip
    tables = [n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == model.num_blocks and all(n.split(".")[-1] in skip for n in tables)


def test_loading_weights_of_another_resolution():
    src = vitkit.create_model("beit_pico_patch4_28", use_abs_pos_emb=True)
    _perturb(src)
    dst = vitkit.create_model("beit_pico_patch4_28", use_abs_pos_emb=True, img_size=36).eval()
    dst.load_state_dict(src.state_dict())
    table = src.blocks[0].attn.relative_position_bias_table.detach()
    assert torch.allclose(dst.blocks[0].attn.relative_position_bias_table, resize_rel_pos_bias_table(table, (9, 9)))
    x = torch.randn(1, 1, 36, 36)
    with torch.no_grad():
        assert _max_diff(dst(x), src.eval()(x)) <= 1e-5  # loading resized == resizing on the fly


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        BeitConfig(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        BeitConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="init_values"):
        BeitConfig(init_values=0.0)
    with pytest.raises(ValueError, match="drop_path_rate"):
        BeitConfig(drop_path_rate=1.0)
    with pytest.raises(ValueError, match="unknown override"):
        vitkit.create_model("beit_pico_patch4_28", use_mask=True)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        vitkit.create_model("beit_pico_patch4_28")(torch.randn(1, 1, 30, 28))
