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


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "deit3_medium_patch16_224"])
def test_deit3_matches_timm_at_its_size_and_another(name):
    """DeiT III: LayerScale, and no position embedding on the class token (timm's no_embed_class).
    The layer scales start at 1e-6, which would hide the blocks: they are drawn around 1 instead."""
    torch.manual_seed(0)
    ref = timm.create_model(name, pretrained=False, num_classes=10).eval()
    sd = {k: (1 + 0.1 * torch.randn_like(v)) if k.endswith("gamma") else v for k, v in ref.state_dict().items()}
    ref.load_state_dict(sd)
    assert sd["pos_embed"].shape[1] == 196  # patches only
    for size in (224, 160):
        ours = vitkit.create_model(name, num_classes=10, img_size=size).eval()
        ours.load_state_dict(sd)  # strict; at 160 px the hook resamples the 14x14 table to 10x10
        theirs = ref if size == 224 else timm.create_model(name, pretrained=False, num_classes=10, img_size=size,
                                                           dynamic_img_size=True).eval()
        if size != 224:
            theirs.load_state_dict({**sd, "pos_embed": ours.pos_embed.detach()})
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert (ours(x) - theirs(x)).abs().max().item() <= 1e-4, size
    # Any other input size on the fly (the table resampled in forward), and the same from timm's own resampling.
    dyn = timm.create_model(name, pretrained=False, num_classes=10, dynamic_img_size=True).eval()
    dyn.load_state_dict(sd)
    ours = vitkit.create_model(name, num_classes=10).eval()
    ours.load_state_dict(sd)
    x = torch.randn(1, 3, 192, 240)
    with torch.no_grad():
        assert (ours(x) - dyn(x)).abs().max().item() <= 1e-4


# Today's backbones (timm's names and layouts): DINOv2 with and without registers and its SwiGLU ViT-g,
# the CLIP towers (pre-norm, QuickGELU), SigLIP (attention pooling, or the average), EVA-02 and DINOv3
# (rotary position embeddings, timm's `Eva`). Full width, two
# blocks (the suite's time: 1,370 tokens at DINOv2's 518 px); the default resolution and, through timm's
# dynamic_img_size, another one on the fly.
BACKBONES = [("vit_small_patch14_dinov2", dict(depth=2)), ("vit_small_patch14_reg4_dinov2", dict(depth=2)),
             ("vit_giant_patch14_reg4_dinov2", dict(depth=2, img_size=126)),
             ("vit_base_patch16_clip_224", dict(depth=2)), ("vit_base_patch32_clip_quickgelu_224", dict(depth=2)),
             ("vit_base_patch16_siglip_224", dict(depth=2)), ("vit_base_patch16_siglip_gap_224", dict(depth=2)),
             # rotary position embeddings: EVA-02 (packed SwiGLU; B: separate q/k/v, normed SwiGLU), DINOv3
             ("eva02_tiny_patch14_224", dict(depth=2)), ("eva02_base_patch14_224", dict(depth=2)),
             ("vit_small_patch16_dinov3", dict(depth=2)), ("vit_small_patch16_dinov3_qkvb", dict(depth=2)),
             ("vit_small_plus_patch16_dinov3", dict(depth=2))]


@pytest.mark.parametrize("name,kw", BACKBONES, ids=[b[0] for b in BACKBONES])
def test_backbones_match_timm_at_their_size_and_another(name, kw):
    from conftest import perturb

    ref = perturb(timm.create_model(name, pretrained=False, dynamic_img_size=True, **kw))
    ours = vitkit.create_model(name, **kw).eval()
    ours.load_state_dict(ref.state_dict())  # strict: every key has timm's name and shape
    size = ours.cfg.img_size
    patch = ours.cfg.patch_size
    for shape in ((size, size), (size - 2 * patch, size + patch)):
        x = torch.randn(2, 3, *shape)
        with torch.no_grad():
            assert (ours(x) - ref(x)).abs().max().item() <= 1e-4, shape
            assert (ours.forward_features(x) - ref.forward_features(x)).abs().max().item() <= 1e-4, shape
