"""The GPU part of the benchmarks, for the day a machine with CUDA is lent: run by gpu_check.sh.

    python benchmarks/gpu_check.py throughput --json out/throughput.json
    python benchmarks/gpu_check.py fashion --data PATH --budget-s 240 --json out/fashion.json
    python benchmarks/gpu_check.py throughput --device cpu --smoke      # the CPU test of the logic

`throughput`: vitkit against timm on the same weights (timm's random initialisation loaded into
vitkit): training steps (vitkit's engine step: autocast forward, cross-entropy, backward, clipping,
AdamW) and inference batches, in bf16 autocast and fp32, timed in interleaved rounds in this one
process (on a GPU the two libraries share nothing a separate process would change); prints
images/s of each and the ratio vitkit/timm.

`fashion`: `vitkit train` on full Fashion-MNIST (the official 10,000-image test split validates
every epoch) and the wall time until its validation top-1 (raw or EMA weights, whichever comes
first) reaches 90, 92, 93 and 94%, from the run's own metrics.jsonl, plus its final evaluation.
The run's epochs are sized by `--time-budget` (the engine plans the epochs that fit).

Absolute figures depend on the machine: each line says which it ran on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

import vitkit
from harness import interleaved, run_curve, time_to_targets
from vitkit.benchmark import bench_optimizer, infer_step, machine_info, machine_line, synchronizer, train_step
from vitkit.engine import TrainConfig, train
from vitkit.engine.runtime import Runtime
from vitkit.run import read_metrics

def throughput(device: str, model: str, batch: int, rounds: int, smoke: bool) -> dict[str, Any]:
    """images/s of vitkit and timm, training and inference, bf16 and fp32, and the ratios."""
    import timm

    overrides: dict[str, Any] = {"depth": 2, "img_size": 64} if smoke else {}
    torch.manual_seed(0)
    peer = timm.create_model(model, pretrained=False, **overrides)
    ours = vitkit.create_model(model, **overrides)
    ours.load_state_dict(peer.state_dict())
    sync = synchronizer(device)
    steps = {}
    for side, net in (("vitkit", ours), ("timm", peer)):
        net.to(device)
        opt = bench_optimizer(net)
        x = torch.randn(batch, 3, *peer.patch_embed.img_size, device=device)
        y = torch.randint(0, peer.num_classes, (batch,), device=device)
        for precision in ("bf16", "fp32"):
            runtime = Runtime(device, precision)
            steps[f"train {side} {precision}"] = train_step(net, x, y, runtime, opt)
            steps[f"infer {side} {precision}"] = infer_step(net, x, runtime)
    rates = {}
    for mode in ("train", "infer"):
        picked = {k: v for k, v in steps.items() if k.startswith(mode)}
        # train_step/infer_step set train/eval mode when built: set it again before each mode's rounds.
        for net in (ours, peer):
            net.train(mode == "train")
        measured = interleaved(picked, batch, warmup=1 if smoke else 3, rounds=rounds,
                               target_s=0.05 if smoke else 0.5, sync=sync)
        rates |= {k: sorted(v)[len(v) // 2] for k, v in measured.items()}
    ratios = {f"{m} {p}": rates[f"{m} vitkit {p}"] / rates[f"{m} timm {p}"]
              for m in ("train", "infer") for p in ("bf16", "fp32")}
    return {"model": model, "batch": batch, "images_per_s": rates, "vitkit_over_timm": ratios}


def fashion(device: str, data: str, model: str, budget: str, out: str | None, epochs: int | None) -> dict[str, Any]:
    """Train on Fashion-MNIST within `budget` and report the time to each accuracy target."""
    run_dir = out or tempfile.mkdtemp(prefix="vitkit-fashion-")
    cfg = TrainConfig(data=data, model=model, device=device, out=run_dir,
                      time_budget=None if epochs else budget, epochs=epochs or TrainConfig.epochs)
    train(cfg)
    rows = read_metrics(run_dir)
    final = json.loads((Path(run_dir) / "eval.json").read_text())
    return {"model": model, "data": data, "budget": budget, "epochs": len(rows),
            "train_s": round(sum(r["time_s"] for r in rows), 2), "time_to": time_to_targets(run_curve(rows)),
            "final_acc1": final.get("acc1"), "run": run_dir}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("throughput", "fashion"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default=None, help="throughput: vit_small_patch16_224; fashion: vit_nano_conv4_32")
    p.add_argument("--batch", type=int, default=256, help="throughput: images per batch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data", default="fashion-mnist", help="fashion: a name or a folder of IDX files")
    p.add_argument("--budget", default="4m", help="fashion: the run's --time-budget")
    p.add_argument("--epochs", type=int, default=None, help="fashion: a fixed number of epochs instead of a budget")
    p.add_argument("--out", default=None, help="fashion: the run directory (default: a temporary one)")
    p.add_argument("--smoke", action="store_true", help="throughput: a 2-block model at 64 px, short rounds")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run this on a machine with one (or pass --device cpu)")
    info = machine_info(a.device)
    print(machine_line(info))
    if a.what == "throughput":
        result = throughput(a.device, a.model or "vit_small_patch16_224", a.batch, a.rounds, a.smoke)
        for k, v in result["images_per_s"].items():
            print(f"{k:<20} {v:10.1f} img/s")
        for k, v in result["vitkit_over_timm"].items():
            print(f"vitkit/timm {k:<10} {v:6.2f}x")
    else:
        result = fashion(a.device, a.data, a.model or "vit_nano_conv4_32", a.budget, a.out, a.epochs)
        print(f"{result['model']} on {result['data']}: {result['epochs']} epochs in {result['train_s']} s, "
              f"final evaluation {result['final_acc1']}%")
        for t, s in result["time_to"].items():
            print(f"time to {t}%: {'not reached' if s is None else f'{s} s'}")
    result["machine"] = info
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
