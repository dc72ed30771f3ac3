"""BEiT masked image modeling (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers").

About 40% of the patches, in blocks, are replaced by a learned [MASK] embedding at the input of a
BEiT encoder (`Beit.forward_masked`); a linear head on the encoder's output predicts, for each
masked patch, the discrete visual token a tokenizer assigns to the uncorrupted patch (sec. 2.3).
The wrapper owns the masking, the tokenizer, the head and the loss; the backbone is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.beit import Beit
from .mae import MaskedOutput, freeze_unused
from .masking import BlockwiseMaskGenerator

UNUSED_BACKBONE = ("head.", "fc_norm.")  # frozen during pre-training (see mae.UNUSED_BACKBONE)


class BeitMIM(nn.Module):
    """Masked image modeling around a `Beit` built with `use_mask_token=True`.

    `mean`, `std`: the data normalisation of the images the loop feeds in; the tokenizer gets the
    pixels back in [0, 1].
    """

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer: nn.Module,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        mask_ratio: float = 0.4,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, Beit) or encoder.mask_token is None:
            raise ValueError(f"BEiT pre-training needs a BEiT model with a mask token (beit_*), got {type(encoder).__name__}")
        self.encoder, self.tokenizer, self.mask_ratio = encoder, tokenizer.eval(), mask_ratio
        tokenizer.requires_grad_(False)
        freeze_unused(encoder, UNUSED_BACKBONE)
        self.patch = tuple(encoder.patch_embed.reduction)
        self.vocab_size = tokenizer.vocab_size
        D = encoder.num_features
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.lm_head = nn.Linear(D, self.vocab_size)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self._masking: dict[tuple[int, int], BlockwiseMaskGenerator] = {}

    def train(self, mode: bool = True) -> "BeitMIM":
        super().train(mode)
        self.tokenizer.eval()  # always: an external tokenizer's dropout or batch norm must not change its tokens
        return self

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights in the classifier's names, without the [MASK] embedding (a
        classifier has none) and without the head: what fine-tuning loads."""
        return {k: v for k, v in self.encoder.state_dict().items() if k != "mask_token"}

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

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedOutput:
        grid = (imgs.shape[-2] // self.patch[0], imgs.shape[-1] // self.patch[1])
        if mask is None:
            mask = self.masking(imgs.shape[0], grid, imgs.device)
        tokens = self.visual_tokens(imgs)
        logits = self.lm_head(self.norm(self.encoder.forward_masked(imgs, mask)))  # (B, N, vocab)
        return MaskedOutput(self.forward_loss(logits, tokens, mask), logits, mask, tokens)
