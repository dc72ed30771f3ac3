"""Reading weights safely: safetensors, or a state-dict file read with `torch.load(weights_only=True)`.

Nothing here unpickles arbitrary objects, so a shared checkpoint cannot run code on load.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a run directory, a `.safetensors` file or a `torch.save`d state dict."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.exists():
        raise FileNotFoundError(f"no weights at {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, pickles carrying code, foreign formats
        raise ValueError(f"cannot read weights from {path}: {e}") from e
    # Common wrappers: {"model": sd}, {"state_dict": sd}, {"model_state": sd}.
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return obj


def load_weights(model: nn.Module, path: str | Path, *, reset_head: bool = False, strict: bool = True) -> None:
    """Load weights into `model` from a vitkit run or weights file, a timm file, a Hugging Face
    directory or hub id, or a JAX `.npz` (`vitkit.convert` recognises the format and renames keys).

    Position embeddings are resampled (the family's load hook does it). With `reset_head`,
    classifier weights whose shape does not match are left at their fresh initialisation
    (fine-tuning on new classes). Any other mismatch is an error naming the keys.
    """
    # The converters know other libraries' names and sit above `models`: imported only when used.
    from ..convert import load_pretrained

    load_pretrained(model, path, num_classes_given=reset_head, strict=strict)


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str | Path,
    reset_head: bool = False,
    strict: bool = True,
) -> None:
    """Load a state dict in vitkit's names, with the head reset and key checks of `load_weights`."""
    own = model.state_dict()
    heads = tuple(getattr(model, "head_prefixes", ("head.", "head_dist.")))
    if reset_head:
        skipped = [k for k in state if k.startswith(heads) and k in own and state[k].shape != own[k].shape]
        if skipped:
            warnings.warn(f"re-initialising the classifier for the new class count (skipped {', '.join(skipped)})")
        state = {k: v for k, v in state.items() if k not in skipped}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"weights in {source} do not fit {type(model).__name__}: {e}") from e
    if reset_head:
        missing = [k for k in missing if not k.startswith(heads)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"weights in {source} do not fit {type(model).__name__}: "
            f"missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}"
        )
