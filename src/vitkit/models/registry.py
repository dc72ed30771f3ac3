"""Named model variants: `create_model` and `list_models`.

Each family registers its variants as data (a frozen config dataclass instance). Unknown names and
overrides fail at the call, listing what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD  # noqa: F401  (the families' defaults)


@dataclass(frozen=True)
class ModelEntry:
    """A registered variant: its family, config and the preprocessing its weights expect."""

    name: str
    family: str
    config: Any
    builder: Callable[[Any], nn.Module]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    description: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    if entry.name in _REGISTRY:
        raise ValueError(f"model {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, sorted; `pattern` is a shell-style wildcard (`"deit*"`) or a substring."""
    names = sorted(_REGISTRY)
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        names = [n for n in names if fnmatch.fnmatchcase(n, glob)]
    return names


def get_model_entry(name: str) -> ModelEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_config(name: str, **overrides: Any) -> Any:
    """The variant's config with `overrides` applied and type-checked."""
    entry = get_model_entry(name)
    fields = {f.name: f for f in dataclasses.fields(entry.config)}
    hints = typing.get_type_hints(type(entry.config))
    for key, value in list(overrides.items()):
        if isinstance(value, list):  # YAML and JSON have no tuples: a saved run's config gives lists
            overrides[key] = value = tuple(value)
        if key not in fields:
            raise ValueError(
                f"unknown override {key!r} for model {name!r} ({entry.family}). Valid: {', '.join(sorted(fields))}"
            )
        if not _matches(value, hints[key]):
            raise TypeError(f"override {key}={value!r} for model {name!r} must be of type {hints[key]}")
    return dataclasses.replace(entry.config, **overrides)


def create_model(
    name: str | None = None,
    *,
    pretrained: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    in_chans: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, or the model a checkpoint holds.

    Args:
        name: a name from `list_models()`; may be left out with a `pretrained` checkpoint that names
            its architecture (a Hugging Face directory, a JAX `.npz`, a vitkit run).
        pretrained: a vitkit run directory, a weights file (`.safetensors`, or a state-dict file read
            with `torch.load(weights_only=True)`, e.g. timm's), a Hugging Face directory or hub id, or
            a JAX `.npz`. The architecture the checkpoint states is adopted (with `name`, one warning
            line lists the fields that differ from that variant); the arguments below win over it:
            positions are resampled to a new `img_size`, the first convolution adapted to a new
            `in_chans`, a classifier of another `num_classes` re-initialised, each said in one line.
        num_classes, img_size, in_chans: the usual shortcuts for config fields.
        overrides: any other field of the family's config; unknown ones raise.
    """
    for key, value in (("num_classes", num_classes), ("img_size", img_size), ("in_chans", in_chans)):
        if value is not None:
            overrides[key] = value
    if pretrained is not None:
        # The converters know other libraries' formats and sit above `models`: imported only when used.
        from ..convert import build_pretrained

        return build_pretrained(pretrained, name, **overrides)
    if name is None:
        raise ValueError("create_model needs a model name (see list_models()), or pretrained= a checkpoint "
                         "that names its architecture")
    return get_model_entry(name).builder(model_config(name, **overrides))


def _matches(value: Any, hint: Any) -> bool:
    """A small runtime check of config override types (int/float/bool/str/Literal/Optional/tuple)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, h) for v, h in zip(value, args))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
