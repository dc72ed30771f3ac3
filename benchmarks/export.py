"""Inference speed of exported models: PyTorch eager vs onnxruntime (fp32) vs onnxruntime int8.

Run from the repository root (needs the export extra, in the dev extra: `pip install -e ".[dev]"`):

    python benchmarks/export.py                 # ViT-S/16 at 224 px and vit_pico_conv4_28, batch 1 and 32
    python benchmarks/export.py --quick         # smoke run: batch 1 and 4, one call each (~20 s on one core)
    python benchmarks/export.py --models vit_tiny_patch16_224 --json export.json

Each model is exported with `vitkit.export.to_onnx` (dynamic batch) and quantised with
`vitkit.export.quantize_int8` (dynamic int8 weights of the linear layers), then all three are timed
in the same process, in interleaved rounds, with the same number of threads (torch's, which follows
OMP_NUM_THREADS). The script prints latency (ms per batch) and throughput (images/s) and the ratio
to PyTorch eager (>1: faster than eager). Random weights: speed does not depend on them, and int8
accuracy is measured by `vitkit export --int8` on a real run instead. Nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime
import torch

import vitkit
from vitkit.export import onnx_runner, quantize_int8
from vitkit.export.exporters import to_onnx
from vitkit.models import get_model_entry

MODELS = ["vit_small_patch16_224", "vit_pico_conv4_28"]
RUNTIMES = ["pytorch", "onnxruntime", "onnxruntime-int8"]


@dataclass
class Row:
    model: str
    batch: int
    runtime: str
    latency_ms: float  # median over rounds of the time per batch
    images_per_s: float
    vs_eager: float  # eager latency / this latency: > 1 is faster than PyTorch eager
    spread: float  # (max - min) / median over this runtime's rounds: high means a disturbed row


def seconds_per_call(fn: Callable[[], object], target_s: float) -> float:
    """Call `fn` for about `target_s` seconds (at least once); the mean time per call."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= target_s:
            return elapsed / calls


def runtimes(name: str, folder: Path, threads: int) -> tuple[dict[str, Callable], tuple[int, ...], dict[str, float]]:
    """The three runtimes of one model as `x -> logits` callables, its input shape, file sizes (MB)."""
    cfg = get_model_entry(name).config
    size = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else tuple(cfg.img_size)
    shape = (cfg.in_chans, *size)
    model = vitkit.create_model(name).eval()
    fp32, int8 = folder / f"{name}.onnx", folder / f"{name}.int8.onnx"
    to_onnx(model, torch.randn(2, *shape), fp32)
    quantize_int8(fp32, int8)
    run32, run8 = onnx_runner(fp32, threads), onnx_runner(int8, threads)

    def eager(x: np.ndarray):
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    sizes = {"onnx_mb": fp32.stat().st_size / 1e6, "int8_mb": int8.stat().st_size / 1e6}
    return {"pytorch": eager, "onnxruntime": run32, "onnxruntime-int8": run8}, shape, sizes


def bench_model(name: str, batches: list[int], rounds: int, warmup: int, target_s: float, threads: int) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fns, shape, sizes = runtimes(name, Path(tmp), threads)
        print(f"{name}: exported and quantised in {time.perf_counter() - t0:.1f} s; "
              f"ONNX {sizes['onnx_mb']:.1f} MB, int8 {sizes['int8_mb']:.1f} MB", flush=True)
        for batch in batches:
            x = np.random.default_rng(0).standard_normal((batch, *shape), dtype=np.float32)
            for fn in fns.values():
                for _ in range(warmup):
                    fn(x)
            times: dict[str, list[float]] = {r: [] for r in RUNTIMES}
            for i in range(rounds):  # interleaved, order rotated: a machine that drifts affects all alike
                order = RUNTIMES[i % 3:] + RUNTIMES[: i % 3]
                for r in order:
                    times[r].append(seconds_per_call(lambda: fns[r](x), target_s))
            eager = statistics.median(times["pytorch"])
            for r in RUNTIMES:
                med = statistics.median(times[r])
                rows.append(Row(name, batch, r, 1e3 * med, batch / med, eager / med,
                                (max(times[r]) - min(times[r])) / med))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per runtime and batch size")
    p.add_argument("--target-s", type=float, default=0.5, help="length of one timed round")
    p.add_argument("--quick", action="store_true", help="batch 1 and 4, one round of one call: a smoke run")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args()
    if a.quick:
        a.batches, a.rounds, a.warmup, a.target_s = [1, 4], 1, 1, 0.0

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads} threads, "
          f"{platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    start, rows = time.perf_counter(), []
    for name in a.models:
        rows += bench_model(name, a.batches, a.rounds, a.warmup, a.target_s, threads)

    print(f"\n{'model':<24} {'batch':>5} {'runtime':<17} {'ms/batch':>9} {'img/s':>8} {'vs eager':>8} {'spread':>6}")
    print("-" * 83)
    for r in rows:
        print(f"{r.model:<24} {r.batch:>5} {r.runtime:<17} {r.latency_ms:>9.2f} {r.images_per_s:>8.1f} "
              f"{r.vs_eager:>8.2f} {100 * r.spread:>5.0f}%")
    print(f"total {time.perf_counter() - start:.0f} s; 'vs eager' > 1 means faster than PyTorch eager. "
          "Machine-dependent figures: compare ratios from one run only.")
    if a.json:
        Path(a.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
