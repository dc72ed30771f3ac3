"""MNIST-format data sets (IDX files, gzipped or not) read offline: Fashion-MNIST, MNIST, KMNIST, EMNIST.

The files are looked for in `$VITKIT_DATA/<name>/`, torchvision's cache (`<cache>/<name>/<Class>/raw/`)
and where Debian's packages install them (`/usr/share/datasets/<name>/`: `apt-get install
dataset-fashion-mnist`); `--data PATH` takes a folder of IDX files too. The official test split is the
validation split. Debian's gzip files differ byte-wise from upstream's (same contents), so torchvision's
checksummed loader refuses them; here only the decoded arrays are checked (shape, count, label range).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

# name: (class names, torchvision's folder name, file prefix, whether flips keep labels)
IDX_SETS = {
    "fashion-mnist": (["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                       "Ankle boot"], "FashionMNIST", "", True),  # clothing: a mirrored shirt is a shirt
    "mnist": ([str(i) for i in range(10)], "MNIST", "", False),
    "kmnist": (["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"], "KMNIST", "", False),
    "emnist": (None, "EMNIST", "emnist-balanced-", False),  # the balanced split: 47 classes
}
SYSTEM_DATASETS = Path("/usr/share/datasets")
_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/ format), gzipped or not, as an array."""
    path = Path(path)
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_TYPES[raw[2]])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path} is truncated: its header says {shape}, it holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()  # writable, so torch can share it


def idx_files(folder: Path, prefix: str = "") -> dict[str, Path] | None:
    """The four files of an IDX folder (train/test images/labels), or None when one is missing."""
    stems = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
    if prefix:  # EMNIST names its files emnist-balanced-train-images-idx3-ubyte, ...
        stems = {k: prefix + v.replace("t10k", "test") for k, v in stems.items()}
    found = {k: next((f for f in (folder / s, folder / f"{s}.gz") if f.is_file()), None) for k, s in stems.items()}
    return found if all(found.values()) else None


def find_idx(name: str, cache: Path) -> dict[str, Path]:
    """The files of a named IDX data set, from the first place that has all four."""
    _, tv_name, prefix, _ = IDX_SETS[name]
    places = [Path(os.environ["VITKIT_DATA"]) / name] if "VITKIT_DATA" in os.environ else []
    places = list(dict.fromkeys([*places, cache / name / tv_name / "raw", cache / name, SYSTEM_DATASETS / name]))
    for place in places:
        files = idx_files(place, prefix)
        if files:
            return files
    package = f"apt-get install dataset-{name}" if name == "fashion-mnist" else "its IDX files"
    raise FileNotFoundError(
        f"no {name} files (train-images-idx3-ubyte[.gz] and the three others) in {', '.join(map(str, places))}: "
        f"install them with `{package}`, put them in $VITKIT_DATA/{name}/, or pass --data FOLDER_OF_IDX_FILES")


def load_idx(files: dict[str, Path], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], bool]:
    """(train images (N, 1, H, W), train labels, test images, test labels, class names, flips keep labels)."""
    classes, _, prefix, hflip = IDX_SETS.get(name, (None, "", "", False))
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{files[f'{split}_images']}: {x.shape} images do not match {y.shape} labels")
        if prefix.startswith("emnist"):  # EMNIST stores images transposed
            arrays[f"{split}_images"] = x.transpose(0, 2, 1)
    n = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    classes = classes or [str(i) for i in range(n)]
    if n > len(classes):
        raise ValueError(f"{files['train_labels']} has labels up to {n - 1}, but {name} has {len(classes)} classes")
    xtr, xte = (np.ascontiguousarray(arrays[k])[:, None] for k in ("train_images", "test_images"))
    return xtr, arrays["train_labels"].astype(np.int64), xte, arrays["test_labels"].astype(np.int64), classes, hflip
