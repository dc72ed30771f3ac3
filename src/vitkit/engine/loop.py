"""The training loop: `train_one_epoch`, `evaluate` and `train`, which ties them to a run directory."""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from torch.optim.swa_utils import AveragedModel

from ..data import BatchMix, TensorSplit, load_data, make_loader, resolve_augment, subset_split
from ..models import create_model, get_model_entry, model_config
from . import rundir
from .config import DEFAULT_MODEL, TrainConfig
from .distill import DistillationLoss, load_teacher
from .ema import create_ema
from .optim import create_optimizer, set_lr, warmup_cosine
from .runtime import Runtime


def classification_loss(outputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in fp32; a model with several heads (DeiT) trains each on the labels, averaged.

    `targets` are class indices, or probability vectors after Mixup/CutMix (soft-target
    cross-entropy; label smoothing applies on top). With a teacher, the distillation objective
    replaces the second term (see the distillation issue).
    """
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(F.cross_entropy(o.float(), targets, label_smoothing=label_smoothing) for o in outs) / len(outs)


def _logits(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum(outputs) / len(outputs) if isinstance(outputs, tuple) else outputs


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Global-RNG seed of one epoch on one process: resume is exact without saving RNG state, and
    processes differ (drop path, per-image policies, Mixup) while sharing the data order."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


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
    mix: BatchMix | None = None,
    ema: AveragedModel | None = None,
    criterion: Callable[[torch.Tensor, Any, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass over `loader`; an optimizer step every `cfg.accum_steps` batches.

    `criterion(inputs, outputs, targets)` replaces the plain classification loss (distillation).

    `model` may be wrapped (DDP, torch.compile). A step whose loss is NaN/inf on any process is
    skipped while the run's count stays within `cfg.skip_nonfinite`; past that the run stops.
    """
    model.train()
    accum = cfg.accum_steps
    total_loss, correct, seen, nonfinite, t0 = 0.0, 0, 0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if runtime.is_main else True)
    optimizer.zero_grad(set_to_none=True)
    n_batches = len(loader) - len(loader) % accum  # a trailing partial accumulation is dropped
    for i, (x, y) in enumerate(bar):
        if i >= n_batches:
            break
        step, last_micro = first_step + i // accum, (i + 1) % accum == 0
        x, y = runtime.to(x, y)
        labels = y
        if mix is not None:
            x, y = mix(x, y)
        set_lr(optimizer, lr_at(step))
        with runtime.no_sync(model, skip=not last_micro), runtime.autocast():
            out = model(x)
            # The teacher (if any) runs here, in the same precision, on the same (mixed) images.
            loss = criterion(x, out, y) if criterion is not None else classification_loss(out, y, cfg.label_smoothing)
        bad = not math.isfinite(loss.item())
        if runtime.world_size > 1:  # every process must skip the same steps, or DDP waits forever
            bad = runtime.sum([float(bad)])[0] > 0
        if bad:
            nonfinite += 1
            if nonfinite_before + nonfinite > cfg.skip_nonfinite:
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {step} (epoch {first_step // max(1, n_batches // accum) + 1}); the last "
                    f"checkpoint is intact. Likely causes: a learning rate too high (--lr), fp16 overflow (use "
                    f"--precision bf16 or fp32), or bad inputs. --skip-nonfinite N tolerates a few such steps"
                )
            warnings.warn(f"skipping step {step}: loss is {loss.item()}")
            optimizer.zero_grad(set_to_none=True)
            continue
        runtime.backward(loss / accum)
        if last_micro:
            runtime.step(model, optimizer, cfg.clip_grad)
            if ema is not None:
                ema.update_parameters(_unwrap(model))
        n = labels.shape[0]
        total_loss += loss.item() * n
        correct += (_logits(out).argmax(-1) == labels).sum().item()
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{100 * correct / seen:.1f}",
                        ips=f"{seen / (time.perf_counter() - t0):.0f}")
    elapsed = time.perf_counter() - t0
    total_loss, correct, seen = runtime.sum([total_loss, correct, seen])
    seen_ = max(seen, 1)
    return {"train_loss": total_loss / seen_, "train_acc1": 100 * correct / seen_, "images_per_s": seen / elapsed,
            "nonfinite_steps": nonfinite}


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside torch.compile and DistributedDataParallel wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def tta_views(x: torch.Tensor, flip: bool = False, shift: int = 0) -> list[torch.Tensor]:
    """Test-time augmentation: the image, its mirror (`flip`) and, with `shift`, the four
    translations by that many pixels (edges replicated), and their mirrors. A model trained with
    translation is nearly but not exactly shift-invariant; averaging its logits over the views
    cancels part of that error (as in airbench's flip + translate TTA): +0.25 points on mnist5k,
    averaged over 13 runs (docs/recipes.md).
    """
    views = [x]
    if shift:
        s, (H, W) = shift, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        views += [padded[..., s + dy : s + dy + H, s + dx : s + dx + W] for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s))]
    return views + [v.flip(-1) for v in views] if flip else views


def tta_view_count(flip: bool, shift: int) -> int:
    """How many views `tta_views` makes: 1, 2 (mirror), 5 (shifts) or 10 (both)."""
    return (1 + 4 * bool(shift)) * (1 + bool(flip))


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, runtime: Runtime, *, tta_flip: bool = False, tta_shift: int = 0, return_outputs: bool = False,
    autocast: bool = True,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 (%) over a loader, summed over processes; optionally the logits and
    targets too (single process). With `tta_flip` / `tta_shift`, each image is scored on the
    average logits of its `tta_views`. `autocast=False` scores in fp32 whatever the runtime's precision.

    A DeiT model is scored on the average of its heads (its eval output), and each head's top-1 is
    reported too (`acc1_heads`: class head, distillation head).
    """
    model.eval()
    two_heads = getattr(model, "separate_heads", None) is not None and getattr(model, "head_dist", None) is not None
    logits, targets, heads = [], [], []

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = model(x)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else (out.float(),)

    if two_heads:
        model.separate_heads = True
    try:
        for x, y in loader:
            x, y = runtime.to(x, y)
            with runtime.autocast() if autocast else contextlib.nullcontext():
                views = [run(v) for v in tta_views(x, tta_flip, tta_shift)]
                outs = tuple(sum(o) / len(views) for o in zip(*views))
            logits.append((sum(outs) / len(outs)).cpu())
            heads.append([o.cpu() for o in outs])
            targets.append(y.cpu())
    finally:
        if two_heads:
            model.separate_heads = False
    logits, targets = torch.cat(logits), torch.cat(targets)
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    per_head = [(torch.cat(h).argmax(1) == targets).sum().item() for h in zip(*heads)] if two_heads else []
    loss_sum, c1, c5, n, *c_heads = runtime.sum([
        F.cross_entropy(logits, targets, reduction="sum").item(),
        (topk[:, 0] == targets).sum().item(),
        (topk == targets[:, None]).any(dim=1).sum().item(),
        len(targets),
        *per_head,
    ])
    result: dict[str, Any] = {"loss": loss_sum / n, "acc1": 100 * c1 / n, "acc5": 100 * c5 / n, "n": int(n)}
    if two_heads:
        result["acc1_heads"] = [100 * c / n for c in c_heads]
    if return_outputs:
        if runtime.world_size > 1:
            raise ValueError("return_outputs needs a single process")
        result.update(logits=logits, targets=targets)
    return result


def _resolve_model(cfg: TrainConfig) -> TrainConfig:
    """Fill in the model: the --pretrained run's (with its architecture overrides), else the default."""
    if cfg.model is not None:
        return cfg
    pre = Path(cfg.pretrained) if cfg.pretrained else None
    if pre is not None and (pre / rundir.CONFIG).exists():
        saved = rundir.read_config(pre)["model"]
        keep = {k: v for k, v in saved["args"].items() if k not in ("num_classes", "in_chans", "img_size")}
        return replace(cfg, model=saved["name"], model_args={**keep, **cfg.model_args})
    if pre is not None:
        raise ValueError(f"--pretrained {pre} is not a vitkit run directory, so --model must name the architecture")
    return replace(cfg, model=DEFAULT_MODEL)


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) a run and return its directory. Under torchrun, every process calls this;
    only the first writes the run directory."""
    resume_state = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        cfg = TrainConfig(**{**rundir.read_config(run_dir)["train"], "resume": str(run_dir)})
        resume_state = rundir.load_resume_state(run_dir)
    cfg = _resolve_model(cfg)
    # Fail on a bad model name, override or image size before any data is read.
    model_config(cfg.model, **cfg.model_args, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    data = load_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, strict=cfg.strict)
    if cfg.train_subset is not None:
        data = replace(data, train=subset_split(data.train, cfg.train_subset, cfg.seed))
    entry = get_model_entry(cfg.model)
    # A CNN takes any input size: in-memory data keeps its own (28 px digits are not upscaled to 224).
    native = data.native_size if entry.family == "cnn" else None
    size = cfg.img_size or native or entry.config.img_size
    img_size = (size, size) if isinstance(size, int) else tuple(size)
    model_args = {**cfg.model_args, "num_classes": data.num_classes, "in_chans": data.in_chans, "img_size": img_size}
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    model = create_model(cfg.model, pretrained=cfg.pretrained, **model_args)
    runtime = Runtime(cfg.device, cfg.precision, model, distributed=True)
    model.to(runtime.device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.linear_probe:  # only the classifier learns; the optimizer sees trainable parameters only
        heads = tuple(getattr(model, "head_prefixes", ("head.",)))
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(heads))
    mean, std = _normalization(cfg, entry, data)
    hflip = (data.hflip and cfg.augment != "none") if cfg.hflip is None else cfg.hflip
    spec = resolve_augment(cfg.augment, policy=cfg.auto_augment, random_erasing=cfg.random_erasing, mixup=cfg.mixup, cutmix=cfg.cutmix)
    # Test-time views are those training made the model invariant to: mirrors where it flips, and
    # one-pixel shifts where the in-memory loader translates. Each epoch is scored with the cheap
    # flip views only; the run's final evaluation (eval.json) uses all of them.
    translates = isinstance(data.train, TensorSplit) and spec.crop
    tta = (hflip or translates) if cfg.tta is None else cfg.tta
    tta_flip, tta_shift = tta and hflip, int(tta and translates)
    mix = BatchMix(data.num_classes, spec.mixup, spec.cutmix) if spec.mixup or spec.cutmix else None
    common = dict(batch_size=cfg.batch_size, img_size=img_size, mean=mean, std=std, seed=cfg.seed,
                  num_workers=cfg.num_workers, rank=runtime.rank, world_size=runtime.world_size)
    train_loader = make_loader(data.train, train=True, augment=spec, hflip=hflip, **common)
    val_loader = make_loader(data.val, train=False, **common)
    if len(train_loader) < cfg.accum_steps:
        raise ValueError(f"{len(data.train)} training images make {len(train_loader)} batches of {cfg.batch_size}"
                         f"{f' x {runtime.world_size} processes' if runtime.world_size > 1 else ''}: too few for "
                         f"accum_steps={cfg.accum_steps}; lower --batch-size or --accum-steps")

    criterion = None
    if cfg.teacher is not None:
        teacher = load_teacher(cfg.teacher, classes=data.classes, in_chans=data.in_chans, img_size=img_size,
                               student_norm=(mean, std), weights=cfg.teacher_weights).to(runtime.device)
        criterion = DistillationLoss(teacher, cfg.distill, cfg.alpha, cfg.tau, cfg.label_smoothing)
        if runtime.is_main:
            print(f"distilling from {cfg.teacher} ({cfg.distill}, alpha {cfg.alpha}"
                  f"{f', tau {cfg.tau}' if cfg.distill == 'soft' else ''})")

    name = cfg.model.replace(":", "_")
    run_dir = Path(cfg.resume or cfg.out or f"runs/{name}-{Path(cfg.data).name}-{datetime.now():%Y%m%d-%H%M%S}")
    if resume_state is None:
        if (run_dir / rundir.CHECKPOINT).exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
        if runtime.is_main:
            rundir.save_config(run_dir, {
                "train": {**cfg.to_dict(), "precision": runtime.precision, "hflip": hflip, "tta": tta},
                "eval": {"tta_flip": tta_flip, "tta_shift": tta_shift},  # the test-time views `vitkit eval` uses
                "model": {"name": cfg.model, "args": {**model_args, "img_size": list(img_size)}},
                "data": {"name": cfg.data, "classes": data.classes, "in_chans": data.in_chans, "img_size": list(img_size),
                         "mean": list(mean), "std": list(std), "mode": "L" if data.in_chans == 1 else "RGB"},
                "world_size": runtime.world_size,
            })
    if data.skipped and runtime.is_main:
        rundir.atomic_write(run_dir / rundir.SKIPPED, "".join(f"{p}\t{why}\n" for p, why in data.skipped).encode())
        print(f"skipped {len(data.skipped)} damaged images or empty class folders (listed in {run_dir / rundir.SKIPPED})")

    optimizer = create_optimizer(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
    ema = create_ema(model, cfg.ema) if cfg.ema else None
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    lr_at = lambda step: warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)  # noqa: E731
    start_epoch, nonfinite = 0, 0
    if resume_state is not None:
        try:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            if ema is not None:
                ema.load_state_dict(resume_state["ema"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"the checkpoint in {run_dir} does not fit the run's config: {e}") from e
        runtime.load_state_dict(resume_state["runtime"])
        start_epoch, nonfinite = resume_state["epoch"] + 1, resume_state.get("nonfinite", 0)
        if runtime.is_main:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}/{cfg.epochs}")

    train_model = runtime.wrap(model)
    if cfg.compile:
        train_model = torch.compile(train_model)
    if runtime.is_main:
        procs = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
        print(f"training {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on {cfg.data}: "
              f"{len(data.train)} train / {len(data.val)} val images, {data.num_classes} classes, "
              f"{img_size[0]}x{img_size[1]} px, {runtime.device}{procs} {runtime.precision} -> {run_dir}")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, runtime.rank))
        train_loader.set_epoch(epoch)
        stats = train_one_epoch(train_model, train_loader, optimizer, runtime, lr_at=lr_at, first_step=epoch * steps_per_epoch,
                                cfg=cfg, nonfinite_before=nonfinite, desc=f"epoch {epoch + 1}/{cfg.epochs}", mix=mix, ema=ema,
                                criterion=criterion)
        nonfinite += stats["nonfinite_steps"]
        val = evaluate(model, val_loader, runtime, tta_flip=tta_flip)
        row = {"epoch": epoch, **stats, "val_loss": val["loss"], "val_acc1": val["acc1"], "val_acc5": val["acc5"]}
        if "acc1_heads" in val:
            row["val_acc1_cls"], row["val_acc1_dist"] = val["acc1_heads"]
        if ema is not None:
            val_ema = evaluate(ema.module, val_loader, runtime, tta_flip=tta_flip)
            row.update(val_loss_ema=val_ema["loss"], val_acc1_ema=val_ema["acc1"], val_acc5_ema=val_ema["acc5"])
        row.update(lr=lr_at((epoch + 1) * steps_per_epoch - 1), time_s=time.perf_counter() - t0)
        if not runtime.is_main:
            continue
        rows = rundir.append_metrics(run_dir, row, keep_epochs=epoch)
        meta = {"model": cfg.model, "epoch": str(epoch)}
        rundir.save_weights(run_dir / rundir.WEIGHTS, model.state_dict(), meta)
        if ema is not None:
            rundir.save_weights(run_dir / rundir.EMA_WEIGHTS, ema.module.state_dict(), meta)
        rundir.save_checkpoint(run_dir / rundir.CHECKPOINT, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "runtime": runtime.state_dict(),
            "epoch": epoch, "rng": torch.get_rng_state(), "nonfinite": nonfinite,
            **({"ema": ema.state_dict()} if ema is not None else {}),
        })
        rundir.plot_curves(run_dir, rows)
        ema_note = f" (EMA {val_ema['acc1']:.2f}%)" if ema is not None else ""
        print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats['train_loss']:.4f} acc {stats['train_acc1']:.2f}%  "
              f"val loss {val['loss']:.4f} acc1 {val['acc1']:.2f}%{ema_note} acc5 {val['acc5']:.2f}%  "
              f"{stats['images_per_s']:.0f} img/s  {row['time_s']:.1f}s", flush=True)
    # The number `vitkit eval RUN` gives: the weights it loads (EMA when kept), every test-time view, fp32.
    final = evaluate(model if ema is None else ema.module, val_loader, runtime, tta_flip=tta_flip, tta_shift=tta_shift,
                     autocast=False)
    if runtime.is_main:
        weights = "raw" if ema is None else "ema"
        rundir.write_eval(run_dir, {"run": str(run_dir), "data": cfg.data, "weights": weights,
                                    "tta_views": tta_view_count(tta_flip, tta_shift), **final})
        print(f"final evaluation ({weights} weights, {_describe_tta(tta_flip, tta_shift)}): acc1 {final['acc1']:.2f}%  "
              f"acc5 {final['acc5']:.2f}%  loss {final['loss']:.4f} -> {run_dir / rundir.EVAL}", flush=True)
    runtime.barrier()
    runtime.close()
    return run_dir


def _describe_tta(flip: bool, shift: int) -> str:
    views = [n for n, on in (("flips", flip), (f"{shift} px shifts", shift)) if on]
    return f"test-time {' + '.join(views)}" if views else "no test-time augmentation"


def _normalization(cfg: TrainConfig, entry, data) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fine-tuning keeps the normalisation the weights were trained with (a vitkit run's own, or
    the registry's for foreign weights); from scratch, the data's statistics."""
    if cfg.pretrained:
        pre = Path(cfg.pretrained)
        if (pre / rundir.CONFIG).exists():
            d = rundir.read_config(pre)["data"]
            if len(d["mean"]) == data.in_chans:
                return tuple(d["mean"]), tuple(d["std"])
        elif data.in_chans == len(entry.mean):
            return tuple(entry.mean), tuple(entry.std)
    return tuple(data.mean), tuple(data.std)
