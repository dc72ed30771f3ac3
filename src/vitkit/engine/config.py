"""The typed configuration of a run, which YAML files and flags are checked against: `FitConfig` (what every
objective shares, run by `engine.fit`) extended by `TrainConfig` (with `distill`) and `PretrainConfig` (mae, beit)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

DEFAULT_MODEL = "vit_pico_conv4_28"
# Pre-train on mnist5k in minutes on a CPU; a patch projection, not the conv stem, whose overlapping
# convolutions would let a masked patch's pixels leak into its visible neighbours.
DEFAULT_PRETRAIN_MODELS = {"mae": "vit_pico_patch4_28", "beit": "beit_pico_patch4_28"}


def _check(obj: Any, checks: dict[str, tuple[bool, str]]) -> None:
    """Raise one line for the first invalid field; then the Literal checks the CLI's parser makes."""
    for name, (ok, allowed) in checks.items():
        if not ok:
            raise ValueError(f"{name}={getattr(obj, name)!r} is invalid: must be {allowed}")
    for name, hint in typing.get_type_hints(type(obj)).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]  # Optional[Literal[...]]
        lit = hint if typing.get_origin(hint) is Literal else next((a for a in args if typing.get_origin(a) is Literal), None)
        value = getattr(obj, name)
        if lit is not None and value is not None and value not in typing.get_args(lit):
            raise ValueError(f"{name}={value!r} is not one of: {', '.join(typing.get_args(lit))}")


def _sub(value: Any, cls: type) -> Any:
    """A sub-config given as a dict (YAML, the Python API) becomes its dataclass; unknown keys raise."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"expected a {cls.__name__} or a mapping, got {value!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(value) - known)
    if bad:
        raise ValueError(f"unknown {cls.__name__} field {bad[0]!r}; valid: {', '.join(sorted(known))}")
    return cls(**value)


# -- objective configs -----------------------------------------------------------------------------
@dataclass
class DistillConfig:
    """DeiT distillation (Touvron et al. 2021): a frozen teacher's predictions as a second target."""

    teacher: str | None = None
    """A vitkit run directory, or with teacher_weights a registered model (`tv:resnet18`, `deit_...`) or
    `timm:NAME`. Must predict the data's classes."""
    teacher_weights: str | None = None
    """Weights file for a teacher given by name."""
    kind: Literal["none", "soft", "hard"] | None = None
    """Distillation loss: default hard with a teacher (DeiT's better one), none without."""
    alpha: float | None = None
    """Weight of the teacher term: default 0.5 (hard) / 0.1 (soft), as in DeiT."""
    tau: float = 3.0
    """Softmax temperature of soft distillation."""

    def resolve(self) -> DistillConfig:
        """Fill in the defaults that depend on other fields, and check (not in `__post_init__`: the CLI
        builds its defaults from an instance, which must keep them unresolved)."""
        if self.kind is None:
            self.kind = "hard" if self.teacher else "none"
        if self.alpha is None:
            self.alpha = 0.1 if self.kind == "soft" else 0.5
        if self.kind != "none" and self.teacher is None:  # named as the user knows the flag
            raise ValueError(f"distill={self.kind!r} is invalid: must be none without a --teacher")
        _check(self, {"alpha": (0 <= self.alpha <= 1, "in [0, 1]"), "tau": (self.tau > 0, "> 0")})
        return self


@dataclass
class MAEConfig:
    """Masked autoencoder (He et al. 2022): reconstruct the pixels of masked patches."""

    mask_ratio: float = 0.75
    """Share of patches masked (uniformly at random)."""
    norm_pix_loss: bool = True
    """Predict each patch's pixels normalised by the patch's own mean and std (MAE's better target)."""
    decoder_dim: int | None = None
    """Width of the light decoder (discarded after pre-training); default half the encoder's, at least 64."""
    decoder_depth: int = 2
    decoder_heads: int = 4

    def __post_init__(self) -> None:
        dim, unit = self.decoder_dim, 4 * self.decoder_heads
        _check(self, {
            "mask_ratio": (0 < self.mask_ratio < 1, "in (0, 1)"),
            "decoder_dim": (dim is None or (dim > 0 and dim % unit == 0), "a positive multiple of 4 * decoder_heads"),
            "decoder_depth": (self.decoder_depth >= 1, ">= 1"), "decoder_heads": (self.decoder_heads >= 1, ">= 1"),
        })


@dataclass
class BEiTConfig:
    """BEiT masked image modeling (Bao et al. 2022): predict the visual tokens of masked patches."""

    mask_ratio: float = 0.4
    """Share of patches masked, in blocks."""
    tokenizer: str = "kmeans"
    """'kmeans': a k-means codebook of the training images' patches (saved as RUN/tokenizer.safetensors); or
    a k-means tokenizer file, a TorchScript or torch.export .pt2 mapping [0, 1] images to ids (docs/pretraining.md)."""
    vocab_size: int = 512
    """Codebook size of a k-means tokenizer; for an external one without a vocab_size attribute, its size."""
    tokenizer_images: int = 4000
    """Training images whose patches build the k-means codebook (at most 100,000 patches are sampled)."""

    def __post_init__(self) -> None:
        _check(self, {"mask_ratio": (0 < self.mask_ratio < 1, "in (0, 1)"), "vocab_size": (self.vocab_size >= 2, ">= 2"),
                      "tokenizer_images": (self.tokenizer_images >= 1, ">= 1")})


# -- the shared fields and the two run kinds -------------------------------------------------------
@dataclass
class FitConfig:
    """The fields every objective shares: data, model, optimisation, precision and the run directory."""

    data: str = "mnist5k"
    """Built-in name (mnist5k, digits), MNIST-format or torchvision name (fashion-mnist, cifar10, ...), an image
    folder, WebDataset shards (wds:DIR_OR_PATTERN) or a Hugging Face dataset (hf:NAME_OR_PATH); docs/data.md."""
    model: str | None = None
    """A name from `vitkit models`; default: the --pretrained run's model, else the objective's default."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model's config fields, e.g. {depth: 6, drop_path_rate: 0.1}."""
    pretrained: str | None = None
    """Start from a run directory or weights file (timm, Hugging Face, JAX), position embeddings resampled to
    img_size, the classifier re-initialised for the data's classes; fine-tuning defaults: lr 5e-4, layer_decay 0.75."""
    img_size: int | None = None
    """Input side in pixels; default: the model's."""
    epochs: int = 40
    batch_size: int = 32
    time_budget: str | None = None
    """Train within this wall-clock time instead of --epochs (90s, 10m, 1.5h): the first steps are timed and the
    epochs that fit, with the final evaluation, are planned and recorded (--resume follows the same plan)."""
    lr: float | None = None
    """Peak AdamW learning rate: default 2e-3 from scratch (tuned for small models at batch 32), 5e-4 fine-tuning."""
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float | None = None
    """Linear warmup, then cosine decay; default min(2, epochs / 2), in pre-training a tenth (MAE: 40 of 400)."""
    layer_decay: float | None = None
    """Layer-wise lr decay: block i of L trains at lr * layer_decay**(L + 1 - i), the embeddings at
    layer_decay**(L + 1); default 0.75 when fine-tuning, off (1.0) from scratch."""
    clip_grad: float | None = 1.0
    """Clip the global gradient norm; null disables."""
    accum_steps: int = 1
    """Gradient accumulation: optimizer step every N batches (effective batch = batch_size * N * processes)."""
    augment: Literal["none", "light", "medium", "strong"] = "light"
    """light: translation (in memory) or random resized crop (folders), flips where labels allow; medium: +
    RandAugment, Mixup 0.2; strong (DeiT, long runs): + random erasing 0.25, Mixup 0.8 / CutMix 1.0."""
    hflip: bool | None = None
    """Horizontal flips; default: on for photos, off for digits."""
    ema: float | None = 0.998
    """Weight-EMA decay (warming up; evaluated and saved beside the raw weights, used by eval, predict); null: off."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 on GPUs and CPUs with bf16 instructions (fp32 on CPUs for CvT: its depthwise convolutions
    run slower in bf16), else fp32. fp16 autocasts with a gradient scaler, on CUDA only."""
    compile: bool = False
    """torch.compile the model (pays off on long runs; compiling a ViT takes ~30 s on a CPU)."""
    grad_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
    fsdp: bool = False
    """Under torchrun, shard the weights, gradients and optimizer state over the processes (FSDP2, one unit per
    transformer block) instead of replicating them (DDP); checkpoints hold whole weights. One process: ignored."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    val_fraction: float = 0.2
    """Held-out share for image folders without train/ and val/ subfolders."""
    num_workers: int = 2
    """DataLoader workers for image folders, shards and HF datasets (in-memory data needs none)."""
    image_key: str | None = None
    """The image entry of WebDataset shards (default: the first of png, jpg, jpeg, webp, ... a sample has) or the
    image column of a Hugging Face dataset (default: image or img)."""
    label_key: str | None = None
    """The label entry of shards (default: cls) or column of a Hugging Face dataset (default: label or labels)."""
    train_num_samples: int | None = None
    """An epoch's length, in samples, for streamed data whose size is unknown (shards without counts, a hub stream)."""
    shuffle_buffer: int = 5000
    """Samples a stream shuffles among (per DataLoader worker); folders and in-memory data are shuffled exactly."""
    steps: int | None = None
    """Stop after this many optimizer steps, the schedule laid over them, instead of at the last epoch's end."""
    strict: bool = False
    """Stop at the first damaged image instead of skipping it (skipped files are listed in the run directory)."""
    skip_nonfinite: int = 0
    """Tolerate this many steps with a NaN/inf loss (skipped, not applied) before stopping the run."""
    seed: int = 0
    out: str | None = None
    """Run directory; default runs/MODEL-DATA-TIMESTAMP."""
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint (its saved config is used)."""

    @property
    def objective_name(self) -> str:
        return "classify"

    def default_warmup(self) -> float:
        return min(2.0, self.epochs / 2)

    def __post_init__(self) -> None:
        # Fine-tuning and from-scratch training differ; resolved here so the record states what was used.
        if self.lr is None:
            self.lr = 5e-4 if self.pretrained else 2e-3
        if self.layer_decay is None:
            self.layer_decay = 0.75 if self.pretrained else 1.0
        if self.time_budget is not None:
            from .budget import parse_duration

            parse_duration(self.time_budget)  # a bad value fails now; the epochs are planned when the run starts
        elif self.warmup_epochs is None:
            self.warmup_epochs = self.default_warmup()
        elif self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs:g} is longer than the run (epochs={self.epochs}): "
                             "lower --warmup-epochs or raise --epochs")
        _check(self, {
            "epochs": (self.epochs >= 1, ">= 1"), "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"), "min_lr": (0 <= self.min_lr <= self.lr, "between 0 and lr"),
            "layer_decay": (0 < self.layer_decay <= 1, "in (0, 1]"), "accum_steps": (self.accum_steps >= 1, ">= 1"),
            "ema": (self.ema is None or 0 < self.ema < 1, "in (0, 1) or null"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_epochs": (self.warmup_epochs is None or self.warmup_epochs >= 0, ">= 0"),
            "val_fraction": (0 < self.val_fraction < 1, "in (0, 1)"), "num_workers": (self.num_workers >= 0, ">= 0"),
            "img_size": (self.img_size is None or self.img_size > 0, "> 0 or null"),
            "clip_grad": (self.clip_grad is None or self.clip_grad > 0, "> 0 or null"),
            "skip_nonfinite": (self.skip_nonfinite >= 0, ">= 0"),
            "steps": (self.steps is None or self.steps >= 1, ">= 1 or null"),
            "train_num_samples": (self.train_num_samples is None or self.train_num_samples >= 1, ">= 1 or null"),
            "shuffle_buffer": (self.shuffle_buffer >= 0, ">= 0"),
            # fp16's gradient scaler would find infs per shard, and the processes could disagree on skipping a step.
            "fsdp": (not self.fsdp or self.precision != "fp16", "false with --precision fp16 (use --precision bf16)"),
        })
        if self.steps is not None and self.time_budget is not None:
            raise ValueError("steps and time_budget both fix the run's length: pass one of them")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainConfig(FitConfig):
    """`vitkit train`: a classifier, optionally distilled from a teacher. The defaults train `vit_pico_conv4_28`
    on `mnist5k` to 98.6-99.0% test top-1 in the final evaluation (EMA weights, test-time shifts; mean 98.8%
    over nine runs; 97.7-99.1% on the plain images) in about 4 minutes on two CPU cores (docs/recipes.md)."""

    finetune: Literal["full", "lora", "linear", "knn"] = "full"
    """With --pretrained, what learns: full: every weight; lora: low-rank adapters on the --lora_targets layers
    (PEFT) and the new classifier, merged into plain weights when saved (default lr 2e-3, no layer decay);
    linear: the classifier only, on frozen features (a linear probe); knn: nothing, the validation split is
    classified by its --knn_k nearest training images (a baseline; the run has no classifier to predict with)."""
    knn_k: int = 20
    knn_temperature: float = 0.07
    """Weighted vote of k-NN: each neighbour counts exp(cosine similarity / T) (DINO's 20 and 0.07)."""
    linear_probe: bool = False
    """The same as --finetune linear."""
    lora_rank: int = 16
    lora_alpha: float = 16.0
    """Adapters add (lora_alpha / lora_rank) B A to each target weight."""
    lora_dropout: float = 0.1
    lora_targets: list[str] = field(default_factory=lambda: ["qkv"])
    """Linear layers (by name) that get adapters: qkv (attention; the default), proj, fc1, fc2."""
    label_smoothing: float = 0.1
    auto_augment: Literal["none", "randaugment", "trivialaugment", "autoaugment"] | None = None
    """Override the preset's per-image policy."""
    mixup: float | None = None
    """Override the preset's Mixup alpha (0 disables)."""
    cutmix: float | None = None
    """Override the preset's CutMix alpha (0 disables)."""
    random_erasing: float | None = None
    """Override the preset's random-erasing probability."""
    tta: bool | None = None
    """Test-time augmentation, on by default when training flips or translates: average the logits over mirrors
    and one-pixel shifts; epochs score the mirrors only, the final evaluation (eval.json) every view."""
    train_subset: float | None = None
    """Train on a stratified, seeded part of the training split: a fraction (<= 1; 1 is all) or a count (> 1) of images."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """DeiT distillation, on with a teacher; short flags: --teacher, --teacher-weights, --distill (the kind), --alpha, --tau."""

    @property
    def objective_name(self) -> str:
        return "knn" if self.finetune == "knn" else "distill" if self.distill.teacher else "classify"

    def __post_init__(self) -> None:
        self.distill = _sub(self.distill, DistillConfig).resolve()
        if self.linear_probe and self.finetune == "full":
            self.finetune = "linear"
        if self.finetune == "lora":  # adapters start at zero: a higher lr, and every block alike
            self.lr = 2e-3 if self.lr is None else self.lr
            self.layer_decay = 1.0 if self.layer_decay is None else self.layer_decay
        if self.finetune == "knn":  # nothing trains, so there is no average of weights: the record says so
            self.ema = None
        super().__post_init__()
        _check(self, {
            "mixup": (self.mixup is None or self.mixup >= 0, ">= 0"),
            "cutmix": (self.cutmix is None or self.cutmix >= 0, ">= 0"),
            "random_erasing": (self.random_erasing is None or 0 <= self.random_erasing <= 1, "in [0, 1]"),
            "linear_probe": (not self.linear_probe or self.finetune == "linear", "the same as --finetune linear"),
            "finetune": (self.finetune == "full" or self.pretrained is not None, "full without --pretrained"),
            "lora_rank": (self.lora_rank >= 1, ">= 1"), "lora_dropout": (0 <= self.lora_dropout < 1, "in [0, 1)"),
            "lora_targets": (len(self.lora_targets) > 0, "at least one layer name"),
            "knn_k": (self.knn_k >= 1, ">= 1"), "knn_temperature": (self.knn_temperature > 0, "> 0"),
            "time_budget": (self.finetune != "knn" or self.time_budget is None, "null with --finetune knn (nothing trains)"),
            # A LoRA adapter is saved by the main process alone, from weights FSDP would hold as shards; k-NN trains nothing.
            "fsdp": (not self.fsdp or self.finetune in ("full", "linear"), "false with --finetune lora or knn"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "train_subset": (self.train_subset is None or self.train_subset > 0, "> 0 (a fraction <= 1 or a count)"),
        })


@dataclass
class PretrainConfig(FitConfig):
    """`vitkit pretrain`: self-supervised, labels unused; fine-tune with `vitkit train --pretrained RUN`. The
    defaults pre-train on mnist5k's 4,000 training images in minutes on two CPU cores (`benchmarks/pretraining.py`)."""

    method: Literal["mae", "beit"] = "mae"
    """mae: masked autoencoder (pixels); beit: masked image modeling of visual tokens."""
    epochs: int = 20
    batch_size: int = 128
    clip_grad: float | None = 3.0
    """Clip the global gradient norm (3.0 as in BEiT); null disables."""
    augment: Literal["none", "light", "medium", "strong"] = "light"
    """light: translation (in memory) or random resized crop (folders), flips for photos; no Mixup/CutMix."""
    ema: float | None = None
    """Decay of a weight EMA of the encoder (saved as model_ema.safetensors); null disables."""
    val_fraction: float = 0.05
    """Share of an image folder held out to report a validation loss (built-in data sets keep their test split)."""
    mae: MAEConfig = field(default_factory=MAEConfig)
    """MAE's settings (--method mae); short flags: --mask-ratio, --norm-pix-loss, --decoder-dim/-depth/-heads."""
    beit: BEiTConfig = field(default_factory=BEiTConfig)
    """BEiT's settings (--method beit); short flags: --mask-ratio, --tokenizer, --vocab-size, --tokenizer-images."""

    @property
    def objective_name(self) -> str:
        return self.method

    def default_warmup(self) -> float:
        return self.epochs / 10

    def __post_init__(self) -> None:
        self.mae, self.beit = _sub(self.mae, MAEConfig), _sub(self.beit, BEiTConfig)
        if self.model is None and not self.pretrained:
            self.model = DEFAULT_PRETRAIN_MODELS.get(self.method)
        super().__post_init__()


def config_from_dict(settings: dict[str, Any]) -> FitConfig:
    """The typed config of a run record's `settings` (what `--resume` continues)."""
    kind = PretrainConfig if "method" in settings else TrainConfig
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"the run was written by another vitkit version (unknown settings {', '.join(unknown[:5])}); "
                         "it cannot be resumed by this one")
    return kind(**settings)
