"""WebDataset shards and Hugging Face datasets: packing, every sample once per epoch across ranks and workers,
step-based runs, and the errors a user meets first (docs/data.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

import vitkit
import vitkit.run as vrun
from vitkit.cli import main
from vitkit.data import load_data, make_loader


def _folder(root: Path, classes: int = 4, n: int = 12, size: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            arr = (np.full((size, size), 75 * c) + rng.integers(0, 20, (size, size))).astype(np.uint8)
            Image.fromarray(arr, "L").save(root / f"c{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """48 images in 4 classes, packed as 5 train shards of 8 (40 images, every shard full) and a val shard."""
    tmp = tmp_path_factory.mktemp("streams")
    root = _folder(tmp / "folder")
    assert main(["data", "pack", str(root), str(tmp / "shards"), "--shard-size", "8", "--val-fraction", "0.17"]) == 0
    return root, tmp / "shards"


def test_pack_writes_shards_with_counts_and_the_folders_split(packed):
    root, out = packed
    info = json.loads((out / "info.json").read_text())
    assert info["classes"] == ["c0", "c1", "c2", "c3"] and info["mode"] == "L" and info["image_size"] == 10
    assert [s["samples"] for s in info["splits"]["train"]] == [8, 8, 8, 8, 8]
    assert sum(s["samples"] for s in info["splits"]["val"]) == 8
    folder, shards = load_data(str(root), val_fraction=0.17), load_data(f"wds:{out}")
    assert (len(shards.train), len(shards.val)) == (len(folder.train), len(folder.val)) == (40, 8)
    assert shards.classes == folder.classes and shards.in_chans == 1 and shards.native_size == (10, 10)


class _Keys(IterableDataset):
    def __init__(self, split, rank, world_size, epoch):
        self.split, self.rank, self.world_size, self.epoch = split, rank, world_size, epoch

    def __iter__(self):
        for _, label, key in self.split.raw_samples(self.epoch, self.rank, self.world_size, 0, True):
            yield key


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_sample_once_per_epoch_across_ranks_and_workers(packed, world_size):
    _, out = packed
    split = load_data(f"wds:{out}").train
    for epoch in (0, 1):
        keys = [k for rank in range(world_size)
                for k in DataLoader(_Keys(split, rank, world_size, epoch), batch_size=None, num_workers=2)]
        assert len(keys) == len(set(keys)) == 40
    # Whole batches only, and the same number on every rank, so DDP's processes step together.
    args = dict(batch_size=4, img_size=(10, 10), mean=(0.5,), std=(0.5,), train=True, num_workers=2,
                world_size=world_size)
    lengths = []
    for rank in range(world_size):
        loader = make_loader(split, rank=rank, **args)
        batches = [y for _, y in loader]
        assert len(batches) == len(loader) and all(len(y) == 4 for y in batches)
        lengths.append(len(loader))
    assert lengths == [min(sum(split.counts[r::world_size]) for r in range(world_size)) // 4] * world_size


def test_shard_order_and_shuffle_replay_per_epoch(packed):
    _, out = packed
    split = load_data(f"wds:{out}").train
    order = lambda e: [k for _, _, k in split.raw_samples(e, 0, 1, 0, True)]  # noqa: E731
    assert order(3) == order(3) and order(3) != order(4)
    loader = make_loader(split, batch_size=8, img_size=(10, 10), mean=(0.5,), std=(0.5,), train=True, num_workers=0,
                         shuffle_buffer=16)
    loader.set_epoch(1)
    a = torch.cat([y for _, y in loader])
    assert torch.equal(a, torch.cat([y for _, y in loader]))  # a resumed epoch reads the same samples


def test_shards_folder_and_hf_dataset_train_alike(packed, tmp_path):
    datasets = pytest.importorskip("datasets")
    root, out = packed
    files = sorted(root.rglob("*.png"))
    ds = datasets.Dataset.from_dict(
        {"image": [str(f) for f in files], "label": [int(f.parent.name[1]) for f in files]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["c0", "c1", "c2", "c3"])}))
    ds.train_test_split(test_size=8, seed=0).save_to_disk(str(tmp_path / "hf"))
    hf = load_data(f"hf:{tmp_path / 'hf'}")
    assert hf.classes == ["c0", "c1", "c2", "c3"] and (len(hf.train), len(hf.val)) == (40, 8) and hf.in_chans == 1
    x, y = next(iter(make_loader(hf.train, batch_size=8, img_size=(10, 10), mean=hf.mean, std=hf.std, train=False,
                                 num_workers=0)))
    assert x.shape == (8, 1, 10, 10) and y.dtype == torch.int64
    args = dict(img_size=16, model_args={"depth": 1}, batch_size=8, warmup_epochs=0, num_workers=0, ema=None, lr=5e-3)
    runs = {name: vitkit.train(vitkit.TrainConfig(data=data, steps=22, out=str(tmp_path / name), **args))
            for name, data in [("folder", str(root)), ("wds", f"wds:{out}"), ("hf", f"hf:{tmp_path / 'hf'}")]}
    for name, run in runs.items():
        rows = vrun.read_metrics(run)
        assert len(rows) == 5 and rows[-1]["lr"] == pytest.approx(1e-5), name  # 22 steps of 5 per epoch, schedule done
        assert vrun.RunRecord.read(run).classes == ["c0", "c1", "c2", "c3"]
        assert rows[-1]["val_acc1"] >= 75, (name, rows[-1])  # four grey levels: easy once trained
        assert main(["eval", str(run)]) == 0  # the report too; a stream's has no pictures of its images
        assert json.loads((run / "eval.json").read_text())["n"] == 8


def test_streamed_parquet_needs_a_length_and_reads_its_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    root = _folder(tmp_path / "folder", classes=3, n=8)
    files = sorted(root.rglob("*.png"))
    ds = datasets.Dataset.from_dict(
        {"img": [str(f) for f in files], "y": [int(f.parent.name[1]) for f in files]},
        features=datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=["a", "b", "c"])}))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    with pytest.raises(ValueError, match="pass --image-key and --label-key; its columns are img, y"):
        load_data(f"hf:{tmp_path / 'pq'}")
    bundle = load_data(f"hf:{tmp_path / 'pq'}", image_key="img", label_key="y")
    assert bundle.classes == ["a", "b", "c"]
    args = dict(batch_size=4, img_size=(10, 10), mean=bundle.mean, std=bundle.std, train=True, num_workers=0)
    with pytest.raises(ValueError, match="--train-num-samples"):
        make_loader(bundle.train, **args)
    bundle = load_data(f"hf:{tmp_path / 'pq'}", image_key="img", label_key="y", train_num_samples=20)
    assert [len(y) for _, y in make_loader(bundle.train, **args)] == [4] * 5


def test_shards_without_info_or_missing_keys_are_clear_errors(packed, tmp_path):
    _, out = packed
    (tmp_path / "a.tar").write_bytes((out / "train-000000.tar").read_bytes())
    with pytest.raises(ValueError, match="info.json.*vitkit data pack"):
        load_data(f"wds:{tmp_path}/*.tar")
    bundle = load_data(f"wds:{out}/train-00000{{0..1}}.tar", label_key="label")  # a pattern: training shards only
    assert len(bundle.train) == 16 and len(bundle.val) == 0
    skips = vitkit.data.SkipLog()
    loader = make_loader(bundle.train, batch_size=4, img_size=(10, 10), mean=(0.5,), std=(0.5,), train=False,
                         num_workers=0, skips=skips)
    with pytest.warns(UserWarning, match="no label entry"):
        assert list(loader) == []
    assert len(skips.met) == 16


def test_torchrun_over_shards_reads_every_sample_once_per_epoch(packed, tmp_path):
    """2 processes over 4 shards of 10: each reads its 2 shards, 5 whole batches of 4 per epoch, and the epoch
    trains on all 40 images (with the partition test above: each exactly once); DDP ends without waiting."""
    root, _ = packed
    assert main(["data", "pack", str(root), str(tmp_path / "shards"), "--shard-size", "10", "--val-fraction", "0.17"]) == 0
    args = ["train", "--data", f"wds:{tmp_path / 'shards'}", "--img-size", "8", "--model-args", '{"depth": 1}',
            "--epochs", "2", "--batch-size", "4", "--warmup-epochs", "0", "--device", "cpu", "--precision", "fp32",
            "--num-workers", "2"]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "vitkit", *args, "--out", str(tmp_path / "ddp")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert vrun.RunRecord.read(tmp_path / "ddp").world_size == 2
    assert [r["train_images"] for r in vrun.read_metrics(tmp_path / "ddp")] == [40, 40]
    assert "final evaluation" in ddp.stdout


def test_steps_and_pack_arguments_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match="steps and time_budget both fix the run's length"):
        vitkit.TrainConfig(steps=5, time_budget="1m")
    with pytest.raises(ValueError, match="steps=0 is invalid"):
        vitkit.TrainConfig(steps=0)
    assert main(["data", "pack", str(tmp_path)]) == 2
    assert "name the folder to write the shards to" in capsys.readouterr().err


def test_an_interrupted_run_over_shards_resumes_exactly(packed, tmp_path, monkeypatch):
    from conftest import train_interrupted_after_first_epoch
    from safetensors.torch import load_file

    _, out = packed
    args = dict(data=f"wds:{out}", img_size=8, model_args={"depth": 1}, epochs=2, batch_size=8, warmup_epochs=0,
                num_workers=1, shuffle_buffer=16)
    train_interrupted_after_first_epoch(monkeypatch, vitkit.TrainConfig(**args, out=str(tmp_path / "cut")))
    vitkit.train(vitkit.TrainConfig(resume=str(tmp_path / "cut")))
    vitkit.train(vitkit.TrainConfig(**args, out=str(tmp_path / "whole")))
    for f in (vrun.WEIGHTS, vrun.EMA_WEIGHTS):
        a, b = load_file(tmp_path / "cut" / f), load_file(tmp_path / "whole" / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
