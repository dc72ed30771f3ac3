"""Which patches to hide (MAE's uniform random masking, BEiT's blockwise masking), and the base of
the objectives that hide them (`MaskedImageModeling`).

Both generators return a boolean mask `(B, N)` over the patch grid in row-major order (True = masked)
and draw from torch's global RNG, which the pre-training loop reseeds every epoch, so a resumed run
masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from ...run import atomic_write
from . import Context, Objective


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
    """BEiT's blockwise masking (Bao et al. 2022, Algorithm 1): rectangles of random area and aspect
    ratio are added until about `mask_ratio` of the patches are masked.

    Each block covers between `min_block` patches and what is still missing to the target, with an
    aspect ratio drawn log-uniformly from `[min_aspect, 1 / min_aspect]`; a block is kept only if it
    masks at least one new patch without overshooting the target, and after 10 failed draws the mask
    is left as is. BEiT uses 40% of a 14 x 14 grid with blocks of at least 16 patches; `min_block`
    defaults to that share of the grid (4 patches on a 7 x 7 grid) so small grids get blocks too.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        mask_ratio: float = 0.4,
        *,
        min_block: int | None = None,
        max_block: int | None = None,
        min_aspect: float = 0.3,
    ) -> None:
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.grid, self.mask_ratio = tuple(grid), mask_ratio
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = max(1, round(self.num_patches * mask_ratio))
        self.min_block = min_block if min_block is not None else max(1, round(16 * self.num_patches / 196))
        self.max_block = max_block if max_block is not None else self.num_masked
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; mask the first that adds 1..budget new patches. Returns how many it added."""
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
        return (f"BlockwiseMaskGenerator(grid={self.grid}, mask_ratio={self.mask_ratio}, "
                f"min_block={self.min_block})")


# -- what masked image modeling objectives share ---------------------------------------------------


class MaskedOutput(NamedTuple):
    """What a masked-modeling objective computes: the loss, the per-patch predictions, the mask
    (True = masked) and the per-patch targets (MAE: normalised pixels; BEiT: visual token ids)."""

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor


NUM_PICTURES = 8


class MaskedImageModeling(Objective):
    """Base of MAE and BEiT: no labels, no classifier (the backbone is built with `num_classes=0`);
    evaluated on the validation loss with the same masks every epoch; a picture per epoch.

    Subclasses set `patch`, implement `masking(batch, grid, device)` and `predict(imgs, mask) ->
    MaskedOutput`, and `picture_rows`.
    """

    labels = False
    classifier = False
    picture: ClassVar[str]
    patch: tuple[int, int]

    def masking(self, batch_size: int, grid: tuple[int, int], device: torch.device | str) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, imgs: torch.Tensor, mask: torch.Tensor | None = None) -> MaskedOutput:
        raise NotImplementedError

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        return imgs.shape[-2] // self.patch[0], imgs.shape[-1] // self.patch[1]

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.predict(x).loss, {}

    @torch.no_grad()
    def evaluate(self, loader, runtime) -> dict[str, float]:
        """The mean loss with masks drawn from a fixed seed: the same masks every epoch, so the
        numbers compare across epochs (and the training RNG is left as it was)."""
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
        from ...data import make_loader

        self.eval_seed, self.samples = ctx.cfg.seed, None
        if not ctx.runtime.is_main:
            return self
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

    def on_epoch_end(self, run_dir: Path, epoch: int) -> None:
        """RUN/<picture>.png (the latest) and RUN/pictures/<picture>_epochNNN.png."""
        from .pictures import save_grid

        path, device = Path(run_dir) / self.picture, next(self.parameters()).device
        save_grid(self, self.samples.to(device), self.sample_mask.to(device), *self.pixel_stats, path)
        atomic_write(Path(run_dir) / "pictures" / f"{path.stem}_epoch{epoch + 1:03d}.png", path.read_bytes())


def freeze_unused(backbone: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Freeze parameters pre-training never uses, so DistributedDataParallel, which expects a
    gradient for every trainable parameter, does not stop; fine-tuning re-initialises them."""
    for name, p in backbone.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
