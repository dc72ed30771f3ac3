"""AdamW with weight-decay groups and the warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models.contract import transformer_block_names


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Each parameter's depth for layer-wise lr decay, and the number of blocks L (`transformer_block_names`, in
    forward order). Depth 0: stem and embeddings; i: the i-th block; parameters between blocks (Swin patch merging,
    a CvT stage's embedding) go with the next block; those after the last (final norm, head) get L + 1."""
    index = {b + ".": i + 1 for i, b in enumerate(transformer_block_names(model))}
    L, ids, current = len(index), {}, 0
    for n, _ in model.named_parameters():
        block = next((b for b in index if n.startswith(b)), None)
        if block is not None:
            current = index[block]
            ids[n] = current
        else:  # stem before the first block, then the next block's depth, L + 1 after the last
            ids[n] = 0 if current == 0 else min(current + 1, L + 1)
    return ids, L


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: decayed weights and the rest (norms, biases, position embeddings, tokens: decay would pull
    them to zero for no benefit; the model names its own in `no_weight_decay()`), each split by depth when
    `layer_decay < 1` (`lr_scale` = layer_decay ** (L + 1 - depth))."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    ids, L = layer_ids(model) if layer_decay < 1 else ({}, 0)
    if L == 0:  # no transformer blocks (a CNN teacher): nothing to decay by depth
        layer_decay = 1.0
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name in skip or name.split(".")[-1] in skip
        depth = ids.get(name, 0)
        group = groups.setdefault((depth, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr_scale": layer_decay ** (L + 1 - depth) if layer_decay < 1 else 1.0,
        })
        group["params"].append(p)
    if layer_decay >= 1:  # the two plain groups, always both present (decayed first)
        for key in ((0, False), (0, True)):
            groups.setdefault(key, {"params": [], "weight_decay": 0.0 if key[1] else weight_decay, "lr_scale": 1.0})
        return [groups[(0, False)], groups[(0, True)]]
    return [groups[k] for k in sorted(groups)]


def create_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel for all parameters instead of ~10 small ops per tensor (torch's CPU
    default); the default model's fp32 step ran 1.10x, its epochs 1.06x as fast (AVX2 path, 2 cores)."""
    return torch.optim.AdamW(param_groups(model, weight_decay, layer_decay), lr=lr, betas=(0.9, 0.999), fused=True)


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from ~0 to `lr`, then cosine decay to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
