"""vitkit vs timm: one self-attention layer, forward + backward, on the CPU, fp32 and bf16 autocast.

Run from the repository root (timm comes with the dev extra):

    python benchmarks/attention.py                 # a minute or two on 2 cores
    python benchmarks/attention.py --json attn.json

Why it exists: in bf16 on a CPU, vitkit's `layers.attend` computes attention with two explicit bf16
matrix products and a softmax instead of `F.scaled_dot_product_attention`, because the fused CPU
kernel measured about twice as slow there. This script keeps that choice honest: both layers get
the same weights (timm's `Attention`, loaded into vitkit's), the same input, and are timed in
interleaved rounds at ViT-S width (384, 6 heads) for several token counts; it prints the median
time of each and the ratio timm / vitkit (> 1: vitkit faster).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from timm.models.vision_transformer import Attention as TimmAttention

from vitkit.benchmark import machine_info, machine_line
from vitkit.models.layers import Attention

CASES = ((64, 50), (64, 197), (16, 401), (8, 577))  # (batch, tokens): ViT-S at 112, 224, 320 and 384 px


def step(layer: torch.nn.Module, x: torch.Tensor, precision: str):
    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    info = machine_info("cpu")
    print(f"self-attention forward + backward, dim {args.dim}, {args.heads} heads")
    print(machine_line(info))
    torch.manual_seed(0)
    peer = TimmAttention(args.dim, num_heads=args.heads, qkv_bias=True)
    ours = Attention(args.dim, args.heads)
    ours.load_state_dict(peer.state_dict())
    results = []
    print(f"\n{'batch':>5} {'tokens':>6} {'precision':<9} {'vitkit ms':>10} {'timm ms':>8} {'timm/vitkit':>12}")
    for batch, tokens in CASES:
        x = torch.randn(batch, tokens, args.dim, requires_grad=True)
        for precision in ("fp32", "bf16"):
            runs = {"vitkit": step(ours, x, precision), "timm": step(peer, x, precision)}
            times: dict[str, list[float]] = {k: [] for k in runs}
            for fn in runs.values():
                fn()  # warm-up
            for _ in range(args.rounds):
                for k, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
            ratio = med["timm"] / med["vitkit"]
            results.append({"batch": batch, "tokens": tokens, "precision": precision, "ms": med, "timm/vitkit": ratio})
            print(f"{batch:>5} {tokens:>6} {precision:<9} {med['vitkit']:>10.1f} {med['timm']:>8.1f} {ratio:>12.2f}")
    print("Machine-dependent figures; compare ratios from one run only.")
    out = {"dim": args.dim, "heads": args.heads, "results": results, "machine": info}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
