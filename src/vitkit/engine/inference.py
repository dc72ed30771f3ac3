"""Using a finished run: `load_run`, `Run.predict` and `evaluate_run`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..data import IMG_EXTENSIONS, eval_transform, load_data, load_image, make_loader
from ..data.datasets import FolderSplit, _scan_classes
from ..models import create_model, load_weights
from . import rundir
from .runtime import Runtime
from .loop import evaluate, tta_view_count


@dataclass
class Run:
    """A trained model with the preprocessing it was trained with."""

    path: Path
    model: nn.Module
    config: dict[str, Any]
    classes: list[str]
    device: torch.device
    weights: str = "raw"
    """Which weights were loaded: "ema" or "raw"."""

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.config["data"]["img_size"])

    @property
    def transform(self):
        d = self.config["data"]
        return eval_transform(self.img_size, tuple(d["mean"]), tuple(d["std"]))

    def preprocess(self, images: list[str | Path | Image.Image]) -> torch.Tensor:
        mode = self.config["data"]["mode"]
        pil = [im.convert(mode) if isinstance(im, Image.Image) else load_image(im, mode) for im in images]
        return torch.stack([self.transform(im) for im in pil])

    @torch.no_grad()
    def predict(self, images: list[str | Path | Image.Image], topk: int = 5, batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """Top-k `(class name, probability)` pairs for each image (paths or PIL images)."""
        k = min(topk, len(self.classes))
        results = []
        for i in range(0, len(images), batch_size):
            x = self.preprocess(images[i : i + batch_size]).to(self.device)
            probs = self.model(x).float().softmax(dim=-1)
            p, idx = probs.topk(k, dim=-1)
            results += [[(self.classes[j], float(q)) for q, j in zip(pr.tolist(), ix.tolist())] for pr, ix in zip(p, idx)]
        return results


def load_run(path: str | Path, device: str = "cpu", weights: str = "auto") -> Run:
    """Rebuild a run's model from `config.yaml` and its weights, in eval mode.

    weights: "ema" (`model_ema.safetensors`), "raw" (`model.safetensors`) or "auto": the EMA
    weights when the run kept them, since they are what a run with EMA is trained to deliver.
    """
    path = Path(path)
    if weights not in ("auto", "ema", "raw"):
        raise ValueError(f"weights must be auto, ema or raw, got {weights!r}")
    config = rundir.read_config(path)
    model = create_model(config["model"]["name"], **config["model"]["args"])
    use_ema = weights == "ema" or (weights == "auto" and (path / rundir.EMA_WEIGHTS).exists())
    if weights == "ema" and not (path / rundir.EMA_WEIGHTS).exists():
        raise FileNotFoundError(f"{path} has no EMA weights ({rundir.EMA_WEIGHTS}); the run was trained without --ema")
    load_weights(model, path / (rundir.EMA_WEIGHTS if use_ema else rundir.WEIGHTS))
    dev = Runtime(device).device
    return Run(path, model.to(dev).eval(), config, list(config["data"]["classes"]), dev, "ema" if use_ema else "raw")


def expand_images(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded to the images inside them (recursively, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMG_EXTENSIONS)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p}")
    return out


def evaluate_run(
    path: str | Path, data: str | None = None, *, batch_size: int = 256, device: str = "cpu", tta: bool | None = None,
    weights: str = "auto", report_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Top-1, top-5 and loss of a run on its validation split, or on `data`; written to RUN/eval.json.

    `report_dir`: also write the full report there (per-class metrics, confusion matrix,
    calibration, most confidently wrong images, HTML page; see `vitkit.engine.report`).

    `tta` (flip averaging) defaults to the run's setting. `data` may be a data-set name (its test
    split is used) or a folder: `FOLDER/val` when present,
    otherwise every image under `FOLDER/CLASS/`. Its class names must match the run's.
    """
    run = load_run(path, device, weights)
    cfg, d = run.config["train"], run.config["data"]
    source = data or cfg["data"]
    folder = Path(source)
    if data and folder.is_dir() and not (folder / "val").is_dir() and source != cfg["data"]:
        classes, files, labels, _ = _scan_classes(folder)
        split = FolderSplit(files, labels, d["mode"])
    else:
        bundle = load_data(source, seed=cfg["seed"], val_fraction=cfg["val_fraction"])
        classes, split = bundle.classes, bundle.val
    if classes != run.classes:
        raise ValueError(f"{source} has classes {classes[:10]}, but the run was trained on {run.classes[:10]}")
    if not len(split):
        raise ValueError(f"no images to evaluate in {source}")
    loader = make_loader(split, train=False, batch_size=batch_size, img_size=run.img_size, mean=tuple(d["mean"]),
                         std=tuple(d["std"]), num_workers=cfg.get("num_workers", 0))
    if tta is None:
        tta = bool(cfg.get("tta"))  # resolved and saved by `train`
    # The views training made the model invariant to (runs saved before shifts existed: flips).
    views = run.config.get("eval", {"tta_flip": cfg.get("hflip", True), "tta_shift": 0})
    flip, shift = tta and views["tta_flip"], views["tta_shift"] if tta else 0
    result = evaluate(run.model, loader, Runtime(device), tta_flip=flip, tta_shift=shift, return_outputs=report_dir is not None)
    outputs = {k: result.pop(k) for k in ("logits", "targets") if k in result}
    result = {"run": str(path), "data": source, "weights": run.weights,
              "tta_views": tta_view_count(flip, shift), **result}
    rundir.write_eval(path, result)
    if report_dir is not None:
        from .report import split_images, write_report

        write_report(report_dir, outputs["logits"], outputs["targets"], run.classes, images=split_images(split),
                     curves=Path(path) / rundir.CURVES, summary=result)
    return result
