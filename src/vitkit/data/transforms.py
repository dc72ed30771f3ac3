"""Training-time per-image preprocessing with torchvision.transforms.v2 (evaluation's is in `vitkit.preprocess`)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ..preprocess import GRAY_MODES, check_image, eval_transform, load_image  # noqa: F401  (re-exported)
from .augment import AugmentSpec, image_policy, resolve_augment


def train_transform(img_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...], *,
                    augment: AugmentSpec, hflip: bool) -> v2.Transform:
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


def image_transform(img_size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...], *, train: bool,
                    augment: AugmentSpec | str = "light", hflip: bool = True) -> v2.Transform:
    """What a loader applies to each decoded image: `train_transform` with the preset (a name or a spec) when
    training, else the evaluation transform."""
    if not train:
        return eval_transform(img_size, mean, std)
    return train_transform(img_size, mean, std, augment=resolve_augment(augment) if isinstance(augment, str)
                           else augment, hflip=hflip)
