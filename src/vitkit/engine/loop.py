"""The one training loop: `fit` runs any objective (classify, distill, mae, beit) with the same engine.

`fit` sets a run up (`setup`), then alternates `train_one_epoch` and the objective's evaluation, saving the run
directory every epoch; accumulation, EMA, compile, skipping non-finite steps, torchrun and resume are shared."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from ..card import describe_hardware, write_card
from ..convert import HUB_ID, open_pretrained, read_checkpoint, resolve_source
from ..data import SkipLog, TensorSplit, load_data, make_loader, resolve_augment, subset_split
from ..data.datasets import load_unlabeled
from ..data.streams import is_stream
from ..models import create_model, get_model_entry, model_config
from ..run import (CHECKPOINT, CONFIG, CURVES, EMA_WEIGHTS, EVAL, SKIPPED, WEIGHTS, RunRecord, append_metrics, atomic_write,
                   load_resume_state, save_checkpoint, save_weights, write_eval)
from .config import DEFAULT_MODEL, FitConfig, PretrainConfig, TrainConfig, config_from_dict
from . import budget
from .ema import create_ema, ema_weights
from .evaluate import tta_view_count
from .objectives import Context, Objective, objective_class
from .optim import create_optimizer, set_lr, warmup_cosine
from .report import _png, _pyplot
from .runtime import Runtime


MIN_DATA_SIZE = 16  # tinier images (sklearn's 8 px digits) are upscaled: a patch-4 ViT needs a few tokens per side


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Global-RNG seed of one epoch on one process: resume is exact without saving RNG state, and
    processes differ (drop path, per-image policies, Mixup, masks) while sharing the data order."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % 2**63


@dataclass
class Session:
    """A run being trained: everything `fit` sets up once, then uses every epoch."""

    cfg: FitConfig
    run_dir: Path
    runtime: Runtime
    objective: Objective
    train_model: nn.Module  # the objective as training steps run it (DDP, or itself sharded by FSDP)
    train_loader: Any
    val_loader: Any
    optimizer: torch.optim.Optimizer | None  # None when the objective does not train (k-NN)
    ema: AveragedModel | None
    lr_at: Callable[[int], float]
    steps_per_epoch: int
    total_steps: int
    start_epoch: int = 0
    nonfinite: int = 0
    deadline: budget.Deadline | None = None  # a new run with a time budget: checked after every epoch


def train_one_epoch(s: Session, epoch: int, train_model: nn.Module) -> dict[str, float]:
    """One pass over the loader, an optimizer step every `accum_steps` batches, of the objective `train_model`
    (maybe wrapped: DDP, torch.compile; or sharded in place by FSDP). A step with a NaN/inf loss on any process
    is skipped while the run's count stays within `skip_nonfinite`; past that the run stops, the last checkpoint
    intact."""
    cfg, runtime, optimizer = s.cfg, s.runtime, s.optimizer
    train_model.train()
    accum, first_step = cfg.accum_steps, epoch * s.steps_per_epoch
    sums: dict[str, float] = {}
    seen, skipped, t0 = 0, 0, time.perf_counter()
    bar = tqdm(s.train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True,
               disable=None if runtime.is_main else True)
    optimizer.zero_grad(set_to_none=True)
    n_batches = min(s.steps_per_epoch, s.total_steps - first_step) * accum  # a trailing partial accumulation is dropped
    for i, (x, y) in enumerate(bar):
        if i >= n_batches:
            break
        step, last_micro = first_step + i // accum, (i + 1) % accum == 0
        x, y = runtime.to(x, y)
        set_lr(optimizer, s.lr_at(step))
        with runtime.no_sync(train_model, skip=not last_micro), runtime.autocast():
            loss, logs = train_model(x, y)
        if _nonfinite(loss, runtime):
            skipped += 1
            _skip_or_stop(loss, step, epoch, s.nonfinite + skipped, cfg.skip_nonfinite)
            optimizer.zero_grad(set_to_none=True)
            continue
        runtime.backward(loss / accum)
        if last_micro:
            runtime.step(train_model, optimizer, cfg.clip_grad)
            if s.ema is not None:
                s.ema.update_parameters(s.objective.model)
        n = x.shape[0]
        for k, v in {"train_loss": loss.detach(), **logs}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        seen += n
        bar.set_postfix({k.removeprefix("train_"): f"{v / seen:.3f}" for k, v in sums.items()}
                        | {"ips": f"{seen / (time.perf_counter() - t0):.0f}"})
    elapsed = time.perf_counter() - t0
    *totals, seen_all = runtime.sum([*sums.values(), seen])
    stats = {k: v / max(seen_all, 1) for k, v in zip(sums, totals)}
    return {**stats, "images_per_s": seen_all / elapsed, "train_images": int(seen_all), "nonfinite_steps": skipped}


def _nonfinite(loss: torch.Tensor, runtime: Runtime) -> bool:
    bad = not math.isfinite(loss.item())
    if runtime.world_size > 1:  # every process must skip the same steps, or DDP waits forever
        bad = runtime.sum([float(bad)])[0] > 0
    return bad


def _skip_or_stop(loss: torch.Tensor, step: int, epoch: int, count: int, allowed: int) -> None:
    if count > allowed:
        raise FloatingPointError(
            f"loss is {loss.item()} at step {step} (epoch {epoch + 1}); the last checkpoint is intact. Likely causes: "
            f"a learning rate too high (--lr), fp16 overflow (use --precision bf16 or fp32), or bad inputs. "
            f"--skip-nonfinite N tolerates a few such steps"
        )
    warnings.warn(f"skipping step {step}: loss is {loss.item()}")


def fit(cfg: FitConfig) -> Path:
    """Train or resume a run and return its directory (under torchrun every process calls it, the first writes)."""
    s = setup(cfg)
    train_model = torch.compile(s.train_model) if s.cfg.compile else s.train_model
    first = last = time.perf_counter()
    for epoch in range(s.start_epoch, s.cfg.epochs if s.objective.trains else 0):
        if s.deadline is not None and epoch > s.start_epoch:  # the mean epoch so far, or the last if slower
            now = time.perf_counter()
            _replan(s, epoch, max((now - first) / (epoch - s.start_epoch), now - last))
        if epoch >= s.cfg.epochs:
            break
        t0 = last = time.perf_counter()
        torch.manual_seed(epoch_seed(s.cfg.seed, epoch, s.runtime.rank))
        s.train_loader.set_epoch(epoch)
        stats = train_one_epoch(s, epoch, train_model)
        s.nonfinite += stats["nonfinite_steps"]
        row = {"epoch": epoch, **stats, **_validate(s)}
        row.update(lr=s.lr_at((epoch + 1) * s.steps_per_epoch - 1), time_s=time.perf_counter() - t0)
        _save_epoch(s, epoch, row)
    _finish(s)
    return s.run_dir


def _replan(s: Session, done: int, epoch_s: float) -> None:
    """Shorten a budgeted run whose epochs have been slower than planned, its cosine re-laid over the epochs that
    fit from the next step on; the run record is rewritten, so `--resume` follows the new plan. Every process
    takes the main process's decision (their clocks differ)."""
    epochs = budget.replan(s.deadline, s.cfg.epochs, done, epoch_s) if s.runtime.is_main else 0
    epochs = round(s.runtime.sum([epochs])[0])  # the main process's value on every process
    if epochs == s.cfg.epochs:
        return
    if s.runtime.is_main:
        print(f"time budget {s.cfg.time_budget}: epochs take {epoch_s:.1f} s, slower than planned; the run ends after "
              f"{epochs} epochs instead of {s.cfg.epochs}{', now' if epochs == done else ', its schedule re-laid over them'}",
              flush=True)
        RunRecord.update_settings(s.run_dir, epochs=epochs)
    s.cfg = replace(s.cfg, epochs=epochs)
    s.lr_at, s.total_steps = _schedule(s.cfg, s.steps_per_epoch)


def _validate(s: Session) -> dict[str, float]:
    """The objective's validation metrics, of the raw weights and (suffixed `_ema`) of the EMA weights."""
    if s.val_loader is None:
        return {}
    row = s.objective.evaluate(s.val_loader, s.runtime)
    if s.ema is not None:
        with ema_weights(s.objective.model, s.ema):
            row.update({f"{k}_ema": v for k, v in s.objective.evaluate(s.val_loader, s.runtime).items()})
    return row


def _save_epoch(s: Session, epoch: int, row: dict[str, Any]) -> None:
    """Metrics, weights, checkpoint, curves and the objective's own files, then one line of progress. Every process
    calls it: under FSDP the weights are gathered from all of them (and the objective's pictures drawn by all);
    the main process writes."""
    full = s.runtime.full_state
    weights = full(s.objective.backbone_state())
    averaged = full(s.objective.backbone_state(s.ema.module)) if s.ema is not None else None
    checkpoint = full({
        "objective": s.objective.state_dict(), "optimizer": s.optimizer.state_dict(), "runtime": s.runtime.state_dict(),
        "epoch": epoch, "nonfinite": s.nonfinite, **({"ema": s.ema.state_dict()} if s.ema is not None else {}),
    })
    s.objective.on_epoch_end(s.run_dir, epoch, s.runtime)
    if not s.runtime.is_main:
        return
    rows = append_metrics(s.run_dir, row, keep_epochs=epoch)
    meta = {"model": s.cfg.model, "epoch": str(epoch), "objective": s.objective.name}
    save_weights(s.run_dir / WEIGHTS, weights, meta)
    if averaged is not None:
        save_weights(s.run_dir / EMA_WEIGHTS, averaged, meta)
    save_checkpoint(s.run_dir / CHECKPOINT, checkpoint)
    plot_curves(s.run_dir, rows)
    print(f"epoch {epoch + 1}/{s.cfg.epochs}  {epoch_summary(row)}", flush=True)


def _finish(s: Session) -> None:
    """The objective's closing evaluation (EMA weights when kept), written to eval.json; then the processes part."""
    with ema_weights(s.objective.model, s.ema):
        final = s.objective.final_evaluation(s.val_loader, s.runtime) if s.val_loader is not None else None
    if final is not None and s.runtime.is_main:
        weights = "raw" if s.ema is None else "ema"
        write_eval(s.run_dir, {"run": str(s.run_dir), "data": s.cfg.data, "weights": weights, **final})
        print(f"final evaluation, {weights} weights: {s.objective.describe(final)} -> {s.run_dir / EVAL}", flush=True)
    if s.runtime.is_main:
        if not s.objective.trains:  # the backbone as it came (k-NN): what the card counts, and `vitkit embed` reads
            meta = {"model": s.cfg.model, "objective": s.objective.name}
            save_weights(s.run_dir / WEIGHTS, s.objective.backbone_state(), meta)
        write_card(s.run_dir)
    s.runtime.barrier()
    s.runtime.close()


_SUMMARY = [("train_loss", "train loss {:.4f}"), ("train_acc1", "acc {:.2f}%"), ("val_loss", " val loss {:.4f}"),
            ("val_acc1", "acc1 {:.2f}%"), ("val_acc1_ema", "(EMA {:.2f}%)"), ("val_loss_ema", "(EMA loss {:.4f})"),
            ("val_acc5", "acc5 {:.2f}%"), ("images_per_s", " {:.0f} img/s"), ("time_s", "{:.1f}s")]


def epoch_summary(row: dict[str, Any]) -> str:
    """One line of an epoch's metrics: whichever of the known ones the objective logged."""
    skip = "val_loss_ema" if "val_acc1_ema" in row else None
    return " ".join(fmt.format(row[k]) for k, fmt in _SUMMARY if k in row and k != skip)


def plot_curves(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Loss per epoch (train, validation, EMA) and, for classifiers, accuracy, as `curves.png`."""
    panels = [("loss", ("train_loss", "val_loss", "val_loss_ema"))]
    if "val_acc1" in rows[-1] or "train_acc1" in rows[-1]:
        panels.append(("top-1 (%)", ("train_acc1", "val_acc1", "val_acc1_ema")))
    ep = [r["epoch"] + 1 for r in rows]
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            if all(k in r for r in rows):
                label = ("train" if k.startswith("train") else "val") + (" (EMA)" if k.endswith("_ema") else "")
                ax.plot(ep, [r[k] for r in rows], label=label)
        ax.set(xlabel="epoch", ylabel=title, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(run_dir / CURVES, _png(fig, bbox_inches=None))


# -- setting a run up ------------------------------------------------------------------------------
def setup(cfg: FitConfig) -> Session:
    """Resolve the config, read the data, build the model and its objective, write the run record
    (a new run) or restore the checkpoint (`--resume`); with a time budget, plan the run's length."""
    started = time.perf_counter()
    cfg, resume_state = _resumed(cfg)
    kind = objective_class(cfg.objective_name)
    cfg = _resolve_model(cfg)
    _check_model(cfg, kind)
    data = _load(cfg, kind)
    model, img_size, model_args = _build_model(cfg, kind, data)
    runtime = Runtime(cfg.device, cfg.precision, model, distributed=True, fsdp=cfg.fsdp)
    model.to(runtime.device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    mean, std = _normalization(cfg, get_model_entry(cfg.model), data)
    hflip = (data.hflip and cfg.augment != "none") if cfg.hflip is None else cfg.hflip
    spec = resolve_augment(cfg.augment, **kind.augment_overrides(cfg))
    tta = _tta(cfg, kind, hflip, isinstance(data.train, TensorSplit) and spec.crop)
    run_dir = _run_dir(cfg, resume_state is not None)
    # Damaged files are met as the loaders read them: every process appends what it meets to the run's list.
    skips = SkipLog(run_dir / SKIPPED, strict=cfg.strict)
    loader_args = dict(batch_size=cfg.batch_size, img_size=img_size, mean=mean, std=std, seed=cfg.seed,
                       num_workers=cfg.num_workers, rank=runtime.rank, world_size=runtime.world_size, skips=skips,
                       pin_memory=runtime.device.type == "cuda", shuffle_buffer=cfg.shuffle_buffer)
    train_loader = make_loader(data.train, train=True, augment=spec, hflip=hflip, **loader_args)
    val_loader = make_loader(data.val, train=False, **loader_args) if len(data.val) or is_stream(data.val) else None
    if runtime.fsdp and is_stream(data.val):  # a sharded forward needs every process: no rank may run an extra batch
        raise ValueError("--fsdp cannot evaluate a streamed validation split (wds:, streamed hf:): its processes may "
                         "read different numbers of batches; drop --fsdp for this data")
    if len(train_loader) < cfg.accum_steps:
        raise ValueError(f"{len(data.train)} training images make {len(train_loader)} batches of {cfg.batch_size}"
                         f"{f' x {runtime.world_size} processes' if runtime.world_size > 1 else ''}: too few for "
                         f"accum_steps={cfg.accum_steps}; lower --batch-size or --accum-steps")
    if cfg.steps is not None and resume_state is None:  # the epochs that hold the steps, the last one cut short
        run_epochs = cfg.steps * cfg.accum_steps / len(train_loader)  # warmup: at most half the run
        cfg = replace(cfg, epochs=max(1, math.ceil(run_epochs)), warmup_epochs=min(cfg.warmup_epochs, run_epochs / 2))
    ctx = Context(cfg, data, runtime, img_size, mean, std, tta, run_dir, resume_state is not None, loader_args)
    objective = kind.build(model, ctx).to(runtime.device)
    deadline = None
    if cfg.time_budget and resume_state is None:  # a resumed run keeps the plan its record holds
        cfg, deadline = budget.plan(cfg, objective, train_loader, val_loader, runtime, started,
                                    (1 + tta[0], tta_view_count(*tta)))
        ctx.cfg = cfg
    if resume_state is None and runtime.is_main:
        _record(ctx, kind, model_args, hflip).write(run_dir)
    if data.skipped and runtime.is_main:  # what listing the folder left out (empty class folders)
        for p, why in data.skipped:
            skips.add(p, why, warn=False)
        print(f"skipped {len(data.skipped)} empty class folders (listed in {run_dir / SKIPPED})")
    s = _session(cfg, run_dir, runtime, objective, train_loader, val_loader)
    s.deadline = deadline
    if resume_state is not None:
        _restore(s, resume_state)
    _announce(s, data, img_size)
    return s


def _resumed(cfg: FitConfig) -> tuple[FitConfig, dict | None]:
    """With `resume`: the run's own config and its latest readable checkpoint."""
    if not cfg.resume:
        return cfg, None
    run_dir = Path(cfg.resume)
    return replace(config_from_dict(RunRecord.read(run_dir).settings), resume=str(run_dir)), load_resume_state(run_dir)


def _resolve_model(cfg: FitConfig) -> FitConfig:
    """Fill in the model: the --pretrained run's (with its architecture overrides), else the default."""
    if cfg.model is not None:
        return cfg
    pre = Path(cfg.pretrained) if cfg.pretrained else None
    if pre is None:
        return replace(cfg, model=DEFAULT_MODEL)
    if not pre.exists() and not HUB_ID.fullmatch(str(pre).removeprefix("hf-hub:")):
        raise ValueError(f"--pretrained {pre} does not exist, so --model must name the architecture")
    # A vitkit run, a Hugging Face directory or hub id and a JAX .npz name their architecture; timm files do not.
    ckpt = read_checkpoint(resolve_source(pre))
    if ckpt.name is None:
        raise ValueError(f"--pretrained {pre} does not name its architecture, so --model must name it")
    keep = {k: v for k, v in ckpt.overrides.items() if k not in ("num_classes", "in_chans", "img_size")}
    return replace(cfg, model=ckpt.name, model_args={**keep, **cfg.model_args})


def _check_model(cfg: FitConfig, kind: type[Objective]) -> None:
    """Fail on a bad model, override, image size or backbone before any data is read (built on the meta device)."""
    size = {"img_size": cfg.img_size} if cfg.img_size else {}
    model_config(cfg.model, **cfg.model_args, **size)
    if kind.requires is not None:
        with torch.device("meta"):
            kind.check_backbone(create_model(cfg.model, **cfg.model_args, **size), cfg.model)
    model_config(cfg.model, **cfg.model_args, **kind.build_args, **size)


def _load(cfg: FitConfig, kind: type[Objective]):
    if not kind.labels:
        return load_unlabeled(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, strict=cfg.strict)
    data = load_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, strict=cfg.strict,
                     image_key=cfg.image_key, label_key=cfg.label_key, train_num_samples=cfg.train_num_samples)
    subset = getattr(cfg, "train_subset", None)
    return replace(data, train=subset_split(data.train, subset, cfg.seed)) if subset is not None else data


def _build_model(cfg: FitConfig, kind: type[Objective], data) -> tuple[nn.Module, tuple[int, int], dict[str, Any]]:
    """The backbone (pretrained weights loaded), its input size and the arguments the record keeps."""
    size = cfg.img_size or _data_size(cfg, data)
    img_size = (size, size) if isinstance(size, int) else tuple(size)
    num_classes = data.num_classes if kind.classifier else 0
    model_args = {**cfg.model_args, "num_classes": num_classes, "in_chans": data.in_chans, "img_size": img_size}
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    if not cfg.pretrained:
        return create_model(cfg.model, **model_args, **kind.build_args), img_size, model_args
    model, ckpt = open_pretrained(cfg.pretrained, cfg.model, **model_args)
    if kind.classifier and ckpt.classes and ckpt.classes != data.classes and len(ckpt.classes) == num_classes:
        # A head of the right size for other classes (Fashion-MNIST's ten for the ten digits) would start the
        # new task from the old one's answers: a fresh classifier, as for a different number of classes.
        warnings.warn(f"--pretrained {cfg.pretrained} classifies {', '.join(ckpt.classes[:3])}, ..., not this data's "
                      f"{', '.join(data.classes[:3])}, ...: re-initialising the classifier")
        model.reset_classifier(num_classes)
    if kind.build_args:  # what the objective adds to the backbone (BEiT's [MASK] embedding) starts fresh
        loaded, model = model, create_model(cfg.model, **model_args, **kind.build_args)
        model.load_state_dict(loaded.state_dict(), strict=False)  # `loaded` is the same model less those parameters
    return model, img_size, model_args


def _data_size(cfg: FitConfig, data) -> int | tuple[int, int]:
    """Without --img-size: the model's default, or the data's own size when smaller (32 px photos train at 32 px,
    not 224), at least `MIN_DATA_SIZE` and rounded up to a size the model takes; said in one line."""
    default = get_model_entry(cfg.model).config.img_size
    side = default if isinstance(default, int) else max(default)
    if data.native_size is None or max(data.native_size) >= side:
        return default
    for s in range(max(MIN_DATA_SIZE, max(data.native_size)), side):
        try:
            model_config(cfg.model, **cfg.model_args, img_size=s)
        except ValueError:
            continue
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"image size {s} px: the training images are at most {max(data.native_size)} px, smaller than "
                  f"{cfg.model}'s default {side} px (--img-size overrides)")
        return s
    return default


def _tta(cfg: FitConfig, kind: type[Objective], hflip: bool, translates: bool) -> tuple[bool, int]:
    """Classifiers' test-time views: mirrors where training flips, one-pixel shifts where the loader translates."""
    if not kind.classifier:
        return False, 0
    tta = (hflip or translates) if getattr(cfg, "tta", None) is None else cfg.tta
    return tta and hflip, int(tta and translates)


def _run_dir(cfg: FitConfig, resuming: bool) -> Path:
    name = cfg.model.replace(":", "_")
    prefix = f"pretrain-{cfg.objective_name}-" if isinstance(cfg, PretrainConfig) else ""
    run_dir = Path(cfg.resume or cfg.out or f"runs/{prefix}{name}-{Path(cfg.data).name}-{datetime.now():%Y%m%d-%H%M%S}")
    if not resuming and (run_dir / CHECKPOINT).exists():
        raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    return run_dir


def _record(ctx: Context, kind: type[Objective], model_args: dict[str, Any], hflip: bool) -> RunRecord:
    cfg, data = ctx.cfg, ctx.data
    settings = {**cfg.to_dict(), "model": cfg.model, "precision": ctx.runtime.precision, "hflip": hflip}
    tta = bool(ctx.tta[0] or ctx.tta[1]) if getattr(cfg, "tta", None) is None else bool(cfg.tta)
    if isinstance(cfg, TrainConfig):
        settings["tta"] = tta
    return RunRecord(
        model=cfg.model, model_args={**model_args, "img_size": list(ctx.img_size)}, img_size=ctx.img_size,
        in_chans=data.in_chans, mean=ctx.mean, std=ctx.std, classes=data.classes if kind.classifier else [],
        objective=kind.name, settings=settings, data=cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction,
        precision=ctx.runtime.precision, ema=cfg.ema is not None, tta=tta and kind.classifier,
        tta_flip=ctx.tta[0], tta_shift=ctx.tta[1], world_size=ctx.runtime.world_size,
        hardware=describe_hardware(ctx.runtime.device, ctx.runtime.world_size),
    )


def _session(cfg: FitConfig, run_dir: Path, runtime: Runtime, objective: Objective, train_loader, val_loader) -> Session:
    """The model as training runs it, its EMA, optimizer and learning-rate schedule over the run's optimizer steps."""
    ema = create_ema(objective.model, cfg.ema) if cfg.ema and objective.trains else None  # copied while whole
    train_model = runtime.wrap(objective)
    if ema is not None:
        runtime.shard(ema.module)
    # After `wrap`: FSDP replaces the parameters with their shards, which are what the optimizer must hold.
    optimizer = create_optimizer(objective, cfg.lr, cfg.weight_decay, cfg.layer_decay) if objective.trains else None
    steps_per_epoch = len(train_loader) // cfg.accum_steps
    lr_at, total = _schedule(cfg, steps_per_epoch)
    return Session(cfg, run_dir, runtime, objective, train_model, train_loader, val_loader, optimizer, ema, lr_at,
                   steps_per_epoch, total)


def _schedule(cfg: FitConfig, steps_per_epoch: int) -> tuple[Callable[[int], float], int]:
    """The learning rate at each optimizer step (warmup, then cosine to the run's last step), and that number."""
    total, warmup = cfg.steps or cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    return (lambda step: warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)), total


def _restore(s: Session, state: dict[str, Any]) -> None:
    try:
        s.runtime.load_state(s.objective, state["objective"])
        s.runtime.load_state(s.optimizer, state["optimizer"])
        if s.ema is not None:
            s.runtime.load_state(s.ema, state["ema"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"the checkpoint in {s.run_dir} does not fit the run's config: {e}") from e
    s.runtime.load_state_dict(state["runtime"])
    s.start_epoch, s.nonfinite = state["epoch"] + 1, state.get("nonfinite", 0)
    if s.runtime.is_main:
        print(f"resuming {s.run_dir} at epoch {s.start_epoch + 1}/{s.cfg.epochs}")


def _announce(s: Session, data, img_size: tuple[int, int]) -> None:
    if not s.runtime.is_main:
        return
    rt, cfg = s.runtime, s.cfg
    procs = f" x {rt.world_size} processes" if rt.world_size > 1 else ""
    labels = f"{data.num_classes} classes" if s.objective.labels else "no labels"
    params = sum(p.numel() for p in s.objective.model.parameters()) / 1e6
    print(f"{s.objective.title} {cfg.model} ({params:.2f}M params) on {cfg.data}: {len(data.train)} train / "
          f"{len(data.val) or 'streamed'} val images, {labels}, {img_size[0]}x{img_size[1]} px, {rt.device}{procs} {rt.precision} "
          f"-> {s.run_dir}")


def _normalization(cfg: FitConfig, entry, data) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Fine-tuning keeps the normalisation the weights were trained with (a vitkit run's own, or the
    registry's for foreign weights); from scratch, the data's statistics."""
    if cfg.pretrained:
        pre = Path(cfg.pretrained)
        if (pre / CONFIG).exists():
            rec = RunRecord.read(pre)
            if len(rec.mean) == data.in_chans:
                return rec.mean, rec.std
        elif data.in_chans == len(entry.mean):
            return tuple(entry.mean), tuple(entry.std)
    return tuple(data.mean), tuple(data.std)


def train(cfg: TrainConfig) -> Path:
    """`vitkit train`: a classifier (distilled from `cfg.distill.teacher` when given)."""
    return fit(cfg)


def pretrain(cfg: PretrainConfig) -> Path:
    """`vitkit pretrain` (`cfg.method`: mae, beit); model.safetensors holds the backbone for `train --pretrained`."""
    return fit(cfg)
