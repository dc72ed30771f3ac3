"""`preprocess.json`: what an exported model expects as input, written next to it.

An export must be usable without vitkit and without the run directory, so the file states every
step of the evaluation transform (`vitkit.data.eval_transform`) in plain terms, plus the class
names in logit order. vitkit reads it back to serve an ONNX export exactly as the run predicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

PREPROCESS_FILE = "preprocess.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Preprocess:
    """Image size, colour mode, normalisation and class names of a trained model."""

    img_size: tuple[int, int]  # (H, W)
    mode: str  # PIL mode the image is converted to: "L" (1 channel) or "RGB"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> Preprocess:
        d = config["data"]
        return cls(tuple(d["img_size"]), d["mode"], tuple(d["mean"]), tuple(d["std"]), tuple(d["classes"]))

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        h, w = self.img_size
        return {
            "mode": self.mode,
            "img_size": [h, w],
            "resize_shorter_side": min(h, w),
            "interpolation": "bilinear",
            "antialias": True,
            "center_crop": [h, w],
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW",
            "dtype": "float32",
            "steps": (f"convert to {self.mode}; resize the shorter side to {min(h, w)} px (bilinear, antialiased); "
                      f"centre-crop to {h}x{w}; divide pixel values by 255; subtract mean and divide by std per "
                      "channel; stack as float32 (batch, channels, height, width)"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], classes: list[str]) -> Preprocess:
        return cls(tuple(d["img_size"]), d["mode"], tuple(d["mean"]), tuple(d["std"]), tuple(classes))

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> the model's input batch `(B, C, H, W)`, as `Run.preprocess` makes it."""
        from ..data import eval_transform

        transform = eval_transform(self.img_size, self.mean, self.std)
        return torch.stack([transform(im.convert(self.mode)) for im in images])


def write_preprocess(folder: Path, pre: Preprocess, **fields: Any) -> Path:
    """Write `folder/preprocess.json`: the preprocessing, the class names and `fields` (model file, checks)."""
    from ..engine.rundir import atomic_write

    doc = {"vitkit_export": SCHEMA_VERSION, **fields, "preprocessing": pre.to_dict(), "classes": list(pre.classes)}
    path = Path(folder) / PREPROCESS_FILE
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode())
    path.chmod(0o644)  # the temporary file behind atomic_write is private; an export is meant to be shared
    return path


def read_preprocess(folder: str | Path) -> tuple[Preprocess, dict[str, Any]]:
    """The `Preprocess` of an export folder and the whole document."""
    path = Path(folder) / PREPROCESS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a vitkit export: it has no {PREPROCESS_FILE}")
    doc = json.loads(path.read_text())
    if doc.get("vitkit_export") != SCHEMA_VERSION:
        raise ValueError(f"{path} has export schema {doc.get('vitkit_export')!r}; this vitkit reads {SCHEMA_VERSION}")
    return Preprocess.from_dict(doc["preprocessing"], doc["classes"]), doc
