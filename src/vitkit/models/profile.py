"""Model size and cost: parameters and FLOPs, counted on the meta device (nothing is allocated)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int | tuple[int, int], in_chans: int, batch: int = 1) -> int:
    """FLOPs of one eval forward pass (a multiply-add counts 2), from `torch.utils.flop_counter`.

    Counted on the meta device, where `scaled_dot_product_attention` runs its math decomposition:
    the attention matrix products are included. (On a CPU tensor the fused kernel has no FLOP
    formula registered and would be left out, under-counting ViT-S/16 by 8%.)
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.empty(batch, in_chans, h, w, device="meta")
    was_training = model.training
    # A parameter a module takes as input (a pooling head's latent query) would otherwise be tracked by
    # the counter's backward hooks, which fail under no_grad.
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.eval().requires_grad_(False)
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.to("meta")(x)
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops()
