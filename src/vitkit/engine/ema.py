"""Weight EMA: an exponential moving average of the weights (`AveragedModel`), kept beside the trained ones.

Its decay warms up as `min(decay, (1 + n) / (10 + n))` after n updates (as in timm and big_vision), so on short
runs the average follows the fast early changes instead of staying anchored to the random initialisation.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Iterator

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
        # Under FSDP the parameters are DTensor shards and the buffers plain tensors: one foreach call per kind.
        kinds: dict[type, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for e, p in zip(ema_params, params):
            if e.is_floating_point():
                kinds.setdefault(type(e), []).append((e, p))
        weight = 1 - ema_decay(decay, int(num_averaged))
        for pairs in kinds.values():
            torch._foreach_lerp_([e for e, _ in pairs], [p.to(e.dtype) for e, p in pairs], weight)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True).eval()


@contextlib.contextmanager
def ema_weights(model: nn.Module, ema: AveragedModel | None) -> Iterator[None]:
    """`model` holding the EMA's weights for the while (nothing changes without an EMA): the objective evaluates
    the average through the module it trains, which under FSDP is the one whose shards can run (the EMA copy is
    shards alone). The tensors trade places one at a time, so no third copy of the weights is made."""
    if ema is None:
        yield
        return
    # The order `AveragedModel` averages in: parameters, then buffers.
    pairs = list(zip(itertools.chain(model.parameters(), model.buffers()),
                     itertools.chain(ema.module.parameters(), ema.module.buffers())))
    _trade(pairs)
    try:
        yield
    finally:
        _trade(pairs)


@torch.no_grad()
def _trade(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for a, b in pairs:
        kept = a.clone()
        a.copy_(b)
        b.copy_(kept)
