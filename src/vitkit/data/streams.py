"""Data read in sequence rather than by index: WebDataset tar shards (`--data wds:PATH`) and Hugging Face datasets
(`--data hf:NAME_OR_PATH`); and `pack_folder`, which writes an image folder as shards (`vitkit data pack`).

Sequential reads are what large data needs on network storage (open_clip measured tar shards at 10-100x
the speed of random file reads). How the samples are shared out, so that each is read once per epoch:

- shard `i` belongs to rank `i % world_size` (fixed, so each rank's sample count is known and equal
  batch counts keep DDP in step), and a rank's shards go to its DataLoader workers in turn;
- within a rank the shard order, and a shuffle buffer per worker, are seeded by (seed, epoch, rank,
  worker): an interrupted epoch replays exactly when resumed;
- an epoch is each rank's samples in whole batches of `batch_size`: the batches of all ranks, the
  smallest rank's count, as `drop_last` does for folders.

Hugging Face datasets saved with `save_to_disk` are memory-mapped Arrow with random access: they load as a
`DatasetSplit` and train exactly as a folder does. Any other name (a hub id, a folder of Parquet files) is
streamed (`load_dataset(..., streaming=True)`), split per rank by `datasets.distributed.split_dataset_by_node`
and per worker by `datasets` itself.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..preprocess import GRAY_MODES, IMAGENET_MEAN, IMAGENET_STD, load_image
from .transforms import image_transform

INFO = "info.json"  # beside the shards: classes, image mode and size, and each split's shards with their counts
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")
DEFAULT_SHUFFLE_BUFFER = 5000


def _seeded(*parts: int) -> random.Random:
    return random.Random(int.from_bytes(np.random.SeedSequence(list(parts)).generate_state(2).tobytes(), "little"))


def decode(raw: bytes | str, mode: str, name: str, draft: int | None = None):
    """A PIL image in `mode` from a sample's bytes (or a file path); ValueError naming the sample if damaged."""
    return load_image(io.BytesIO(raw) if isinstance(raw, bytes) else raw, mode, name=name, draft=draft)


# -- the splits -------------------------------------------------------------------------------------
@dataclass
class ShardSplit:
    """WebDataset tar shards of one split, with their sample counts when known (`info.json`)."""

    shards: list[str]
    counts: list[int] | None
    mode: str
    image_key: str | None = None  # None: the first of IMAGE_KEYS the sample has
    label_key: str = "cls"
    num_samples: int | None = None  # an epoch's length when the counts are unknown (--train-num-samples)

    def __len__(self) -> int:
        return sum(self.counts) if self.counts is not None else (self.num_samples or 0)

    def rank_count(self, rank: int, world_size: int) -> int | None:
        if self.counts is not None:
            return sum(self.counts[rank::world_size])
        return None if self.num_samples is None else self.num_samples // world_size

    def raw_samples(self, epoch: int, rank: int, world_size: int, seed: int, train: bool,
                    buffer: int = 0) -> Iterator[tuple]:
        """`(image bytes, label, key)` of this rank's and worker's shards; training passes them through a shuffle
        buffer of `buffer` samples (0 or 1: none)."""
        mine = self.shards[rank::world_size]
        if train:
            mine = list(mine)
            _seeded(seed, epoch, rank).shuffle(mine)
        worker = get_worker_info()
        if worker is not None:
            mine = mine[worker.id :: worker.num_workers]
        samples = (s for shard in mine for s in _tar_samples(shard, self.image_key, self.label_key))
        if train and buffer > 1:
            samples = _shuffled(samples, buffer, _seeded(seed, epoch, rank, worker.id if worker else 0))
        yield from samples


def _tar_samples(shard: str, image_key: str | None, label_key: str) -> Iterator[tuple]:
    """Samples of one tar shard, grouped by key as WebDataset writes them (`KEY.png`, `KEY.cls`, ...)."""
    import webdataset as wds

    for sample in wds.tarfile_samples([{"url": shard}]):
        key = f"{shard}:{sample['__key__']}"
        keys = (image_key,) if image_key else IMAGE_KEYS
        raw = next((sample[k] for k in keys if k in sample), None)
        label = sample.get(label_key)
        if raw is None or label is None:
            want = image_key or "/".join(IMAGE_KEYS[:4])
            yield None, -1, (key, f"no {want if raw is None else label_key} entry (entries: {sorted(sample)[1:]})")
            continue
        yield raw, int(label), key


@dataclass
class HFStreamSplit:
    """A streamed Hugging Face dataset split (`datasets.IterableDataset`), its length known or given."""

    dataset: Any
    image_key: str
    label_key: str
    mode: str
    num_samples: int | None = None

    def __len__(self) -> int:
        return self.num_samples or 0

    def rank_count(self, rank: int, world_size: int) -> int | None:
        return None if self.num_samples is None else self.num_samples // world_size

    def raw_samples(self, epoch: int, rank: int, world_size: int, seed: int, train: bool,
                    buffer: int = 0) -> Iterator[tuple]:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(self.dataset, rank=rank, world_size=world_size) if world_size > 1 else self.dataset
        if train and buffer > 1:  # the dataset's own buffer, reseeded per epoch by `set_epoch`
            ds = ds.shuffle(seed=seed, buffer_size=buffer)
            ds.set_epoch(epoch)
        for i, row in enumerate(ds):  # datasets gives each DataLoader worker its own shards
            yield _hf_raw(row[self.image_key]), int(row[self.label_key]), f"{self.dataset.info.dataset_name}#{i}"


def is_stream(split) -> bool:
    """Whether a split is read in sequence (shards, a streamed dataset), its length maybe unknown (0)."""
    return isinstance(split, (ShardSplit, HFStreamSplit))


def _hf_raw(value) -> bytes | str:
    """The bytes (or path) of an `Image(decode=False)` value."""
    if isinstance(value, dict):
        return value.get("bytes") or value["path"]
    raise ValueError(f"expected an image column, got {type(value).__name__}")


@dataclass
class DatasetSplit:
    """A Hugging Face dataset on disk (memory-mapped Arrow): random access, so it trains as a folder does."""

    dataset: Any  # datasets.Dataset, its image column cast to Image(decode=False)
    index: np.ndarray  # rows of `dataset` in this split
    labels: np.ndarray
    image_key: str
    mode: str

    def __len__(self) -> int:
        return len(self.index)

    def name(self, i: int) -> str:
        return f"row {int(self.index[i])}"

    def read(self, i: int, draft: int | None = None):
        return decode(_hf_raw(self.dataset[int(self.index[i])][self.image_key]), self.mode, self.name(i), draft)

    def subset(self, idx) -> DatasetSplit:
        idx = np.asarray(idx, dtype=np.int64)
        return DatasetSplit(self.dataset, self.index[idx], self.labels[idx], self.image_key, self.mode)


# -- reading them -----------------------------------------------------------------------------------
def draft_size(img_size, train: bool) -> int:
    """The side JPEGs may be decoded down to (`load_image(draft=...)`): the input size for evaluation (resized
    to it anyway), twice that for training, so a random crop of a quarter of the image keeps its detail."""
    return max(img_size) * (2 if train else 1)


class _StreamDataset(IterableDataset):
    """Decoded, transformed samples of a stream split for one rank; a shuffle buffer when training."""

    def __init__(self, split, transform, *, train: bool, seed: int, rank: int, world_size: int,
                 shuffle_buffer: int, draft: int | None = None) -> None:
        self.split, self.transform, self.train, self.draft = split, transform, train, draft
        self.seed, self.rank, self.world_size, self.buffer = seed, rank, world_size, shuffle_buffer
        self.epoch = 0

    def __iter__(self):
        samples = self.split.raw_samples(self.epoch, self.rank, self.world_size, self.seed, self.train, self.buffer)
        for raw, label, key in samples:
            if raw is None:
                yield None, -1, key  # `key` holds (name, reason)
                continue
            try:
                image = decode(raw, self.split.mode, key, self.draft)
            except ValueError as e:
                yield None, -1, (key, str(e.__cause__ or e))
                continue
            yield self.transform(image), label, None


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer: each item leaves at a random place among the next `size`."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


class StreamLoader:
    """Batches of a stream split (shards, a streamed dataset) on this rank: training yields exactly `len(self)`
    whole batches, the same number on every rank; evaluation yields every sample of the rank's part."""

    def __init__(self, split: ShardSplit | HFStreamSplit, *, batch_size: int, img_size, mean, std, train: bool,
                 augment="light", hflip: bool = True, seed: int = 0, num_workers: int = 2, rank: int = 0,
                 world_size: int = 1, skips=None, pin_memory: bool = False,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> None:
        from .loader import SkipLog, _collate  # the loader module imports this one

        tf = image_transform(img_size, mean, std, train=train, augment=augment, hflip=hflip)
        self.dataset = _StreamDataset(split, tf, train=train, seed=seed, rank=rank, world_size=world_size,
                                      shuffle_buffer=shuffle_buffer, draft=draft_size(img_size, train))
        self.loader = DataLoader(self.dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
                                 pin_memory=pin_memory)
        self.split, self.batch_size, self.train, self.epoch = split, batch_size, train, 0
        self.skips = skips or SkipLog()
        counts = [split.rank_count(r, world_size) for r in range(world_size)]
        if train and None in counts:
            raise ValueError(f"the number of training samples in this stream is unknown: pass --train-num-samples N "
                             f"(an epoch's length), or write the shards with `vitkit data pack`, which counts them")
        mine = counts[rank]
        self.batches = (min(counts) // batch_size if train else -(-mine // batch_size)) if mine is not None else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches or 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.dataset.epoch = self.epoch  # the workers, started per epoch, take it with them
        xs, ys, have, made = [], [], 0, 0
        for x, y, bad in self.loader:
            for name, reason in bad:
                self.skips.add(name, reason)
            if x is None:
                continue
            if not self.train:
                yield x, y
                continue
            # Workers end on partial batches: re-cut the stream into whole ones, and stop at the planned count.
            xs.append(x)
            ys.append(y)
            have += len(y)
            while have >= self.batch_size and made < self.batches:
                X, Y = torch.cat(xs), torch.cat(ys)
                yield X[: self.batch_size], Y[: self.batch_size]
                made += 1
                xs, ys, have = [X[self.batch_size :]], [Y[self.batch_size :]], have - self.batch_size
            if made == self.batches:
                return


# -- opening them -----------------------------------------------------------------------------------
def _expand(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    return sorted({f for p in braceexpand(pattern) for f in (glob.glob(p) or ([p] if os.path.exists(p) else []))})


def open_shards(spec: str, *, image_key: str | None = None, label_key: str | None = None,
                train_num_samples: int | None = None):
    """`wds:DIR` (shards with `info.json`, as `vitkit data pack` writes) or `wds:PATTERN` (a glob or
    `{000..099}` pattern of training shards; the classes from `info.json` beside them). Returns
    `(classes, train, val, mode, native size)`; `val` is None for a pattern."""
    path = spec.removeprefix("wds:")
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    info_file = folder / INFO
    if not info_file.exists():
        raise ValueError(f"{spec}: no {info_file}, which names the classes (and counts the samples) of the shards; "
                         f"`vitkit data pack ROOT OUT` writes shards with it, or write one: "
                         '{"classes": [...], "splits": {"train": [{"file": "...tar", "samples": N}, ...]}}')
    info = json.loads(info_file.read_text())
    counts_of = {str(folder / s["file"]): s.get("samples") for split in info["splits"].values() for s in split}

    def split(files: list[str]) -> ShardSplit:
        counts = [counts_of.get(f) for f in files]
        return ShardSplit(files, None if None in counts else counts, info.get("mode", "RGB"), image_key,
                          label_key or "cls", num_samples=train_num_samples)

    if Path(path).is_dir():
        train = split([str(folder / s["file"]) for s in info["splits"]["train"]])
        val = split([str(folder / s["file"]) for s in info["splits"].get("val", [])]) if "val" in info["splits"] else None
    else:
        files = _expand(path)
        if not files:
            raise FileNotFoundError(f"{spec}: no shard matches {path}")
        train, val = split(files), None
    if val is not None:
        val.num_samples = None  # validation reads whatever the shards hold
    return info["classes"], train, val, info.get("mode", "RGB"), info.get("image_size")


def open_hf(spec: str, *, image_key: str | None = None, label_key: str | None = None, train_num_samples: int | None = None,
            seed: int = 0, val_fraction: float = 0.2):
    """`hf:PATH` of `save_to_disk` (random access) or `hf:NAME` (a hub id or a local folder the `datasets`
    library reads, streamed). Returns `(classes, train, val, mode, native size)`."""
    import datasets

    name = spec.removeprefix("hf:")
    on_disk = Path(name).is_dir() and any((Path(name) / f).exists() for f in ("dataset_dict.json", "dataset_info.json"))
    ds = datasets.load_from_disk(name) if on_disk else datasets.load_dataset(name, streaming=True)
    splits = ds if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)) else {"train": ds}
    if "train" not in splits:
        raise ValueError(f"{spec} has no train split (it has {', '.join(splits)})")
    val_name = next((s for s in ("validation", "val", "valid", "test") if s in splits), None)
    features = splits["train"].features or {}
    image_key = image_key or next((k for k in ("image", "img", "png", "jpg") if k in features), None)
    label_key = label_key or next((k for k in ("label", "labels", "fine_label", "cls") if k in features), None)
    if image_key is None or label_key is None or image_key not in features or label_key not in features:
        raise ValueError(f"{spec}: pass --image-key and --label-key; its columns are {', '.join(features)}")
    names = getattr(features[label_key], "names", None)
    if not names:
        raise ValueError(f"{spec}: the label column {label_key!r} is not a ClassLabel, so the class names are unknown")
    cast = {k: v.cast_column(image_key, datasets.Image(decode=False)) for k, v in splits.items()}
    first = next(iter(cast["train"].take(1) if not on_disk else [cast["train"][0]]))
    with _peek(first[image_key]) as im:  # greyscale or RGB, and the size, from the first image's header
        mode, side = ("L" if im.mode in GRAY_MODES else "RGB"), max(im.size)
    if on_disk:
        def part(ds_, idx=None) -> DatasetSplit:
            labels = np.asarray(ds_[label_key], dtype=np.int64)
            idx = np.arange(len(labels)) if idx is None else np.asarray(idx)
            return DatasetSplit(ds_, idx, labels[idx], image_key, mode)
        train = part(cast["train"])
        if val_name is not None:
            val = part(cast[val_name])
        else:
            from .datasets import _split_per_class

            tr, va = _split_per_class(train.labels.tolist(), val_fraction, seed)
            train, val = train.subset(tr), train.subset(va)
    else:
        def known(s: str) -> int | None:
            info = splits[s].info.splits
            return info[s].num_examples if info and s in info else None
        train = HFStreamSplit(cast["train"], image_key, label_key, mode, train_num_samples or known("train"))
        val = HFStreamSplit(cast[val_name], image_key, label_key, mode, known(val_name)) if val_name else None
    return list(names), train, val, mode, side


def _peek(value):
    from PIL import Image

    raw = _hf_raw(value)
    return Image.open(io.BytesIO(raw) if isinstance(raw, bytes) else raw)


def stream_bundle_stats(mode: str) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """Channels and normalisation of images in `mode`, as for folders: greyscale (0.5, 0.5), RGB ImageNet's."""
    return (1, (0.5,), (0.5,)) if mode == "L" else (3, IMAGENET_MEAN, IMAGENET_STD)


# -- writing shards ---------------------------------------------------------------------------------
def pack_folder(root: str | Path, out: str | Path, *, shard_size: int = 10_000, seed: int = 0,
                val_fraction: float = 0.2, progress: bool = False) -> dict:
    """Write a class folder (`ROOT/CLASS/*`, or `ROOT/train` and `ROOT/val`) as WebDataset shards
    `OUT/{train,val}-NNNNNN.tar` of `shard_size` samples, the files' bytes as they are (no re-encoding), shuffled
    with `seed` so every shard mixes the classes; the split is the one `vitkit train --data ROOT` uses. Writes
    `OUT/info.json` (classes, mode, size, each shard's count) and returns it."""
    import webdataset as wds
    from tqdm import tqdm

    from .datasets import load_data

    bundle = load_data(str(root), seed=seed, val_fraction=val_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"format": "webdataset", "written_by": "vitkit data pack", "source": str(Path(root).resolve()),
            "classes": bundle.classes, "mode": "L" if bundle.in_chans == 1 else "RGB",
            "image_size": bundle.native_size[0] if bundle.native_size else None, "splits": {}}
    total = len(bundle.train) + len(bundle.val)
    with tqdm(total=total, desc="packing", unit="img", disable=not progress) as bar:
        for name, split in (("train", bundle.train), ("val", bundle.val)):
            order = np.random.default_rng(seed).permutation(len(split))
            shards = []
            for s, start in enumerate(range(0, len(order), shard_size)):
                file = f"{name}-{s:06d}.tar"
                tmp = out / f".{file}.tmp"
                with wds.TarWriter(str(tmp)) as sink:
                    for i in order[start : start + shard_size]:
                        path = split.path(int(i))
                        ext = path.suffix.lower().lstrip(".")
                        sink.write({"__key__": f"{int(i):09d}", ext: path.read_bytes(), "cls": int(split.labels[i])})
                        bar.update()
                os.replace(tmp, out / file)  # a shard is there whole or not at all
                shards.append({"file": file, "samples": len(order[start : start + shard_size])})
            info["splits"][name] = shards
    (out / INFO).write_text(json.dumps(info, indent=1))
    return info

