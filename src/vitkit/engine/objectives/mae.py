"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The objective owns the masking, a light decoder and the loss; the backbone, unchanged, is any model whose family
implements the contract's `forward_visible` (ViT, DeiT, hybrids), so its encoder runs on the visible patches only.
Its state dict is the classifier's own, ready for `vitkit train --pretrained`.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from ...models.layers import Block, sincos_2d_pos_embed
from . import Context
from .masking import (MaskedImageModeling, MaskedOutput, RandomMaskGenerator, freeze_unused, patchify,
                      random_mask_count, unpatchify)

UNUSED_BACKBONE = ("head.", "head_dist.", "fc_norm.")  # never used while pre-training: frozen (`freeze_unused`)


class MaskedAutoencoder(MaskedImageModeling):
    """MAE around a ViT-family backbone: its blocks encode the visible ~25% of the patches (and prefix tokens); the
    decoder maps them to `decoder_dim`, puts a learned mask token in every masked position, adds fixed 2-D sin-cos
    positions, runs `decoder_depth` blocks and predicts each patch's pixels. The loss: mean squared error on masked
    patches only, against pixels normalised per patch (`norm_pix_loss`, MAE's better target, Table 1d)."""

    name = "mae"
    title = "pre-training (MAE)"
    requires = ("forward_visible", "a ViT-family backbone that encodes only the visible patches (vit_*, deit_*, hybrids)")
    picture = "mae_reconstructions.png"

    def __init__(self, encoder: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 64, decoder_depth: int = 2,
                 decoder_heads: int = 4, norm_pix_loss: bool = True) -> None:
        self.check_backbone(encoder, type(encoder).__name__)
        super().__init__(encoder)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = tuple(encoder.patch_embed.reduction)  # pixels per token side
        self.in_chans, self.num_prefix_tokens = encoder.cfg.in_chans, encoder.num_prefix_tokens
        D = encoder.num_features
        freeze_unused(encoder, UNUSED_BACKBONE)
        # With global average pooling the backbone's per-token norm is the identity (its norm is fc_norm, after
        # pooling); the decoder then normalises the latent itself.
        self.encoder_norm = nn.LayerNorm(D, eps=1e-6) if isinstance(encoder.norm, nn.Identity) else nn.Identity()
        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, mlp_ratio=4.0, norm_layer=norm_layer)
                                            for _ in range(decoder_depth))
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch[0] * self.patch[1] * self.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("decoder") and isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # MAE's init for its own layers
                nn.init.zeros_(m.bias)

    @classmethod
    def build(cls, model: nn.Module, ctx: Context) -> MaskedAutoencoder:
        c = ctx.cfg.mae
        # Half the encoder's width (MAE: 512 for ViT-L), at least 64; a multiple of 4 per head for the sin-cos positions.
        unit = 4 * c.decoder_heads
        decoder_dim = c.decoder_dim or max(64, model.num_features // 2 // unit * unit)
        return cls(model, mask_ratio=c.mask_ratio, decoder_dim=decoder_dim, decoder_depth=c.decoder_depth,
                   decoder_heads=c.decoder_heads, norm_pix_loss=c.norm_pix_loss).prepare(ctx)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def masking(self, batch_size: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        return RandomMaskGenerator(grid, self.mask_ratio)(batch_size, device)

    def _visible_first(self, mask: torch.Tensor) -> torch.Tensor:
        """Patch indices `(B, N)`: the visible ones, then the masked ones, each in patch order (MAE's `ids_shuffle`).
        Every row must mask as many patches as `masking` does."""
        n = random_mask_count(mask.shape[1], self.mask_ratio)
        if not mask.is_meta and bool((mask.sum(dim=1) != n).any()):
            raise ValueError(f"MAE masks {n} of {mask.shape[1]} patches in every image (mask_ratio {self.mask_ratio})")
        return mask.to(torch.uint8).argsort(dim=1, stable=True)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latent tokens `(B, prefix + K, D)` of the K visible patches (`mask` False), in patch order."""
        num_visible = mask.shape[1] - random_mask_count(mask.shape[1], self.mask_ratio)
        ids_keep = self._visible_first(mask)[:, :num_visible]
        return self.encoder_norm(self.model.forward_visible(imgs, ids_keep))

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Predicted pixels `(B, N, ph * pw * C)` for every patch."""
        x = self.decoder_embed(latent)  # (B, P + K, Dd)
        P, (B, N), Dd = self.num_prefix_tokens, mask.shape, x.shape[-1]
        ids_restore = self._visible_first(mask).argsort(dim=1)  # where each patch sits in [visible, masked]
        tokens = torch.cat([x[:, P:], self.mask_token.to(x.dtype).expand(B, N - (x.shape[1] - P), -1)], dim=1)
        tokens = tokens.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # (B, N, Dd), patch order
        x = torch.cat([x[:, :P], tokens + sincos_2d_pos_embed(grid, Dd).to(x)], dim=1)
        for blk in self.decoder_blocks:
            x, _ = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, P:]

    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch pixel targets `(B, N, ph * pw * C)`, normalised per patch with `norm_pix_loss`."""
        target = patchify(imgs.float(), self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    @staticmethod
    def forward_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only (MAE sec. 3)."""
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
        m = mask.float()
        return (per_patch * m).sum() / m.sum().clamp_min(1)

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedOutput:
        grid = self.grid(imgs)
        if mask is None:
            mask = self.masking(imgs.shape[0], grid, imgs.device)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask, grid)
        target = self.targets(imgs)
        return MaskedOutput(self.forward_loss(pred, target, mask), pred, mask, target)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, out: MaskedOutput) -> torch.Tensor:
        """Images from the predictions (un-normalised with the true patch statistics, as in MAE's demo) and the
        visible patches of the input."""
        pred, raw = out.pred.float(), patchify(imgs.float(), self.patch)
        if self.norm_pix_loss:
            pred = pred * (raw.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + raw.mean(dim=-1, keepdim=True)
        return unpatchify(torch.where(out.mask.unsqueeze(-1), pred, raw), self.patch, self.grid(imgs), self.in_chans)

    def picture_rows(self, imgs: torch.Tensor, pixels: torch.Tensor, out: MaskedOutput) -> list[torch.Tensor]:
        """The reconstruction, in [0, 1] pixels."""
        mean, std = (n.to(imgs) for n in self.pixel_stats)
        return [self.reconstruct(imgs, out) * std + mean]
