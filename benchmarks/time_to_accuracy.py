"""Time to accuracy: wall time until the mnist5k test split reaches 98% top-1, vitkit vs timm vs vit-pytorch.

Run from the repository root (the peers come with the bench extra: `pip install -e ".[bench]"`):

    python benchmarks/time_to_accuracy.py --json tta.json      # full run: up to ~40 min on 2 cores
    python benchmarks/time_to_accuracy.py --smoke              # plumbing check, 1-2 minutes

Three contestants train on the same data (mnist5k: 4,000 training and 1,000 test images, 28x28
grey, normalised with the training split's mean and std) and are evaluated on the test split after
every epoch:

1. vitkit's default recipe: `train(TrainConfig(out=...))`, exactly what `vitkit train` does with
   no options (model, augmentation, schedule, EMA, ... all as TrainConfig's defaults say). Its
   per-epoch times come from the run's metrics.jsonl (`time_s`: the epoch's training plus its
   evaluation(s)). The run always completes its own schedule, so its final accuracy is the
   recipe's; the budget is applied to the cumulative epoch times afterwards (stopping early would
   not change the times up to the target: the schedule depends on the configured epochs only).
2. timm's `vit_tiny_patch16_224` rebuilt for 28x28 grey input (patch 4, 1 channel, 10 classes).
3. vit-pytorch's `SimpleViT` (dim 128, depth 6, 4 heads, MLP 256, patch 4).

Both peers train in the plain loop a user of those libraries would write: a shuffling DataLoader
over a TensorDataset (no augmentation), batch 64, AdamW (lr 1e-3, weight decay 0.05 on every
parameter), linear warmup then cosine to 0 stepped per batch over `--epochs` epochs,
cross-entropy with label smoothing 0.1, fp32.

Time to target = the summed epoch times (training + test evaluation) up to the first evaluation
at or above the target. Set-up (data loading, model and optimizer construction) is excluded for
every contestant, and so are vitkit's per-epoch checkpoint and plot writes (they happen after its
`time_s` is taken); the wall time of vitkit's whole `train()` call is reported beside it. A
contestant stops at the target, at `--budget-s` of epoch time (checked after every step for the
peers; a stopped epoch is still evaluated, but a result after the budget does not count), or at
its last epoch, whichever comes first. Speed-up = peer time / vitkit time; when a peer misses
the target within the budget it is the lower bound budget / vitkit time (">= X"). vitkit is
judged on its raw weights; the same figures on its EMA weights (what `vitkit eval` and `predict`
use by default) are printed beside them, and so is the run's final evaluation (eval.json: EMA
weights averaged over the default test-time views, the number `vitkit eval RUN` gives).

Absolute times depend on the machine and on what else runs on it: run on a quiet machine and
compare figures from one run only.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import vitkit
from vitkit.benchmark import machine_info, machine_line
from vitkit.data import load_data
import vitkit.run as vrun
from vitkit.engine import TrainConfig, train
from vitkit.run import load_run

CONTESTANTS = ("vitkit", "timm", "simplevit")
LABELS = {
    "vitkit": "vitkit default recipe",
    "timm": "timm vit_tiny_patch16_224",
    "simplevit": "vit-pytorch SimpleViT",
}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summarize(name: str, curve: list[dict], target: float, budget: float, max_epochs: int, params: int, **extra) -> dict:
    """Time and epochs to target (within budget), best and final accuracy, from per-evaluation rows
    `{"epoch": 1-based, "cum_s": seconds of epoch time so far, "acc1": %, "partial": bool}`."""
    hit = next((r for r in curve if r["acc1"] >= target and r["cum_s"] <= budget), None)
    return {
        "name": name,
        "label": LABELS[name],
        "params": params,
        "reached": hit is not None,
        "time_to_target_s": hit["cum_s"] if hit else None,
        "epochs_to_target": hit["epoch"] if hit else None,
        "best_acc1": max((r["acc1"] for r in curve), default=None),
        "final_acc1": curve[-1]["acc1"] if curve else None,
        "epochs_run": len(curve),
        "max_epochs": max_epochs,
        "epoch_time_s": curve[-1]["cum_s"] if curve else 0.0,
        "curve": curve,
        **extra,
    }


# ----------------------------------------------------------------------------- vitkit


def run_vitkit(args, target: float, budget: float) -> dict:
    """`vitkit train` with no options (epochs overridable for smoke runs only)."""
    overrides = {}
    if args.vitkit_epochs is not None:
        default_warmup = next(f.default for f in fields(TrainConfig) if f.name == "warmup_epochs")
        overrides = {"epochs": args.vitkit_epochs, "warmup_epochs": min(default_warmup, args.vitkit_epochs)}
    with tempfile.TemporaryDirectory(prefix="vitkit-tta-") as tmp:
        cfg = TrainConfig(out=str(Path(tmp) / "run"), **overrides)
        t0 = time.perf_counter()
        run_dir = train(cfg)
        wall = time.perf_counter() - t0
        rows = vrun.read_metrics(run_dir)
        saved = vrun.RunRecord.read(run_dir)
        final_eval = json.loads((run_dir / vrun.EVAL).read_text())  # what `vitkit eval RUN` reports
        params = count_params(load_run(run_dir, weights="raw").model)
    curve, cum = [], 0.0
    for r in rows:
        cum += r["time_s"]
        curve.append({"epoch": r["epoch"] + 1, "cum_s": cum, "acc1": r["val_acc1"], "partial": False,
                      **({"acc1_ema": r["val_acc1_ema"]} if "val_acc1_ema" in r else {})})
    extra = {
        "model": saved.model,
        "precision": saved.precision,
        "train_call_wall_s": wall,  # set-up + epochs + checkpoint/plot writes
        "overrides": overrides,
        "final_eval": {k: final_eval[k] for k in ("acc1", "weights", "tta_views")},
    }
    ema = [r["val_acc1_ema"] for r in rows if "val_acc1_ema" in r]
    if ema:
        extra.update(final_acc1_ema=ema[-1], best_acc1_ema=max(ema))
    return summarize("vitkit", curve, target, budget, cfg.epochs, params, **extra)


# ----------------------------------------------------------------------------- peers


def build_peer(name: str) -> nn.Module:
    if name == "timm":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1, num_classes=10)
    from vit_pytorch import SimpleViT

    return SimpleViT(image_size=28, patch_size=4, num_classes=10, dim=128, depth=6, heads=4, mlp_dim=256, channels=1)


def peer_version(name: str) -> str:
    if name == "timm":
        import timm

        return timm.__version__
    from importlib.metadata import version

    return version("vit-pytorch")


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(-1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def run_peer(name: str, tensors, args, target: float, budget: float) -> dict:
    """The plain loop: AdamW, per-step linear warmup + cosine, label smoothing, eval every epoch."""
    (xtr, ytr), (xte, yte) = tensors
    torch.manual_seed(args.seed)
    model = build_peer(name)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch_size, shuffle=True, generator=gen)
    test_loader = DataLoader(TensorDataset(xte, yte), batch_size=args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    total = args.epochs * steps_per_epoch
    warmup = round(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    curve, cum = [], 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        partial, steps = False, 0
        for x, y in train_loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
            if cum + time.perf_counter() - t0 > budget:
                partial = True
                break
        acc1 = accuracy(model, test_loader)
        cum += time.perf_counter() - t0
        curve.append({"epoch": epoch + 1, "cum_s": cum, "acc1": acc1, "partial": partial, "steps": steps})
        print(f"[{name}] epoch {epoch + 1}/{args.epochs}{f' (stopped at the budget after {steps}/{steps_per_epoch} steps)' if partial else ''}  "
              f"test acc1 {acc1:.2f}%  {time.perf_counter() - t0:.1f}s  (cumulative {cum:.1f}s)", flush=True)
        if (acc1 >= target and cum <= budget) or cum >= budget:
            break
    return summarize(name, curve, target, budget, args.epochs, count_params(model), version=peer_version(name))


# ----------------------------------------------------------------------------- report


def speedup(ours: dict, peer: dict, budget: float) -> tuple[float | None, str]:
    """(value, text): peer time / vitkit time, a bound when one side missed the target."""
    t_ours, t_peer = ours["time_to_target_s"], peer["time_to_target_s"]
    if ours["reached"] and peer["reached"]:
        v = t_peer / t_ours
        return v, f"{v:.2f}x"
    if ours["reached"]:
        v = budget / t_ours
        return v, f">= {v:.2f}x"
    if peer["reached"]:
        v = t_peer / budget
        return v, f"<= {v:.2f}x"
    return None, "n/a (neither reached the target)"


def ema_result(ours: dict, target: float, budget: float) -> dict | None:
    """vitkit's result judged on its EMA weights instead of the raw ones (None without EMA)."""
    if "final_acc1_ema" not in ours:
        return None
    hit = next((r for r in ours["curve"] if r["acc1_ema"] >= target and r["cum_s"] <= budget), None)
    return {**ours, "reached": hit is not None, "time_to_target_s": hit["cum_s"] if hit else None}


def fmt_acc(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_table(results: dict[str, dict], target: float, budget: float) -> None:
    head = f"{'contestant':<26} {'params':>8} {'time to ' + format(target, 'g') + '%':>16} {'epochs':>7} " \
           f"{'best %':>7} {'final %':>8} {'epochs run':>10}"
    print("\n" + head)
    print("-" * len(head))
    for r in results.values():
        when = f"{r['time_to_target_s']:.1f} s" if r["reached"] else f"not in {budget:g} s"
        ep = str(r["epochs_to_target"]) if r["reached"] else "-"
        partial = "*" if r["curve"] and r["curve"][-1]["partial"] else ""
        print(f"{r['label']:<26} {r['params'] / 1e6:>7.2f}M {when:>16} {ep:>7} {fmt_acc(r['best_acc1']):>7} "
              f"{fmt_acc(r['final_acc1']):>8} {str(r['epochs_run']) + partial + '/' + str(r['max_epochs']):>10}")
    if "vitkit" in results:
        v = results["vitkit"]
        ema = ema_result(v, target, budget)
        if ema is not None:
            when = f"{ema['time_to_target_s']:.1f} s" if ema["reached"] else f"not in {budget:g} s"
            print(f"vitkit EMA weights: {target:g}% after {when}, final {v['final_acc1_ema']:.2f}%, "
                  f"best {v['best_acc1_ema']:.2f}%")
        fe = v["final_eval"]
        print(f"vitkit final evaluation (eval.json, what `vitkit eval` reports: {fe['weights']} weights, "
              f"{fe['tta_views']} test-time view{'s' if fe['tta_views'] > 1 else ''}): {fe['acc1']:.2f}%")
        print(f"vitkit: {v['model']} ({v['precision']}); whole train() call {v['train_call_wall_s']:.1f} s, of which "
              f"{v['epoch_time_s']:.1f} s epoch time (the rest: set-up, checkpoint and plot writes, the final evaluation)")
    if any(r["curve"] and r["curve"][-1]["partial"] for r in results.values()):
        print("* the last epoch was stopped at the budget (then evaluated)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=98.0, help="test top-1 (%%) to reach")
    p.add_argument("--budget-s", type=float, default=1000.0, help="wall-clock budget of epoch time per contestant")
    p.add_argument("--epochs", type=int, default=30, help="epochs of the peers' cosine schedule (and their maximum)")
    p.add_argument("--warmup-epochs", type=float, default=2.0, help="peers' linear warmup, in epochs")
    p.add_argument("--lr", type=float, default=1e-3, help="peers' AdamW peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="peers' AdamW weight decay")
    p.add_argument("--label-smoothing", type=float, default=0.1, help="peers' label smoothing")
    p.add_argument("--batch-size", type=int, default=64, help="peers' batch size")
    p.add_argument("--vitkit-epochs", type=int, default=None,
                   help="override vitkit's epochs (smoke runs only; default: TrainConfig's, i.e. the real recipe)")
    p.add_argument("--contestants", default=",".join(CONTESTANTS), help=f"comma-separated subset of {','.join(CONTESTANTS)}")
    p.add_argument("--seed", type=int, default=0, help="peers' seed (vitkit uses its recipe's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    p.add_argument("--smoke", action="store_true",
                   help="plumbing check: 1 epoch each, 25 s budget, 20%% target (figures mean nothing)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.vitkit_epochs, args.budget_s, args.target = 1, 1, 25.0, 20.0
        args.warmup_epochs = min(args.warmup_epochs, 1)
    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTESTANTS))
    if unknown:
        p.error(f"unknown contestants {unknown}; choose from {', '.join(CONTESTANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    info = machine_info("cpu")
    print(f"time to {args.target:g}% test top-1 on mnist5k, vitkit {vitkit.__version__}; budget {args.budget_s:g} s of "
          f"epoch time each; peers: {args.epochs}-epoch schedule{' [SMOKE RUN: figures mean nothing]' if args.smoke else ''}")
    print(machine_line(info), flush=True)
    start = time.perf_counter()

    # The peers' data: the same split and normalisation statistics vitkit uses.
    bundle = load_data("mnist5k")
    mean = torch.tensor(bundle.mean).view(1, -1, 1, 1)
    std = torch.tensor(bundle.std).view(1, -1, 1, 1)
    norm = lambda s: ((s.images.float() / 255 - mean) / std, s.labels)  # noqa: E731
    tensors = (norm(bundle.train), norm(bundle.val))

    results: dict[str, dict] = {}
    for name in names:
        print(f"\n== {LABELS[name]}", flush=True)
        if name == "vitkit":
            results[name] = run_vitkit(args, args.target, args.budget_s)
        else:
            results[name] = run_peer(name, tensors, args, args.target, args.budget_s)

    print_table(results, args.target, args.budget_s)
    ratios = {}
    if "vitkit" in results:
        # Judged on the raw weights; the EMA weights (what `vitkit eval` and `predict` use) beside them.
        judged = {"vitkit": results["vitkit"],
                  "vitkit_ema": ema_result(results["vitkit"], args.target, args.budget_s)}
        for key, ours in judged.items():
            if ours is None:
                continue
            for name in names:
                if name != "vitkit":
                    value, text = speedup(ours, results[name], args.budget_s)
                    ratios[f"{key}_vs_{name}"] = {"value": value, "text": text,
                                                  "bound": None if text[0].isdigit() or value is None else text[:2]}
                    print(f"speed-up {'vitkit EMA weights' if key == 'vitkit_ema' else 'vitkit'} vs {LABELS[name]}: {text}")
    total = time.perf_counter() - start
    print(f"total {total:.0f} s. Set-up time (data, model, optimizer) is excluded for all contestants; "
          f"speed-up > 1 means vitkit reached {args.target:g}% sooner. Machine-dependent figures.")
    out = {
        "target_acc1": args.target,
        "budget_s": args.budget_s,
        "smoke": args.smoke,
        "args": vars(args),
        "machine": info,
        "results": results,
        "speedup": ratios,
        "total_s": total,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
