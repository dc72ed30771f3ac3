"""Device and precision behind one small adapter, so the training loop does not branch on them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..models.contract import transformer_block_names
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
    `distributed=True` under torchrun: one process per device (cuda:LOCAL_RANK with nccl, or gloo on CPUs), the
    model replicated (DistributedDataParallel) or, with `fsdp=True`, sharded (FSDP2's `fully_shard`, `shard`).
    """

    def __init__(self, device: str = "auto", precision: str = "fp32", model: nn.Module | None = None, *,
                 distributed: bool = False, fsdp: bool = False) -> None:
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
        # One process has nothing to shard; the same command (or a resumed FSDP run) trains unsharded there.
        self.fsdp = fsdp and self.world_size > 1
        if fsdp and not self.fsdp:
            warnings.warn("--fsdp: one process holds the whole model anyway, training unsharded "
                          "(torchrun --nproc-per-node N shards it over N processes)")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model for training steps: itself sharded in place under FSDP (so build its optimizer after this),
        DistributedDataParallel across processes, else itself. Under FSDP the model's `model_methods` (an
        objective's evaluation) gather its shards as `forward` does, and every process must call them."""
        if self.fsdp:
            from torch.distributed.fsdp import register_fsdp_forward_method

            self.shard(model)
            for name in getattr(model, "model_methods", ()):
                register_fsdp_forward_method(model, name)
            return model
        if self.world_size == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shard(self, model: nn.Module) -> nn.Module:
        """Under FSDP, `model` sharded in place over the processes (else as it is): each transformer block is
        one unit, gathered just before it runs and freed after, the rest (embeddings, head, an objective's
        decoder) one unit at the root. `wrap` shards the model it trains, the loop the EMA copy alike (each
        parameter splits along its first dimension however it is grouped, so the EMA's shards line up with
        the model's and the average is a local update).

        bf16 stays autocast over fp32 shards rather than FSDP's `MixedPrecisionPolicy(param_dtype=bf16)`:
        the same numbers as DDP and one process, the fp32 final evaluation and fp32 losses stay fp32, for
        gathers and gradient reductions in fp32 (twice the bytes of bf16)."""
        if not self.fsdp:
            return model
        from torch.distributed.fsdp import fully_shard  # imported when used: 0.5 s of every run's start otherwise

        for name in transformer_block_names(model):
            fully_shard(model.get_submodule(name))
        # The root too frees its weights after each forward (FSDP would keep them for the backward): between
        # steps every parameter is only its shard, which is what the EMA swap and the checkpoint read.
        fully_shard(model, reshard_after_forward=True)
        return model

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def to(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.to(self.device, non_blocking=self.device.type == "cuda") for t in tensors)

    def no_sync(self, model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on the micro-batches of an accumulation that are not its last. FSDP
        reduce-scatters every micro-batch instead: skipping would hold whole unsharded gradients meanwhile."""
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

    def full_state(self, state: Any) -> Any:
        """`state` (a state dict, an optimizer's, nested dicts and lists) as a checkpoint saves it: under FSDP each
        sharded tensor gathered whole, on the CPU of the main process (None on the others, which only take part);
        unchanged otherwise. Every process must call it, in the same order."""
        if not self.fsdp:
            return state
        from torch.distributed.tensor import DTensor

        if isinstance(state, DTensor):
            whole = state.full_tensor()
            return whole.cpu() if self.is_main else None
        if isinstance(state, dict):
            return {k: self.full_state(v) for k, v in state.items()}
        if isinstance(state, (list, tuple)):
            return type(state)(self.full_state(v) for v in state)
        return state

    def load_state(self, target: nn.Module | torch.optim.Optimizer, state: dict) -> None:
        """`target.load_state_dict(state)` from a checkpoint's whole tensors, each cut to this process's shard
        of the parameter it belongs to under FSDP (every process has read the checkpoint: no communication)."""
        if not self.fsdp:
            target.load_state_dict(state)
        elif isinstance(target, nn.Module):
            own = target.state_dict()
            target.load_state_dict({k: _shard_like(v, own.get(k)) for k, v in state.items()})
        else:
            target.load_state_dict(state)  # the moments come back whole: cut them as their parameters are
            for p, moments in target.state.items():
                for k, v in moments.items():
                    if k != "step":
                        moments[k] = _shard_like(v, p)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


def _shard_like(value: Any, like: Any) -> Any:
    """`value`, a whole tensor, as the shard this process holds of `like` (a DTensor); other values unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(value, DTensor):
        return value
    return distribute_tensor(value.to(like.device), like.device_mesh, like.placements, src_data_rank=None)
