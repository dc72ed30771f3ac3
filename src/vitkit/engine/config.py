"""The typed training configuration. YAML files and command-line flags are checked against it."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


DEFAULT_MODEL = "vit_pico_conv4_28"


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as `config.yaml` in the run directory.

    The defaults train `vit_pico_conv4_28` on `mnist5k` to 98.6-99.0% test top-1 in the final
    evaluation (EMA weights, test-time shifts; mean 98.8% over nine runs; 97.7-99.1% on the plain
    images) in about 4 minutes on two CPU cores (docs/recipes.md).
    """

    data: str = "mnist5k"
    """Built-in name (mnist5k, digits), torchvision name (cifar10, mnist, ...) or an image folder."""
    model: str | None = None
    """A name from `vitkit models`; default: the model of the --pretrained run, else vit_pico_conv4_28."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model's config fields, e.g. {depth: 6, drop_path_rate: 0.1}."""
    pretrained: str | None = None
    """Fine-tune from a run directory or weights file (timm, Hugging Face, JAX): the classifier is
    re-initialised for the data's classes, position embeddings are resampled to img_size, and the
    fine-tuning defaults apply (lr 5e-4, layer_decay 0.75)."""
    linear_probe: bool = False
    """With --pretrained: train only the new classifier on frozen features (a linear probe)."""
    img_size: int | None = None
    """Input side in pixels; default: the model's."""
    epochs: int = 40
    batch_size: int = 32
    lr: float | None = None
    """Peak learning rate (AdamW) after warmup; default 2e-3 from scratch (tuned for the small
    models at batch 32; lower it for large ones), 5e-4 when fine-tuning."""
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    layer_decay: float | None = None
    """Layer-wise lr decay: block i of L trains at lr * layer_decay**(L + 1 - i), the embeddings at
    layer_decay**(L + 1); default 0.75 when fine-tuning, off (1.0) from scratch."""
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    """Clip the global gradient norm; null disables."""
    accum_steps: int = 1
    """Gradient accumulation: optimizer step every N batches (effective batch = batch_size * N * processes)."""
    augment: Literal["none", "light", "medium", "strong"] = "light"
    """Preset sized to the budget. light: translation (in memory) or random resized crop (folders)
    plus flips where labels allow; medium: + RandAugment and Mixup 0.2; strong (DeiT, for long
    runs): + random erasing 0.25 and Mixup 0.8 / CutMix 1.0."""
    auto_augment: Literal["none", "randaugment", "trivialaugment", "autoaugment"] | None = None
    """Override the preset's per-image policy."""
    mixup: float | None = None
    """Override the preset's Mixup alpha (0 disables)."""
    cutmix: float | None = None
    """Override the preset's CutMix alpha (0 disables)."""
    random_erasing: float | None = None
    """Override the preset's random-erasing probability."""
    hflip: bool | None = None
    """Horizontal flips; default: on for photos, off for digits."""
    teacher: str | None = None
    """DeiT distillation teacher: a vitkit run directory, a registered model (`tv:resnet18`,
    `deit_...`) with --teacher-weights, or `timm:NAME` with --teacher-weights. Must predict the data's classes."""
    teacher_weights: str | None = None
    """Weights file for a teacher given by name."""
    distill: Literal["none", "soft", "hard"] | None = None
    """Distillation loss: default hard with a teacher (DeiT's better one), none without."""
    alpha: float | None = None
    """Weight of the teacher term: default 0.5 (hard) / 0.1 (soft), as in DeiT."""
    tau: float = 3.0
    """Softmax temperature of soft distillation."""
    ema: float | None = 0.998
    """Decay of the weight EMA (evaluated and saved alongside the raw weights; used by eval and
    predict); null disables. The decay warms up as min(ema, (1 + n) / (10 + n)) over the first steps."""
    tta: bool | None = None
    """Test-time augmentation: average the logits over the views training made the model invariant
    to: mirrors (when training flips) and one-pixel shifts (when the in-memory loader translates).
    Each epoch is scored with the mirrors only; the final evaluation (eval.json) with all views.
    Default: on when training flips or translates."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs and on CPUs with bf16 instructions (fp32 there for models with depthwise
    convolutions, i.e. CvT, which run slower in bf16), else fp32. bf16 autocast on CPU or CUDA; fp16
    autocast with a gradient scaler on CUDA."""
    compile: bool = False
    """torch.compile the model (pays off on long runs; compiling a ViT takes ~30 s on a CPU)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    train_subset: float | None = None
    """Train on part of the training split only, stratified and seeded: a fraction (< 1) or a
    number of images (>= 1). For low-label experiments; validation is unchanged."""
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
        # Fine-tuning and from-scratch training want different defaults; resolved here so the
        # saved config.yaml states what was used.
        if self.lr is None:
            self.lr = 5e-4 if self.pretrained else 2e-3
        if self.layer_decay is None:
            self.layer_decay = 0.75 if self.pretrained else 1.0
        if self.distill is None:
            self.distill = "hard" if self.teacher else "none"
        if self.alpha is None:
            self.alpha = 0.1 if self.distill == "soft" else 0.5
        checks = {  # field: (valid?, what is allowed)
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr is None or self.lr > 0, "> 0"),
            "min_lr": (0 <= self.min_lr <= max(self.lr or 0, 0), "between 0 and lr"),
            "layer_decay": (self.layer_decay is None or 0 < self.layer_decay <= 1, "in (0, 1]"),
            "accum_steps": (self.accum_steps >= 1, ">= 1"),
            "mixup": (self.mixup is None or self.mixup >= 0, ">= 0"),
            "cutmix": (self.cutmix is None or self.cutmix >= 0, ">= 0"),
            "random_erasing": (self.random_erasing is None or 0 <= self.random_erasing <= 1, "in [0, 1]"),
            "ema": (self.ema is None or 0 < self.ema < 1, "in (0, 1) or null"),
            "alpha": (0 <= self.alpha <= 1, "in [0, 1]"),
            "tau": (self.tau > 0, "> 0"),
            "distill": (self.distill == "none" or self.teacher is not None, "none without a --teacher"),
            "linear_probe": (not self.linear_probe or self.pretrained is not None, "false without --pretrained"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_epochs": (0 <= self.warmup_epochs <= self.epochs, "between 0 and epochs"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "val_fraction": (0 < self.val_fraction < 1, "in (0, 1)"),
            "train_subset": (self.train_subset is None or self.train_subset > 0, "> 0 (a fraction < 1 or a count)"),
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
            args = [a for a in typing.get_args(hint) if a is not type(None)]  # Optional[Literal[...]]
            lit = hint if typing.get_origin(hint) is Literal else next((a for a in args if typing.get_origin(a) is Literal), None)
            value = getattr(self, name)
            if lit is not None and value is not None and value not in typing.get_args(lit):
                allowed = ", ".join(typing.get_args(lit))
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of: {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
