"""Reading weights safely: safetensors, or a state-dict file read with `torch.load(weights_only=True)`.

Nothing here unpickles arbitrary objects, so a shared checkpoint cannot run code on load.
"""

from __future__ import annotations

import math
import pickle
import pickletools
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

WEIGHTS_NAME = "model.safetensors"

# What PyTorch's tensor-only unpickler says when it stops at a pickled object (torch >= 2.4 wording).
_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_CALL = re.compile(r"reduce for unrecognized function (.+?)(?: which belongs|$)", re.M)
_OPERAND = re.compile(r"Unsupported operand (\d+)")
# The sentence PyTorch appends to several load errors, recommending `weights_only` be turned off.
_UNSAFE_ADVICE = getattr(torch.serialization, "UNSAFE_MESSAGE", "")


def torch_load_tensors(path: str | Path) -> object:
    """`torch.load(path, map_location="cpu", weights_only=True)`, with vitkit's messages.

    PyTorch's own message for a file carrying Python objects advises loading it unsafely; this
    raises `ValueError` naming what was found, saying that nothing ran and how to convert a
    trusted file instead. A truncated or foreign file is a `ValueError` too (its reason, without
    PyTorch's advice); only operating-system errors (missing file, no permission) stay `OSError`.
    """
    try:
        with warnings.catch_warnings():
            # PyTorch asks for an issue about protocol 4/5 pickles, which it then refuses anyway.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError as e:
        # `from None`: the chained PyTorch text would print the unsafe advice in a traceback.
        raise ValueError(_refused_pickle_message(str(e), path)) from None
    except Exception as e:  # truncated archives, TorchScript or foreign files: one error type for callers
        reason = " ".join(str(e).replace(_UNSAFE_ADVICE, "").split()) if _UNSAFE_ADVICE else str(e)
        if "TorchScript" in reason:
            reason = "it is a TorchScript archive (a program, not a state dict), which vitkit does not load"
        raise ValueError(reason or f"{type(e).__name__}: the file is empty or cut short") from None


def _refused_pickle_message(error: str, path: str | Path) -> str:
    """vitkit's one-line explanation of a file that tensor-only unpickling refused (`error` is PyTorch's text)."""
    names = _GLOBAL.findall(error) or _CALL.findall(error) or _pickle_globals(Path(path))
    if names:
        what = (f"the file holds a pickled Python object (global {', '.join(dict.fromkeys(names))}), which could "
                "run code when loaded")
    else:
        op = _OPERAND.search(error)
        what = ("the file is damaged or holds pickle data other than a state dict of tensors"
                + (f" (pickle opcode {op[1]})" if op else ""))
    return (f"{what}; vitkit refused it and nothing in it was executed. If you trust the file, "
            "load it yourself and save its state dict with safetensors "
            "(safetensors.torch.save_file(state_dict, \"model.safetensors\")), then use that file or convert it "
            "with `vitkit convert`")


def _pickle_globals(path: Path, limit: int = 1 << 20) -> list[str]:
    """The globals a raw pickle file names, read with `pickletools` (a parser: nothing is executed).

    PyTorch names the global itself for its own (protocol 2) files; a `pickle.dump` with protocol 4
    or 5 is refused at its first opcode, before any global, so the file is scanned here instead.
    """
    found: list[str] = []
    strings: list[str] = []  # STACK_GLOBAL takes its module and name from the two strings pushed before it
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f.read(limit)):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a zip archive, a damaged file or one cut at `limit`: what was found so far
        pass
    return found


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
        obj = torch_load_tensors(path)
    except Exception as e:  # truncated files, pickles carrying code, foreign formats
        raise ValueError(f"cannot read weights from {path}: {str(e) or type(e).__name__}") from e
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

    Position embeddings are resampled (the family's load hook does it), and the first convolution is
    adapted to the model's input channels (`adapt_input_conv`). With `reset_head`, classifier
    weights whose shape does not match are left at their fresh initialisation (fine-tuning on new
    classes). Any other mismatch is an error naming the keys.
    """
    # The converters know other libraries' names and sit above `models`: imported only when used.
    from ..convert import load_pretrained

    load_pretrained(model, path, num_classes_given=reset_head, strict=strict)


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-convolution weight `(out, C, kh, kw)` for `in_chans` input channels, as timm's `adapt_input_conv`.

    To one channel: the sum over the C channels, so a grey image gives what its C-channel copy gave.
    Otherwise the channels are tiled to `in_chans` and scaled by C / in_chans: timm's 3 / N for RGB
    weights, and 1 / N from one channel, so a grey image copied to N channels gives what it gave.
    """
    w = weight.float()  # half-precision sums are inexact (and unsupported on some CPUs)
    if in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        c = w.shape[1]
        out = w.repeat(1, math.ceil(in_chans / c), 1, 1)[:, :in_chans] * (c / in_chans)
    return out.to(weight.dtype)


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str | Path,
    reset_head: bool = False,
    strict: bool = True,
) -> None:
    """Load a state dict in vitkit's names, with the head reset, input-channel adaptation and key
    checks of `load_weights`."""
    own = model.state_dict()
    heads = tuple(getattr(model, "head_prefixes", ("head.", "head_dist.")))
    if reset_head:
        skipped = [k for k in state if k.startswith(heads) and k in own and state[k].shape != own[k].shape]
        if skipped:
            warnings.warn(f"re-initialising the classifier for {getattr(model, 'num_classes', '?')} classes: "
                          f"{source} has {state[skipped[0]].shape[0]} (skipped {', '.join(skipped)})")
        state = {k: v for k, v in state.items() if k not in skipped}
    state = _adapt_first_conv(model, state, own, source)
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


def _adapt_first_conv(
    model: nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], source: str | Path
) -> dict[str, torch.Tensor]:
    """`state` with the first convolution adapted to the model's input channels, said in one line.

    The family names that convolution (`first_conv`, timm's pretrained_cfg name); only its input
    channels may differ, anything else is left for the strict load to report.
    """
    first = getattr(model, "first_conv", None)
    key = f"{first}.weight"
    if first is None or key not in state or key not in own:
        return state
    w, want = state[key], own[key].shape
    if w.shape == want or w.ndim != 4 or w.shape[0] != want[0] or w.shape[2:] != want[2:]:
        return state
    how = f"summed over its {w.shape[1]} channels" if want[1] == 1 else \
        f"channels repeated and scaled by {w.shape[1]}/{want[1]}"
    warnings.warn(f"{source} was trained on {w.shape[1]}-channel images, the model takes {want[1]}: "
                  f"adapting the first convolution {first} ({how})")
    return {**state, key: adapt_input_conv(w, want[1])}
