"""`preprocess.json`, next to an exported model: so that it is usable without vitkit or the run, every
step of the evaluation transform (`vitkit.preprocess.eval_transform`) in plain terms and the class names
in logit order. vitkit reads it back to serve an ONNX export exactly as the run predicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..preprocess import Preprocess
from ..run import atomic_write

PREPROCESS_FILE = "preprocess.json"
SCHEMA_VERSION = 1


def write_preprocess(folder: Path, pre: Preprocess, **fields: Any) -> Path:
    """Write `folder/preprocess.json`: the preprocessing, the class names and `fields` (model file, checks)."""
    doc = {"vitkit_export": SCHEMA_VERSION, **fields, "preprocessing": preprocess_dict(pre), "classes": list(pre.classes)}
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
    d = doc["preprocessing"]
    return Preprocess(tuple(d["img_size"]), d["mode"], tuple(d["mean"]), tuple(d["std"]), tuple(doc["classes"])), doc


def preprocess_dict(pre: Preprocess) -> dict[str, Any]:
    """Every step of the evaluation transform in plain terms, for code that does not use vitkit."""
    h, w = pre.img_size
    return {"mode": pre.mode, "img_size": [h, w], "resize_shorter_side": min(h, w), "interpolation": "bilinear",
            "antialias": True, "center_crop": [h, w], "mean": list(pre.mean), "std": list(pre.std), "layout": "NCHW",
            "dtype": "float32",
            "steps": (f"convert to {pre.mode}; resize the shorter side to {min(h, w)} px (bilinear, antialiased); "
                      f"centre-crop to {h}x{w}; divide pixel values by 255; subtract mean and divide by std per "
                      "channel; stack as float32 (batch, channels, height, width)")}
