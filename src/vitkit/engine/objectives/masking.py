"""Which patches to hide: MAE's uniform random masking and BEiT's blockwise masking.

Both generators return a boolean mask `(B, N)` over the patch grid in row-major order (True = masked)
and draw from torch's global RNG, which the pre-training loop reseeds every epoch, so a resumed run
masks exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

import numpy as np
import torch


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
