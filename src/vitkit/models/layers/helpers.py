"""Small helpers every family needs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def cpuinfo(field: str) -> str:
    """A field of the first CPU in Linux's /proc/cpuinfo (`vendor_id`, `model name`); "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def to_2tuple(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """`7 -> (7, 7)`; a pair stays a pair (as ints)."""
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def classifier_head(dim: int, num_classes: int) -> nn.Module:
    """A linear classifier, or the identity for `num_classes=0` (a feature extractor, as in timm)."""
    return nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()


def init_linears(module: nn.Module) -> None:
    """timm's init of the linear layers in `module`: truncated normal weights (std .02), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_small_head(head: nn.Module, scale: float = 0.001) -> None:
    """timm's linear init of a classifier, then its weight times `scale`: BEiT and EVA fine-tune from a
    near-zero classifier ("init_scale" 0.001 in their code and timm). An identity head is left as it is."""
    if isinstance(head, nn.Linear):
        init_linears(head)
        with torch.no_grad():
            head.weight.mul_(scale)


def check_ranges(cfg: Any, positive: tuple[str, ...] = (), nonnegative: tuple[str, ...] = (),
                 rates: tuple[str, ...] = ()) -> None:
    """Raise `ValueError` for the first field of `cfg` out of range: `positive` > 0, `nonnegative` >= 0,
    `rates` in [0, 1). A tuple is checked entry by entry."""
    for names, what, ok in ((positive, "positive", lambda v: v > 0), (nonnegative, ">= 0", lambda v: v >= 0),
                            (rates, "in [0, 1)", lambda v: 0 <= v < 1)):
        for name in names:
            value = getattr(cfg, name)
            if not all(ok(v) for v in (value if isinstance(value, tuple) else (value,))):
                raise ValueError(f"{name} must be {what}, got {value}")
