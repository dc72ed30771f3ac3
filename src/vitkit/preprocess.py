"""What a trained model expects as input: reading images and the evaluation transform, shared by training,
evaluation, predict, explain, export and serve; it imports nothing of vitkit, so running a model needs no more."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

# The normalisations pretrained weights expect (ImageNet statistics; Inception-style [-1, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# Single-channel modes: 1-bit, 8-bit, with alpha, 16/32-bit integer and float greyscale.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# What a damaged, truncated, foreign or oversized file raises inside PIL.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def check_image(path: str | Path) -> str:
    """Decode `path` fully (at reduced scale where the format allows) and return its PIL mode; ValueError
    naming the file for what PIL cannot decode: truncated, corrupt, not an image, empty, or a bomb."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.draft(mode, (64, 64))  # JPEG decodes at 1/8 scale: cheap, and truncation still fails
            im.load()
        return mode
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {e or type(e).__name__}") from e


def load_image(path: str | Path | BinaryIO, mode: str = "RGB", *, name: str | None = None,
               draft: int | None = None) -> Image.Image:
    """Open an image (a path, or a file object such as a shard member's bytes, then named `name` in errors),
    apply its EXIF rotation and convert it to `mode` ("L" or "RGB"): 16-bit and float images are rescaled to 8
    bits (PIL's conversion would clip them), palettes applied, alpha dropped. `draft`: a JPEG is decoded at
    the smallest of 1/1, 1/2, 1/4 or 1/8 scale whose sides are still at least `draft` pixels (PIL's draft
    mode: the decoder skips the detail; a 1,400x1,000 photo decoded for 224 px training read 1.8x as fast)."""
    try:
        with Image.open(path) as im:
            if draft is not None:
                im.draft(None, (draft, draft))
            im = ImageOps.exif_transpose(im)
            if im.mode in _WIDE_MODES:
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8), mode="L")
            return im.convert(mode)
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {name or path}: {e or type(e).__name__}") from e


def eval_transform(img_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Transform:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise."""
    return v2.Compose([v2.ToImage(), v2.Resize(min(img_size), antialias=True), v2.CenterCrop(img_size),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


@dataclass(frozen=True)
class Preprocess:
    """Image size, colour mode, normalisation and class names of a trained model."""

    img_size: tuple[int, int]  # (H, W)
    mode: str  # PIL mode the image is converted to: "L" (1 channel) or "RGB"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    @property
    def in_chans(self) -> int:
        return len(self.mean)

    def transform(self) -> v2.Transform:
        return eval_transform(self.img_size, self.mean, self.std)

    def __call__(self, images: list[str | Path | Image.Image]) -> torch.Tensor:
        """Image files or PIL images -> the model's input batch `(B, C, H, W)`."""
        transform = self.transform()
        pil = [im.convert(self.mode) if isinstance(im, Image.Image) else load_image(im, self.mode) for im in images]
        return torch.stack([transform(im) for im in pil])


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
