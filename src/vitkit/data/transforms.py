"""Per-image preprocessing with torchvision.transforms.v2, shared by training, eval and predict."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open an image, apply its EXIF rotation and convert it to `mode` ("L" or "RGB")."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "F") and mode == "L":
                # 16-bit and float greyscale: scale to 8 bits instead of clipping.
                arr = torch.as_tensor(__import__("numpy").asarray(im, dtype="float32"))
                arr = (arr - arr.min()) / (arr.max() - arr.min()).clamp_min(1e-12) * 255
                return Image.fromarray(arr.round().byte().numpy(), mode="L")
            return im.convert(mode)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def train_transform(
    img_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...], *, augment: str, hflip: bool
) -> v2.Transform:
    """'light': random resized crop (scale 0.5-1) and, where labels allow, horizontal flips."""
    if augment == "none":
        return eval_transform(img_size, mean, std)
    ops: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(img_size, scale=(0.5, 1.0), antialias=True)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def eval_transform(img_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> v2.Transform:
    """Resize the shorter side, centre-crop, scale to [0, 1], normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(min(img_size), antialias=True),
            v2.CenterCrop(img_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
