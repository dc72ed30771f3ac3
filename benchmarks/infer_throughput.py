"""vitkit vs timm vs Hugging Face transformers: inference throughput (images/s) on the CPU, fp32 and bf16.

Run from the repository root (timm and transformers come with the dev extra: `pip install -e ".[dev]"`):

    python benchmarks/infer_throughput.py                  # full run: a few minutes on 2 cores
    python benchmarks/infer_throughput.py --quick          # smoke run, under half a minute
    python benchmarks/infer_throughput.py --models swin_tiny_patch4_window7_224 --json infer.json

Models: ViT-B/16 and Swin-T at 224 px, batch 32. vitkit's model gets timm's (random) weights; the
transformers model (`ViTForImageClassification` / `SwinForImageClassification`) is built from a
random config of the same sizes with `attn_implementation="sdpa"` and keeps its own random
weights (the cost of the arithmetic does not depend on the values). Every model runs in eval mode
under `torch.inference_mode()` and, for bf16, `torch.autocast("cpu", dtype=torch.bfloat16)` - the
step of `vitkit.benchmark.infer_step`. Each library runs in a process of its own, as its users run
it (vitkit's with its CPU allocator setting, `runtime.keep_freed_memory`; the peers' with glibc's
defaults); `--same-process` times all three in this one. The six cases of a model (3 libraries x
2 precisions) are timed in interleaved rounds; the script prints the median images/s and the
ratios vitkit/timm and vitkit/transformers at equal precision, and vitkit's default precision
(`auto`, as the engine resolves it) against each peer's fp32. Compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import time

import timm
import torch
import transformers
from torch import nn

import vitkit
from harness import interleaved, process_steps
from vitkit.benchmark import Step, infer_step, machine_info, machine_line, median_spread
from vitkit.engine.runtime import Runtime, auto_precision
from vitkit.models import model_config

MODELS = ["vit_base_patch16_224", "swin_tiny_patch4_window7_224"]
PRECISIONS = ("fp32", "bf16")
LIBS = ("vitkit", "timm", "transformers")
# The peers' processes keep glibc's default allocator, as their users run them: the inference step
# they borrow from vitkit would otherwise apply vitkit's setting (runtime.keep_freed_memory).
LIB_ENV = {"vitkit": {}, "timm": {"VITKIT_CPU_ALLOCATOR": "system"}, "transformers": {"VITKIT_CPU_ALLOCATOR": "system"}}
QUICK_OVERRIDES = {"vit_base_patch16_224": {"depth": 1}, "swin_tiny_patch4_window7_224": {"depths": (1, 1, 1, 1)}}


class Logits(nn.Module):
    """A transformers classifier called like the others: images in, logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def hf_model(name: str, **overrides) -> nn.Module:
    """The transformers model of the same architecture and sizes as vitkit's `name`."""
    cfg = model_config(name, **overrides)
    common = dict(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                  num_labels=cfg.num_classes, qkv_bias=cfg.qkv_bias, layer_norm_eps=cfg.norm_eps)
    if name.startswith("swin"):
        config = transformers.SwinConfig(embed_dim=cfg.embed_dim, depths=list(cfg.depths),
                                         num_heads=list(cfg.num_heads), window_size=cfg.window_size,
                                         mlp_ratio=cfg.mlp_ratio, drop_path_rate=0.0, **common)
        cls = transformers.SwinForImageClassification
    else:
        config = transformers.ViTConfig(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth,
                                        num_attention_heads=cfg.num_heads,
                                        intermediate_size=int(cfg.embed_dim * cfg.mlp_ratio), hidden_act="gelu",
                                        **common)
        cls = transformers.ViTForImageClassification
    return Logits(cls._from_config(config, attn_implementation="sdpa"))


def lib_steps(lib: str, name: str, overrides: dict, batch: int) -> dict[str, Step]:
    """One library's inference steps, `"LIB PRECISION"` -> step (run in that library's own process)."""
    torch.manual_seed(0)
    if lib == "transformers":
        model = hf_model(name, **overrides)
    else:
        model = timm.create_model(name, pretrained=False, **overrides)
        if lib == "vitkit":
            ours = vitkit.create_model(name, **overrides)
            ours.load_state_dict(model.state_dict())
            model = ours
    cfg = model_config(name, **overrides)
    torch.manual_seed(1)
    x = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size)
    return {f"{lib} {prec}": infer_step(model, x, Runtime("cpu", prec)) for prec in PRECISIONS}


def bench_model(name: str, args: argparse.Namespace) -> dict:
    overrides = QUICK_OVERRIDES[name] if args.quick else {}
    if args.same_process:
        steps, workers = {}, []
        for lib in LIBS:
            steps.update(lib_steps(lib, name, overrides, args.batch))
    else:
        workers = [process_steps(__file__, "lib_steps", lib, name, overrides, args.batch, env=LIB_ENV[lib])
                   for lib in LIBS]
        steps = {n: w.step(n) for w in workers for n in w.names}
    steps = {f"{lib} {prec}": steps[f"{lib} {prec}"] for prec in PRECISIONS for lib in LIBS}
    rates = interleaved(steps, args.batch, warmup=args.warmup, rounds=args.rounds, target_s=args.target_s)
    for w in workers:
        w.close()
    ips = {k: median_spread(v) for k, v in rates.items()}
    auto = auto_precision("cpu", vitkit.create_model(name, **overrides))
    r = lambda a, b: ips[a][0] / ips[b][0]  # noqa: E731
    ratios = {}
    for peer_lib in ("timm", "transformers"):
        for q in PRECISIONS:
            ratios[f"vitkit/{peer_lib} {q}"] = r(f"vitkit {q}", f"{peer_lib} {q}")
        ratios[f"vitkit auto ({auto}) / {peer_lib} fp32"] = r(f"vitkit {auto}", f"{peer_lib} fp32")

    print(f"\n{name}{' ' + str(overrides) if overrides else ''}, batch {args.batch}, transformers attention: sdpa, "
          + ("one process per library" if workers else "all libraries in one process"))
    print(f"{'library':<13} {'precision':<9} {'img/s':>8} {'spread':>7}")
    for key, (med, spread) in ips.items():
        lib, prec = key.split()
        print(f"{lib:<13} {prec:<9} {med:>8.2f} {spread:>7.0%}")
    print("ratios (> 1: vitkit faster)")
    for k, v in ratios.items():
        print(f"  {k:<40} {v:.2f}")
    return {"model": name, "overrides": overrides, "batch": args.batch, "rounds": rates,
            "processes": "one per library" if workers else "same",
            "images_per_s": {k: v[0] for k, v in ips.items()}, "spread": {k: v[1] for k, v in ips.items()},
            "auto": auto, "ratios": ratios}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=MODELS, metavar="NAME",
                   help=f"subset of: {', '.join(MODELS)}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case before timing (fewer for slow ones)")
    p.add_argument("--target-s", type=float, default=0.25, help="approximate seconds per case and round")
    p.add_argument("--same-process", action="store_true",
                   help="time all libraries in this process instead of one process each")
    p.add_argument("--quick", action="store_true", help="smoke run: one block per stage, batch 2, one round")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.warmup = 2, 1, 1

    info = machine_info("cpu")
    print(f"inference throughput, vitkit {vitkit.__version__} vs timm {timm.__version__} vs transformers "
          f"{transformers.__version__}")
    print(machine_line(info))
    start = time.perf_counter()
    results = [bench_model(name, args) for name in args.models]
    print(f"\ntotal {time.perf_counter() - start:.0f} s. Machine-dependent figures; spread = (max - min) / median "
          "over the rounds.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "machine": info, "timm": timm.__version__,
                       "transformers": transformers.__version__}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
