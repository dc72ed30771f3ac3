"""vitkit vs timm: training throughput (images/s) of ViT-S/16 at batch 64 on the CPU, fp32 and bf16.

Run from the repository root (timm comes with the dev extra: `pip install -e ".[dev]"`):

    python benchmarks/train_throughput.py                  # full run: a few minutes on 2 cores
    python benchmarks/train_throughput.py --quick          # smoke run, under half a minute
    python benchmarks/train_throughput.py --json train.json
    python benchmarks/train_throughput.py --compile --rounds 5  # + vitkit under torch.compile

Both models start from the same weights (timm's random initialisation, loaded into vitkit) and train
with the same step - vitkit's engine step from `vitkit.benchmark.train_step`: autocast forward,
cross-entropy, backward, gradient clipping, AdamW - on one fixed random batch. Each library runs
in a process of its own, as its users run it (vitkit's with vitkit's CPU allocator setting,
`runtime.keep_freed_memory`; timm's with glibc's defaults); `--same-process` times both in this
one, where they share the setting. The four cases (vitkit/timm x fp32/bf16) are timed in
interleaved rounds, and the script prints the median images/s of each and the ratios. A side's
"best" precision is the faster of its two; vitkit's default is `--precision auto` as the engine
resolves it (`auto_precision`).
Absolute figures depend on the machine and its load; compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch

import vitkit
from harness import interleaved, process_steps
from vitkit.benchmark import Step, bench_optimizer, machine_info, machine_line, median_spread, train_step
from vitkit.engine.runtime import Runtime, auto_precision

PRECISIONS = ("fp32", "bf16")
SIDES = ("vitkit", "timm")
# timm's process is timed with glibc's default allocator, as a timm user runs it: the engine step it
# borrows from vitkit would otherwise apply vitkit's setting (runtime.keep_freed_memory) to it too.
SIDE_ENV = {"vitkit": {}, "timm": {"VITKIT_CPU_ALLOCATOR": "system"}}


def build_pair(name: str, **overrides) -> tuple[torch.nn.Module, torch.nn.Module]:
    """vitkit's model and timm's, with the same weights."""
    torch.manual_seed(0)
    peer = timm.create_model(name, pretrained=False, **overrides)
    ours = vitkit.create_model(name, **overrides)
    ours.load_state_dict(peer.state_dict())
    return ours, peer


def side_steps(side: str, name: str, overrides: dict, batch: int, compile_: bool) -> dict[str, Step]:
    """One library's training steps, `"SIDE PRECISION"` -> step (run in that library's own process)."""
    ours, peer = build_pair(name, **overrides)
    model = ours if side == "vitkit" else peer
    torch.manual_seed(1)
    x = torch.randn(batch, 3, *peer.patch_embed.img_size)
    y = torch.randint(0, peer.num_classes, (batch,))
    # One optimizer per model, shared by its two precisions (its state does not depend on them).
    opt = bench_optimizer(model)
    steps = {}
    for prec in PRECISIONS:
        runtime = Runtime("cpu", prec)
        # A batch-2 step first pays the one-off costs (AdamW state, autograd and oneDNN set-up) cheaply.
        train_step(model, x[:2], y[:2], runtime, opt)()
        steps[f"{side} {prec}"] = train_step(model, x, y, runtime, opt)
    if compile_ and side == "vitkit":
        # The engine's `--compile`: torch.compile of the same module (same weights and optimizer).
        # No batch-2 step here: it would compile for a second shape. Compiling happens in the warm-up.
        compiled = torch.compile(model)
        for prec in PRECISIONS:
            steps[f"vitkit+compile {prec}"] = train_step(compiled, x, y, Runtime("cpu", prec), opt)
    return steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="a name that both vitkit and timm know")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed full-batch steps per case before timing")
    p.add_argument("--target-s", type=float, default=0.25, help="approximate seconds per case and round")
    p.add_argument("--compile", action="store_true",
                   help="also time vitkit under torch.compile (what `vitkit train --compile` runs); compiling takes minutes")
    p.add_argument("--same-process", action="store_true",
                   help="time both libraries in this process instead of one process each")
    p.add_argument("--quick", action="store_true", help="smoke run: 2-block ViT-Ti/16, batch 2, one round")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    overrides = {}
    if args.quick:
        args.model, overrides, args.batch, args.rounds, args.warmup = "vit_tiny_patch16_224", {"depth": 2}, 2, 1, 1
    info = machine_info("cpu")
    print(f"training throughput, vitkit {vitkit.__version__} vs timm {timm.__version__}: {args.model}"
          f"{' ' + str(overrides) if overrides else ''}, batch {args.batch}")
    print(machine_line(info))
    start = time.perf_counter()
    if args.same_process:
        steps = {}
        for side in SIDES:
            steps.update(side_steps(side, args.model, overrides, args.batch, args.compile))
        workers = []
    else:
        workers = [process_steps(__file__, "side_steps", side, args.model, overrides, args.batch, args.compile,
                                 env=SIDE_ENV[side]) for side in SIDES]
        steps = {name: w.step(name) for w in workers for name in w.names}
    print("each library in its own process (as its users run it)" if workers else
          "both libraries in this process (they share its allocator setting)")
    order = [f"{side} {prec}" for prec in PRECISIONS for side in SIDES]
    steps = {k: steps[k] for k in order + [k for k in steps if k not in order]}
    # Slow steps get one call per round; --rounds sets how many rounds they get too.
    rates = interleaved(steps, args.batch, warmup=args.warmup, rounds=args.rounds, target_s=args.target_s,
                        slow_rounds=args.rounds)
    for w in workers:
        w.close()
    ips = {k: median_spread(v) for k, v in rates.items()}

    print(f"\n{'library':<14} {'precision':<9} {'img/s':>8} {'spread':>7}")
    for key, (med, spread) in ips.items():
        side, prec = key.split()
        print(f"{side:<14} {prec:<9} {med:>8.2f} {spread:>7.0%}")
    best = {side: max(PRECISIONS, key=lambda q: ips[f"{side} {q}"][0]) for side in SIDES}
    auto = auto_precision("cpu", vitkit.create_model(args.model, **overrides))
    r = lambda a, b: ips[a][0] / ips[b][0]  # noqa: E731
    ratios = {f"vitkit/timm {q}": r(f"vitkit {q}", f"timm {q}") for q in PRECISIONS}
    ratios[f"vitkit best ({best['vitkit']}) / timm best ({best['timm']})"] = r(f"vitkit {best['vitkit']}",
                                                                              f"timm {best['timm']}")
    ratios[f"vitkit default (auto -> {auto}) / timm fp32"] = r(f"vitkit {auto}", "timm fp32")
    if args.compile:
        ratios.update({f"vitkit --compile / timm {q}": r(f"vitkit+compile {q}", f"timm {q}") for q in PRECISIONS})
    print("\nratios (> 1: vitkit faster)")
    for k, v in ratios.items():
        print(f"  {k:<44} {v:.2f}")
    print(f"total {time.perf_counter() - start:.0f} s. Machine-dependent figures; spread = (max - min) / median "
          "over the rounds.")
    result = {"model": args.model, "overrides": overrides, "batch": args.batch, "rounds": rates,
              "processes": "same" if args.same_process else "one per library",
              "images_per_s": {k: v[0] for k, v in ips.items()}, "spread": {k: v[1] for k, v in ips.items()},
              "best": best, "auto": auto, "ratios": ratios, "machine": info, "timm": timm.__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
