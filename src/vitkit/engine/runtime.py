"""Device and precision behind one small adapter, so the training loop does not branch on them."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class Runtime:
    """Where tensors live and how the forward/backward pass runs.

    - `fp32`: plain.
    - `bf16`: autocast to bfloat16 (CPU with bf16 instructions, or CUDA); no scaler is needed
      because bf16 has fp32's exponent range.
    - `fp16`: CUDA autocast with a gradient scaler, which multiplies the loss so small gradients
      do not underflow, and skips steps whose gradients overflowed.
    """

    def __init__(self, device: str = "auto", precision: str = "fp32") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for, but CUDA is not available")
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 needs a CUDA device (CPU autocast is bf16); use --precision bf16 or fp32")
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def to(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        non_blocking = self.device.type == "cuda"
        return tuple(t.to(self.device, non_blocking=non_blocking) for t in tensors)

    def backward_step(
        self, loss: torch.Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float | None
    ) -> None:
        """Backward, optional gradient-norm clipping (on unscaled gradients), optimizer step."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if clip_grad:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
