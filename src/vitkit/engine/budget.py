"""Training within a wall-clock budget (`--time-budget 10m`): time the first steps, then fix the run's length.

The plan replaces `--epochs` before the run starts, so the schedule (warmup + cosine) is laid over
the steps that fit, the final evaluation has its time set aside, and the plan is recorded in the
run's settings: `--resume` continues the same plan exactly, whatever the machine does later.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from .optim import create_optimizer

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*")
_UNIT_S = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
WARMUP_STEPS, TIMED_STEPS = 3, 8
SAFETY = 0.05  # of the budget, for what the estimate misses (checkpoint writes, a slower epoch)


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h' or a number of seconds -> seconds."""
    match = _DURATION.fullmatch(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"time_budget={text!r} is invalid: must be a positive duration such as 90s, 10m or 1.5h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def seconds_per_step(objective: torch.nn.Module, loader, runtime, cfg: Any) -> float:
    """Median wall time of one training step (batch loading included), measured on a copy of the
    objective with its own optimizer, so the run itself starts from its seeded weights."""
    probe = copy.deepcopy(objective).train()
    optimizer = create_optimizer(probe, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    times: list[float] = []
    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            x, y = runtime.to(x, y)
            with runtime.autocast():
                loss, _ = probe(x, y)
            runtime.backward(loss)
            runtime.step(probe, optimizer, cfg.clip_grad)
            loss.item()  # waits for the device
            if i >= WARMUP_STEPS:
                times.append(time.perf_counter() - t0)
            if len(times) == TIMED_STEPS:
                break
            t0 = time.perf_counter()
    return statistics.median(times) if times else time.perf_counter() - t0


def plan(cfg: Any, objective: torch.nn.Module, train_loader, val_loader, runtime, started: float,
         eval_views: int = 1) -> Any:
    """The config with the number of epochs that fits `cfg.time_budget` from `started` on (at least one).

    Per epoch: its training steps, and the validation passes (forward only, about a third of a
    step per batch; twice with EMA). At the end: the final evaluation over `eval_views` test-time
    views. The budget minus what set-up already took and a 5% margin is what the epochs may use.
    """
    budget = parse_duration(cfg.time_budget)
    step_s = seconds_per_step(objective, train_loader, runtime, cfg)
    forward_s = step_s / 3
    val_batches = len(val_loader) if val_loader is not None else 0
    epoch_s = len(train_loader) * step_s + val_batches * forward_s * (2 if cfg.ema else 1)
    final_s = val_batches * forward_s * eval_views
    left = budget * (1 - SAFETY) - (time.perf_counter() - started) - final_s
    epochs = max(1, math.floor(left / epoch_s))
    if runtime.is_main:
        print(f"time budget {cfg.time_budget}: {1000 * step_s:.1f} ms per step measured, {len(train_loader)} steps and "
              f"~{epoch_s:.1f} s per epoch -> {epochs} epochs (~{epochs * epoch_s + final_s:.0f} s with the final "
              f"evaluation; set-up took {time.perf_counter() - started:.0f} s)", flush=True)
    planned = replace(cfg, epochs=epochs)
    return replace(planned, warmup_epochs=planned.default_warmup() if cfg.warmup_epochs is None else min(cfg.warmup_epochs, epochs))
