"""PNG grids written during masked-image pre-training: rows original / masked input, then the
objective's own rows (`picture_rows`: MAE's reconstruction; BEiT's visual tokens and predictions)."""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from ...run import atomic_write
from .mae import patchify, unpatchify
from .masking import MaskedOutput

MASK_GREY = 0.5  # masked patches are drawn mid-grey


def _masked(pixels: torch.Tensor, mask: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    grid = (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1])
    p = patchify(pixels, patch)
    p = torch.where(mask.unsqueeze(-1), torch.full_like(p, MASK_GREY), p)
    return unpatchify(p, patch, grid, pixels.shape[1])


def _png(rows: list[torch.Tensor], scale: int) -> bytes:
    """Rows of images `(n, C, H, W)` in [0, 1] -> PNG bytes, upscaled (nearest) to be legible."""
    x = torch.cat(rows).float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def save_grid(objective: torch.nn.Module, imgs: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor,
              std: torch.Tensor, path: Path) -> None:
    """Run `objective` on `imgs` (normalised, `(n, C, H, W)`) with `mask` and write its grid to `path`."""
    was_training = objective.training
    objective.eval()
    try:
        out: MaskedOutput = objective.predict(imgs, mask)
        pixels = (imgs.float() * std.to(imgs) + mean.to(imgs)).clamp(0, 1)
        rows = [pixels, _masked(pixels, mask, objective.patch)] + objective.picture_rows(imgs, pixels, out)
    finally:
        objective.train(was_training)
    atomic_write(path, _png([r.cpu() for r in rows], scale=max(1, 96 // imgs.shape[-1])))
