"""The run directory and its typed record: the contract between training and every tool that reads a run.

    RUN/
      config.yaml            the `RunRecord`: what rebuilds the model, its preprocessing and the run
      model.safetensors      the latest weights (safetensors: loading runs no code)
      model_ema.safetensors  their exponential moving average, when the run keeps one
      checkpoint.pt          training state for --resume (tensors and plain values only)
      checkpoint-prev.pt     the one before, the fallback when the latest cannot be read
      skipped_files.txt      damaged images left out of the data, with the reason
      metrics.jsonl          one JSON line per epoch
      curves.png             training curves
      eval.json              the final evaluation: written by training, rewritten by `vitkit eval`

`RunRecord.write`/`read` are the one writer and reader of `config.yaml`; every file is written atomically. Only
`vitkit.models` and `vitkit.preprocess` are imported, so a tool that runs a trained model loads no training code.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from PIL import Image
from safetensors.torch import save
from torch import nn

from .models import create_model
from .models.weights import load_state, read_state_dict, torch_load_tensors
from .preprocess import Preprocess

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint-prev.pt"
SKIPPED = "skipped_files.txt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
EVAL = "eval.json"
SCHEMA_VERSION = 2


def atomic_write(path: str | Path, data: bytes, *, keep_previous: Path | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash leaves the old file
    or the new one, never half of either. With `keep_previous`, the old file is first renamed there (the fallback
    checkpoint). A full disk or a permission error raises `OSError` naming `path`, the old file untouched."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise


@dataclass
class RunRecord:
    """Everything a run directory says about its run, typed; saved as `config.yaml`. `settings` is the whole
    training configuration as a plain dict (what `--resume` rebuilds); every field a tool needs has its own."""

    model: str
    """Registered model name."""
    model_args: dict[str, Any]
    """Every config field the model was built with beyond the variant's (num_classes, in_chans, img_size, overrides)."""
    img_size: tuple[int, int]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    """Class names in logit order; empty for self-supervised runs."""
    objective: str = "classify"
    """classify, distill, mae, beit, or converted (weights from elsewhere, nothing trained)."""
    settings: dict[str, Any] = field(default_factory=dict)
    data: str | None = None
    """Where the data came from (a name or a path); None for converted weights."""
    seed: int = 0
    val_fraction: float = 0.2
    """With `data` and `seed`: the validation split `vitkit eval` rebuilds."""
    precision: str = "fp32"
    """The precision training resolved (`auto` becomes what was measured to be faster)."""
    ema: bool = False
    """Whether the run keeps EMA weights (`model_ema.safetensors`)."""
    tta: bool = False
    """Whether the final evaluation averages test-time views (and `vitkit eval` by default)."""
    tta_flip: bool = False
    tta_shift: int = 0
    world_size: int = 1
    hardware: str | None = None
    """Where the run trained, in words (the model card states it)."""
    source: str | None = None
    """Converted runs: the weights they came from."""
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        self.img_size = tuple(int(s) for s in self.img_size)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        self.classes = [str(c) for c in self.classes]

    @property
    def pretrained(self) -> str | None:
        """What the run started from (`--pretrained`), if anything."""
        return self.settings.get("pretrained")

    def recipe(self) -> dict[str, Any]:
        """The training settings a model card states (the whole configuration is `settings`)."""
        keys = ("batch_size", "lr", "weight_decay", "layer_decay", "augment", "label_smoothing", "ema", "finetune")
        return {k: self.settings[k] for k in keys if self.settings.get(k) is not None}

    @property
    def mode(self) -> str:
        """PIL mode of the model's input images."""
        return "L" if self.in_chans == 1 else "RGB"

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.img_size, self.mode, self.mean, self.std, tuple(self.classes))

    def write(self, run_dir: str | Path) -> None:
        doc = dataclasses.asdict(self)
        doc["img_size"], doc["mean"], doc["std"] = list(self.img_size), list(self.mean), list(self.std)
        atomic_write(Path(run_dir) / CONFIG, yaml.safe_dump(doc, sort_keys=False).encode())

    @classmethod
    def update_settings(cls, run_dir: str | Path, **changes: Any) -> None:
        """Rewrite a run's record with some of its training settings changed (a budgeted run re-planned)."""
        record = cls.read(run_dir)
        dataclasses.replace(record, settings={**record.settings, **changes}).write(run_dir)

    @classmethod
    def read(cls, run_dir: str | Path) -> RunRecord:
        path = Path(run_dir) / CONFIG
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} is not a vitkit run directory (no {CONFIG})")
        try:
            doc = yaml.safe_load(path.read_text())
            if not isinstance(doc, dict):
                raise ValueError("not a mapping")
            if "schema" not in doc:  # vitkit 0.1 wrote sections: train/pretrain, eval, model, data
                doc = _from_v1(doc)
            if doc["schema"] > SCHEMA_VERSION:
                raise ValueError(f"schema {doc['schema']} is newer than this vitkit's ({SCHEMA_VERSION}); upgrade vitkit")
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in doc.items() if k in known})
        except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _from_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """A config.yaml of vitkit 0.1 as a schema-2 record."""
    d, m = doc["data"], doc["model"]
    settings = doc.get("train") or doc.get("pretrain") or {}
    if "pretrain" in doc:
        objective = settings.get("method", "mae")
    elif str(settings.get("data", "")).startswith("none: converted"):
        objective = "converted"
    else:
        objective = "distill" if settings.get("teacher") else "classify"
    views = doc.get("eval", {"tta_flip": settings.get("hflip", True), "tta_shift": 0})
    return {
        "model": m["name"], "model_args": m["args"], "img_size": d["img_size"], "in_chans": d["in_chans"],
        "mean": d["mean"], "std": d["std"], "classes": d["classes"], "objective": objective, "settings": settings,
        "data": None if objective == "converted" else settings.get("data"), "seed": settings.get("seed", 0),
        "val_fraction": settings.get("val_fraction", 0.2), "precision": settings.get("precision", "fp32"),
        "ema": bool(settings.get("ema")) and "pretrain" not in doc, "tta": bool(settings.get("tta")),
        "tta_flip": bool(views["tta_flip"]), "tta_shift": int(views["tta_shift"]),
        "world_size": doc.get("world_size", 1), "source": settings.get("pretrained") if objective == "converted" else None,
        "schema": 1,
    }


# -- weights, checkpoints, metrics -----------------------------------------------------------------
def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, metadata=metadata))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write the training state; the checkpoint it replaces becomes `checkpoint-prev.pt`."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue(), keep_previous=Path(path).with_name(PREV_CHECKPOINT))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read training state without unpickling arbitrary objects (tensors and plain values only)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no checkpoint at {path}; was the run started with this directory?")
    try:
        return torch_load_tensors(path)
    except ValueError as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e


def load_resume_state(run_dir: str | Path) -> dict[str, Any]:
    """The latest readable checkpoint of a run: `checkpoint.pt`, else `checkpoint-prev.pt`."""
    run_dir = Path(run_dir)
    problems = []
    for name in (CHECKPOINT, PREV_CHECKPOINT):
        try:
            state = load_checkpoint(run_dir / name)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
            continue
        if not isinstance(state, dict) or not {"objective", "optimizer", "epoch"} <= set(state):
            problems.append(f"{run_dir / name} is not a training checkpoint of this vitkit version")
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resuming from the previous checkpoint {run_dir / name}")
        return state
    raise ValueError(f"cannot resume {run_dir}: " + "; ".join(problems))


def append_metrics(run_dir: Path, row: dict[str, Any], keep_epochs: int | None = None) -> list[dict[str, Any]]:
    """Add one epoch's row; rows past `keep_epochs` (left by an interrupted run) are dropped first."""
    rows = read_metrics(run_dir)
    if keep_epochs is not None:
        rows = [r for r in rows if r["epoch"] < keep_epochs]
    rows.append(row)
    atomic_write(run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def front_matter(meta: dict[str, Any]) -> str:
    """A Markdown file's YAML metadata block (a Hugging Face model card's)."""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---"


def write_eval(run_dir: str | Path, result: dict[str, Any]) -> None:
    """RUN/eval.json: the latest evaluation of the run (top-1, top-5, loss, and what was scored)."""
    atomic_write(Path(run_dir) / EVAL, (json.dumps(result, indent=2) + "\n").encode())


# -- using a finished run --------------------------------------------------------------------------
@dataclass
class Run:
    """A trained model, in eval mode, with its record (and so its preprocessing)."""

    path: Path
    model: nn.Module
    record: RunRecord
    device: torch.device
    weights: str = "raw"
    """Which weights were loaded: "ema" or "raw"."""

    @property
    def classes(self) -> list[str]:
        return self.record.classes

    @property
    def img_size(self) -> tuple[int, int]:
        return self.record.img_size

    def preprocess(self, images: list[str | Path | Image.Image]) -> torch.Tensor:
        return self.record.preprocess(images)

    def _batches(self, images: list, batch_size: int, progress: str | None = None) -> Iterator[torch.Tensor]:
        """`images` preprocessed, `batch_size` at a time, on the run's device; a progress bar named `progress`."""
        from tqdm import tqdm

        for i in tqdm(range(0, len(images), batch_size), desc=progress, unit="batch", disable=progress is None):
            yield self.preprocess(images[i : i + batch_size]).to(self.device)

    @torch.no_grad()
    def predict(self, images: list[str | Path | Image.Image], topk: int = 5, batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """Top-k `(class name, probability)` pairs for each image (paths or PIL images)."""
        if not self.classes:
            raise ValueError(f"{self.path} is a {self.record.objective} pre-training run: it has no classifier; "
                             f"fine-tune it with `vitkit train --pretrained {self.path}`")
        self.check_classifier()
        k = min(topk, len(self.classes))
        results = []
        for x in self._batches(images, batch_size):
            p, idx = self.model(x).float().softmax(dim=-1).topk(k, dim=-1)
            results += [[(self.classes[j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]
        return results

    def check_classifier(self) -> None:
        """A k-NN run classified by nearest neighbours while it ran; its head was never trained."""
        if self.record.objective == "knn":
            raise ValueError(f"{self.path} is a k-NN evaluation: it has no trained classifier; train one with "
                             f"`vitkit train --pretrained {self.record.pretrained} --finetune linear`")

    @torch.no_grad()
    def embed(self, images: list[str | Path | Image.Image], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """One feature vector per image, `(N, num_features)` float32: the pooled features the classifier
        reads (`forward_head(..., pre_logits=True)`), in the order of `images`."""
        out = []
        for x in self._batches(images, batch_size, "embedding" if progress else None):
            out.append(self.model.forward_head(self.model.forward_features(x), pre_logits=True).float().cpu())
        return torch.cat(out)


def write_embeddings(path: str | Path, embeddings: torch.Tensor, files: list[str]) -> list[Path]:
    """`.npy` (and the file names, one per row, in a `.txt` beside it) or `.parquet` (columns `file` and
    `embedding`); written atomically. Returns the files written."""
    import numpy as np

    path = Path(path)
    if path.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, embeddings.numpy())
        atomic_write(path, buf.getvalue())
        atomic_write(path.with_suffix(".txt"), "".join(f"{f}\n" for f in files).encode())
        return [path, path.with_suffix(".txt")]
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("writing Parquet needs pyarrow (pip install pyarrow); or write .npy") from None
        table = pa.table({"file": [str(f) for f in files],
                          "embedding": pa.array(list(embeddings.numpy()), type=pa.list_(pa.float32()))})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic_write(path, buf.getvalue().to_pybytes())
        return [path]
    raise ValueError(f"{path}: write embeddings to a .npy or .parquet file")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' is CUDA when available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} was asked for, but CUDA is not available")
    return device


def load_run(path: str | Path, device: str = "cpu", weights: str = "auto") -> Run:
    """A run's model from its record and weights, in eval mode; weights: "ema", "raw" or "auto" (EMA when kept)."""
    path = Path(path)
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw, got {weights!r}")
    record = RunRecord.read(path)
    model = create_model(record.model, **record.model_args)
    has_ema = (path / EMA_WEIGHTS).exists()
    if weights == "ema" and not has_ema:
        raise FileNotFoundError(f"{path} has no EMA weights ({EMA_WEIGHTS}); the run was trained without --ema")
    use_ema = weights == "ema" or (weights == "auto" and has_ema)
    file = path / (EMA_WEIGHTS if use_ema else WEIGHTS)
    load_state(model, read_state_dict(file), source=file)
    dev = resolve_device(device)
    return Run(path, model.to(dev).eval(), record, dev, "ema" if use_ema else "raw")
