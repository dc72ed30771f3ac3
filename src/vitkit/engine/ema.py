"""Weight EMA: an exponential moving average of the weights (`AveragedModel`), kept beside the trained ones.

Its decay warms up as `min(decay, (1 + n) / (10 + n))` after n updates (as in timm and big_vision), so on short
runs the average follows the fast early changes instead of staying anchored to the random initialisation.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_decay(decay: float, num_updates: int) -> float:
    return min(decay, (1 + num_updates) / (10 + num_updates))


def create_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of `model` (parameters and buffers); call `.update_parameters(model)` after each step."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # Integer buffers (relative-position indices) are constants: copied once, never averaged.
        pairs = [(e, p) for e, p in zip(ema_params, params) if e.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs], 1 - ema_decay(decay, int(num_averaged)))

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True).eval()
