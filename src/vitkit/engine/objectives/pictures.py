"""PNG grids written during pre-training, and the loss curve.

MAE: rows original / masked input / reconstruction (predicted masked patches, visible ones pasted).
BEiT: rows original / masked input, then, for a tokenizer that can decode its tokens (k-means),
the visual tokens of the image and the tokens the model predicts at the masked patches.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from ..engine import rundir
from .mae import MaskedAutoencoder, MaskedOutput, patchify, unpatchify

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
        out: MaskedOutput = objective(imgs, mask)
        mean, std = mean.to(imgs), std.to(imgs)
        pixels = (imgs.float() * std + mean).clamp(0, 1)
        patch = objective.patch
        rows = [pixels, _masked(pixels, mask, patch)]
        if isinstance(objective, MaskedAutoencoder):
            rows.append(objective.reconstruct(imgs, out) * std + mean)
        elif hasattr(objective.tokenizer, "decode"):
            grid = (imgs.shape[-2] // patch[0], imgs.shape[-1] // patch[1])
            predicted = torch.where(mask, out.pred.argmax(-1), out.target)
            rows += [objective.tokenizer.decode(out.target, grid), objective.tokenizer.decode(predicted, grid)]
    finally:
        objective.train(was_training)
    side = imgs.shape[-1]
    rundir.atomic_write(path, _png([r.cpu() for r in rows], scale=max(1, 96 // side)))


def plot_loss(run_dir: Path, rows: list[dict]) -> None:
    """Training and validation loss per epoch, as `curves.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] + 1 for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ep, [r["train_loss"] for r in rows], label="train")
    if all("val_loss" in r for r in rows):
        ax.plot(ep, [r["val_loss"] for r in rows], label="val")
    ax.set(xlabel="epoch", ylabel="loss", title="pre-training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    rundir.atomic_write(run_dir / rundir.CURVES, buf.getvalue())
