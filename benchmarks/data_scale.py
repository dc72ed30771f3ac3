"""Data at scale: how soon `vitkit train` takes its first step on 20,000 and 200,000 files, as a folder, as
WebDataset shards and as a Hugging Face dataset, and how fast each feeds the model; timm's folder loader alongside.

Run from the repository root (it writes ~1.5 GB under --work, default /tmp/vitkit-data-scale):

    python benchmarks/data_scale.py                   # ~10 min on 2 CPU cores
    python benchmarks/data_scale.py --accuracy-steps 938   # and train on each source of the same 70,000 images
    python benchmarks/data_scale.py --smoke           # 2,000 and 6,000 files: the pipeline only

The data: Fashion-MNIST from Debian's dataset-fashion-mnist (70,000 28x28 grey images) written as PNG
files, `ROOT/train/CLASS/` and `ROOT/val/CLASS/`; the 210,000-file folder adds each image mirrored and
flipped upside down. The 20,000-file folder is 18,000 + 2,000 of them (hard links). Each folder is packed
with `vitkit data pack` (shards of 10,000) and saved as a Hugging Face dataset (`save_to_disk`, the PNG bytes
embedded).

Per source and size, in its own process:
- first step: from launching `vitkit train --data SOURCE --batch-size 128` (the default model, 2 workers) to
  its first optimizer step done, the process then ends. Folders are timed twice: `cold` without the cached
  listing (`$VITKIT_CACHE` emptied; the OS page cache is warm in both) and `cached`;
- peak RSS of the main process at that step (VmHWM), and its DataLoader workers' own memory then (USS: the
  pages not shared with the main process);
- loading alone: images/s of the training loader (augmentation included, no model) over 100 batches of 128
  after the first, with 2 workers;
- timm: `timm.data.create_dataset(root=ROOT/train)` + `create_loader(..., is_training=True)` the same way
  (time to the first batch, images/s). timm's default training transforms differ (a random resized crop and
  a flip, like vitkit's folder `light` preset); timm's loader converts to float in the main process.
`--accuracy-steps N`: the default model trained N steps (batch 64, seed 0, the default recipe otherwise) on
the 70,000 original images as a folder, as shards and as an HF dataset; top-1 on the 10,000 test images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import cpu_line as describe_machine  # noqa: E402

CHILD = r"""
import json, os, sys, time
import psutil
import vitkit.engine.runtime as rt
real = rt.Runtime.step
def step(self, *a, **k):
    real(self, *a, **k)
    t = time.time()
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would include the parent's peak.
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
    # The workers' own pages (USS): what they add beyond what they share with the main process.
    workers = sum(c.memory_full_info().uss for c in psutil.Process().children(recursive=True)) / 2**20
    print("FIRST_STEP " + json.dumps({"t": t, "peak_rss_mb": hwm, "workers_uss_mb": workers}), flush=True)
    os._exit(0)
rt.Runtime.step = step
from vitkit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_folders(work: Path, sizes: tuple[int, int]) -> dict[int, Path]:  # noqa: C901
    """The base folder (70,000 originals) and folders of `sizes` files (train/val, classes as folders)."""
    from PIL import Image

    from vitkit.data import load_data

    fm = load_data("fashion-mnist")
    base = work / "fm70k"
    splits = {"train": fm.train, "val": fm.val}
    if not (base / "done").exists():
        shutil.rmtree(base, ignore_errors=True)
        for split, data in splits.items():
            for i, (x, y) in enumerate(zip(data.images[:, 0].numpy(), data.labels.tolist())):
                img = Image.fromarray(x, "L")
                views = [("", img)]
                if max(sizes) > 70_000:  # mirrored and upside-down copies make 210,000
                    views += [("m", img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
                              ("f", img.transpose(Image.Transpose.FLIP_TOP_BOTTOM))]
                for tag, im in views:
                    name = fm.classes[y].replace("/", "-")  # "T-shirt/top" would make two nested folders
                    d = base / split / name if not tag else work / f"copies-{tag}" / split / name
                    d.mkdir(parents=True, exist_ok=True)
                    im.save(d / f"{tag}{i:05d}.png", compress_level=1)
        (base / "done").write_text("")
    out = {}
    for n in sizes:
        root = work / f"folder{n}"
        if (root / "done").exists():
            out[n] = root
            continue
        shutil.rmtree(root, ignore_errors=True)
        n_val = n // 10 if n < 70_000 else n // 7
        for split, want in (("train", n - n_val), ("val", n_val)):
            srcs = [base / split] + ([work / f"copies-{t}" / split for t in "mf"] if n > 70_000 else [])
            files = sorted(p for s in srcs for p in s.rglob("*.png"))
            pick = np.random.default_rng(0).permutation(len(files))[:want]
            for i in pick:
                f = files[i]
                dst = root / split / f.parent.name / f.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, dst)
        (root / "done").write_text("")
        out[n] = root
    out[0] = base
    return out


def pack(root: Path, work: Path) -> tuple[Path, Path]:
    """`vitkit data pack` shards and an HF `save_to_disk` dataset of a folder."""
    import datasets

    from vitkit.data.streams import pack_folder

    shards, hf = work / f"{root.name}-wds", work / f"{root.name}-hf"
    if not (shards / "info.json").exists():
        pack_folder(root, shards, shard_size=10_000)
    if not (hf / "dataset_dict.json").exists():
        classes = sorted(d.name for d in (root / "train").iterdir())
        feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
        parts = {}
        for split in ("train", "val"):
            files = sorted((root / split).rglob("*.png"))
            parts[split] = datasets.Dataset.from_dict(
                {"image": [{"bytes": f.read_bytes(), "path": None} for f in files],
                 "label": [classes.index(f.relative_to(root / split).parts[0]) for f in files]}, features=feats)
        datasets.DatasetDict(parts).save_to_disk(str(hf))
    return shards, hf


def first_step(source: str, cache: Path, *, cold: bool, extra: tuple[str, ...] = ()) -> dict:
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    out = cache.parent / "runs" / f"r{time.time_ns()}"
    args = ["train", "--data", source, "--batch-size", "128", "--epochs", "1", "--num-workers", "2", "--out", str(out),
            *extra]
    env = {**os.environ, "VITKIT_CACHE": str(cache)}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("FIRST_STEP ")), None)
    if line is None:
        raise RuntimeError(f"{source}: no first step\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(line.removeprefix("FIRST_STEP "))
    shutil.rmtree(out, ignore_errors=True)
    return {"first_step_s": r["t"] - t0, "peak_rss_mb": r["peak_rss_mb"], "workers_uss_mb": r["workers_uss_mb"]}


def loading_rate(source: str, cache: Path, batches: int) -> float:
    """Images/s of vitkit's training loader alone (in a fresh process, so the sizes do not share memory)."""
    code = f"""
import os, time
os.environ["VITKIT_CACHE"] = {str(cache)!r}
from vitkit.data import load_data, make_loader, resolve_augment
b = load_data({source!r})
loader = make_loader(b.train, batch_size=128, img_size=(28, 28), mean=b.mean, std=b.std, train=True,
                     augment=resolve_augment("light"), hflip=True, num_workers=2)
it = iter(loader); next(it); t = time.perf_counter(); n = 0
for i, (x, y) in zip(range({batches}), it):
    n += len(y)
print("RATE", n / (time.perf_counter() - t))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RATE")), None)
    if line is None:
        raise RuntimeError(proc.stderr[-3000:])
    return float(line.split()[1])


def timm_folder(root: Path, batches: int) -> dict:
    code = f"""
import time
t0 = time.time()
import timm.data
ds = timm.data.create_dataset("", root={str(root / 'train')!r}, split="train", is_training=True)
loader = timm.data.create_loader(ds, input_size=(1, 28, 28), batch_size=128, is_training=True, num_workers=2,
                                 mean=(0.5,), std=(0.5,), use_prefetcher=False)
it = iter(loader); next(it); first = time.time() - t0; t = time.perf_counter(); n = 0
for i, (x, y) in zip(range({batches}), it):
    n += len(y)
print("TIMM", first, n / (time.perf_counter() - t))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("TIMM")), None)
    if line is None:
        raise RuntimeError(proc.stderr[-3000:])
    _, first, rate = line.split()
    return {"first_batch_s": float(first), "rate": float(rate)}


def accuracy(sources: dict[str, str], steps: int, work: Path) -> dict[str, float]:
    import vitkit

    out = {}
    for name, source in sources.items():
        run = vitkit.train(vitkit.TrainConfig(data=source, steps=steps, batch_size=64, num_workers=2,
                                              out=str(work / "runs" / f"acc-{name}-{time.time_ns()}")))
        out[name] = json.loads((run / "eval.json").read_text())["acc1"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/vitkit-data-scale")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--accuracy-steps", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sizes = (2_000, 6_000) if args.smoke else (20_000, 210_000)
    print(describe_machine())
    t = time.time()
    folders = write_folders(work, sizes)
    print(f"folders written in {time.time() - t:.0f} s")
    cache = work / "cache"
    rows = []
    for n in sizes:
        root = folders[n]
        shards, hf = pack(root, work)
        cold = first_step(str(root), cache, cold=True)
        cached = first_step(str(root), cache, cold=False)
        rows.append({"source": "folder", "files": n, "cold_s": cold["first_step_s"], "cached_s": cached["first_step_s"],
                     "peak_rss_mb": cached["peak_rss_mb"], "workers_uss_mb": cached["workers_uss_mb"],
                     "load_img_s": loading_rate(str(root), cache, args.batches)})
        for name, src in (("wds", f"wds:{shards}"), ("hf", f"hf:{hf}")):
            r = first_step(src, cache, cold=False)
            rows.append({"source": name, "files": n, "cold_s": r["first_step_s"], "cached_s": None,
                         "peak_rss_mb": r["peak_rss_mb"], "workers_uss_mb": r["workers_uss_mb"],
                         "load_img_s": loading_rate(src, cache, args.batches)})
        tm = timm_folder(root, args.batches)
        rows.append({"source": "timm folder", "files": n, "cold_s": tm["first_batch_s"], "cached_s": None,
                     "peak_rss_mb": None, "workers_uss_mb": None, "load_img_s": tm["rate"]})
        for r in rows[-4:]:
            print(json.dumps(r), flush=True)
    print("\n| source | files | first step, cold (s) | first step, cached listing (s) | peak RSS main (MB) | "
          "workers' own memory, USS (MB) | loading (img/s) | vs timm |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x["load_img_s"] for x in rows if x["source"] == "timm folder" and x["files"] == r["files"])
        f = lambda v, p=1: "-" if v is None else f"{v:,.{p}f}"  # noqa: E731
        print(f"| {r['source']} | {r['files']:,} | {f(r['cold_s'])} | {f(r['cached_s'])} | {f(r['peak_rss_mb'], 0)} | "
              f"{f(r['workers_uss_mb'], 0)} | {f(r['load_img_s'], 0)} | {r['load_img_s'] / base:.2f} |")
    print("timm's row: time to its first batch (no model), from process start.")
    result = {"machine": describe_machine(), "rows": rows}
    if args.accuracy_steps:
        shards, hf = pack(folders[0], work)
        acc = accuracy({"folder": str(folders[0]), "wds": f"wds:{shards}", "hf": f"hf:{hf}"}, args.accuracy_steps, work)
        print(f"\ntop-1 on the 10,000 test images after {args.accuracy_steps} steps of 64 (seed 0): " +
              ", ".join(f"{k} {v:.2f}%" for k, v in acc.items()))
        result["accuracy"] = {"steps": args.accuracy_steps, **acc}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
