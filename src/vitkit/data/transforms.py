"""Per-image preprocessing with torchvision.transforms.v2, shared by training, eval and predict."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2

from .augment import AugmentSpec, image_policy


# Single-channel modes: 1-bit, 8-bit, with alpha, 16/32-bit integer and float greyscale.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# What a damaged, truncated, foreign or oversized file raises inside PIL.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def check_image(path: str | Path) -> str:
    """Decode `path` fully (at reduced scale where the format allows) and return its PIL mode.

    Raises ValueError naming the file for anything PIL cannot decode: truncated or corrupt data,
    a non-image, a zero-byte file, or an image over PIL's decompression-bomb limit.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.draft(mode, (64, 64))  # JPEG decodes at 1/8 scale: cheap, and truncation still fails
            im.load()
        return mode
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {e or type(e).__name__}") from e


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Open an image, apply its EXIF rotation and convert it to `mode` ("L" or "RGB").

    16-bit and float images are rescaled to 8 bits (PIL's own conversion would clip them); palette
    images go through their palette; an alpha channel is dropped.
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in _WIDE_MODES:
                arr = np.asarray(im, dtype=np.float32)
                lo, hi = float(arr.min()), float(arr.max())
                im = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).round().astype(np.uint8), mode="L")
            return im.convert(mode)
    except _DECODE_ERRORS as e:
        raise ValueError(f"cannot read image {path}: {e or type(e).__name__}") from e


def train_transform(
    img_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...], *, augment: AugmentSpec, hflip: bool
) -> v2.Transform:
    """Random resized crop (scale 0.5-1; 0.08-1 with a policy, as DeiT), flips where labels allow,
    the preset's policy on uint8 pixels, then normalisation and random erasing."""
    if not augment.crop and augment.policy == "none" and not augment.random_erasing and not hflip:
        return eval_transform(img_size, mean, std)
    ops: list[v2.Transform] = [v2.ToImage()]
    if augment.crop:
        scale = (0.08, 1.0) if augment.policy != "none" else (0.5, 1.0)
        ops.append(v2.RandomResizedCrop(img_size, scale=scale, antialias=True))
    else:
        ops += [v2.Resize(min(img_size), antialias=True), v2.CenterCrop(img_size)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    policy = image_policy(augment.policy)
    if policy is not None:
        ops.append(policy)
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment.random_erasing:
        ops.append(v2.RandomErasing(p=augment.random_erasing, value=0))
    return v2.Compose(ops)


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
