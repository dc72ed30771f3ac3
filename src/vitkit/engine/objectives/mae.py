"""Masked autoencoder (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

The wrapper owns the masking, a light decoder and the loss; the backbone is any ViT-family
classifier (`VisionTransformer`: ViT, DeiT, hybrids), unchanged, whose encoder runs on the visible
patches only (`forward_features(x, ids_keep)`). After pre-training, `encoder_state_dict()` is the
classifier's own state dict, ready for `vitkit train --pretrained`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import torch
from torch import nn

from ..models.layers import Block, sincos_2d_pos_embed
from ..models.vit import VisionTransformer
from .masking import RandomMaskGenerator, random_mask_count

# Backbone parameters that pre-training never uses: frozen so DistributedDataParallel, which expects a
# gradient for every trainable parameter, does not stop; they are re-initialised by fine-tuning anyway.
UNUSED_BACKBONE = ("head.", "head_dist.", "fc_norm.")


class MaskedOutput(NamedTuple):
    """What an objective returns: the loss, the per-patch predictions, the mask (True = masked)
    and the per-patch targets (MAE: normalised pixels; BEiT: visual token ids)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor


def patchify(imgs: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Images `(B, C, H, W)` -> patches `(B, N, ph * pw * C)` in the encoder's row-major token order."""
    B, C, H, W = imgs.shape
    ph, pw = patch
    x = imgs.reshape(B, C, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // ph) * (W // pw), ph * pw * C)


def unpatchify(x: torch.Tensor, patch: tuple[int, int], grid: tuple[int, int], chans: int) -> torch.Tensor:
    """Patches `(B, N, ph * pw * C)` -> images `(B, C, H, W)`; the inverse of `patchify`."""
    B = x.shape[0]
    (ph, pw), (gh, gw) = patch, grid
    x = x.reshape(B, gh, gw, ph, pw, chans)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, chans, gh * ph, gw * pw)


def freeze_unused(backbone: nn.Module, prefixes: tuple[str, ...]) -> None:
    for name, p in backbone.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)


class MaskedAutoencoder(nn.Module):
    """MAE around a ViT-family backbone.

    encoder: patch embedding + position embedding, then the backbone's blocks on the visible ~25%
    of the patches (prefix tokens included). decoder: a linear map to `decoder_dim`, a learned mask
    token in every masked position, fixed 2-D sin-cos positions, `decoder_depth` blocks and a linear
    prediction of each patch's pixels. The loss is the mean squared error on masked patches only,
    against pixels normalised per patch (`norm_pix_loss`, MAE's better target, Table 1d).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 64,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise ValueError(f"MAE needs a ViT-family backbone (vit_*, deit_*, hybrids); got {type(encoder).__name__}")
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch = tuple(encoder.patch_embed.reduction)  # pixels per token side
        self.in_chans = encoder.cfg.in_chans
        self.num_prefix_tokens = encoder.num_prefix_tokens
        D = encoder.num_features
        freeze_unused(encoder, UNUSED_BACKBONE)
        # With global average pooling the backbone's per-token norm is the identity (its norm is
        # fc_norm, after pooling); the decoder then normalises the latent itself.
        self.encoder_norm = nn.LayerNorm(D, eps=1e-6) if isinstance(encoder.norm, nn.Identity) else nn.Identity()

        self.decoder_embed = nn.Linear(D, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio=4.0, norm_layer=norm_layer) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch[0] * self.patch[1] * self.in_chans)
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("decoder") and isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)  # MAE's init for its own layers
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"mask_token"}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's weights in the classifier's names (no decoder): what fine-tuning loads."""
        return self.encoder.state_dict()

    def masking(self, batch_size: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        return RandomMaskGenerator(grid, self.mask_ratio)(batch_size, device)

    def _visible_first(self, mask: torch.Tensor) -> torch.Tensor:
        """Patch indices `(B, N)`: the visible ones first, then the masked ones, each in patch order
        (MAE's `ids_shuffle`). Every row must mask as many patches as `masking` does."""
        n = random_mask_count(mask.shape[1], self.mask_ratio)
        if not mask.is_meta and bool((mask.sum(dim=1) != n).any()):
            raise ValueError(f"MAE masks {n} of {mask.shape[1]} patches in every image (mask_ratio {self.mask_ratio})")
        return mask.to(torch.uint8).argsort(dim=1, stable=True)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latent tokens `(B, prefix + K, D)` of the K visible patches (`mask` False), in patch order."""
        num_visible = mask.shape[1] - random_mask_count(mask.shape[1], self.mask_ratio)
        ids_keep = self._visible_first(mask)[:, :num_visible]
        return self.encoder_norm(self.encoder.forward_features(imgs, ids_keep=ids_keep))

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

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedOutput:
        grid = (imgs.shape[-2] // self.patch[0], imgs.shape[-1] // self.patch[1])
        if mask is None:
            mask = self.masking(imgs.shape[0], grid, imgs.device)
        pred = self.forward_decoder(self.forward_encoder(imgs, mask), mask, grid)
        target = self.targets(imgs)
        return MaskedOutput(self.forward_loss(pred, target, mask), pred, mask, target)

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, out: MaskedOutput) -> torch.Tensor:
        """Images from the predictions (per-patch normalisation undone with the true patch statistics,
        as in MAE's demo), with the visible patches pasted from the input."""
        grid = (imgs.shape[-2] // self.patch[0], imgs.shape[-1] // self.patch[1])
        pred = out.pred.float()
        if self.norm_pix_loss:
            raw = patchify(imgs.float(), self.patch)
            pred = pred * (raw.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + raw.mean(dim=-1, keepdim=True)
        pred = torch.where(out.mask.unsqueeze(-1), pred, patchify(imgs.float(), self.patch))
        return unpatchify(pred, self.patch, grid, self.in_chans)
