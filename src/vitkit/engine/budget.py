"""Training within a wall-clock budget (`--time-budget 10m`): time the first steps, then fix the run's length.

The plan replaces `--epochs` before the run starts, so the schedule (warmup + cosine) covers the steps that fit,
the final evaluation has its time set aside, and the run's settings record the plan `--resume` continues exactly.
A shared machine's speed drifts (on the 2-core CPU the docs were measured on, one run's epochs took 74-98 s), so
after every epoch the plan is checked against the clock: when the epochs left would end past the budget, the run
is shortened and the rest of its cosine laid over the epochs that fit (`replan`), and the record follows.
"""

from __future__ import annotations

import copy
import itertools
import math
import re
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from .ema import create_ema
from .optim import create_optimizer

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*")
_UNIT_S = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
WARMUP_STEPS, MIN_TIMED, MAX_TIMED = 5, 10, 60
PROBE_SHARE = 0.03  # of the budget at most, for timing (beyond MIN_TIMED steps)
SAFETY = 0.05  # of the budget, for what the estimate misses (checkpoint writes, a slower epoch)


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h' or a number of seconds -> seconds."""
    match = _DURATION.fullmatch(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"time_budget={text!r} is invalid: must be a positive duration such as 90s, 10m or 1.5h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def time_steps(objective: torch.nn.Module, train_loader, val_loader, runtime, cfg: Any, budget: float) -> tuple[float, float]:
    """(median seconds per training step, loading and EMA update included; seconds per evaluation batch), on a
    copy of the objective with its own optimizer, so the run starts from its seeded weights. The first steps run
    faster than the steady state (28 against 40 ms per step for the default model), so 10 to 60 are timed."""
    probe = copy.deepcopy(objective).train()
    optimizer = create_optimizer(probe, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    ema = create_ema(probe.model, cfg.ema) if cfg.ema else None
    times: list[float] = []
    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        t0 = start = time.perf_counter()
        for i, (x, y) in enumerate(train_loader):
            x, y = runtime.to(x, y)
            with runtime.autocast():
                loss, _ = probe(x, y)
            runtime.backward(loss)
            runtime.step(probe, optimizer, cfg.clip_grad)
            if ema is not None:
                ema.update_parameters(probe.model)
            loss.item()  # waits for the device
            if i >= WARMUP_STEPS:
                times.append(time.perf_counter() - t0)
            spent = time.perf_counter() - start
            if len(times) >= MAX_TIMED or (len(times) >= MIN_TIMED and spent > PROBE_SHARE * budget):
                break
            t0 = time.perf_counter()
    return statistics.median(times), _eval_batch_s(probe, val_loader, runtime)


@torch.no_grad()
def _eval_batch_s(probe: torch.nn.Module, val_loader, runtime, batches: int = 4) -> float:
    if val_loader is None:
        return 0.0
    probe.eval()
    times = []
    for x, _ in itertools.islice(val_loader, batches):
        t0 = time.perf_counter()
        with runtime.autocast():
            probe.model(runtime.to(x)[0]).float().sum().item()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times)


@dataclass
class Deadline:
    """When a budgeted run must end (`time.perf_counter()` seconds) and what its final evaluation takes."""

    at: float
    final_s: float


def plan(cfg: Any, objective: torch.nn.Module, train_loader, val_loader, runtime, started: float,
         views: tuple[int, int] = (1, 1)) -> tuple[Any, Deadline]:
    """The config with the number of epochs (at least one) that fits `cfg.time_budget` from `started` on, and the
    run's deadline: each epoch trains and validates over `views[0]` test-time views (twice with EMA), the final
    evaluation takes `views[1]`; the epochs may use the budget less set-up, timing and a 5% margin."""
    budget = parse_duration(cfg.time_budget)
    step_s, forward_s = time_steps(objective, train_loader, val_loader, runtime, cfg, budget)
    val_batches = len(val_loader) if val_loader is not None else 0
    epoch_s = len(train_loader) * step_s + val_batches * forward_s * views[0] * (2 if cfg.ema else 1)
    final_s = val_batches * forward_s * views[1]
    left = budget * (1 - SAFETY) - (time.perf_counter() - started) - final_s
    epochs = max(1, math.floor(left / epoch_s))
    if runtime.is_main:
        print(f"time budget {cfg.time_budget}: {1000 * step_s:.1f} ms per step measured, {len(train_loader)} steps and "
              f"~{epoch_s:.1f} s per epoch -> {epochs} epochs (~{epochs * epoch_s + final_s:.0f} s with the final "
              f"evaluation; set-up took {time.perf_counter() - started:.0f} s)", flush=True)
    planned = replace(cfg, epochs=epochs)
    planned = replace(planned, warmup_epochs=planned.default_warmup() if cfg.warmup_epochs is None else min(cfg.warmup_epochs, epochs))
    return planned, Deadline(started + budget, final_s)


def replan(deadline: Deadline, epochs: int, done: int, epoch_s: float, now: float | None = None) -> int:
    """The number of epochs the run can still have after `done` of its `epochs` planned, each taking `epoch_s`
    (as measured so far, saving included): unchanged while they end by the deadline, else the most that do (at
    least `done`: then the run ends now). Never more than planned, so a faster spell does not lengthen it."""
    left = deadline.at - (time.perf_counter() if now is None else now) - deadline.final_s
    if (epochs - done) * epoch_s <= left:
        return epochs
    return max(done, min(epochs, done + math.floor(left / epoch_s)))
