"""The pre-training loop: `pretrain_one_epoch`, `evaluate_loss` and `pretrain`, which ties them to a
run directory the way `engine.loop.train` does (same run files, resume, precision and torchrun)."""

from __future__ import annotations

import math
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import make_loader, resolve_augment
from ..data.datasets import load_unlabeled
from ..engine import rundir
from ..engine.loop import epoch_seed
from ..engine.optim import create_optimizer, set_lr, warmup_cosine
from ..engine.runtime import Runtime
from ..models import create_model, get_model_entry, model_config
from .config import PretrainConfig
from .mae import MaskedAutoencoder
from .mim import BeitMIM
from .pictures import plot_loss, save_grid
from .tokenizer import build_kmeans_tokenizer, load_tokenizer

TOKENIZER = "tokenizer.safetensors"
PICTURES = {"mae": "mae_reconstructions.png", "beit": "beit_masks.png"}  # the latest; pictures/ keeps each epoch's
NUM_PICTURES = 8
METHOD_NAMES = {"mae": "MAE", "beit": "BEiT"}


def pretrain_one_epoch(
    objective: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    *,
    lr_at: Callable[[int], float],
    first_step: int,
    clip_grad: float | None,
    desc: str = "pretrain",
) -> dict[str, float]:
    """One pass over `loader` (labels ignored); `objective` may be wrapped in DDP."""
    objective.train()
    total, seen, t0 = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None if runtime.is_main else True)
    for i, (x, _) in enumerate(bar):
        step = first_step + i
        (x,) = runtime.to(x)
        set_lr(optimizer, lr_at(step))
        with runtime.autocast():
            loss = objective(x).loss
        bad = not math.isfinite(loss.item())
        if runtime.world_size > 1:  # every process must stop together, or DDP waits forever
            bad = runtime.sum([float(bad)])[0] > 0
        if bad:
            raise FloatingPointError(f"pre-training loss is {loss.item()} at step {step}; the last checkpoint is intact. "
                                     f"Lower --lr, or use --precision fp32")
        runtime.backward_step(loss, objective, optimizer, clip_grad)
        total += loss.item() * x.shape[0]
        seen += x.shape[0]
        bar.set_postfix(loss=f"{total / seen:.4f}", ips=f"{seen / (time.perf_counter() - t0):.0f}")
    elapsed = time.perf_counter() - t0
    total, seen = runtime.sum([total, seen])
    return {"train_loss": total / max(seen, 1), "images_per_s": seen / elapsed}


@torch.no_grad()
def evaluate_loss(objective: nn.Module, loader, runtime: Runtime, *, seed: int) -> float:
    """The objective's mean loss over `loader` with masks drawn from `seed`: the same masks every
    epoch, so the numbers compare across epochs."""
    objective.eval()
    total, seen = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x, _ in loader:
            (x,) = runtime.to(x)
            grid = (x.shape[-2] // objective.patch[0], x.shape[-1] // objective.patch[1])
            mask = objective.masking(x.shape[0], grid, "cpu").to(runtime.device)
            with runtime.autocast():
                total += objective(x, mask).loss.item() * x.shape[0]
            seen += x.shape[0]
    total, seen = runtime.sum([total, seen])
    return total / seen if seen else float("nan")


def _pixels_for_tokenizer(data, cfg: PretrainConfig, img_size, mean, std) -> torch.Tensor:
    """Up to `cfg.tokenizer_images` training images `(M, C, H, W)` in [0, 1], unaugmented."""
    loader = make_loader(data.train, train=False, batch_size=256, img_size=img_size, mean=mean, std=std,
                         num_workers=cfg.num_workers)
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    chunks, n = [], 0
    for x, _ in loader:
        chunks.append(x * s + m)
        n += x.shape[0]
        if n >= cfg.tokenizer_images:
            break
    return torch.cat(chunks)[: cfg.tokenizer_images]


def _tokenizer(cfg: PretrainConfig, data, img_size, patch, run_dir: Path, *, resuming: bool, save: bool):
    """BEiT's tokenizer: a file, the run's own k-means codebook when resuming, else a new one
    (every process builds the same from the same images and seed; the main one saves it)."""
    if cfg.tokenizer != "kmeans":
        return load_tokenizer(cfg.tokenizer, cfg.vocab_size)
    if resuming:
        return load_tokenizer(run_dir / TOKENIZER)
    pixels = _pixels_for_tokenizer(data, cfg, img_size, data.mean, data.std)
    tokenizer = build_kmeans_tokenizer(pixels, patch, tuple(data.mean), tuple(data.std), vocab_size=cfg.vocab_size,
                                       seed=cfg.seed)
    if save:
        tokenizer.save(run_dir / TOKENIZER)
    return tokenizer


def build_objective(cfg: PretrainConfig, encoder: nn.Module, tokenizer, mean, std) -> nn.Module:
    if cfg.method == "mae":
        # Half the encoder's width (MAE: 512 for ViT-L), at least 64; a multiple of 4 per head for the sin-cos positions.
        unit = 4 * cfg.decoder_heads
        decoder_dim = cfg.decoder_dim or max(64, encoder.num_features // 2 // unit * unit)
        return MaskedAutoencoder(encoder, mask_ratio=cfg.mask_ratio, decoder_dim=decoder_dim,
                                 decoder_depth=cfg.decoder_depth, decoder_heads=cfg.decoder_heads,
                                 norm_pix_loss=cfg.norm_pix_loss)
    return BeitMIM(encoder, tokenizer, mean=mean, std=std, mask_ratio=cfg.mask_ratio)


def pretrain(cfg: PretrainConfig) -> Path:
    """Pre-train (or resume) a self-supervised run and return its directory. Its `model.safetensors`
    holds the encoder in the classifier's names, so `vitkit train --pretrained RUN` fine-tunes it.
    Under torchrun every process calls this; only the first writes the run directory."""
    resume_state = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        cfg = PretrainConfig(**{**rundir.read_config(run_dir)["pretrain"], "resume": str(run_dir)})
        resume_state = rundir.load_resume_state(run_dir)
    family = get_model_entry(cfg.model).family
    if (cfg.method == "beit") != (family == "beit") or family not in ("vit", "deit", "hybrid", "beit"):
        want = "a BEiT model (beit_*)" if cfg.method == "beit" else "a ViT-family model (vit_*, deit_*, hybrids)"
        raise ValueError(f"--method {cfg.method} needs {want}; {cfg.model} is a {family} model")
    # The classifier has no head while pre-training (num_classes 0); BEiT needs its [MASK] embedding.
    extra = {"use_mask_token": True} if cfg.method == "beit" else {}
    model_config(cfg.model, **cfg.model_args, **extra, **({"img_size": cfg.img_size} if cfg.img_size else {}))
    data = load_unlabeled(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction, strict=cfg.strict)
    size = cfg.img_size or get_model_entry(cfg.model).config.img_size
    img_size = (size, size) if isinstance(size, int) else tuple(size)
    model_args = {**cfg.model_args, "num_classes": 0, "in_chans": data.in_chans, "img_size": img_size}
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    encoder = create_model(cfg.model, **model_args, **extra)
    runtime = Runtime(cfg.device, cfg.precision, encoder, distributed=True)
    mean, std = tuple(data.mean), tuple(data.std)

    name = f"pretrain-{cfg.method}-{cfg.model.replace(':', '_')}-{Path(cfg.data).name}"
    run_dir = Path(cfg.resume or cfg.out or f"runs/{name}-{datetime.now():%Y%m%d-%H%M%S}")
    if resume_state is None and (run_dir / rundir.CHECKPOINT).exists():
        raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
    tokenizer = None
    if cfg.method == "beit":
        tokenizer = _tokenizer(cfg, data, img_size, encoder.patch_embed.reduction, run_dir,
                               resuming=resume_state is not None, save=runtime.is_main)
    objective = build_objective(cfg, encoder, tokenizer, mean, std).to(runtime.device)

    common = dict(batch_size=cfg.batch_size, img_size=img_size, mean=mean, std=std, seed=cfg.seed,
                  num_workers=cfg.num_workers, rank=runtime.rank, world_size=runtime.world_size)
    hflip = data.hflip and cfg.augment != "none"
    train_loader = make_loader(data.train, train=True, augment=resolve_augment(cfg.augment), hflip=hflip, **common)
    val_loader = make_loader(data.val, train=False, **common) if len(data.val) else None
    if len(train_loader) == 0:
        raise ValueError(f"{len(data.train)} training images make no batch of {cfg.batch_size}; lower --batch-size")
    # The pictures show the same images and masks every epoch (main process only).
    sample_split = data.val if len(data.val) else data.train
    samples = next(iter(make_loader(sample_split, train=False, **{**common, "rank": 0, "world_size": 1})))[0][:NUM_PICTURES]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        grid = (img_size[0] // objective.patch[0], img_size[1] // objective.patch[1])
        sample_mask = objective.masking(samples.shape[0], grid, "cpu")

    if resume_state is None and runtime.is_main:
        keep = {k: v for k, v in model_args.items() if k != "use_mask_token"}  # a classifier has no [MASK]
        rundir.save_config(run_dir, {
            "pretrain": {**cfg.to_dict(), "precision": runtime.precision},
            "model": {"name": cfg.model, "args": {**keep, "img_size": list(img_size)}},
            "data": {"name": cfg.data, "classes": [], "in_chans": data.in_chans, "img_size": list(img_size),
                     "mean": list(mean), "std": list(std), "mode": "L" if data.in_chans == 1 else "RGB"},
            "world_size": runtime.world_size,
        })
    if data.skipped and runtime.is_main:
        rundir.atomic_write(run_dir / rundir.SKIPPED, "".join(f"{p}\t{why}\n" for p, why in data.skipped).encode())

    optimizer = create_optimizer(objective, cfg.lr, cfg.weight_decay)
    steps_per_epoch = len(train_loader)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    lr_at = lambda step: warmup_cosine(step, total, warmup, cfg.lr, cfg.min_lr)  # noqa: E731
    start_epoch = 0
    if resume_state is not None:
        try:
            objective.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ValueError(f"the checkpoint in {run_dir} does not fit the run's config: {e}") from e
        runtime.load_state_dict(resume_state["runtime"])
        start_epoch = resume_state["epoch"] + 1
        if runtime.is_main:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}/{cfg.epochs}")

    train_objective = runtime.wrap(objective)
    if runtime.is_main:
        procs = f" x {runtime.world_size} processes" if runtime.world_size > 1 else ""
        print(f"pre-training {cfg.model} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M params) with "
              f"{METHOD_NAMES[cfg.method]} (mask ratio {cfg.mask_ratio}) on {cfg.data}: {len(data.train)} train / "
              f"{len(data.val)} val images, no labels, {img_size[0]}x{img_size[1]} px, {runtime.device}{procs} "
              f"{runtime.precision} -> {run_dir}")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch, runtime.rank))
        train_loader.set_epoch(epoch)
        stats = pretrain_one_epoch(train_objective, train_loader, optimizer, runtime, lr_at=lr_at,
                                   first_step=epoch * steps_per_epoch, clip_grad=cfg.clip_grad,
                                   desc=f"epoch {epoch + 1}/{cfg.epochs}")
        row = {"epoch": epoch, **stats}
        if val_loader is not None:
            row["val_loss"] = evaluate_loss(objective, val_loader, runtime, seed=cfg.seed)
        row.update(lr=lr_at((epoch + 1) * steps_per_epoch - 1), time_s=time.perf_counter() - t0)
        if not runtime.is_main:
            continue
        rows = rundir.append_metrics(run_dir, row, keep_epochs=epoch)
        rundir.save_weights(run_dir / rundir.WEIGHTS, objective.encoder_state_dict(),
                            {"model": cfg.model, "epoch": str(epoch), "pretrain": cfg.method})
        rundir.save_checkpoint(run_dir / rundir.CHECKPOINT, {
            "model": objective.state_dict(), "optimizer": optimizer.state_dict(), "runtime": runtime.state_dict(),
            "epoch": epoch, "rng": torch.get_rng_state(),
        })
        plot_loss(run_dir, rows)
        picture = run_dir / PICTURES[cfg.method]
        save_grid(objective, samples.to(runtime.device), sample_mask.to(runtime.device),
                  torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1), picture)
        rundir.atomic_write(run_dir / "pictures" / f"{picture.stem}_epoch{epoch + 1:03d}.png", picture.read_bytes())
        val = f"  val loss {row['val_loss']:.4f}" if "val_loss" in row else ""
        print(f"epoch {epoch + 1}/{cfg.epochs}  train loss {stats['train_loss']:.4f}{val}  "
              f"{stats['images_per_s']:.0f} img/s  {row['time_s']:.1f}s", flush=True)
    runtime.barrier()
    runtime.close()
    return run_dir
