"""Small helpers every family needs."""

from __future__ import annotations

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
