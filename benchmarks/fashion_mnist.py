"""Fashion-MNIST within a wall-clock budget: vitkit's recipe against timm, vit-pytorch, ResNet-18 and a small CNN.

Run from the repository root (the peers come with the bench extra: `pip install -e ".[bench]"`; the data with
`apt-get install dataset-fashion-mnist`, see docs/data.md):

    python benchmarks/fashion_mnist.py --budget 15m --json fm.json   # 5 contestants x 15 min: ~80 min on 2 cores
    python benchmarks/fashion_mnist.py --budget 5m                   # the 5-minute recipe against the same peers
    python benchmarks/fashion_mnist.py --smoke                       # plumbing check, ~2 minutes

Every contestant trains on the 60,000 training images and is scored on the official 10,000 test images after
every epoch, each in a process of its own, one after the other, with the same budget:

1. vitkit: `vitkit train --config configs/fashion_mnist_<budget>.yaml` (or `--vitkit-config`), the command the
   recipe's header gives, run as a user runs it. The engine plans the epochs that fit the budget.
2. timm `vit_tiny_patch16_224` rebuilt for 28x28 grey input (patch 4, 1 channel, 10 classes; 5.4M params).
3. vit-pytorch `SimpleViT` (dim 128, depth 6, 4 heads, MLP 256, patch 4).
4. torchvision ResNet-18 with a CIFAR stem (a 3x3 stride-1 first convolution, no max-pool; 11.2M params).
5. A small CNN, what a pragmatic user trains instead: two blocks of 5x5 convolution, batch norm, ReLU and
   2x2 max-pool (32 and 64 channels), then a 128-unit hidden layer (0.44M params).

The peers train in a plain loop: AdamW (lr 1e-3, weight decay 0.05), linear warmup (one epoch, at most a tenth of
the run) then cosine to zero stepped per batch, cross-entropy with label smoothing 0.1, batch 128, the standard
Fashion-MNIST augmentation (random translation up to 3 px and horizontal flips, the batch pipeline vitkit uses),
at the faster of fp32 and bf16 autocast on this CPU (timed over 12 steps each; bf16 only where the CPU has bf16
instructions). So that a fixed-epoch schedule does not cut them off at a high learning rate, each peer's schedule
is laid over the epochs that fit its budget, from its own timed steps, as vitkit's `--time-budget` does.

Time to 90/92/93/94% = the summed epoch times (training and test evaluation) up to the first epoch whose test
top-1 reaches it (for vitkit the raw or the EMA weights, whichever is higher: it evaluates both). Set-up (imports,
data loading, the planning probe) is outside it for everyone; vitkit's whole command's wall time is printed
beside it. Ratios are peer time / vitkit time (">=" where the peer missed the target within its budget).

Absolute times depend on the machine and on what else runs on it: run it on a quiet machine, and compare figures
from one run only. Each line of the output says which machine it ran on.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import TARGETS, run_curve, time_to_targets
from vitkit.engine.budget import parse_duration

PEERS = ("timm", "simplevit", "resnet18", "cnn")
CONTESTANTS = ("vitkit", *PEERS)
LABELS = {
    "vitkit": "vitkit recipe",
    "timm": "timm vit_tiny_patch16_224",
    "simplevit": "vit-pytorch SimpleViT",
    "resnet18": "ResNet-18 (CIFAR stem)",
    "cnn": "small CNN (2 conv blocks)",
}
ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- peers


class SmallCNN(nn.Module):
    """Two conv blocks (5x5 conv, batch norm, ReLU, 2x2 max-pool), then 128 hidden units: the published
    Fashion-MNIST "2 Conv" baseline with batch norm."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 5, padding=2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, 32), block(32, 64))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_peer(name: str) -> nn.Module:
    if name == "timm":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=4, in_chans=1, num_classes=10)
    if name == "simplevit":
        from vit_pytorch import SimpleViT

        return SimpleViT(image_size=28, patch_size=4, num_classes=10, dim=128, depth=6, heads=4, mlp_dim=256, channels=1)
    if name == "resnet18":
        from torchvision.models import resnet18

        model = resnet18(num_classes=10)
        model.conv1 = nn.Conv2d(1, 64, 3, stride=1, padding=1, bias=False)  # the CIFAR stem: keep 28x28 at first
        model.maxpool = nn.Identity()
        return model
    if name == "cnn":
        return SmallCNN()
    raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEERS)}")


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def run_peer(name: str, args: argparse.Namespace, budget_s: float) -> dict[str, Any]:
    from vitkit.data import load_data
    from vitkit.data.loader import TensorLoader
    from vitkit.engine.runtime import cpu_has_bf16

    bundle = load_data(args.data)
    common = dict(batch_size=args.batch_size, img_size=(28, 28), mean=bundle.mean, std=bundle.std, hflip=True,
                  augment="light", seed=args.seed)
    train_loader = TensorLoader(bundle.train, train=True, **common)
    test_loader = TensorLoader(bundle.val, train=False, **{**common, "batch_size": 500})
    torch.manual_seed(args.seed)
    model = build_peer(name)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(opt, x, y, precision):
        with autocast(precision):
            loss = criterion(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    # The probe: 3 untimed and 12 timed steps at each precision, then the weights are put back.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    probe_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = iter(train_loader)
    step_s: dict[str, float] = {}
    for precision in ("fp32", "bf16") if cpu_has_bf16() else ("fp32",):
        times = []
        for i in range(15):
            x, y = next(batches)
            t0 = time.perf_counter()
            step(probe_opt, x, y, precision)
            if i >= 3:
                times.append(time.perf_counter() - t0)
        step_s[precision] = sorted(times)[len(times) // 2]
    precision = min(step_s, key=step_s.get)
    model.load_state_dict(state)
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(precision):
        for i, (x, _) in enumerate(test_loader):
            model(x)
            if i == 3:
                break
    eval_s = (time.perf_counter() - t0) / 4 * len(test_loader)
    epoch_s = len(train_loader) * step_s[precision] + eval_s
    epochs = max(1, math.floor(budget_s * 0.95 / epoch_s))
    print(f"[{name}] {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; ms per step "
          + ", ".join(f"{k} {1000 * v:.1f}" for k, v in step_s.items())
          + f" -> {precision}; ~{epoch_s:.0f} s per epoch -> {epochs} epochs", flush=True)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    total = epochs * len(train_loader)
    warmup = min(len(train_loader), total // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
    curve, cum = [], 0.0
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        t0 = time.perf_counter()
        model.train()
        partial = False
        for x, y in train_loader:
            step(optimizer, x, y, precision)
            scheduler.step()
            if cum + time.perf_counter() - t0 > budget_s:
                partial = True
                break
        model.eval()
        correct = 0
        with torch.no_grad(), autocast(precision):
            for x, y in test_loader:
                correct += (model(x).argmax(-1) == y).sum().item()
        acc1 = 100.0 * correct / len(bundle.val)
        cum += time.perf_counter() - t0
        curve.append({"epoch": epoch + 1, "cum_s": round(cum, 2), "acc1": acc1, "partial": partial})
        print(f"[{name}] epoch {epoch + 1}/{epochs}{' (stopped at the budget)' if partial else ''}  test top-1 "
              f"{acc1:.2f}%  cumulative {cum:.1f} s", flush=True)
        if partial:
            break
    return {"name": name, "params": sum(p.numel() for p in model.parameters()), "precision": precision,
            "epochs": epochs, "curve": curve, "final_acc1": curve[-1]["acc1"]}


# ----------------------------------------------------------------------------- vitkit


def default_config(budget: str) -> Path:
    minutes = round(parse_duration(budget) / 60)
    return ROOT / "configs" / f"fashion_mnist_{minutes}m.yaml"


def run_vitkit(args: argparse.Namespace, budget_s: float) -> dict[str, Any]:
    """The recipe's command in a process of its own, then its run directory read back."""
    from vitkit.run import EVAL, RunRecord, load_run, read_metrics

    config = Path(args.vitkit_config) if args.vitkit_config else default_config(args.budget)
    with tempfile.TemporaryDirectory(prefix="vitkit-fm-") as tmp:
        cmd = [sys.executable, "-m", "vitkit", "train", "--data", args.data, "--time-budget", args.budget,
               "--out", str(Path(tmp) / "run")]
        if config.exists():
            cmd[4:4] = ["--config", str(config)]
        elif args.vitkit_config:
            raise SystemExit(f"--vitkit-config {config} does not exist")
        print("[vitkit] " + " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        run_dir = Path(tmp) / "run"
        record = RunRecord.read(run_dir)
        rows = read_metrics(run_dir)
        final = json.loads((run_dir / EVAL).read_text())
        params = sum(p.numel() for p in load_run(run_dir, weights="raw").model.parameters())
    curve = run_curve(rows)
    return {"name": "vitkit", "model": record.model, "precision": record.precision, "config": str(config if config.exists() else "defaults"),
            "epochs": len(rows), "curve": curve, "final_acc1": final["acc1"], "final_eval": final, "wall_s": round(wall, 1),
            "params": params}


# ----------------------------------------------------------------------------- the table


def print_table(results: dict[str, dict[str, Any]], budget_s: float) -> dict[str, dict[str, str]]:
    head = f"{'contestant':<28} {'params':>7} {'prec':>5} {'epochs':>6} {'final %':>8}" + "".join(
        f" {'to ' + format(t, 'g') + '%':>9}" for t in TARGETS)
    print("\n" + head + "\n" + "-" * len(head))
    for r in results.values():
        tt = r["time_to"]
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "-"
        print(f"{LABELS[r['name']]:<28} {params:>7} {r['precision']:>5} {r['epochs']:>6} {r['final_acc1']:>8.2f}"
              + "".join(f" {'-' if tt[f'{t:g}'] is None else format(tt[f'{t:g}'], '.0f') + ' s':>9}" for t in TARGETS))
    ratios: dict[str, dict[str, str]] = {}
    if "vitkit" in results:
        ours = results["vitkit"]["time_to"]
        for name, r in results.items():
            if name == "vitkit":
                continue
            row = {}
            for t in map(lambda t: f"{t:g}", TARGETS):
                if ours[t] is None:
                    row[t] = "vitkit missed" if r["time_to"][t] is not None else "-"
                elif r["time_to"][t] is None:
                    row[t] = f">= {budget_s / ours[t]:.2f}x"
                else:
                    row[t] = f"{r['time_to'][t] / ours[t]:.2f}x"
            ratios[name] = row
            print(f"{LABELS[name] + ' / vitkit':<38}" + "".join(f" {row[f'{t:g}']:>14}" for t in TARGETS))
        v = results["vitkit"]
        print(f"vitkit: {v['model']} ({v['precision']}), {v['config']}; whole command {v['wall_s']:.0f} s; final "
              f"evaluation (what `vitkit eval` reports) {v['final_acc1']:.2f}%")
    print("times: summed epoch time (training + test evaluation) to the first epoch at the target; ratios > 1: vitkit sooner")
    return ratios


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="15m", help="wall-clock budget per contestant (90s, 15m, 1h)")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist or a folder of its IDX files")
    p.add_argument("--contestants", default=",".join(CONTESTANTS), help=f"comma-separated subset of {','.join(CONTESTANTS)}")
    p.add_argument("--vitkit-config", help="vitkit's recipe (default: configs/fashion_mnist_<minutes>m.yaml, else defaults)")
    p.add_argument("--batch-size", type=int, default=128, help="peers' batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="peers' AdamW peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="peers' seed (vitkit's is its recipe's)")
    p.add_argument("--smoke", action="store_true", help="plumbing check: a 40 s budget each (figures mean nothing)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--worker", choices=CONTESTANTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.budget = "40s"
    budget_s = parse_duration(args.budget)
    if args.worker:  # one contestant, in this process of its own
        result = run_vitkit(args, budget_s) if args.worker == "vitkit" else run_peer(args.worker, args, budget_s)
        result["time_to"] = time_to_targets(result["curve"], budget_s)
        Path(args.result).write_text(json.dumps(result))
        return result

    names = [n.strip() for n in args.contestants.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONTESTANTS))
    if unknown:
        p.error(f"unknown contestants {unknown}; choose from {', '.join(CONTESTANTS)}")
    missing = [m for n, m in (("timm", "timm"), ("simplevit", "vit_pytorch")) if n in names and importlib.util.find_spec(m) is None]
    if missing:  # before any contestant runs, not after the first ones' minutes
        p.error(f"{', '.join(missing)} not installed: pip install -e \".[bench]\" (or leave those contestants out)")
    from vitkit.benchmark import machine_info, machine_line

    info = machine_info("cpu")
    print(f"Fashion-MNIST, {args.budget} per contestant{' [SMOKE RUN: figures mean nothing]' if args.smoke else ''}")
    print(machine_line(info), flush=True)
    start = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="fm-bench-") as tmp:
        for name in names:
            print(f"\n== {LABELS[name]}", flush=True)
            out = Path(tmp) / f"{name}.json"
            passed = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--smoke",)]
            subprocess.run([sys.executable, __file__, *passed, "--budget", args.budget, "--worker", name,
                            "--result", str(out)], check=True)
            results[name] = json.loads(out.read_text())
    ratios = print_table(results, budget_s)
    total = time.perf_counter() - start
    print(f"total {total:.0f} s; {machine_line(info)}")
    report = {"budget": args.budget, "smoke": args.smoke, "machine": info, "args": vars(args), "results": results,
              "ratios": ratios, "total_s": round(total, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
