"""Regularisers applied on the residual branch: stochastic depth and layer scale."""

from __future__ import annotations

import torch
from torch import nn


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rates rising linearly from 0 to `rate` over `depth` blocks (plain floats: meta-device safe)."""
    return [rate * i / max(1, depth - 1) for i in range(depth)]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Stochastic depth (Huang et al. 2016): drop the whole residual branch per sample.

    Survivors are scaled by `1 / keep_prob` so the expected value is unchanged at eval time.
    """
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = x.new_empty(shape).bernoulli_(keep_prob)
    return x * mask / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT, Touvron et al. 2021); timm name `gamma`."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma
