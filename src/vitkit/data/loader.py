"""Batches for training and evaluation.

`TensorLoader` is the fast path for data held in memory: it indexes a uint8 tensor and augments
the whole batch at once (random translation, flips), so on a 2-core machine no worker processes
compete with the model for the cores. Image folders go through a `DataLoader` with per-image
torchvision transforms. Both are deterministic given `(seed, epoch)`, which makes `--resume` exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .datasets import FolderSplit, TensorSplit
from .transforms import eval_transform, load_image, train_transform


class TensorLoader:
    def __init__(
        self,
        split: TensorSplit,
        *,
        batch_size: int,
        img_size: tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        augment: str = "light",
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        images = split.images
        if tuple(images.shape[-2:]) != tuple(img_size):  # resize once, not every batch
            images = F.interpolate(images.float(), size=img_size, mode="bilinear", antialias=True, align_corners=False)
            images = images.round().clamp(0, 255).to(torch.uint8)
        self.images, self.labels = images, split.labels
        self.batch_size, self.train, self.augment, self.hflip, self.seed = batch_size, train, augment, hflip, seed
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.epoch = 0
        self.max_shift = max(1, img_size[0] // 8)  # ~3 px at 28, 4 px at 32 (the CIFAR pad-4 crop)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)
            if self.train and self.augment != "none":
                x = self._augment(x, g)
            yield (x - self.mean) / self.std, self.labels[idx]

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        B, C, H, W = x.shape
        s = self.max_shift
        # Random translation: zero-pad, then a per-sample crop gathered in one go.
        x = F.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (B,), generator=g)
        dx = torch.randint(0, 2 * s + 1, (B,), generator=g)
        rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(B, C, H, W + 2 * s)
        x = x.gather(2, rows)
        cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(B, C, H, W)
        x = x.gather(3, cols)
        if self.hflip:
            flip = torch.rand(B, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


class _FolderDataset(Dataset):
    def __init__(self, split: FolderSplit, transform) -> None:
        self.split, self.transform = split, transform

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.split.files[i], self.split.mode)), self.split.labels[i]


class FolderLoader:
    """A `DataLoader` over image files whose shuffling is reseeded every epoch."""

    def __init__(self, split: FolderSplit, *, batch_size, img_size, mean, std, train, augment="light", hflip=True,
                 seed: int = 0, num_workers: int = 2) -> None:
        tf = train_transform(img_size, mean, std, augment=augment, hflip=hflip) if train else eval_transform(img_size, mean, std)
        self.generator = torch.Generator()
        self.seed, self.epoch = seed, 0
        self.loader = DataLoader(
            _FolderDataset(split, tf),
            batch_size=batch_size,
            shuffle=train,
            drop_last=train and len(split) > batch_size,
            num_workers=num_workers,
            generator=self.generator,
            persistent_workers=False,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.generator.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(self.loader)


def make_loader(split: TensorSplit | FolderSplit, **kwargs) -> TensorLoader | FolderLoader:
    """The fast in-memory loader for tensors, a DataLoader for files."""
    if isinstance(split, TensorSplit):
        kwargs.pop("num_workers", None)
        return TensorLoader(split, **kwargs)
    return FolderLoader(split, **kwargs)
