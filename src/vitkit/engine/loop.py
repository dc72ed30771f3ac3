"""The training loop: `train_one_epoch`, `evaluate` and `train`, which ties them to a run directory."""

from __future__ import annotations

import math
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import load_data, make_loader
from ..models import create_model, get_model_entry, model_config
from . import rundir
from .config import TrainConfig
from .optim import create_optimizer, set_lr, warmup_cosine
from .runtime import Runtime


def classification_loss(outputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in fp32; a model with several heads (DeiT) trains each on the labels, averaged.

    With a teacher, the distillation objective replaces the second term (see the distillation issue).
    """
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(F.cross_entropy(o.float(), targets, label_smoothing=label_smoothing) for o in outs) / len(outs)


def _logits(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum(outputs) / len(outputs) if isinstance(outputs, tuple) else outputs


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    *,
    lr_at: Callable[[int], float],
    first_step: int,
    cfg: TrainConfig,
    nonfinite_before: int = 0,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over `loader`. A step whose loss is NaN/inf is skipped while the run's count stays
    within `cfg.skip_nonfinite`; past that the run stops with the step number."""
    model.train()
    total_loss, correct, seen, nonfinite, t0 = 0.0, 0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None)
    for i, (x, y) in enumerate(bar):
        x, y = runtime.to(x, y)
        set_lr(optimizer, lr_at(first_step + i))
        with runtime.autocast():
            out = model(x)
        loss = classification_loss(out, y, cfg.label_smoothing)
        if not math.isfinite(loss.item()):
            nonfinite += 1
            if nonfinite_before + nonfinite > cfg.skip_nonfinite:
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {first_step + i} (epoch {first_step // len(loader) + 1}); the last "
                    f"checkpoint is intact. Likely causes: a learning rate too high (--lr), fp16 overflow (use "
                    f"--precision bf16 or fp32), or bad inputs. --skip-nonfinite N tolerates a few such steps"
                )
            warnings.warn(f"skipping step {first_step + i}: loss is {loss.item()}")
            continue
        runtime.backward_step(loss, model, optimizer, cfg.clip_grad)
        n = y.shape[0]
        total_loss += loss.item() * n
        correct += (_logits(out).argmax(-1) == y).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                        ips=f"{seen / (time.perf_counter() - t0):.0f}")
    elapsed = time.perf_counter() - t0
    seen_ = max(seen, 1)
    return {"train_loss": total_loss / seen_, "train_acc1": 100 * correct / seen_, "images_per_s": seen / elapsed,
            "nonfinite_steps": nonfinite}


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, *, return_outputs: bool = False) -> dict[str, Any]:
    """Loss, top-1 and top-5 (%) over a loader; optionally the logits and targets too."""
    model.eval()
    logits, targets = [], []
    for x, y in loader:
        x, y = runtime.to(x, y)
        with runtime.autocast():
            out = model(x)
        logits.append(_logits(out).float().cpu())
        targets.append(y.cpu())
    logits, targets = torch.cat(logits), torch.cat(targets)
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    result: dict[str, Any] = {
        "loss": F.cross_entropy(logits, targets).item(),
        "acc1": 100 * (topk[:, 0] == targets).float().mean().item(),
        "acc5": 100 * (topk == targets[:, None]).any(dim=1).float().mean().item(),
        "n": len(targets),
    }
    if return_outputs:
        result.update(logits=logits, targets=targets)
    return result


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) a run and return its directory."""
    resume_state = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        cfg = TrainConfig(**{**rundir.read_config(run_dir)["train"], "resume": str(run_dir)})
        resume_state = rundir.load_resume_state(run_dir)
    # Fail on a bad model name, override or image size before any data is read.
    model_config(cfg.model, **cfg.model_args, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    runtime = Runtime(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, strict=cfg.strict)
    entry = get_model_entry(cfg.model)
    size = cfg.img_size or entry.config.img_size
    img_size = (size, size) if isinstance(size, int) else tuple(size)
    model_args = {**cfg.model_args, "num_classes": data.num_classes, "in_chans": data.in_chans, "img_size": img_size}
    model = create_model(cfg.model, pretrained=cfg.pretrained, **model_args).to(runtime.device)
    # Pretrained weights expect their own normalisation; from scratch, the data's statistics.
    mean, std = (entry.mean, entry.std) if cfg.pretrained and data.in_chans == len(entry.mean) else (data.mean, data.std)
    hflip = data.hflip if cfg.hflip is None else cfg.hflip
    common = dict(batch_size=cfg.batch_size, img_size=img_size, mean=mean, std=std, seed=cfg.seed, num_workers=cfg.num_workers)
    train_loader = make_loader(data.train, train=True, augment=cfg.augment, hflip=hflip, **common)
    val_loader = make_loader(data.val, train=False, **common)

    run_dir = Path(cfg.resume or cfg.out or f"runs/{cfg.model}-{Path(cfg.data).name}-{datetime.now():%Y%m%d-%H%M%S}")
    if resume_state is None:
        if (run_dir / rundir.CHECKPOINT).exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        rundir.save_config(run_dir, {
            "train": cfg.to_dict(),
            "model": {"name": cfg.model, "args": {**model_args, "img_size": list(img_size)}},
            "data": {"name": cfg.data, "classes": data.classes, "in_chans": data.in_chans, "img_size": list(img_size),
                     "mean": list(mean), "std": list(std), "mode": "L" if data.in_chans == 1 else "RGB"},
        })
    if data.skipped:
        rundir.atomic_write(run_dir / rundir.SKIPPED, "".join(f"{p}\t{why}\n" for p, why in data.skipped).encode())
        print(f"skipped {len(data.skipped)} damaged images or empty class folders (listed in {run_dir / rundir.SKIPPED})")

    optimizer = create_optimizer(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    lr_at = lambda step: warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)  # noqa: E731
    start_epoch, nonfinite = 0, 0
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"the checkpoint in {run_dir} does not fit the run's config: {e}") from e
        runtime.load_state_dict(resume_state["runtime"])
        torch.set_rng_state(resume_state["rng"])
        start_epoch, nonfinite = resume_state["epoch"] + 1, resume_state.get("nonfinite", 0)
        print(f"resuming {run_dir} at epoch {start_epoch + 1}/{cfg.epochs}")

    print(f"training {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {cfg.data}: "
          f"{len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
          f"{img_size[0]}x{img_size[1]} px, {runtime.device} {cfg.precision} -> {run_dir}")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(model, train_loader, optimizer, runtime, lr_at=lr_at, first_step=epoch * steps_per_epoch,
                                cfg=cfg, nonfinite_before=nonfinite, desc=f"epoch {epoch + 1}/{cfg.epochs}")
        nonfinite += stats["nonfinite_steps"]
        val = evaluate(model, val_loader, runtime)
        row = {"epoch": epoch, **stats, "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"],
               "lr": lr_at((epoch + 1) * steps_per_epoch - 1), "time_s": time.perf_counter() - t0}
        rows = rundir.append_metrics(run_dir, row, keep_epochs=epoch)
        rundir.save_weights(run_dir / rundir.WEIGHTS, model.state_dict(), {"model": cfg.model, "epoch": str(epoch)})
        rundir.save_checkpoint(run_dir / rundir.CHECKPOINT, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "runtime": runtime.state_dict(),
            "epoch": epoch, "rng": torch.get_rng_state(), "nonfinite": nonfinite,
        })
        rundir.plot_curves(run_dir, rows)
        print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats['train_loss']:.4f} acc {stats['train_acc1']:.2f}%  "
              f"val loss {val['loss']:.4f} acc1 {val['acc1']:.2f}% acc5 {val['acc5']:.2f}%  "
              f"{stats['images_per_s']:.0f} img/s  {row['time_s']:.1f}s", flush=True)
    return run_dir
