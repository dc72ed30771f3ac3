"""What every converter returns, and the mapping of a source architecture to a registered variant."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch

from ..models import get_model_entry, list_models

# A key-table target: a template filled with the regex groups (`"blocks.{0}.norm1.{1}"`), or a
# function of the match where the index itself changes (Swin's downsample moving to the next stage).
Target = Union[str, Callable[[re.Match], str]]


@dataclass
class Checkpoint:
    """A source checkpoint in vitkit's (timm's) parameter names, with what it says about itself. `name` and
    `overrides`: the registered variant and config fields that rebuild the exact architecture, when the
    source states it (Hugging Face config, JAX shapes, a vitkit run) or is told it. `family`: the
    source's own family, when it says (its architecture is adopted only into that family)."""

    state: dict[str, torch.Tensor]
    name: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    family: str | None = None


def rename(state: dict[str, torch.Tensor], table: list[tuple[str, Target]], source: str) -> dict[str, torch.Tensor]:
    """Apply a key table (regex, target) to every key; keys no pattern matches raise, listed."""
    compiled = [(re.compile(pattern), target) for pattern, target in table]
    out, unknown = {}, []
    for key, value in state.items():
        for pattern, target in compiled:
            if m := pattern.fullmatch(key):
                new = target(m) if callable(target) else target.format(*m.groups())
                if new in out:
                    raise ValueError(f"{source}: two keys map to {new!r}")
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} key(s) outside the conversion table: {', '.join(sorted(unknown))}")
    return out


def closest_variant(target: Any, family: str, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """The registered variant nearest to config `target`, and the fields to override on it, so that
    `create_model(name, **overrides)` builds exactly `target`. The variant of that config class with
    the fewest differing fields wins, `family` breaking ties (a ViT checkpoint prefers `vit_*` to the
    same architecture under `deit_*`); an explicit `name` is only checked to be of the right class."""
    cls = type(target)
    if name is not None:
        if not isinstance(get_model_entry(name).config, cls):
            raise ValueError(f"the checkpoint is a {family} model ({cls.__name__}), {name!r} is not")
        return name, _differences(get_model_entry(name).config, target)
    candidates = [n for n in list_models() if isinstance(get_model_entry(n).config, cls)]
    if not candidates:
        raise ValueError(f"no registered model uses {cls.__name__}")
    best = min(candidates, key=lambda n: (len(_differences(get_model_entry(n).config, target)),
                                          get_model_entry(n).family != family, n))
    return best, _differences(get_model_entry(best).config, target)


def config_class(family: str) -> type:
    """The config dataclass of a registered family (looked up, so a new family needs no import here)."""
    for n in list_models():
        entry = get_model_entry(n)
        if entry.family == family:
            return type(entry.config)
    raise ValueError(f"no registered model of family {family!r}")


def _differences(base: Any, target: Any) -> dict[str, Any]:
    return {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
            if getattr(base, f.name) != getattr(target, f.name)}


def square(size: int | tuple[int, int] | list[int]) -> int | tuple[int, int]:
    """An image size as the registry writes it: an int when square."""
    if isinstance(size, int):
        return size
    h, w = (int(s) for s in size)
    return h if h == w else (h, w)


def expect_shape(key: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
