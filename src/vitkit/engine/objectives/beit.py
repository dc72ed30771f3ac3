"""BEiT masked image modeling (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers").

About 40% of the patches, in blocks, are replaced by a learned [MASK] embedding at the input of a backbone whose
family implements the contract's `forward_masked`; a linear head predicts, for each masked patch, the visual token
a tokenizer (tokenizer.py) assigns to the uncorrupted patch (sec. 2.3). The backbone is unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ...data import make_loader
from . import Context
from .masking import BlockwiseMaskGenerator, MaskedImageModeling, MaskedOutput, freeze_unused
from .tokenizer import build_kmeans_tokenizer, load_tokenizer

UNUSED_BACKBONE = ("head.", "fc_norm.")  # never used while pre-training: frozen (`freeze_unused`)
TOKENIZER = "tokenizer.safetensors"


class BeitMIM(MaskedImageModeling):
    """Masked image modeling around a backbone with a [MASK] embedding; `mean`, `std`: the input's normalisation."""

    name = "beit"
    title = "pre-training (BEiT)"
    requires = ("forward_masked", "a model with a [MASK] embedding (beit_*)")
    picture = "beit_masks.png"
    build_args = {"use_mask_token": True}

    def __init__(self, encoder: nn.Module, tokenizer: nn.Module, *, mean: tuple[float, ...], std: tuple[float, ...],
                 mask_ratio: float = 0.4) -> None:
        self.check_backbone(encoder, type(encoder).__name__)
        if encoder.mask_token is None:
            raise ValueError("BEiT pre-training needs the model built with use_mask_token=True (its [MASK] embedding)")
        super().__init__(encoder)
        self.tokenizer, self.mask_ratio = tokenizer.eval(), mask_ratio
        tokenizer.requires_grad_(False)
        freeze_unused(encoder, UNUSED_BACKBONE)
        self.patch, self.vocab_size = tuple(encoder.patch_embed.reduction), tokenizer.vocab_size
        D = encoder.num_features
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.lm_head = nn.Linear(D, self.vocab_size)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._masking: dict[tuple[int, int], BlockwiseMaskGenerator] = {}

    @classmethod
    def build(cls, model: nn.Module, ctx: Context) -> BeitMIM:
        c = ctx.cfg.beit
        return cls(model, _tokenizer(c, model.patch_embed.reduction, ctx), mean=ctx.mean, std=ctx.std,
                   mask_ratio=c.mask_ratio).prepare(ctx)

    def train(self, mode: bool = True) -> "BeitMIM":
        super().train(mode)
        self.tokenizer.eval()  # always: an external tokenizer's dropout or batch norm must not change its tokens
        return self

    def backbone_state(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The backbone's weights without the [MASK] embedding (a classifier has none): what fine-tuning loads."""
        return {k: v for k, v in super().backbone_state(model).items() if k != "mask_token"}

    def masking(self, batch_size: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        gen = self._masking.setdefault(grid, BlockwiseMaskGenerator(grid, self.mask_ratio))
        return gen(batch_size, device)

    @torch.no_grad()
    def visual_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """Token ids `(B, N)` of the uncorrupted images, computed in fp32 whatever the autocast."""
        with torch.autocast(imgs.device.type, enabled=False):
            tokens = self.tokenizer((imgs.float() * self.std + self.mean).clamp(0, 1))
        N = (imgs.shape[-2] // self.patch[0]) * (imgs.shape[-1] // self.patch[1])
        if tokens.shape[1] != N:
            raise ValueError(f"the tokenizer gives {tokens.shape[1]} tokens per image, the encoder has {N} patches")
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise ValueError(f"the tokenizer returned ids outside [0, {self.vocab_size}); check --vocab-size")
        return tokens

    @staticmethod
    def forward_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the masked patches' tokens only (BEiT eq. 1)."""
        return F.cross_entropy(logits[mask].float(), tokens[mask])

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedOutput:
        if mask is None:
            mask = self.masking(imgs.shape[0], self.grid(imgs), imgs.device)
        tokens = self.visual_tokens(imgs)
        logits = self.lm_head(self.norm(self.model.forward_masked(imgs, mask)))  # (B, N, vocab)
        return MaskedOutput(self.forward_loss(logits, tokens, mask), logits, mask, tokens)

    def picture_rows(self, imgs: torch.Tensor, pixels: torch.Tensor, out: MaskedOutput) -> list[torch.Tensor]:
        """With a tokenizer that decodes (k-means): the visual tokens, and the predicted ones at masked patches."""
        if not hasattr(self.tokenizer, "decode"):
            return []
        predicted = torch.where(out.mask, out.pred.argmax(-1), out.target)
        return [self.tokenizer.decode(out.target, self.grid(imgs)), self.tokenizer.decode(predicted, self.grid(imgs))]


def _pixels(ctx: Context, count: int) -> torch.Tensor:
    """Up to `count` training images `(M, C, H, W)` in [0, 1], unaugmented."""
    args = {**ctx.loader_args, "batch_size": 256, "rank": 0, "world_size": 1}
    m, s = torch.tensor(ctx.mean).view(1, -1, 1, 1), torch.tensor(ctx.std).view(1, -1, 1, 1)
    chunks, n = [], 0
    for x, _ in make_loader(ctx.data.train, train=False, **args):
        chunks.append(x * s + m)
        n += x.shape[0]
        if n >= count:
            break
    return torch.cat(chunks)[:count]


def _tokenizer(c, patch: tuple[int, int], ctx: Context) -> nn.Module:
    """BEiT's tokenizer: a file, the run's own k-means codebook when resuming, else a new one (the same everywhere)."""
    if c.tokenizer != "kmeans":
        return load_tokenizer(c.tokenizer, c.vocab_size)
    path = Path(ctx.run_dir) / TOKENIZER
    if ctx.resuming:
        return load_tokenizer(path)
    data = ctx.data
    tokenizer = build_kmeans_tokenizer(_pixels(ctx, c.tokenizer_images), patch, tuple(data.mean), tuple(data.std),
                                       vocab_size=c.vocab_size, seed=ctx.cfg.seed)
    if ctx.runtime.is_main:
        tokenizer.save(path)
    return tokenizer
