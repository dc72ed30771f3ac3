"""Converters from other libraries' weights to vitkit's: pure functions, one module per source format.

    timm.py    timm files (.safetensors, .pth, .bin): ViT, DeiT, Swin, BEiT; near identity
    hf.py      Hugging Face directories: transformers ViT, DeiT, Swin, BEiT (CvT in hf_cvt.py), timm hub dirs
    jax.py     JAX ViT .npz: the ViT paper's release and big_vision

`vitkit.convert` may import from `vitkit.models`; `vitkit.models` imports it only lazily, inside
`load_weights`, so that `create_model(name, pretrained=PATH)` takes every format. Nothing is ever
unpickled: safetensors, `torch.load(weights_only=True)` and `numpy.load(allow_pickle=False)` only.
See docs/weights.md.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

from torch import nn

from ..engine import rundir
from ..models import create_model, get_model_entry, model_config, read_state_dict
from ..models.weights import WEIGHTS_NAME, load_state
from .common import Checkpoint, square
from .hf import read_hf
from .jax import read_npz
from .timm import convert_timm, resize_swin_bias_tables, timm_overrides

__all__ = ["Checkpoint", "convert", "detect_format", "load_pretrained", "read_checkpoint", "resolve_source"]

FORMATS = ("vitkit-run", "safetensors", "torch", "hf", "jax-npz")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# `org/name` with the hub's characters; tried on the hub only when no such local path exists.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
# Config fields a loaded checkpoint may differ in: the load adapts them (resampled positions, a new
# head) or they only matter in training (dropout).
ADAPTABLE = {"img_size", "num_classes", "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate",
             "drop_path_rate"}
# Fields that change the outputs only slightly: a warning, not an error (transformers' ViT and BEiT
# use LayerNorm epsilon 1e-12 where the registered variants, like timm, use 1e-6).
NUMERIC = {"norm_eps"}


def detect_format(path: str | Path) -> str:
    """One of `FORMATS`, from the path alone (suffix, or the files a directory holds)."""
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        if (path / WEIGHTS_NAME).exists():
            return "vitkit-run"
        raise ValueError(f"{path} holds neither config.json (Hugging Face) nor {WEIGHTS_NAME} (vitkit run)")
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix == ".npz":
        return "jax-npz"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise ValueError(f"{path}: unknown weights format {suffix!r}; expected .safetensors, .npz, "
                     f"{', '.join(TORCH_SUFFIXES)} or a directory")


def resolve_source(src: str | Path) -> Path:
    """A local path as is; an `org/name` that is not one is fetched from the Hugging Face hub.

    huggingface_hub is optional: without it, or offline, the error says how to pass a directory.
    """
    path = Path(src)
    if path.exists() or not HUB_ID.fullmatch(str(src)):
        return path
    hint = f"download it where there is a connection (`hf download {src} --local-dir DIR`) and pass DIR"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"no such file or directory: {src}; as a hub id it needs huggingface_hub, "
                                f"or {hint}") from None
    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repository, no access: all the same to the user
        raise OSError(f"no such file or directory: {src}, and it could not be downloaded from the Hugging Face hub "
                      f"({type(e).__name__}); {hint}") from e


def read_checkpoint(path: str | Path, name: str | None = None) -> Checkpoint:
    """Read and convert any supported format to vitkit names; `name` names a timm file's variant."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        return read_hf(path, name)
    if fmt == "jax-npz":
        return read_npz(path, name)
    if fmt == "vitkit-run" and (path / rundir.CONFIG).exists():
        return _read_run(path, name)
    state = convert_timm(read_state_dict(path))  # a timm file, or a bare folder holding model.safetensors
    return Checkpoint(state, name, timm_overrides(state, get_model_entry(name).config) if name else {})


def load_pretrained(model: nn.Module, path: str | Path, *, num_classes_given: bool, strict: bool = True) -> None:
    """Load any supported checkpoint into `model` (what `create_model(name, pretrained=path)` calls).

    A Hugging Face or JAX checkpoint must match the model's architecture in every field but
    `ADAPTABLE` (`NUMERIC` ones warn): some differences, like the number of heads, change no shape. Position tables are resampled by the
    families' load hooks, Swin bias tables resized to the model's window. With
    `num_classes_given`, a classifier of another class count is re-initialised with a warning; any
    other missing or unexpected key is an error.
    """
    path = resolve_source(path)
    ckpt = read_checkpoint(path)
    if detect_format(path) in ("hf", "jax-npz") and ckpt.name is not None:
        _check_architecture(model, ckpt, path)
    state = resize_swin_bias_tables(ckpt.state, {k: v.shape for k, v in model.state_dict().items()})
    load_state(model, state, source=path, reset_head=num_classes_given, strict=strict)


def convert(
    src: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
) -> Path:
    """Write a vitkit run directory (`model.safetensors`, `config.yaml`) from any supported checkpoint.

    `model` is needed for timm files, which do not name their architecture; for the other formats
    it picks the registered variant to describe the architecture with (overrides fill the rest).
    `num_classes` other than the checkpoint's re-initialises the head; `img_size` resamples positions.
    """
    path, out = resolve_source(src), Path(out_dir)
    if (out / rundir.CONFIG).exists():
        raise FileExistsError(f"{out} already holds a run; choose another output directory")
    ckpt = read_checkpoint(path, model)
    if ckpt.name is None:
        raise ValueError(f"{src} does not name a registered architecture (timm files never do); pass --model NAME")
    entry = get_model_entry(ckpt.name)
    args = dict(ckpt.overrides)
    source_classes = args.get("num_classes", entry.config.num_classes)
    args.update({k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None})
    net = create_model(ckpt.name, **args)
    state = resize_swin_bias_tables(ckpt.state, {k: v.shape for k, v in net.state_dict().items()})
    load_state(net, state, source=path, reset_head=net.cfg.num_classes != source_classes)

    cfg = net.cfg
    size = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
    n = cfg.num_classes
    classes = ckpt.classes if ckpt.classes and n == source_classes else [str(i) for i in range(n)]
    rundir.save_weights(out / rundir.WEIGHTS, net.state_dict(), {"model": ckpt.name, "source": str(src)})
    rundir.save_config(out, {
        # Nothing was trained here; `data` names no data set, so `vitkit eval` needs --data.
        "train": {"model": ckpt.name, "pretrained": str(src), "data": "none: converted weights, pass --data",
                  "seed": 0, "val_fraction": 0.2, "num_workers": 0},
        "model": {"name": ckpt.name,
                  "args": {**args, "num_classes": n, "in_chans": cfg.in_chans, "img_size": list(size)}},
        "data": {"classes": classes, "in_chans": cfg.in_chans, "img_size": list(size),
                 "mean": list(ckpt.mean or entry.mean), "std": list(ckpt.std or entry.std),
                 "mode": "L" if cfg.in_chans == 1 else "RGB"},
    })
    return out


def _read_run(path: Path, name: str | None) -> Checkpoint:
    state = read_state_dict(path)
    config = rundir.read_config(path)
    # YAML has no tuples; the registry's tuple-typed fields (Swin depths, ...) need them back.
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in config["model"]["args"].items()}
    args["img_size"] = square(args["img_size"])
    d = config["data"]
    name = name or config["model"]["name"]
    return Checkpoint(state, name, args, list(d["classes"]), tuple(d["mean"]), tuple(d["std"]))


def _check_architecture(model: nn.Module, ckpt: Checkpoint, path: Path) -> None:
    """Fail when the model would load the tensors but compute something else (e.g. another head count)."""
    ours = getattr(model, "cfg", None)
    theirs = model_config(ckpt.name, **ckpt.overrides)
    if type(ours) is not type(theirs):
        raise ValueError(f"{path} holds a {get_model_entry(ckpt.name).family} model, not a {type(model).__name__}")
    differ = [f.name for f in dataclasses.fields(theirs)
              if f.name not in ADAPTABLE and getattr(theirs, f.name) != getattr(ours, f.name)]
    slight = [f for f in differ if f in NUMERIC]
    if slight:
        warnings.warn(f"{path} was trained with " + ", ".join(f"{f}={getattr(theirs, f)!r}" for f in slight)
                      + "; the model's differs, so outputs differ slightly (pass it as an override to match)")
        differ = [f for f in differ if f not in NUMERIC]
    if differ:
        want = ", ".join(f"{f}={getattr(theirs, f)!r}" for f in differ)
        have = ", ".join(f"{f}={getattr(ours, f)!r}" for f in differ)
        raise ValueError(f"{path} was trained with {want}, the model has {have}; build it with those "
                         f"overrides of {ckpt.name!r}, or use `vitkit convert`")
