"""Which patches to hide (MAE's uniform random masking, BEiT's blockwise masking), and the base of the objectives
that hide them (`MaskedImageModeling`), with the pictures they draw every epoch.

Both generators return a boolean mask `(B, N)` over the row-major patch grid (True = masked), drawn from torch's
global RNG, which the loop reseeds every epoch: a resumed run masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from ...data import make_loader
from ...run import atomic_write
from . import Context, Objective

NUM_PICTURES = 8
MASK_GREY = 0.5  # masked patches are drawn mid-grey


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


def random_mask_count(num_patches: int, mask_ratio: float) -> int:
    """Patches `RandomMaskGenerator` masks per image: `round(N * ratio)`, leaving at least one visible."""
    return min(num_patches - 1, max(1, round(num_patches * mask_ratio)))


class RandomMaskGenerator:
    """MAE's masking (He et al. 2022, sec. 3): a uniformly random subset of `round(N * ratio)`
    patches per image, the same count in every image so the visible tokens form a dense `(B, K, D)`."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float = 0.75) -> None:
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.grid, self.mask_ratio = tuple(grid), mask_ratio
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = random_mask_count(self.num_patches, mask_ratio)

    def __call__(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        noise = torch.rand(batch_size, self.num_patches, device=device)
        rank = noise.argsort(dim=1).argsort(dim=1)  # each patch's position in a random order
        return rank < self.num_masked  # (B, N)

    def __repr__(self) -> str:
        return f"RandomMaskGenerator(grid={self.grid}, mask_ratio={self.mask_ratio})"


class BlockwiseMaskGenerator:
    """BEiT's blockwise masking (Bao et al. 2022, Algorithm 1): rectangles are added until about `mask_ratio` of
    the patches are masked, each covering `min_block` patches up to what is missing, its aspect ratio log-uniform
    in `[min_aspect, 1 / min_aspect]`, kept if it masks 1..missing new patches (10 failed draws end the mask).
    BEiT masks 40% of a 14 x 14 grid in blocks of at least 16 patches; `min_block` defaults to that share of the
    grid (4 patches on 7 x 7) so small grids get blocks too."""

    def __init__(self, grid: tuple[int, int], mask_ratio: float = 0.4, *, min_block: int | None = None,
                 max_block: int | None = None, min_aspect: float = 0.3) -> None:
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.grid, self.mask_ratio = tuple(grid), mask_ratio
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = max(1, round(self.num_patches * mask_ratio))
        self.min_block = min_block if min_block is not None else max(1, round(16 * self.num_patches / 196))
        self.max_block = max_block if max_block is not None else self.num_masked
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; mask the first that adds 1..budget new patches and return how many."""
        H, W = self.grid
        for _ in range(10):
            area = rng.uniform(self.min_block, max(self.min_block, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h <= H and 0 < w <= W):
                continue
            top, left = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= budget:
                block[...] = True
                return new
        return 0

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One mask `(H, W)`."""
        mask = np.zeros(self.grid, dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, min(self.num_masked - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        return mask

    def __call__(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,))))  # follows torch's seed
        masks = np.stack([self.sample(rng).reshape(-1) for _ in range(batch_size)])
        return torch.from_numpy(masks).to(device)  # (B, N)

    def __repr__(self) -> str:
        return f"BlockwiseMaskGenerator(grid={self.grid}, mask_ratio={self.mask_ratio}, min_block={self.min_block})"


# -- what masked image modeling objectives share ---------------------------------------------------
class MaskedOutput(NamedTuple):
    """Loss, per-patch predictions, mask (True = masked) and targets (MAE: normalised pixels; BEiT: token ids)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor


class MaskedImageModeling(Objective):
    """Base of MAE and BEiT: no labels, no classifier (`num_classes=0`); evaluated on the validation loss with
    the same masks every epoch; a picture per epoch. Subclasses set `patch` and implement `masking`, `predict`
    and `picture_rows`."""

    labels = False
    classifier = False
    picture: ClassVar[str]
    patch: tuple[int, int]

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        return imgs.shape[-2] // self.patch[0], imgs.shape[-1] // self.patch[1]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.predict(x).loss, {}

    @torch.no_grad()
    def evaluate(self, loader, runtime) -> dict[str, float]:
        """The mean loss with masks from a fixed seed, the same every epoch (the training RNG is left as it was)."""
        self.eval()
        total, seen = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.eval_seed)
            for x, _ in loader:
                (x,) = runtime.to(x)
                mask = self.masking(x.shape[0], self.grid(x), "cpu").to(runtime.device)
                with runtime.autocast():
                    total += self.predict(x, mask).loss.item() * x.shape[0]
                seen += x.shape[0]
        total, seen = runtime.sum([total, seen])
        return {"val_loss": total / seen} if seen else {}

    def prepare(self, ctx: Context) -> MaskedImageModeling:
        """Fix the validation masks' seed, and the images and masks the pictures show every epoch."""
        self.eval_seed = ctx.cfg.seed
        split = ctx.data.val if len(ctx.data.val) else ctx.data.train
        args = {**ctx.loader_args, "rank": 0, "world_size": 1}
        self.samples = next(iter(make_loader(split, train=False, **args)))[0][:NUM_PICTURES]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.cfg.seed)
            self.sample_mask = self.masking(self.samples.shape[0], self.grid(self.samples), "cpu")
        self.pixel_stats = (torch.tensor(ctx.mean).view(1, -1, 1, 1), torch.tensor(ctx.std).view(1, -1, 1, 1))
        return self

    def picture_rows(self, imgs: torch.Tensor, pixels: torch.Tensor, out: MaskedOutput) -> list[torch.Tensor]:
        return []

    @torch.no_grad()
    def on_epoch_end(self, run_dir: Path, epoch: int, runtime) -> None:
        """RUN/<picture>.png (the latest) and RUN/pictures/<picture>_epochNNN.png: rows original / masked input,
        then `picture_rows` (MAE's reconstruction; BEiT's visual tokens and predictions)."""
        device = next(self.parameters()).device
        imgs, mask = self.samples.to(device), self.sample_mask.to(device)
        mean, std = (n.to(imgs) for n in self.pixel_stats)
        was_training = self.training
        self.eval()
        try:
            out = self.predict(imgs, mask)
            pixels = (imgs.float() * std + mean).clamp(0, 1)
            rows = [pixels, _masked(pixels, mask, self.patch)] + self.picture_rows(imgs, pixels, out)
        finally:
            self.train(was_training)
        if not runtime.is_main:  # every process predicts (a sharded model runs on all together), one draws
            return
        png = _png([r.cpu() for r in rows], scale=max(1, 96 // imgs.shape[-1]))
        path = Path(run_dir) / self.picture
        atomic_write(path, png)
        atomic_write(Path(run_dir) / "pictures" / f"{path.stem}_epoch{epoch + 1:03d}.png", png)


def _masked(pixels: torch.Tensor, mask: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    p = patchify(pixels, patch)
    p = torch.where(mask.unsqueeze(-1), torch.full_like(p, MASK_GREY), p)
    return unpatchify(p, patch, (pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1]), pixels.shape[1])


def _png(rows: list[torch.Tensor], scale: int) -> bytes:
    """Rows of images `(n, C, H, W)` in [0, 1] -> PNG bytes, upscaled (nearest) to be legible."""
    x = torch.cat(rows).float().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=rows[0].shape[0], padding=2, pad_value=1.0)
    buf = io.BytesIO()
    Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().numpy()).save(buf, format="PNG")
    return buf.getvalue()


def freeze_unused(backbone: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Freeze what pre-training never uses: DDP waits for every trainable parameter's gradient (fine-tuning resets)."""
    for name, p in backbone.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
