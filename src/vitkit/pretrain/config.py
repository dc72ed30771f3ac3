"""The typed pre-training configuration; `vitkit pretrain` builds its flags from it."""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# The small variants that pre-train on mnist5k in minutes on a CPU (patch projection, not the conv
# stem: overlapping convolutions would let a masked patch's pixels leak into its visible neighbours).
DEFAULT_MODELS = {"mae": "vit_pico_patch4_28", "beit": "beit_pico_patch4_28"}
DEFAULT_MASK_RATIO = {"mae": 0.75, "beit": 0.4}


@dataclass
class PretrainConfig:
    """Everything a pre-training run needs; saved in `config.yaml` under `pretrain`.

    The defaults pre-train the pico model of the method on mnist5k's 4,000 training images (labels
    unused) in a few minutes on two CPU cores; `benchmarks/pretraining.py` measures what it gives.
    """

    method: Literal["mae", "beit"] = "mae"
    """mae: masked autoencoder (pixels); beit: masked image modeling of visual tokens."""
    data: str = "mnist5k"
    """Built-in name, torchvision name or an image folder: flat, or with subfolders (labels are ignored)."""
    model: str | None = None
    """A name from `vitkit models`: a ViT-family model for mae, a BEiT model for beit; default
    vit_pico_patch4_28 / beit_pico_patch4_28."""
    model_args: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model's config fields, e.g. {depth: 6}; fine-tuning reuses them."""
    img_size: int | None = None
    """Input side in pixels; default: the model's."""
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    """Peak learning rate (AdamW) after warmup."""
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float | None = None
    """Linear warmup before the cosine decay; default a tenth of the epochs (MAE: 40 of 400)."""
    clip_grad: float | None = 3.0
    """Clip the global gradient norm (3.0 as in BEiT); null disables."""
    mask_ratio: float | None = None
    """Share of patches masked: default 0.75 (mae, random) or 0.4 (beit, blockwise)."""
    norm_pix_loss: bool = True
    """mae: predict each patch's pixels normalised by the patch's own mean and std (MAE's better target)."""
    decoder_dim: int | None = None
    """mae: width of the light decoder (discarded after pre-training); default half the encoder's, at least 64."""
    decoder_depth: int = 2
    decoder_heads: int = 4
    tokenizer: str = "kmeans"
    """beit: 'kmeans' builds a k-means codebook over the training images' patches (saved as
    RUN/tokenizer.safetensors); or a file: a saved k-means tokenizer, a TorchScript file or a
    torch.export .pt2 mapping images in [0, 1] to token ids (docs/pretraining.md)."""
    vocab_size: int = 512
    """beit: codebook size of a k-means tokenizer; for an external one without a vocab_size attribute, its size."""
    tokenizer_images: int = 4000
    """beit: training images whose patches build the k-means codebook (at most 100,000 patches are sampled)."""
    augment: Literal["none", "light"] = "light"
    """light: random translation (in-memory data) or random resized crop (folders), flips for photos."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """As for training: auto is bf16 on GPUs and bf16 CPUs for models >= 5M parameters, else fp32."""
    device: str = "auto"
    val_fraction: float = 0.05
    """Share of an image folder held out to report a validation loss (built-in data sets keep their test split)."""
    num_workers: int = 2
    """DataLoader workers for image folders."""
    strict: bool = False
    """Stop at the first damaged image instead of skipping it."""
    seed: int = 0
    out: str | None = None
    """Run directory; default runs/pretrain-METHOD-MODEL-DATA-TIMESTAMP."""
    resume: str | None = None
    """Continue the run in this directory from its last checkpoint (its saved config is used)."""

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = DEFAULT_MODELS.get(self.method)
        if self.mask_ratio is None:
            self.mask_ratio = DEFAULT_MASK_RATIO.get(self.method)
        if self.warmup_epochs is None:
            self.warmup_epochs = self.epochs / 10
        checks = {  # field: (valid?, what is allowed)
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"),
            "min_lr": (0 <= self.min_lr <= self.lr, "between 0 and lr"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_epochs": (0 <= self.warmup_epochs <= self.epochs, "between 0 and epochs"),
            "clip_grad": (self.clip_grad is None or self.clip_grad > 0, "> 0 or null"),
            "mask_ratio": (self.mask_ratio is None or 0 < self.mask_ratio < 1, "in (0, 1)"),
            "decoder_dim": (self.decoder_dim is None or (self.decoder_dim % (4 * self.decoder_heads) == 0
                                                         and self.decoder_dim > 0), "a positive multiple of 4 * decoder_heads"),
            "decoder_depth": (self.decoder_depth >= 1, ">= 1"),
            "decoder_heads": (self.decoder_heads >= 1, ">= 1"),
            "vocab_size": (self.vocab_size >= 2, ">= 2"),
            "tokenizer_images": (self.tokenizer_images >= 1, ">= 1"),
            "val_fraction": (0 < self.val_fraction < 1, "in (0, 1)"),
            "num_workers": (self.num_workers >= 0, ">= 0"),
            "img_size": (self.img_size is None or self.img_size > 0, "> 0 or null"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")
        for name, hint in typing.get_type_hints(PretrainConfig).items():  # the CLI's Literal checks, for the API too
            if typing.get_origin(hint) is Literal and getattr(self, name) not in typing.get_args(hint):
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of: {', '.join(typing.get_args(hint))}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
