"""Batches for training and evaluation.

`TensorLoader` is the fast path for data held in memory: it augments a whole uint8 batch at once
(translation, flips, erasing; Mixup/CutMix follow in the engine), so on a 2-core machine no worker
processes compete with the model for the cores. Image folders go through a `DataLoader` with
per-image transforms. Both are deterministic given `(seed, epoch)`, which makes `--resume` exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from .augment import AugmentSpec, apply_per_image, image_policy, resolve_augment
from .datasets import FolderSplit, TensorSplit
from .streams import StreamLoader, draft_size, is_stream
from .transforms import image_transform


def eval_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """The image indices of one rank's evaluation batches: every `world_size`-th image, unpadded (reduced metrics
    count each image once), in `batch_size` chunks for one process; under torchrun in as many batches on every
    rank, the count of the largest share, since a sharded model (FSDP) runs each forward on all ranks together."""
    mine = torch.arange(rank, n, world_size)
    if world_size == 1:
        return list(mine.split(batch_size))
    return list(mine.tensor_split(-(-len(range(0, n, world_size)) // batch_size)))


class TensorLoader:
    """Batches from a uint8 tensor, augmented a whole batch at a time.

    Under `torch.distributed`, every rank draws the same permutation and augmentation for the global
    batch (`batch_size * world_size`) and keeps its slice: N ranks see what one process would.
    Evaluation shards the images unpadded, so reduced metrics count every image once (`eval_batches`).
    """

    def __init__(self, split: TensorSplit, *, batch_size: int, img_size: tuple[int, int], mean: tuple[float, ...],
                 std: tuple[float, ...], train: bool, augment: AugmentSpec | str = "light", hflip: bool = False,
                 seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        images = split.images
        if tuple(images.shape[-2:]) != tuple(img_size):  # resize once, not every batch
            images = F.interpolate(images.float(), size=img_size, mode="bilinear", antialias=True, align_corners=False)
            images = images.round().clamp(0, 255).to(torch.uint8)
        self.images, self.labels = images, split.labels
        self.batch_size, self.train, self.hflip, self.seed = batch_size, train, hflip, seed
        self.spec = resolve_augment(augment) if isinstance(augment, str) else augment
        self.policy = image_policy(self.spec.policy)
        self.erasing = v2.RandomErasing(p=self.spec.random_erasing, value=0) if self.spec.random_erasing else None
        self.rank, self.world_size = rank, world_size
        self.mean, self.std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
        self.epoch = 0
        self.max_shift = max(1, img_size[0] // 8)  # ~3 px at 28, 4 px at 32 (the CIFAR pad-4 crop)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        if self.train:
            return n // (self.batch_size * self.world_size)
        return len(eval_batches(n, self.batch_size, self.rank, self.world_size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.labels)
        if not self.train:
            for idx in eval_batches(n, self.batch_size, self.rank, self.world_size):
                yield self._normalize(self.images[idx]), self.labels[idx]
            return
        order = torch.randperm(n, generator=g)
        gb = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for i in range(len(self)):
            idx = order[i * gb : (i + 1) * gb]
            x = self.images[idx]
            # Draw the global batch's random parameters on every rank, then keep this rank's slice.
            shifts = torch.randint(0, 2 * self.max_shift + 1, (2, gb), generator=g)[:, mine]
            flips = (torch.rand(gb, generator=g) < 0.5)[mine]
            x = x[mine]
            if self.policy is not None:  # per image, on uint8 pixels as the policies expect
                x = apply_per_image(self.policy, x)
            x = self._normalize(x)
            if self.spec.crop:
                x = self._translate(x, shifts)
            if self.hflip:
                x = torch.where(flips[:, None, None, None], x.flip(-1), x)
            if self.erasing is not None:
                x = apply_per_image(self.erasing, x)
            yield x, self.labels[idx[mine]]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std

    def _translate(self, x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Random translation: pad with the normalised black level, then a per-sample crop gathered in one go."""
        B, C, H, W = x.shape
        s = self.max_shift
        black = (-self.mean / self.std).view(1, C, 1, 1)
        x = F.pad(x - black, (s, s, s, s)) + black
        dy, dx = shifts
        rows = (dy[:, None] + torch.arange(H))[:, None, :, None].expand(B, C, H, W + 2 * s)
        x = x.gather(2, rows)
        cols = (dx[:, None] + torch.arange(W))[:, None, None, :].expand(B, C, H, W)
        return x.gather(3, cols)


class SkipLog:
    """Damaged files met while reading a folder, each recorded once: a warning, and a line `path<TAB>reason`
    appended to `path` (the run's skipped_files.txt), whose existing lines count as met (a resumed run lists
    nothing twice). With `strict`, the first one is an error instead."""

    def __init__(self, path: Path | None = None, *, strict: bool = False) -> None:
        self.path, self.strict = path, strict
        self.met: dict[str, str] = {}
        if path is not None and path.exists():
            self.met = dict(line.split("\t", 1) for line in path.read_text().splitlines() if "\t" in line)

    def add(self, file: str, reason: str, *, warn: bool = True) -> None:
        if self.strict:
            raise ValueError(f"damaged image (strict mode): cannot read image {file}: {reason}")
        if file in self.met:
            return
        self.met[file] = reason
        where = ""
        if self.path is not None:
            try:
                with open(self.path, "a") as f:  # one short line per write: processes appending never interleave
                    f.write(f"{file}\t{reason}\n")
                where = f" (listed in {self.path})"
            except OSError as e:
                where = f" (could not list it in {self.path}: {e})"
        if warn:
            warnings.warn(f"skipped damaged image {file}: {reason}{where}")


class _FolderDataset(Dataset):
    """Image `i` of a random-access split (a folder's `FolderSplit`, an on-disk HF `DatasetSplit`), transformed,
    with its label; a file that does not decode gives `(None, -1, (path, reason))`
    so the worker goes on and the main process records the skip (`SkipLog`)."""

    def __init__(self, split: FolderSplit, transform, draft: int | None = None) -> None:
        self.split, self.transform, self.draft = split, transform, draft

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, tuple[str, str] | None]:
        try:
            image = self.split.read(i, self.draft)
        except ValueError as e:
            return None, -1, (self.split.name(i), str(e.__cause__ or e))
        return self.transform(image), int(self.split.labels[i]), None


def _collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    """A batch of the images that decoded (one fewer per damaged file), and the damaged files."""
    good = [(x, y) for x, y, bad in items if bad is None]
    bad = [b for _, _, b in items if b is not None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


class FolderLoader:
    """A `DataLoader` over image files whose shuffling is reseeded every epoch. Under `torch.distributed`,
    training uses a `DistributedSampler`; evaluation gives each rank every `world_size`-th image (`eval_batches`).
    Damaged files are dropped from their batch and recorded in `skips`, which the engine points at the run."""

    def __init__(self, split: FolderSplit, *, batch_size, img_size, mean, std, train,
                 augment: AugmentSpec | str = "light", hflip=True, seed: int = 0, num_workers: int = 2, rank: int = 0,
                 world_size: int = 1, skips: SkipLog | None = None, pin_memory: bool = False) -> None:
        tf = image_transform(img_size, mean, std, train=train, augment=augment, hflip=hflip)
        dataset = _FolderDataset(split, tf, draft_size(img_size, train))
        self.generator = torch.Generator()
        self.seed, self.epoch, self.sampler = seed, 0, None
        self.skips = skips or SkipLog()
        if world_size > 1 and train:
            self.sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                              drop_last=True)
        if train:
            self.loader = DataLoader(dataset, batch_size=batch_size, shuffle=self.sampler is None, sampler=self.sampler,
                                     drop_last=len(split) > batch_size * world_size, num_workers=num_workers,
                                     generator=self.generator, persistent_workers=False, collate_fn=_collate,
                                     pin_memory=pin_memory)
        else:
            batches = [b.tolist() for b in eval_batches(len(dataset), batch_size, rank, world_size)]
            self.loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, generator=self.generator,
                                     persistent_workers=False, collate_fn=_collate, pin_memory=pin_memory)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.generator.manual_seed(self.seed * 100_003 + self.epoch)
        for x, y, bad in self.loader:
            for file, reason in bad:
                self.skips.add(file, reason)
            if x is not None:
                yield x, y


def make_loader(split, **kwargs) -> TensorLoader | FolderLoader | StreamLoader:
    """The fast in-memory loader for tensors, a DataLoader over files (or on-disk HF rows) read by index, a
    stream loader for shards and streamed datasets."""
    if is_stream(split):
        return StreamLoader(split, **kwargs)
    kwargs.pop("shuffle_buffer", None)
    if isinstance(split, TensorSplit):
        for k in ("num_workers", "skips", "pin_memory"):
            kwargs.pop(k, None)
        return TensorLoader(split, **kwargs)
    return FolderLoader(split, **kwargs)
