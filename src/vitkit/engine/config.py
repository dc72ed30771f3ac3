"""The typed training configuration. YAML files and command-line flags are checked against it."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as `config.yaml` in the run directory.

    The defaults train `vit_pico_conv4_28` on `mnist5k` to >= 97% test top-1 in a few minutes on
    two CPU cores.
    """

    data: str = "mnist5k"
    """Built-in name (mnist5k, digits), torchvision name (cifar10, mnist, ...) or an image folder."""
    model: str = "vit_pico_conv4_28"
    """A name from `vitkit models`."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model's config fields, e.g. {depth: 6, drop_path_rate: 0.1}."""
    pretrained: str | None = None
    """A run directory or weights file to start from (the classifier is re-initialised)."""
    img_size: int | None = None
    """Input side in pixels; default: the model's."""
    epochs: int = 20
    batch_size: int = 64
    lr: float = 3e-3
    """Peak learning rate (AdamW), reached after warmup; tuned for the small models, lower it for large ones."""
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    """Clip the global gradient norm; null disables."""
    augment: Literal["none", "light"] = "light"
    """'light': random translation (in memory) or random resized crop (folders), plus flips where labels allow."""
    hflip: bool | None = None
    """Horizontal flips; default: on for photos, off for digits."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """bf16 autocast on CPU or CUDA; fp16 autocast with a gradient scaler on CUDA only."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    val_fraction: float = 0.2
    """Held-out share for image folders without train/ and val/ subfolders."""
    num_workers: int = 2
    """DataLoader workers for image folders (in-memory data needs none)."""
    strict: bool = False
    """Stop at the first damaged image instead of skipping it (skipped files are listed in the run directory)."""
    skip_nonfinite: int = 0
    """Tolerate this many steps with a NaN/inf loss (skipped, not applied) before stopping the run."""
    seed: int = 0
    out: str | None = None
    """Run directory; default runs/MODEL-DATA-TIMESTAMP."""
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint (its saved config is used)."""

    def __post_init__(self) -> None:
        checks = {  # field: (valid?, what is allowed)
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"),
            "min_lr": (0 <= self.min_lr <= max(self.lr, 0), "between 0 and lr"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_epochs": (0 <= self.warmup_epochs <= self.epochs, "between 0 and epochs"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "val_fraction": (0 < self.val_fraction < 1, "in (0, 1)"),
            "num_workers": (self.num_workers >= 0, ">= 0"),
            "img_size": (self.img_size is None or self.img_size > 0, "> 0 or null"),
            "clip_grad": (self.clip_grad is None or self.clip_grad > 0, "> 0 or null"),
            "skip_nonfinite": (self.skip_nonfinite >= 0, ">= 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")
        # The Python API gets the same checks as the CLI, whose parser enforces the Literal types.
        for name, hint in typing.get_type_hints(TrainConfig).items():
            if typing.get_origin(hint) is Literal and getattr(self, name) not in typing.get_args(hint):
                allowed = ", ".join(typing.get_args(hint))
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of: {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
