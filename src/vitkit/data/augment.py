"""Augmentation presets sized to the training budget, built from torchvision.transforms.v2.

A preset is an image policy (RandAugment, TrivialAugmentWide, AutoAugment or none), a random-erasing
probability and Mixup/CutMix strengths, each overridable. Short runs want `light` (flips and small
translations: strong augmentation needs many epochs to pay off), long runs `strong` (DeiT's recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torchvision.transforms import v2

POLICIES = ("none", "randaugment", "trivialaugment", "autoaugment")


@dataclass(frozen=True)
class AugmentSpec:
    policy: str = "none"
    """Per-image policy on top of crop/translate and flips."""
    random_erasing: float = 0.0
    """Probability of erasing a random rectangle of each training image."""
    mixup: float = 0.0
    """Mixup's Beta(alpha, alpha) parameter; 0 disables it."""
    cutmix: float = 0.0
    """CutMix's Beta(alpha, alpha) parameter; 0 disables it. With both on, each batch uses one of the two."""
    crop: bool = True
    """Random translation (in-memory data) or random resized crop (image folders)."""


PRESETS: dict[str, AugmentSpec] = {
    "none": AugmentSpec(crop=False),
    # Flips and ~1/8-image translations: what a 20-epoch run on a few thousand images can use.
    "light": AugmentSpec(),
    # "Better plain ViT baselines" (Beyer et al. 2022): RandAugment(2, 10) and light Mixup.
    "medium": AugmentSpec(policy="randaugment", mixup=0.2),
    # DeiT: RandAugment(2, 9), random erasing 0.25, Mixup 0.8 / CutMix 1.0 — for hundreds of epochs.
    "strong": AugmentSpec(policy="randaugment", random_erasing=0.25, mixup=0.8, cutmix=1.0),
}


def resolve_augment(preset: str, *, policy: str | None = None, random_erasing: float | None = None,
                    mixup: float | None = None, cutmix: float | None = None) -> AugmentSpec:
    """A preset by name with any of its fields overridden (None keeps the preset's value)."""
    if preset not in PRESETS:
        raise ValueError(f"augment={preset!r} is not one of: {', '.join(PRESETS)}")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"auto_augment={policy!r} is not one of: {', '.join(POLICIES)}")
    overrides = {"policy": policy, "random_erasing": random_erasing, "mixup": mixup, "cutmix": cutmix}
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def image_policy(name: str) -> v2.Transform | None:
    """The per-image policy on uint8 images (PIL or tensor), or None."""
    if name == "randaugment":
        # magnitude 9 of 31 bins as in DeiT/timm's rand-m9; two ops per image.
        return v2.RandAugment(num_ops=2, magnitude=9)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    if name == "autoaugment":
        return v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)
    if name == "none":
        return None
    raise ValueError(f"unknown augmentation policy {name!r}; choose from {', '.join(POLICIES)}")


def apply_per_image(transform: v2.Transform, images: torch.Tensor) -> torch.Tensor:
    """Apply a v2 transform to each image of a batch independently (v2 would share one draw per call)."""
    return torch.stack([transform(im) for im in images])


class BatchMix:
    """Mixup and/or CutMix (torchvision's v2) on an assembled batch, on the device, so the same mixed
    images go to the student and a distillation teacher; labels become probability vectors, which
    `torch.nn.functional.cross_entropy` takes directly (with label smoothing on top)."""

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0) -> None:
        ops = [op(alpha=a, num_classes=num_classes) for op, a in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if a > 0]
        if not ops:
            raise ValueError("BatchMix needs mixup > 0 or cutmix > 0")
        self.op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.op(images, labels)
