"""Parameter and FLOP counts: vitkit's agree with timm's for the shared models (same counter)."""

import pytest
import torch

import vitkit
from vitkit.models.profile import count_flops, count_params

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    "name", ["vit_small_patch16_224", "deit_small_distilled_patch16_224", "swin_tiny_patch4_window7_224", "beit_base_patch16_224"]
)
def test_params_and_flops_match_timm(name):
    with torch.device("meta"):
        ours, ref = vitkit.create_model(name), timm.create_model(name)
    assert count_params(ours) == count_params(ref)
    assert count_flops(ours, 224, 3) == count_flops(ref, 224, 3)


def test_flops_count_attention_matmuls():
    """ViT-S/16 at 224: the linear layers, plus 2 x 2*N^2*D per block for q k^T and attn v."""
    with torch.device("meta"):
        model = vitkit.create_model("vit_small_patch16_224")
    n, d, depth = 197, 384, 12
    attention = depth * 2 * (2 * n * n * d)
    assert count_flops(model, 224, 3) - attention == pytest.approx(8.48e9, rel=1e-3)
