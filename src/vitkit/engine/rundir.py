"""The run directory: everything a run writes, each file written atomically.

    RUN/
      config.yaml        training config + what rebuilds the model and its preprocessing
      model.safetensors  the latest weights (safetensors: loading runs no code)
      model_ema.safetensors  their exponential moving average, when the run keeps one
      checkpoint.pt      training state for --resume (tensors and plain values only)
      checkpoint-prev.pt the one before, the fallback when the latest cannot be read
      skipped_files.txt  damaged images left out of the data, with the reason
      metrics.jsonl      one JSON line per epoch
      curves.png         training curves
      eval.json          the final evaluation: written by `train`, rewritten by `vitkit eval`
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save

CONFIG = "config.yaml"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "model_ema.safetensors"
CHECKPOINT = "checkpoint.pt"
PREV_CHECKPOINT = "checkpoint-prev.pt"
SKIPPED = "skipped_files.txt"
METRICS = "metrics.jsonl"
CURVES = "curves.png"
EVAL = "eval.json"


def atomic_write(path: str | Path, data: bytes, *, keep_previous: Path | None = None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never half of either. With
    `keep_previous`, the old file is first renamed there (the fallback checkpoint). A full disk or a
    permission error raises `OSError` naming `path`; the old file is untouched and the temporary
    file is removed.
    """
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
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise type(e)(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_eval(run_dir: str | Path, result: dict[str, Any]) -> None:
    """RUN/eval.json: the latest evaluation of the run (top-1, top-5, loss, and what was scored)."""
    atomic_write(Path(run_dir) / EVAL, (json.dumps(result, indent=2) + "\n").encode())


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(path, save(tensors, metadata=metadata))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write the training state; the checkpoint it replaces becomes `checkpoint-prev.pt`."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue(), keep_previous=Path(path).with_name(PREV_CHECKPOINT))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read training state without unpickling arbitrary objects (`weights_only=True`)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}; was the run started with this directory?") from None
    except Exception as e:
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
        if not {"model", "optimizer", "epoch", "rng"} <= set(state):
            problems.append(f"{run_dir / name} is not a vitkit training checkpoint")
            continue
        if problems:
            warnings.warn(f"{problems[0]}; resuming from the previous checkpoint {run_dir / name}")
        return state
    raise ValueError(f"cannot resume {run_dir}: " + "; ".join(problems))


def save_config(run_dir: Path, config: dict[str, Any]) -> None:
    atomic_write(run_dir / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())


def read_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a vitkit run directory (no {CONFIG})")
    with open(path) as f:
        return yaml.safe_load(f)


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
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Loss and accuracy per epoch, train and validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] + 1 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    a.plot(ep, [r["train_loss"] for r in rows], label="train")
    a.plot(ep, [r["val_loss"] for r in rows], label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    b.plot(ep, [r["train_acc1"] for r in rows], label="train")
    b.plot(ep, [r["val_acc1"] for r in rows], label="val")
    if all("val_acc1_ema" in r for r in rows):
        a.plot(ep, [r["val_loss_ema"] for r in rows], label="val (EMA)")
        b.plot(ep, [r["val_acc1_ema"] for r in rows], label="val (EMA)")
    b.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(run_dir / CURVES, buf.getvalue())
