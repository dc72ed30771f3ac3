import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import TensorLoader, load_data, make_loader


def test_mnist5k_split_is_fixed_stratified_4000_1000():
    a, b = load_data("mnist5k", seed=0), load_data("mnist5k", seed=7)
    assert len(a.train) == 4000 and len(a.val) == 1000
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert torch.bincount(a.val.labels).tolist() == [100] * 10
    assert a.in_chans == 1 and a.classes == [str(i) for i in range(10)] and not a.hflip
    assert a.mean[0] == pytest.approx(0.13, abs=0.02)


def test_digits():
    d = load_data("digits")
    assert d.native_size == (8, 8) and d.num_classes == 10 and len(d.train) + len(d.val) == 1797
    assert d.train.images.dtype == torch.uint8 and d.train.images.max() == 255


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown data set 'nope'.*mnist5k"):
        load_data("nope")


def test_torchvision_offline_error_says_what_to_do(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*a, **k):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not load torchvision data set 'cifar10'.*copy the files"):
        load_data("cifar10")


def _write_folder(root, n_per_class=6, mode="RGB", size=(20, 16)):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog", "owl"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_split_and_loader(tmp_path):
    _write_folder(tmp_path)
    d = load_data(str(tmp_path), val_fraction=1 / 3)
    assert d.classes == ["cat", "dog", "owl"] and d.in_chans == 3
    assert len(d.train) == 12 and len(d.val) == 6 and sorted(d.val.labels) == [0, 0, 1, 1, 2, 2]
    loader = make_loader(d.train, train=True, batch_size=4, img_size=(16, 16), mean=d.mean, std=d.std, num_workers=0)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_grayscale_folder_and_train_val_layout(tmp_path):
    _write_folder(tmp_path / "train", mode="L")
    _write_folder(tmp_path / "val", n_per_class=2, mode="L")
    d = load_data(str(tmp_path))
    assert d.in_chans == 1 and len(d.train) == 18 and len(d.val) == 6


def test_folder_with_one_class_fails(tmp_path):
    (tmp_path / "only").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "only" / "a.png")
    with pytest.raises(ValueError, match="at least two class folders"):
        load_data(str(tmp_path))


def test_tensor_loader_is_deterministic_per_epoch_and_augments():
    d = load_data("digits")
    kw = dict(batch_size=32, img_size=(16, 16), mean=d.mean, std=d.std, train=True, seed=3)
    a, b = TensorLoader(d.train, **kw), TensorLoader(d.train, **kw)
    xa, ya = next(iter(a))
    xb, yb = next(iter(b))
    assert xa.shape == (32, 1, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(1)
    assert not torch.equal(next(iter(b))[1], ya)
    plain = TensorLoader(d.train, **{**kw, "train": False})
    assert len(plain) == -(-len(d.train) // 32) and len(a) == len(d.train) // 32
    # Eval batches come in order and unaugmented.
    x0, y0 = next(iter(plain))
    assert torch.equal(y0, d.train.labels[:32])
