"""The harness of the comparison scripts in this folder: interleaved timing rounds, and steps that
run in a process of their own, so that each library is measured as its users run it.

Scripts here import it as `from harness import ...` (Python puts the script's folder on the path).
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import os
import time
import traceback
from typing import Any, Callable

from vitkit.benchmark import Step, _no_sync, time_calls


def interleaved(steps: dict[str, Step], batch: int, *, warmup: int = 2, rounds: int = 5, target_s: float = 0.25,
                slow_rounds: int = 3, sync: Callable[[], None] = _no_sync) -> dict[str, list[float]]:
    """Images/s of each step in each of several interleaved rounds (the method of bench_models.py).

    Each step is warmed up (`warmup` calls, cut short once a call takes longer than `target_s`:
    it has then paid its one-off costs - kernel selection, allocator growth, optimizer state).
    Then every round runs each step the same number of times, sized so that a round of the slowest
    step lasts about `target_s`; steps slower than that get one call per round and at most
    `slow_rounds` rounds. The order alternates (A B C, C B A, ...), so a machine that speeds up or
    slows down during the run does not favour one side. Take the median over rounds.
    """
    last: dict[str, float] = {}
    for name, step in steps.items():
        for _ in range(warmup):
            last[name] = time_calls(step, 1, sync)[0]
            if last[name] > target_s:
                break
    iters = max(1, round(target_s / max(last.values()))) if last and target_s > 0 else 1
    n_rounds = rounds if iters > 1 else min(rounds, slow_rounds)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(max(1, n_rounds)):
        for name in names if r % 2 == 0 else names[::-1]:
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                steps[name]()
            sync()
            rates[name].append(iters * batch / (time.perf_counter() - t0))
    return rates


TARGETS = (90.0, 92.0, 93.0, 94.0)  # Fashion-MNIST's: the published 2-conv CNN is at 91.6%, ResNet-18 at 94.9%


def run_curve(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A vitkit run's `metrics.jsonl` rows as a curve: per epoch, the summed epoch time (training and
    evaluation, `time_s`) so far and the better of its raw and EMA validation top-1."""
    curve, elapsed = [], 0.0
    for row in rows:
        elapsed += row["time_s"]
        curve.append({"epoch": row["epoch"] + 1, "cum_s": round(elapsed, 2), "acc1_raw": row["val_acc1"],
                      "acc1_ema": row.get("val_acc1_ema"), "acc1": max(row["val_acc1"], row.get("val_acc1_ema") or 0.0)})
    return curve


def time_to_targets(curve: list[dict[str, Any]], budget_s: float = math.inf,
                    targets: tuple[float, ...] = TARGETS) -> dict[str, float | None]:
    """Seconds (`cum_s`) at the first point of the curve whose `acc1` reaches each target within the budget;
    None for a target not reached."""
    out: dict[str, float | None] = {}
    for t in targets:
        hit = next((r for r in curve if r["acc1"] >= t and r["cum_s"] <= budget_s), None)
        out[f"{t:g}"] = None if hit is None else hit["cum_s"]
    return out


def _step_worker(conn: Any, script: str, builder: str, args: tuple, env: dict[str, str]) -> None:
    """Body of a `process_steps` worker: build the steps, then run them on request until told to stop."""
    try:
        os.environ.update(env)
        spec = importlib.util.spec_from_file_location("_vitkit_bench_script", script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        steps = getattr(module, builder)(*args)
        conn.send(("ready", list(steps)))
    except Exception:  # the parent raises it with the worker's traceback
        conn.send(("error", traceback.format_exc()))
        return
    while (name := conn.recv()) is not None:
        try:
            steps[name]()
            conn.send("done")
        except Exception:
            conn.send(traceback.format_exc())


class ProcessSteps:
    """Steps that live in a process of their own (see `process_steps`); call `close()` when done."""

    def __init__(self, script: str, builder: str, args: tuple = (), env: dict[str, str] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_step_worker, args=(child, script, builder, args, env or {}), daemon=True)
        self._proc.start()
        try:
            status, payload = self._conn.recv()
        except EOFError:
            status, payload = "error", f"the worker process exited with code {self._proc.exitcode}"
        if status == "error":
            self._proc.join()
            raise RuntimeError(f"building the steps of {builder} in a worker process failed:\n{payload}")
        self.names: list[str] = payload

    def step(self, name: str) -> Step:
        def run() -> None:
            self._conn.send(name)
            if (reply := self._conn.recv()) != "done":
                raise RuntimeError(f"step {name!r} failed in its worker process:\n{reply}")

        return run

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.send(None)
            self._proc.join(timeout=30)


def process_steps(script: str, builder: str, *args: Any, env: dict[str, str] | None = None) -> ProcessSteps:
    """Build the steps `script.builder(*args)` returns (a dict name -> step) in a new process.

    What for: comparing libraries as their users run them. A process's state - the C allocator's
    settings, oneDNN/MKL caches, whatever a library sets up when imported - then belongs to one
    library only. `env` is set in the worker before `script` is loaded. Calling a step runs it
    in the worker and waits for it; the round trip (~0.1 ms) is negligible next to a model step.
    Only one worker computes at a time, so they do not compete for the cores.
    """
    return ProcessSteps(script, builder, args, env)
