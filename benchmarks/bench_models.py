"""Compare vitkit models with their timm counterparts: inference and training throughput on CPU.

Run from the repository root (needs the dev extra for timm: `pip install -e ".[dev]"`):

    python benchmarks/bench_models.py                      # full default run, about 4 minutes on 2 cores
    python benchmarks/bench_models.py --quick              # smoke run, under half a minute
    python benchmarks/bench_models.py --models vit_pico_patch4_28 --json results.json

Both implementations are timed in the same process, in interleaved rounds, and the script prints
the ratio vitkit/timm of images per second (>1 means vitkit is faster). Absolute figures depend on
the machine, its load and the torch build; only the ratios from one run are meant to be compared.
Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import vitkit
from vitkit.models import get_model_entry

MODELS = ["vit_pico_patch4_28", "vit_tiny_patch16_224", "vit_small_patch16_224", "deit_small_distilled_patch16_224"]
# Rotary position embeddings (timm's Eva): on request, --models eva02_tiny_patch14_224 vit_small_patch16_dinov3.
ROPE_MODELS = ["eva02_tiny_patch14_224", "vit_small_patch16_dinov3"]


@dataclass
class Row:
    model: str
    mode: str  # "infer" or "train"
    precision: str  # "fp32" or "bf16"
    batch: int
    vitkit_ips: float  # images per second, median over rounds
    timm_ips: float
    ratio: float  # vitkit_ips / timm_ips
    spread: float  # largest (max - min) / median over the rounds of either side: high means a noisy row


def build_pair(name: str) -> tuple[nn.Module, nn.Module]:
    """The vitkit model and its timm peer, with identical weights where the layouts match."""
    # Headless backbones (EVA-02 at 224, DINOv3) get an ImageNet-sized head on both sides, to train.
    head = {"num_classes": 1000} if get_model_entry(name).config.num_classes == 0 else {}
    ours = vitkit.create_model(name, **head)
    if name == "vit_pico_patch4_28":
        # No timm twin: the closest timm configuration. Its sin-cos position embedding is a fixed
        # buffer in vitkit, and timm has no such option, so timm runs without one (a single add).
        peer = VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4,
                                 num_heads=4, mlp_ratio=2, global_pool="avg", class_token=False, pos_embed="none")
    else:
        peer = timm.create_model(name, **head)
        # Same weights, so both do the same arithmetic (value-dependent costs such as denormals match).
        ours.load_state_dict(peer.state_dict())
    return ours, peer


def image_shape(timm_model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) of the input the pair expects, read from the timm side."""
    h, w = timm_model.patch_embed.img_size
    return timm_model.patch_embed.proj.in_channels, h, w


def infer_step(model: nn.Module, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    model.eval()

    def step() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    return step


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool) -> Callable[[], None]:
    model.train()
    target = torch.randint(0, model.num_classes, (x.shape[0],))

    def step() -> None:
        # Autocast covers the forward pass only; backward follows the forward's dtypes (torch's advice).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        # vitkit's distilled DeiT returns (class logits, distillation logits) in train mode; timm's
        # returns their average. Summing keeps the loss a single tensor; the extra add is negligible.
        logits = sum(out) if isinstance(out, tuple) else out
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(steps: dict[str, Callable[[], None]], batch: int, warmup: int, rounds: int,
            target_s: float) -> dict[str, list[float]]:
    """Images/s of each step in each of the interleaved rounds."""
    # Warm-up: the first calls pay for oneDNN kernel selection, allocator growth and AdamW's state.
    last: dict[str, float] = {}
    for name, step in steps.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            step()
            last[name] = time.perf_counter() - t0
            if last[name] > target_s:
                break  # a call this long has paid the one-off costs; more would only cost time
    # The same iteration count for both, sized from the slower one, so each round lasts ~target_s.
    iters = max(1, round(target_s / max(last.values()))) if last and target_s > 0 else 1
    # Interference here comes in bursts of a few seconds; the median of short rounds ignores them.
    # Steps that take longer than a round on their own (224-px batches) get at most 3 rounds.
    n_rounds = rounds if iters > 1 else min(rounds, 3)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(n_rounds):
        # Alternate which one goes first (ABBA...), so a machine speeding up or slowing down over
        # the run does not systematically favour either side.
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            rates[name].append(iters * batch / (time.perf_counter() - t0))
    return rates


def ordered(args: argparse.Namespace, **steps: Callable[[], None]) -> dict[str, Callable[[], None]]:
    # Which side is warmed up and timed first may shift a row by ~10% (seen on the pico fp32
    # batch-256 row, cause unknown); --timm-first swaps the order to check whether a ratio survives.
    return dict(reversed(steps.items())) if args.timm_first else steps


def bench_model(name: str, args: argparse.Namespace) -> list[Row]:
    torch.manual_seed(0)
    ours, peer = build_pair(name)
    c, h, w = image_shape(peer)
    small = h <= 64  # the 28-px model is cheap: bigger batches and a full-batch training warm-up
    if args.quick:
        infer_batches, train_batch, warmup, rounds, target_s = [1, 4], 4, 1, 1, 0.0
    else:
        infer_batches = [1, 256 if small else 32]
        train_batch = 128 if small else 32
        warmup, rounds, target_s = args.warmup, args.rounds, args.target_s
    rows = []
    for bf16 in (False, True):
        for batch in infer_batches:
            x = torch.randn(batch, c, h, w)
            steps = ordered(args, vitkit=infer_step(ours, x, bf16), timm=infer_step(peer, x, bf16))
            rows.append(make_row(name, "infer", bf16, batch, measure(steps, batch, warmup, rounds, target_s)))
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4) for m in (ours, peer)}
    for bf16 in (False, True):
        x = torch.randn(train_batch, c, h, w)
        steps = ordered(args, vitkit=train_step(ours, opts[ours], x, bf16), timm=train_step(peer, opts[peer], x, bf16))
        train_warmup = warmup
        if not small:
            # A 224-px step takes seconds, so a full-batch warm-up per side would cost ~40 s per run.
            # One batch-2 step pays the one-off costs (AdamW state, autograd and oneDNN set-up), the
            # timed rounds are one step each, and the median drops what first-call cost remains.
            for model, opt in opts.items():
                train_step(model, opt, x[:2], bf16)()
            train_warmup = 0
        rows.append(make_row(name, "train", bf16, train_batch, measure(steps, train_batch, train_warmup, rounds,
                                                                         target_s)))
    return rows


def make_row(name: str, mode: str, bf16: bool, batch: int, rates: dict[str, list[float]]) -> Row:
    # Medians ignore a disturbed round; the spread shows whether the rounds agreed at all.
    med = {side: statistics.median(v) for side, v in rates.items()}
    spread = max((max(v) - min(v)) / med[side] for side, v in rates.items())
    row = Row(name, mode, "bf16" if bf16 else "fp32", batch, med["vitkit"], med["timm"], med["vitkit"] / med["timm"],
              spread)
    print(format_row(row), flush=True)  # print as we go: a full run takes minutes
    return row


HEADER = (f"{'model':<34} {'mode':<5} {'prec':<4} {'batch':>5} {'vitkit img/s':>12} {'timm img/s':>11} "
          f"{'vitkit/timm':>11} {'spread':>6}")


def format_row(r: Row) -> str:
    return (f"{r.model:<34} {r.mode:<5} {r.precision:<4} {r.batch:>5} {r.vitkit_ips:>12.1f} {r.timm_ips:>11.1f} "
            f"{r.ratio:>11.2f} {r.spread:>6.0%}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS + ROPE_MODELS, default=MODELS, metavar="NAME",
                   help=f"subset of: {', '.join(MODELS + ROPE_MODELS)} (default: the first {len(MODELS)})")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved timing rounds per side, at most 3 for slow steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per side before timing")
    p.add_argument("--target-s", type=float, default=0.25, help="approximate seconds per timed round")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: small batches, one round")
    p.add_argument("--timm-first", action="store_true", help="warm up and time timm first, to check order effects")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    args = p.parse_args(argv)

    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(HEADER)
    print("-" * len(HEADER))
    start = time.perf_counter()
    rows = [row for name in args.models for row in bench_model(name, args)]
    print(f"total {time.perf_counter() - start:.0f} s; ratio > 1 means vitkit is faster. Machine-dependent figures.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
