"""Device and precision behind one small adapter, so the training loop does not branch on them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..run import resolve_device


def has_depthwise_conv(model: nn.Module) -> bool:
    """True for models with grouped convolutions (CvT's depthwise projections)."""
    return any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX-512 BF16 or AMX)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def auto_precision(device: torch.device | str, model: nn.Module | None = None) -> str:
    """`--precision auto`: bf16 on GPUs that support it and on CPUs with bf16 instructions, else fp32. Per training
    step on a 2-core AVX-512-bf16 CPU (docs/recipes.md), bf16 ran 1.3-1.9x as fast as fp32 for every ViT and Swin
    from 0.3M to 22M parameters (`layers.attention`), but 0.7x for CvT: depthwise-conv models get fp32 on CPUs."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    slow_in_bf16 = model is not None and has_depthwise_conv(model)
    return "bf16" if device.type == "cpu" and cpu_has_bf16() and not slow_in_bf16 else "fp32"


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt parameters, from glibc's malloc.h
_allocator_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel; True if done.

    glibc serves each block above its mmap threshold (32 MB at most) with fresh pages and unmaps it on free:
    ~600,000 page faults and 1 s of system time per ViT-B/16 inference batch of 32 on the 2-core machine of
    docs/benchmark.md. With mmap off and no trimming, ViT-B/16 inference ran 1.10x and a ViT-S/16 training step
    (batch 64) 1.05-1.11x as fast (fp32), for a peak memory kept until exit (6.5% higher, 5.6 vs 5.2 GB, for
    ViT-S training), as PyTorch's CUDA allocator and jemalloc/tcmalloc set-ups do. Called by every CPU
    `Runtime`; `VITKIT_CPU_ALLOCATOR=system` (default `keep`) leaves glibc's defaults."""
    global _allocator_tuned
    choice = os.environ.get("VITKIT_CPU_ALLOCATOR", "keep")
    if choice not in ("keep", "system"):
        raise ValueError(f"VITKIT_CPU_ALLOCATOR must be keep or system, got {choice!r}")
    if _allocator_tuned is None:
        _allocator_tuned = False
        if choice == "keep" and sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                _allocator_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
            except (OSError, AttributeError):
                pass
    return _allocator_tuned


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as set by torchrun; (0, 1, 0) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


class Runtime:
    """Where tensors live, how the forward/backward pass runs, and how processes cooperate.

    Precision: `auto` is `auto_precision(device, model)`; `fp32` plain; `bf16` autocast (CPU with bf16
    instructions, or CUDA), no scaler needed (bf16 has fp32's exponent range); `fp16` CUDA autocast with a
    gradient scaler, which scales the loss so small gradients do not underflow and skips overflowed steps.
    `distributed=True` under torchrun: one process per device (cuda:LOCAL_RANK with nccl, or gloo on CPUs).
    """

    def __init__(self, device: str = "auto", precision: str = "fp32", model: nn.Module | None = None, *,
                 distributed: bool = False) -> None:
        self.rank, self.world_size, local_rank = torchrun_env() if distributed else (0, 1, 0)
        self.device = resolve_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        if precision == "auto":
            precision = auto_precision(self.device, model)
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device (CPU autocast is bf16); use --precision bf16 or fp32")
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model for training steps: DistributedDataParallel across processes, else itself."""
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def to(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=self.device.type == "cuda") for t in tensors)

    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on the micro-batches of an accumulation that are not its last."""
        return model.no_sync() if skip and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float | None) -> None:
        """Optional gradient-norm clipping (on unscaled gradients), optimizer step, zero the gradients."""
        if self.scaler is not None and clip_grad:
            self.scaler.unscale_(optimizer)
        if clip_grad:
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all processes (float64 on the CPU/GPU the group uses)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
