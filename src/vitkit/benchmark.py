"""Speed of a model on this machine (`vitkit benchmark`), and the timing core of `benchmarks/*.py`.

`benchmark()` times a registered model's training steps and inference batches; per (mode, precision): images/s,
median batch (and batch-1) latency, peak memory, GFLOPs per image, TFLOP/s and its share of the matmul peak.

A training step is the engine's (`Classify` under `Runtime.autocast()`, `Runtime.backward`, `Runtime.step` with
AdamW and clipping); inference runs in eval mode under `torch.inference_mode()` and the same autocast.

`time_calls`, `train_step`, `bench_optimizer`, `infer_step`, `matmul_peak`, `PeakMemory` and `machine_info` are
what the scripts in `benchmarks/` build on (with their own harness: interleaved rounds, one process per library).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .engine.config import TrainConfig
from .engine.objectives.classify import Classify
from .engine.optim import create_optimizer
from .engine.runtime import Runtime, cpu_has_bf16
from .models import create_model, get_model_entry
from .models.layers.helpers import cpuinfo
from .models.profile import count_flops, count_params

MODES = ("train", "infer")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_MODES = ("train", "infer")
DEFAULT_PRECISIONS = ("fp32", "auto")

# A training step costs about three forwards: the backward pass computes gradients with respect to both the
# activations and the weights, each as costly as the forward.
TRAIN_FLOPS_FACTOR = 3
# Small, so repeated steps on one random batch do not diverge (NaN/inf arithmetic can run at another speed); the
# rate does not change the cost of a step.
BENCH_LR = 1e-4
_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

Step = Callable[[], None]


# ----------------------------------------------------------------------------- timing core
def _no_sync() -> None:
    pass


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """A function that waits for the device's queued work (CUDA kernels run asynchronously)."""
    device = torch.device(device)
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else _no_sync


def time_calls(fn: Step, n: int, sync: Callable[[], None] = _no_sync) -> list[float]:
    """Seconds taken by each of `n` calls of `fn`, the device synchronised around each call."""
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def median_spread(values: list[float]) -> tuple[float, float]:
    """(median, (max - min) / median): the figure to report and how much the samples disagreed."""
    med = statistics.median(values)
    return med, (max(values) - min(values)) / med if med > 0 else 0.0


# ----------------------------------------------------------------------------- steps
def bench_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The engine's AdamW (weight-decay groups, default weight decay) at `BENCH_LR`."""
    return create_optimizer(model, BENCH_LR, _TRAIN_DEFAULTS["weight_decay"])


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: Runtime,
               optimizer: torch.optim.Optimizer | None = None) -> Step:
    """One engine step on the fixed batch: autocast forward, fp32 label-smoothed CE, backward, clipping, AdamW
    (`bench_optimizer(model)` unless `optimizer` is given)."""
    model.train()
    if optimizer is None:
        optimizer = bench_optimizer(model)
    objective, clip = Classify(model, label_smoothing=_TRAIN_DEFAULTS["label_smoothing"]), _TRAIN_DEFAULTS["clip_grad"]

    def step() -> None:
        with runtime.autocast():
            loss, _ = objective(x, y)
        runtime.backward(loss)
        runtime.step(model, optimizer, clip)

    return step


def infer_step(model: nn.Module, x: torch.Tensor, runtime: Runtime) -> Step:
    """One inference batch: eval mode, `torch.inference_mode()`, the runtime's autocast."""
    model.eval()

    def step() -> None:
        with torch.inference_mode(), runtime.autocast():
            model(x)

    return step


# ----------------------------------------------------------------------------- machine
def matmul_peak(precision: str, device: torch.device | str = "cpu", size: int | None = None, reps: int = 3) -> float:
    """Matrix-multiply TFLOP/s: the best of `reps` `size`-square products (default 2048 on CPU, 8192 on CUDA)."""
    device = torch.device(device)
    size, dtype = size or (8192 if device.type == "cuda" else 2048), _DTYPES[precision]
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    c = torch.empty(size, size, device=device, dtype=dtype)
    step = lambda: torch.mm(a, b, out=c)  # noqa: E731
    time_calls(step, 1, synchronizer(device))  # kernel selection and first-touch of the output
    best = min(time_calls(step, reps, synchronizer(device)))
    return 2 * size**3 / best / 1e12


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What the figures depend on: CPU, threads, torch build (and the GPU, on CUDA)."""
    from . import __version__

    device = torch.device(device)
    info: dict[str, Any] = {
        "cpu": cpuinfo("model name") or platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_has_bf16(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "vitkit": __version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def machine_line(info: dict[str, Any]) -> str:
    """`machine_info` as one line for the top of a printed report."""
    where = info.get("gpu", info["cpu"])
    return (f"{where}, {info['logical_cpus']} logical CPUs, {info['threads']} torch threads, CPU capability "
            f"{info['cpu_capability']}{', bf16' if info['cpu_bf16'] else ''}; torch {info['torch']}, "
            f"Python {info['python']}")


# ----------------------------------------------------------------------------- memory
def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def _release_cpu_memory() -> bool:
    """Return freed memory to the OS (glibc's `malloc_trim`) and restart the peak-RSS count at the current RSS
    (writing 5 to Linux's `/proc/self/clear_refs` resets getrusage's high-water mark); True when it could."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block, in bytes (`nbytes`, set on exit). CUDA: `torch.cuda.max_memory_allocated` (tensors
    from before the block too). CPU: how much the process's peak RSS (ru_maxrss) grew, from the RSS at the start
    where Linux lets the peak be reset (`reset` True): tensors, caches, scratch buffers, all the process touched."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.kind = "cuda_max_memory_allocated" if self.device.type == "cuda" else "process_peak_rss_growth"
        self.reset, self.nbytes = False, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.reset = True
        else:
            self.reset = _release_cpu_memory()
            self._base = _maxrss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.nbytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.nbytes = max(0, _maxrss_bytes() - self._base)


# ----------------------------------------------------------------------------- `vitkit benchmark`
def _check(modes: list[str], precisions: list[str], batch_size: int, steps: int, warmup: int,
           img_size: int | None) -> None:
    if not modes or not precisions:
        raise ValueError("give at least one mode (train, infer) and one precision (auto, fp32, bf16, fp16)")
    for values, allowed, rule in ((modes, MODES, "mode must be train or infer"),
                                  (precisions, PRECISIONS, "precision must be auto, fp32, bf16 or fp16")):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{rule}, got {bad[0]!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("steps", steps, 1), ("warmup", warmup, 0)):
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if img_size is not None and img_size < 1:
        raise ValueError(f"img_size must be positive, got {img_size}")


def _row(name: str, mode: str, precision: str, requested: str, kwargs: dict[str, Any], shape: tuple[int, int, int],
         num_classes: int, batch_size: int, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    """Build the model and time one (mode, precision) case; the model lives only inside this row."""
    sync = synchronizer(device)
    batch1_ms = None
    with PeakMemory(device) as mem:
        torch.manual_seed(0)
        model = create_model(name, **kwargs).to(device)
        runtime = Runtime(str(device), precision, model)
        x = torch.randn(batch_size, *shape, device=device)
        if mode == "train":
            y = torch.randint(0, num_classes, (batch_size,), device=device)
            step = train_step(model, x, y, runtime)
        else:
            step = infer_step(model, x, runtime)
        time_calls(step, warmup, sync)
        times = time_calls(step, steps, sync)
        if mode == "infer":
            one = infer_step(model, x[:1], runtime)
            time_calls(one, warmup, sync)
            batch1_ms = 1000 * statistics.median(time_calls(one, steps, sync))
        del model, step, runtime, x
    median, spread = median_spread(times)
    return {
        "mode": mode, "precision": precision, "requested": requested, "batch_size": batch_size,
        "images_per_s": batch_size / median, "batch_ms": 1000 * median, "batch_ms_spread": spread,
        "batch1_ms": batch1_ms, "peak_mem_mib": mem.nbytes / 2**20, "peak_mem_kind": mem.kind,
        "peak_mem_reset": mem.reset,
    }


def benchmark(model: str, *, modes: list[str] | tuple[str, ...] = DEFAULT_MODES,
              precisions: list[str] | tuple[str, ...] = DEFAULT_PRECISIONS, batch_size: int = 64,
              img_size: int | None = None, steps: int = 10, warmup: int = 3, device: str = "cpu",
              matmul_size: int | None = None, json_path: str | Path | None = None,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Time `model` in each (mode, precision) and return the report (also written to `json_path`). `auto` resolves
    as in training; precisions that resolve alike run once. `log` receives the header, each row as it completes
    and the footnotes (None: silent). Bad arguments raise ValueError before any work."""
    modes, precisions = list(modes), list(precisions)
    _check(modes, precisions, batch_size, steps, warmup, img_size)
    say = log or (lambda line: None)
    cfg = get_model_entry(model).config
    kwargs: dict[str, Any] = {} if img_size is None else {"img_size": img_size}
    num_classes = cfg.num_classes
    if num_classes == 0:  # a feature extractor (e.g. the R50 hybrid): give it a classifier to train
        kwargs["num_classes"] = num_classes = 1000
    with torch.device("meta"):  # count without allocating or initialising weights
        meta = create_model(model, **kwargs)
    size = img_size if img_size is not None else cfg.img_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    flops, params = count_flops(meta, (h, w), cfg.in_chans), count_params(meta)
    # Resolve the precisions first: every error is raised before the minutes of timing start.
    resolved: dict[str, list[str]] = {}
    for p in precisions:
        runtime = Runtime(device, p, meta)
        resolved.setdefault(runtime.precision, []).append(p)
    dev, info = runtime.device, machine_info(runtime.device)
    say(f"vitkit benchmark: {model}, {params / 1e6:.2f}M params, {flops / 1e9:.3f} GFLOPs per image (forward), "
        f"{h}x{w} px, batch {batch_size}, {dev}")
    say(machine_line(info))
    for p, req in resolved.items():
        if "auto" in req:
            say(f"precision auto -> {p}")
    side = matmul_size or (8192 if dev.type == "cuda" else 2048)
    peaks = {p: matmul_peak(p, dev, side) for p in resolved}
    say(f"matmul peak ({side}x{side}): " + ", ".join(f"{p} {t:.3f} TFLOP/s" for p, t in peaks.items()))
    say("")
    say(HEADER)
    say("-" * len(HEADER))
    rows = []
    for mode in modes:
        factor = TRAIN_FLOPS_FACTOR if mode == "train" else 1
        for p, req in resolved.items():
            row = _row(model, mode, p, ",".join(req), kwargs, (cfg.in_chans, h, w), num_classes, batch_size, steps,
                       warmup, dev)
            row.update(gflops_per_image=flops / 1e9, gflops_per_image_step=factor * flops / 1e9,
                       tflops=factor * flops * row["images_per_s"] / 1e12, peak_tflops=peaks[p])
            row["fraction_of_peak"] = row["tflops"] / peaks[p]
            rows.append(row)
            say(format_row(row))
    say("")
    say("img/s: batch / median batch time. GFLOP/img: per image and step (a training step counts 3 forwards).")
    say("peak mem: torch.cuda.max_memory_allocated during the row (weights, gradients, optimizer state, activations)."
        if dev.type == "cuda" else
        "peak mem: growth of the whole process's peak RSS during the row (getrusage); process-level, approximate.")
    report = {
        "model": model, "params": params, "img_size": [h, w], "in_chans": cfg.in_chans, "num_classes": num_classes,
        "batch_size": batch_size, "steps": steps, "warmup": warmup, "device": str(dev),
        "gflops_per_image": flops / 1e9, "matmul_size": side, "matmul_peak_tflops": peaks,
        "machine": info, "results": rows,
    }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
        say(f"written to {json_path}")
    return report


HEADER = (f"{'mode':<5} {'precision':<11} {'img/s':>9} {'batch ms':>10} {'bs1 ms':>8} {'peak MiB':>9} "
          f"{'GFLOP/img':>9} {'TFLOP/s':>8} {'of peak':>7}")


def format_row(r: dict[str, Any]) -> str:
    prec = f"{r['precision']} (auto)" if "auto" in r["requested"].split(",") else r["precision"]
    b1 = f"{r['batch1_ms']:.1f}" if r["batch1_ms"] is not None else "-"
    return (f"{r['mode']:<5} {prec:<11} {r['images_per_s']:>9.1f} {r['batch_ms']:>10.1f} {b1:>8} "
            f"{r['peak_mem_mib']:>9.0f} {r['gflops_per_image_step']:>9.3f} {r['tflops']:>8.3f} "
            f"{r['fraction_of_peak']:>7.0%}")
