"""What the server runs: a run directory in PyTorch, or an ONNX export in onnxruntime. Both return class
probabilities for a preprocessed batch; the PyTorch one also an attention map per image for the page."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..export.preprocess import PREPROCESS_FILE, read_preprocess
from ..preprocess import load_image
from ..run import CONFIG, load_run

# Largest side of the attention map sent to the page: the token grids are smaller (14 for ViT-B/16
# at 224 px, 56 for Swin's first stage); the page smooths the map over the image.
MAP_SIDE = 64


class TorchPredictor:
    """A run directory's model (its EMA weights when it kept them), on the CPU, in eval mode; attention
    maps are `vitkit.explain.rollout`, for every family (Swin's windows and CvT's strided keys included)."""

    backend = "pytorch"

    def __init__(self, run_dir: str | Path) -> None:
        run = load_run(run_dir, "cpu")
        self.model, self.name = run.model, run.record.model
        self.preprocess = run.record.preprocess
        self.classes = list(self.preprocess.classes)
        try:
            self._attention_maps(torch.zeros(1, self.preprocess.in_chans, *self.preprocess.img_size))
            self.has_attention = True
        except ValueError:  # vitkit.explain found no attention probabilities it can place on the image
            self.has_attention = False

    def __call__(self, x: torch.Tensor, attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x (B, C, H, W)` -> probabilities `(B, classes)` and, if asked and available, maps `(B, h, w)` in [0, 1]."""
        with torch.inference_mode():
            probs = self.model(x).float().softmax(-1)
        return probs, self._attention_maps(x) if attention and self.has_attention else None

    def _attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        from ..explain import rollout

        maps = rollout(self.model, x)  # (B, H, W); not under inference_mode: it takes gradients of the head
        h, w = maps.shape[-2:]
        if max(h, w) > MAP_SIDE:
            size = (max(1, round(h * MAP_SIDE / max(h, w))), max(1, round(w * MAP_SIDE / max(h, w))))
            maps = F.adaptive_avg_pool2d(maps[:, None], size)[:, 0]
        return maps


class OnnxPredictor:
    """An ONNX export folder (or one of its `.onnx` files) in onnxruntime; no attention maps."""

    backend = "onnxruntime"
    has_attention = False

    def __init__(self, path: str | Path) -> None:
        from ..export.checks import onnx_runner

        path = Path(path)
        folder = path.parent if path.suffix == ".onnx" else path
        self.preprocess, doc = read_preprocess(folder)
        if doc.get("format") != "onnx":
            raise ValueError(f"{folder} holds a {doc.get('format')} export; the server runs ONNX exports and run "
                             "directories (TorchScript and .pt2 archives are unpickled on loading, so it does not open them)")
        model_file = path if path.suffix == ".onnx" else folder / doc["model_file"]
        self._run = onnx_runner(model_file)
        self.dynamic_batch = doc["input"]["batch"] == "dynamic"
        self.name = f"{doc['source']['model']} ({model_file.name})"
        self.classes = list(self.preprocess.classes)

    def __call__(self, x: torch.Tensor, attention: bool = False) -> tuple[torch.Tensor, None]:
        xs = [x] if self.dynamic_batch else list(x.split(1))
        logits = torch.cat([torch.from_numpy(self._run(b.numpy())) for b in xs])
        return logits.float().softmax(-1), None


def load_predictor(path: str | Path) -> TorchPredictor | OnnxPredictor:
    """A run directory -> `TorchPredictor`; an ONNX export folder or `.onnx` file -> `OnnxPredictor`."""
    path = Path(path)
    if (path / CONFIG).is_file():
        return TorchPredictor(path)
    if (path / PREPROCESS_FILE).is_file() or (path.suffix == ".onnx" and path.is_file()):
        return OnnxPredictor(path)
    raise FileNotFoundError(f"{path} is neither a run directory (config.yaml) nor a vitkit export ({PREPROCESS_FILE})")


def decode_image(data: bytes, mode: str) -> Image.Image:
    """Uploaded bytes -> a PIL image in `mode`; ValueError for anything PIL cannot decode."""
    return load_image(io.BytesIO(data), mode)
