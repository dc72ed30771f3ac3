"""Transfer learning offline: a ViT pre-trained on Fashion-MNIST (supervised, or MAE without labels),
adapted to mnist5k digits with 1%, 10% and 100% of the labels by full fine-tuning, LoRA, a linear
probe and k-NN, against the same architecture trained from scratch for the same steps.

Run from the repository root:

    python benchmarks/transfer.py                     # full run, ~25 min on 2 CPU cores (see below)
    python benchmarks/transfer.py --smoke             # 2,000 pre-training images, 1 epoch everywhere: the pipeline only
    python benchmarks/transfer.py --json transfer.json

One run, one machine, in one process (the engine's `train` and `pretrain`, what `vitkit train` and
`vitkit pretrain` run):

1. Two backbones, both `vit_pico_patch4_28` (0.30M parameters; a patch projection, as MAE needs: its
   family has `forward_visible`, and no convolutional stem leaks masked pixels into visible tokens),
   pre-trained on the 60,000 Fashion-MNIST training images (`data="fashion-mnist"`, from Debian's
   dataset-fashion-mnist; 28x28 grey, like the digits):
   a. supervised: `train` on the Fashion-MNIST labels, batch 128, lr 2e-3, `--sup-epochs` (6)
      epochs, light augmentation (translation and flips), EMA 0.998; its top-1 on the 10,000 test
      images (eval.json: EMA weights, one view: `tta=False`) is printed;
   b. MAE: `pretrain(method="mae")`, labels unused, with its defaults (75% masked, decoder 64 wide
      and 2 deep, batch 128, lr 2e-3), `--mae-epochs` (8) epochs; its last validation loss is printed.
   What `--pretrained RUN` loads is the weights the run evaluated: the supervised run's EMA, MAE's raw
   encoder (MAE keeps no EMA by default). The supervised run's
   classifier has the right size for the digits (10 classes) but names other classes, so the engine
   re-initialises it (one warning per row): every transfer row starts with a fresh, seeded head.
2. Each backbone is adapted to mnist5k (4,000 training / 1,000 test digits) with 1%, 10% and 100%
   of the training labels (`train_subset=0.01` and `0.1`, stratified and seeded by the engine:
   40 and 400 images; 100% is the whole split, 4,000), with `finetune="full"` (layer decay 0.75),
   `"lora"` (rank `--lora-rank` 4, alpha = rank, on `qkv`: 2.3% of the parameters train; the
   engine's default rank 16 would train 8% of so small a model), `"linear"` (the classifier only)
   and `"knn"` (nothing trains: the weighted 20-NN vote over the labelled images' features).
3. `scratch`: the same architecture from a random initialisation, trained on the same images.

Equal steps: within a label fraction every trained row (scratch, and full, LoRA and linear from
both backbones) uses the same images, batch size and epoch count, hence exactly the same number of
optimizer steps (the table's `steps`: epochs x images // batch, the loader drops a partial batch).
Batch 8 at 1% (5 steps per epoch over 40 images), 32 at 10% and 100% (12 and 125 steps per epoch);
`--epochs 20,25,8` (1%, 10%, 100%): 100, 300 and 1,000 steps. The step counts differ across
fractions on purpose: every epoch also evaluates the 1,000 test images twice (raw and EMA weights)
and writes the run directory, ~1.5 s that dominate the small-data rows, so equal steps at 1% would
cost ten times the 100% rows. Every trained row has the same recipe otherwise: peak lr `--lr` 3e-3
(the best of 1e-3..4e-3 for fine-tuning these pico models in docs/pretraining.md, and the value
benchmarks/pretraining.py uses for every row), warmup min(2, epochs / 2) epochs then cosine,
light augmentation, label smoothing 0.1, EMA 0.998, `--precision` (default `auto`: bf16 on CPUs
with bf16 instructions, else fp32; the runs' records say which, and the report prints it).

Per row: backbone, mode, labels (fraction and images), optimizer steps, trainable parameters
(counted on the model after the engine's own `--finetune` preparation, `Classify.adapt`, as the
run's first line prints them; k-NN: 0), top-1 on the 1,000 test images as the run's eval.json
reports it (the final evaluation: EMA weights, fp32, one view: test-time views are off, `tta=False`,
so every row, k-NN included, is scored on the same plain images), and the wall time of the `train`
call (set-up, training, per-epoch evaluations and writes, final evaluation). The report also gives
the pre-training runs' wall times, the supervised backbone's Fashion-MNIST test top-1, and the
machine (CPU, AVX-512/AVX2, bf16 instructions, threads, torch). `--json FILE` writes every row,
with each run's per-epoch times.

`--smoke` pre-trains on a stratified 2,000 of the Fashion-MNIST training images (1,000 test images)
for one epoch each and trains every row for one epoch: it checks the pipeline, its numbers mean
nothing. The part is written as IDX files to a temporary folder that both pre-trainings read as
`--data FOLDER` (`--pretrain-images N` does the same for a full run).

Time on the 2-core AMD EPYC of benchmarks/README.md (AVX-512 with bf16, so bf16), measured on
2026-12-07: 24.4 min in all (supervised pre-training 344 s, MAE 319 s, the 27 rows 13.3 min); the
table is in docs/finetuning.md. Run it on a quiet machine: the rows run one after the other, and
another busy process lengthens whichever it overlaps. Nothing is asserted: this prints a table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

import vitkit.run as vrun
from vitkit.benchmark import machine_info, machine_line
from vitkit.data import load_data, subset_split
from vitkit.engine import PretrainConfig, TrainConfig, pretrain, train
from vitkit.engine.objectives.classify import Classify
from vitkit.models import create_model

MODEL = "vit_pico_patch4_28"
FRACTIONS = (0.01, 0.1, 1.0)
BATCH = {0.01: 8, 0.1: 32, 1.0: 32}
FASHION_TRAIN = 60000
MODES = ("full", "lora", "linear", "knn")
NAMES = {"scratch": "scratch", "supervised": "supervised", "mae": "MAE"}


def _last(run: Path) -> dict:
    return vrun.read_metrics(run)[-1]


def _epoch_times(run: Path) -> list[float]:
    """Each epoch's training and evaluation time (the metrics' `time_s`; the per-epoch writes come after it)."""
    return [row["time_s"] for row in vrun.read_metrics(run)]


def _eval(run: Path) -> dict:
    return json.loads((run / vrun.EVAL).read_text())


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file (the MNIST format) of uint8 values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fashion_subset(root: Path, train_images: int, seed: int) -> Path:
    """A folder of IDX files: a stratified, seeded part of Fashion-MNIST's training split and of its test split
    (a sixth as many, at least 1,000), for a short pre-training (`--smoke`, `--pretrain-images`); `--data` takes it."""
    data = load_data("fashion-mnist")
    n_test = min(len(data.val), max(1000, train_images // 6))
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    for split, n, stem in ((data.train, train_images, "train"), (data.val, n_test, "t10k")):
        part = subset_split(split, n, seed) if n < len(split) else split
        _write_idx(folder / f"{stem}-images-idx3-ubyte", part.images[:, 0].numpy())
        _write_idx(folder / f"{stem}-labels-idx1-ubyte", part.labels.numpy())
    return folder


def trainable(cfg: TrainConfig) -> tuple[int, int]:
    """(trainable, total) parameters of the row's model after the engine's --finetune preparation."""
    model = create_model(MODEL, num_classes=10, in_chans=1, img_size=(28, 28))
    if cfg.finetune == "knn":
        return 0, sum(p.numel() for p in model.parameters())
    Classify.adapt(model, cfg)
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sup-epochs", type=int, default=6, help="supervised pre-training epochs on Fashion-MNIST")
    ap.add_argument("--mae-epochs", type=int, default=8, help="MAE pre-training epochs on Fashion-MNIST")
    ap.add_argument("--epochs", default="20,25,8", help="epochs of every trained row at 1%%, 10%%, 100%% of the labels")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every trained row")
    ap.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (alpha = rank, on qkv)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--pretrain-images", type=int, default=None,
                    help="pre-train on a stratified part of the 60,000 Fashion-MNIST training images (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--smoke", action="store_true",
                    help="2,000 pre-training images, 1 epoch everywhere: checks that the pipeline runs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.sup_epochs = args.mae_epochs = 1
        args.epochs = "1,1,1"
        args.pretrain_images = args.pretrain_images or 2000
    counts = [int(e) for e in args.epochs.split(",")]
    if len(counts) != len(FRACTIONS) or min(counts) < 1:
        ap.error("--epochs takes three positive counts: 1%,10%,100%")
    epochs = dict(zip(FRACTIONS, counts))
    info = machine_info("cpu")
    pre_rows, rows, t_start = {}, [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fashion = str(fashion_subset(Path(tmp) / "data", args.pretrain_images, args.seed)) if args.pretrain_images \
            else "fashion-mnist"
        # -- 1. pre-training on Fashion-MNIST ----------------------------------------------------
        t0 = time.perf_counter()
        sup = train(TrainConfig(model=MODEL, data=fashion, epochs=args.sup_epochs, batch_size=128,
                                lr=2e-3, tta=False, precision=args.precision, seed=args.seed,
                                out=f"{tmp}/pretrain-supervised"))
        ev = _eval(sup)
        pre_rows["supervised"] = {"epochs": args.sup_epochs, "time_s": time.perf_counter() - t0,
                                  "train_images": args.pretrain_images or FASHION_TRAIN, "test_acc1": ev["acc1"],
                                  "test_images": ev.get("n"), "precision": vrun.RunRecord.read(sup).precision,
                                  "epoch_s": _epoch_times(sup)}
        t0 = time.perf_counter()
        mae = pretrain(PretrainConfig(method="mae", model=MODEL, data=fashion, epochs=args.mae_epochs,
                                      seed=args.seed, precision=args.precision, out=f"{tmp}/pretrain-mae"))
        pre_rows["mae"] = {"epochs": args.mae_epochs, "time_s": time.perf_counter() - t0,
                           "val_loss": _last(mae).get("val_loss"), "precision": vrun.RunRecord.read(mae).precision,
                           "epoch_s": _epoch_times(mae)}
        inits = {"supervised": sup, "mae": mae}

        # -- 2. and 3. transfer to mnist5k ------------------------------------------------------------
        digits = load_data("mnist5k").train
        for frac in FRACTIONS:
            n = len(subset_split(digits, frac, args.seed))  # the engine's subset (1: the whole split)
            common = dict(data="mnist5k", train_subset=frac, epochs=epochs[frac],
                          batch_size=BATCH[frac], lr=args.lr, tta=False, precision=args.precision, seed=args.seed,
                          lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank))
            cells = [("scratch", "full")] + [(b, m) for b in ("supervised", "mae") for m in MODES]
            for backbone, mode in cells:
                name = f"{backbone}-{mode}-{frac:g}"
                if backbone == "scratch":
                    cfg = TrainConfig(model=MODEL, out=f"{tmp}/{name}", **common)
                else:
                    cfg = TrainConfig(pretrained=str(inits[backbone]), finetune=mode, out=f"{tmp}/{name}", **common)
                n_train, n_all = trainable(cfg)
                t0 = time.perf_counter()
                run = train(cfg)
                wall = time.perf_counter() - t0
                ev, rec = _eval(run), vrun.RunRecord.read(run)
                steps = 0 if mode == "knn" else epochs[frac] * (n // BATCH[frac])  # the loader drops a partial batch
                rows.append({"backbone": backbone, "mode": mode, "fraction": frac, "images": n,
                             "epochs": 0 if mode == "knn" else epochs[frac], "batch_size": BATCH[frac],
                             "steps": steps, "trainable": n_train, "params": n_all, "acc1": ev["acc1"],
                             "test_images": ev.get("n"), "time_s": wall, "epoch_s": _epoch_times(run),
                             "precision": rec.precision})
    total = time.perf_counter() - t_start

    print(f"\nTransfer: {MODEL} pre-trained on Fashion-MNIST, adapted to mnist5k; {date.today()}")
    print(machine_line(info) + f"; precision {_precisions(pre_rows, rows)}; total {total / 60:.1f} min\n")
    s, m = pre_rows["supervised"], pre_rows["mae"]
    print(f"pre-training on {s['train_images']:,} Fashion-MNIST training images:")
    print(f"  supervised: {_epochs(s['epochs'])}, {s['time_s']:.0f} s, Fashion-MNIST test top-1 {s['test_acc1']:.2f}% "
          f"({s['test_images']:,} test images, EMA weights)")
    val = "—" if m["val_loss"] is None else f"{m['val_loss']:.4f}"
    print(f"  MAE:        {_epochs(m['epochs'])}, {m['time_s']:.0f} s, last validation loss {val}\n")
    print(f"| {'backbone':<10} | {'mode':<6} | {'labels':<12} | {'steps':>5} | {'trainable':>17} | {'top-1':>6} | {'time':>6} |")
    print(f"|{'-' * 12}|{'-' * 8}|{'-' * 14}|{'-' * 7}|{'-' * 19}|{'-' * 8}|{'-' * 8}|")
    for r in rows:
        labels = f"{100 * r['fraction']:g}% ({r['images']:,})"
        params = f"{r['trainable']:,} ({100 * r['trainable'] / r['params']:.1f}%)"
        print(f"| {NAMES[r['backbone']]:<10} | {r['mode']:<6} | {labels:<12} | {r['steps']:>5} | {params:>17} | "
              f"{r['acc1']:>5.1f}% | {r['time_s']:>4.0f} s |")
    recipe = ", ".join(f"{100 * f:g}%: {_epochs(epochs[f])} of batch {BATCH[f]}" for f in FRACTIONS)
    times = ", ".join(f"{100 * f:g}% {sum(r['time_s'] for r in rows if r['fraction'] == f):.0f} s" for f in FRACTIONS)
    print(f"\ntop-1: eval.json of each run, on the {rows[0]['test_images']:,} mnist5k test images (EMA weights, one "
          f"view; k-NN: 20-NN vote over the labelled images). Trained rows: {recipe}, lr {args.lr:g}, the same steps "
          f"within a label fraction; LoRA rank {args.lora_rank} on qkv. Rows' time by fraction: {times}. "
          f"Nothing is asserted.")
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, "machine": info,
                                         "total_s": total, "pretraining": pre_rows, "results": rows}, indent=2))


def _epochs(n: int) -> str:
    return f"{n} epoch{'' if n == 1 else 's'}"


def _precisions(pre_rows: dict, rows: list[dict]) -> str:
    return ", ".join(sorted({r["precision"] for r in [*pre_rows.values(), *rows]}))


if __name__ == "__main__":
    main()
