"""Converters from other libraries' weights to vitkit's: pure functions, one module per source format.

    timm.py    timm files (.safetensors, .pth, .bin): ViT, DeiT, Swin, BEiT; near identity
    hf.py      Hugging Face directories: transformers ViT, DeiT, Swin, BEiT (CvT in hf_cvt.py), timm hub dirs
    jax.py     JAX ViT .npz: the ViT paper's release and big_vision

`vitkit.models` imports this package only lazily (in `load_weights` and `create_model`), so that
`create_model([name], pretrained=PATH)` takes every format. Nothing is ever unpickled: safetensors,
`torch.load(weights_only=True)` and `numpy.load(allow_pickle=False)` only. See docs/weights.md.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..card import write_card
from ..run import CONFIG, EMA_WEIGHTS, WEIGHTS, Run, RunRecord, load_run, resolve_device, save_weights
from ..models import create_model, get_model_entry, model_config, read_state_dict
from ..models.weights import WEIGHTS_NAME, load_state
from .common import Checkpoint, closest_variant, square
from .hf import read_hf
from .jax import read_npz
from .timm import convert_timm, resize_swin_bias_tables, timm_overrides

__all__ = ["Checkpoint", "build_pretrained", "convert", "detect_format", "load_pretrained", "open_pretrained", "open_source",
           "read_checkpoint", "resolve_source"]

FORMATS = ("vitkit-run", "safetensors", "torch", "hf", "jax-npz")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# `org/name` with the hub's characters; tried on the hub only when no such local path exists.
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
HUB_FILES = ["config.json", "preprocessor_config.json", "model.safetensors", "pytorch_model.bin"]
# Config fields a loaded checkpoint may differ in: the load adapts them (resampled positions, a new
# head, the first convolution's input channels) or they only matter in training (dropout).
ADAPTABLE = {"img_size", "num_classes", "in_chans", "drop_rate", "pos_drop_rate", "proj_drop_rate",
             "attn_drop_rate", "drop_path_rate"}
# Formats whose checkpoints state their whole architecture; timm files state only what the tensors show.
STATED = ("hf", "jax-npz")
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
    fmt = {".safetensors": "safetensors", ".npz": "jax-npz", **dict.fromkeys(TORCH_SUFFIXES, "torch")}.get(suffix)
    if fmt is not None:
        return fmt
    raise ValueError(f"{path}: unknown weights format {suffix!r}; expected .safetensors, .npz, "
                     f"{', '.join(TORCH_SUFFIXES)} or a directory")


def resolve_source(src: str | Path) -> Path:
    """A local path as is; a hub id (`org/name`, or timm's `hf-hub:org/name`) that is not one comes from
    the Hugging Face hub through `huggingface_hub`: downloaded when online, read from the local cache when
    offline (`HF_HUB_OFFLINE=1`, or no network). What is missing is said in one line."""
    path = Path(src)
    repo = str(src).removeprefix("hf-hub:")
    if (path.exists() and repo == str(src)) or not HUB_ID.fullmatch(repo):
        return path
    hint = f"run `hf download {repo}` where there is a network (it fills the cache), or pass a local directory"
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise FileNotFoundError(f"no such file or directory: {src}; as a hub id it needs huggingface_hub "
                                "(pip install huggingface_hub), or pass a local directory") from None
    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_FILES))
    except Exception as e:  # offline and not cached, unknown repository, no access
        where = (f"is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub is offline "
                 "(HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else
                 f"could not be downloaded from the Hugging Face hub ({type(e).__name__})")
        raise OSError(f"no such file or directory: {src}, and as a hub id it {where}; {hint}") from e


def read_checkpoint(path: str | Path, name: str | None = None) -> Checkpoint:
    """Read and convert any supported format to vitkit names; `name` names a timm file's variant."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "hf":
        return read_hf(path, name)
    if fmt == "jax-npz":
        return read_npz(path, name)
    if fmt == "vitkit-run" and (path / CONFIG).exists():
        return _read_run(path, name)
    state = convert_timm(read_state_dict(path))  # a timm file, or a bare folder holding model.safetensors
    return Checkpoint(state, name, timm_overrides(state, get_model_entry(name).config) if name else {})


def load_pretrained(model: nn.Module, path: str | Path, *, num_classes_given: bool, strict: bool = True) -> None:
    """Load any supported checkpoint into an already built `model` (what `load_weights` calls). A Hugging
    Face or JAX checkpoint must match the model in every field but `ADAPTABLE` (`NUMERIC` ones warn): some,
    like the head count, change no shape. Positions are resampled, Swin bias tables resized, the first
    convolution adapted; with `num_classes_given` a classifier of another size is re-initialised (a
    warning); any other missing or unexpected key is an error."""
    path = resolve_source(path)
    _load_checkpoint(model, read_checkpoint(path), path, num_classes_given=num_classes_given, strict=strict)


def build_pretrained(src: str | Path, name: str | None = None, **overrides: Any) -> nn.Module:
    """Build the model a checkpoint holds and load it (what `create_model([name], pretrained=src)` calls).

    Without `name` the checkpoint must state its architecture (Hugging Face, JAX `.npz`, a vitkit run;
    timm files do not); with `name`, the fields where it differs from that variant are adopted, in one
    warning. `overrides` win (`num_classes` re-initialises the head, `img_size` resamples positions,
    `in_chans` adapts the first convolution); one contradicting a Hugging Face or JAX architecture is
    an error. A checkpoint of another family than `name`'s loads as it is: the strict load names the misfits.
    """
    model, _, _ = _build(src, name, overrides)
    return model


def open_pretrained(src: str | Path, name: str | None = None, **overrides: Any) -> tuple[nn.Module, Checkpoint]:
    """`build_pretrained`, with the checkpoint it read (its class names, statistics) beside the model."""
    model, ckpt, _ = _build(src, name, overrides)
    return model, ckpt


def convert(src: str | Path, out_dir: str | Path, *, model: str | None = None, num_classes: int | None = None,
            img_size: int | None = None) -> Path:
    """Write a vitkit run directory (`model.safetensors`, `config.yaml`) from any supported checkpoint.

    `model` is needed for timm files, which do not name their architecture; for the others it picks
    the registered variant to describe it with. `num_classes` other than the checkpoint's
    re-initialises the head; `img_size` resamples positions.
    """
    out = Path(out_dir)
    if (out / CONFIG).exists():
        raise FileExistsError(f"{out} already holds a run; choose another output directory")
    given = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
    net, record = _converted(src, model, given)
    save_weights(out / WEIGHTS, net.state_dict(), {"model": record.model, "source": str(src)})
    record.write(out)
    write_card(out)
    return out


def _converted(src: str | Path, model: str | None, given: dict[str, Any]) -> tuple[nn.Module, RunRecord]:
    """The model a checkpoint holds and the record `convert` writes for it."""
    net, ckpt, _ = _build(src, model, given)
    entry = get_model_entry(ckpt.name)
    args = {**_adopted(ckpt, model, given), **given}  # what the model was built with
    source_classes = ckpt.overrides.get("num_classes", entry.config.num_classes)
    cfg, n = net.cfg, net.cfg.num_classes
    size = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
    # The source's label names (Hugging Face `id2label`, timm `label_names`), unless the head is new.
    classes = ckpt.classes if ckpt.classes and n == source_classes else [str(i) for i in range(n)]
    # Nothing was trained here: the record names no data set, so `vitkit eval` needs --data.
    record = RunRecord(model=ckpt.name, model_args={**args, "num_classes": n, "in_chans": cfg.in_chans,
                                                    "img_size": list(size)},
                       img_size=size, in_chans=cfg.in_chans, mean=_per_channel(ckpt.mean or entry.mean, cfg.in_chans),
                       std=_per_channel(ckpt.std or entry.std, cfg.in_chans), classes=classes, objective="converted",
                       source=str(src))
    return net, record


def open_source(src: str | Path, model: str | None = None, device: str = "cpu") -> Run:
    """A run directory, or any checkpoint `create_model(pretrained=)` takes (a hub id, a Hugging Face
    directory, a timm file with `model`), as a `Run` in memory, with the preprocessing it states."""
    if Path(src).is_dir() and (Path(src) / CONFIG).exists() and model is None:
        return load_run(src, device)
    net, record = _converted(src, model, {})  # in memory: what `convert` would write, without the round trip
    dev = resolve_device(device)
    return Run(Path(src), net.to(dev).eval(), record, dev)


def _read_run(path: Path, name: str | None) -> Checkpoint:
    # The weights the run evaluated and `load_run` uses: the EMA where the run kept one.
    state = read_state_dict(path / EMA_WEIGHTS if (path / EMA_WEIGHTS).exists() else path)
    rec = RunRecord.read(path)
    # YAML has no tuples; the registry's tuple-typed fields (Swin depths, ...) need them back.
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in rec.model_args.items()}
    args["img_size"] = square(args["img_size"])
    family = get_model_entry(rec.model).family
    if name is not None and name != rec.model:  # the run's architecture as overrides of the variant asked for
        name, args = closest_variant(model_config(rec.model, **args), family, name)
    return Checkpoint(state, name or rec.model, args, list(rec.classes), rec.mean, rec.std, family)


def _per_channel(values: tuple[float, ...], in_chans: int) -> tuple[float, ...]:
    """Normalisation statistics for `in_chans` channels: ImageNet's RGB ones averaged for a grey model."""
    return tuple(values) if len(values) == in_chans else (sum(values) / len(values),) * in_chans


def _build(src: str | Path, name: str | None, given: dict[str, Any]) -> tuple[nn.Module, Checkpoint, Path]:
    """`build_pretrained`, also returning the checkpoint and its local path (`convert` writes both)."""
    path = resolve_source(src)
    ckpt = read_checkpoint(path, name)
    if ckpt.name is None:
        raise ValueError(f"{src} does not name its architecture (timm and plain weights files never do); "
                         "pass a model name (vitkit convert: --model NAME)")
    adopted = _adopted(ckpt, name, given)
    model = create_model(ckpt.name, **adopted, **given)
    _load_checkpoint(model, ckpt, path, num_classes_given="num_classes" in given)
    if name is not None:  # without a name the checkpoint's architecture is what was asked for
        differ = {k: v for k, v in adopted.items() if getattr(get_model_entry(name).config, k) != v}
        if differ:
            warnings.warn(f"{path}: adopting the checkpoint's " + ", ".join(f"{k}={v!r}" for k, v in differ.items())
                          + f" over the defaults of {name!r}")
    return model, ckpt, path


def _adopted(ckpt: Checkpoint, name: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's config fields that `given` does not set, when the checkpoint may describe `name`:
    one of another family (a ViT run loaded as a DeiT) is not reshaped, the strict load reports the misfit."""
    if name is not None and ckpt.family is not None and ckpt.family != get_model_entry(name).family:
        return {}
    return {k: v for k, v in ckpt.overrides.items() if k not in given}


def _load_checkpoint(model: nn.Module, ckpt: Checkpoint, path: Path, *, num_classes_given: bool,
                     strict: bool = True) -> None:
    if detect_format(path) in STATED and ckpt.name is not None:
        _check_architecture(model, ckpt, path)
    state = resize_swin_bias_tables(ckpt.state, {k: v.shape for k, v in model.state_dict().items()})
    load_state(model, state, source=path, reset_head=num_classes_given, strict=strict)


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
                      + "; the model's differs, so outputs differ slightly (leave the override out to adopt it)")
        differ = [f for f in differ if f not in NUMERIC]
    if differ:
        want = ", ".join(f"{f}={getattr(theirs, f)!r}" for f in differ)
        have = ", ".join(f"{f}={getattr(ours, f)!r}" for f in differ)
        raise ValueError(f"{path} was trained with {want}, the model has {have}; leave out what contradicts the "
                         "checkpoint (overrides, a model name of another family) to build its own architecture, "
                         "or use `vitkit convert`")
