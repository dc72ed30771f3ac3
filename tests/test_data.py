import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import TensorLoader, load_data, make_loader
from vitkit.data.datasets import FolderSplit
from vitkit.data.loader import eval_batches


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



def test_evaluation_shards_run_as_many_batches_on_every_rank(tmp_path):
    """65 images over 2 ranks at batch 32 were 33 + 32 images in 2 and 1 batches: a sharded model (FSDP),
    whose forward needs every rank, would wait forever on the second. Each image still counts once."""
    shards = [eval_batches(65, 32, rank, 2) for rank in range(2)]
    assert [len(b) for b in shards] == [2, 2] and all(len(i) <= 32 for b in shards for i in b)
    assert sorted(torch.cat([i for b in shards for i in b]).tolist()) == list(range(65))
    assert [len(i) for i in eval_batches(65, 32)] == [32, 32, 1]  # one process: plain batches
    _write_folder(tmp_path)
    d = load_data(str(tmp_path), val_fraction=1 / 3)
    five = FolderSplit(d.val.files[:5], d.val.labels[:5], d.val.mode)  # 3 + 2 images at batch 2: 2 batches each
    loaders = [make_loader(five, train=False, batch_size=2, img_size=(16, 16), mean=d.mean, std=d.std, num_workers=0,
                           rank=r, world_size=2) for r in range(2)]
    assert [len(loader) for loader in loaders] == [2, 2] and sum(len(y) for lo in loaders for _, y in lo) == 5


# -- MNIST-format (IDX) data sets, offline ----------------------------------------------------------
def _write_idx(path, array, gz):
    import gzip

    codes = {np.uint8: 0x08, np.int32: 0x0C}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(array.dtype.newbyteorder(">") if array.itemsize > 1 else array.dtype).tobytes()
    (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb").write(data)


def _idx_folder(root, gz=True, n=(30, 10)):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for split, count in zip(("train", "t10k"), n):
        _write_idx(root / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (count, 28, 28), dtype=np.uint8), gz)
        _write_idx(root / f"{split}-labels-idx1-ubyte", (np.arange(count) % 10).astype(np.uint8), gz)
    return root


def test_fashion_mnist_loads_offline_from_the_debian_package():
    """`apt-get install dataset-fashion-mnist` (the README's set-up): 60,000 train / 10,000 test, named classes."""
    d = load_data("fashion-mnist")
    assert (len(d.train), len(d.val), d.num_classes, d.in_chans) == (60000, 10000, 10, 1)
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot" and d.hflip  # clothing: mirrors keep labels
    assert torch.bincount(d.val.labels).tolist() == [1000] * 10 and torch.bincount(d.train.labels).tolist() == [6000] * 10
    assert 0.28 < d.mean[0] < 0.29 and d.val.images.dtype == torch.uint8


@pytest.mark.parametrize("gz", [True, False])
def test_a_folder_of_idx_files_is_a_data_set(tmp_path, gz):
    d = load_data(str(_idx_folder(tmp_path / "mine", gz=gz)))
    assert (len(d.train), len(d.val)) == (30, 10) and d.classes == [str(i) for i in range(10)] and not d.hflip
    from vitkit.data.datasets import load_unlabeled  # pre-training reads it too (its images, not files)

    u = load_unlabeled(str(tmp_path / "mine"))
    assert torch.equal(u.train.images, d.train.images)


def test_named_idx_sets_are_looked_for_in_vitkit_data_first(tmp_path, monkeypatch):
    _idx_folder(tmp_path / "kmnist", n=(20, 10))
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path))
    d = load_data("kmnist")
    assert len(d.train) == 20 and d.classes[:2] == ["o", "ki"] and not d.hflip
    monkeypatch.setenv("VITKIT_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no kmnist files .* --data FOLDER_OF_IDX_FILES"):
        load_data("kmnist")
    import vitkit.data.idx as idx

    monkeypatch.setattr(idx, "SYSTEM_DATASETS", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")


def test_a_truncated_idx_file_is_named(tmp_path):
    from vitkit.data.idx import read_idx

    root = _idx_folder(tmp_path / "cut", gz=False)
    data = (root / "t10k-images-idx3-ubyte").read_bytes()
    (root / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte is truncated"):
        read_idx(root / "t10k-images-idx3-ubyte")
    (root / "t10k-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_data(str(root))


def test_folder_listing_is_cached_until_a_directory_changes(tmp_path, monkeypatch):
    from vitkit.data import listing

    monkeypatch.setenv("VITKIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c / "sub").mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(root / c / f"{i}.png")
    Image.new("L", (8, 8)).save(root / "a" / "sub" / "deep.png")
    (root / "a" / "notes.txt").write_text("not an image")
    files, cached = listing.list_images(root)
    assert not cached and files == ["a/0.png", "a/1.png", "a/2.png", "a/sub/deep.png", "b/0.png", "b/1.png", "b/2.png"]
    assert listing.list_images(root) == (files, True)
    Image.new("L", (8, 8)).save(root / "b" / "sub" / "new.png")  # a file added deep down: its folder changed
    files, cached = listing.list_images(root)
    assert not cached and "b/sub/new.png" in files and listing.list_images(root)[1]
    (root / "a" / "0.png").unlink()
    assert listing.list_images(root)[0] == [f for f in files if f != "a/0.png"]
    (root / "a" / "sub" / "deep.png").unlink()
    (root / "a" / "sub").rmdir()  # a directory the cache recorded is gone
    assert listing.list_images(root) == (["a/1.png", "a/2.png", "b/0.png", "b/1.png", "b/2.png", "b/sub/new.png"],
                                         False)
    bundle = load_data(str(root))  # the loader lists through the same cache
    assert bundle.classes == ["a", "b"] and len(bundle.train) + len(bundle.val) == 6


def test_jpegs_decode_at_reduced_size_for_the_input_size_pngs_whole(tmp_path):
    from vitkit.data import load_image
    from vitkit.data.streams import draft_size

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (400, 600, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert draft_size((64, 64), train=True) == 128 and draft_size((64, 64), train=False) == 64
    assert load_image(tmp_path / "a.jpg", draft=128).size == (300, 200)  # 1/2: the smallest scale with sides >= 128
    assert load_image(tmp_path / "a.jpg", draft=60).size == (150, 100)
    assert load_image(tmp_path / "a.jpg", draft=50).size == (75, 50)  # 1/8: PIL's smallest
    assert load_image(tmp_path / "a.jpg").size == load_image(tmp_path / "a.png", draft=60).size == (600, 400)
