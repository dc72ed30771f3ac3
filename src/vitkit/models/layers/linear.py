"""Fully connected layers whose fp32 CPU matrix products can run on oneDNN instead of MKL.

Why: torch computes an fp32 `F.linear` on the CPU with MKL's sgemm, which picks its code path by
CPU vendor: on AMD processors a generic one (`MKL_VERBOSE=1` names "Intel(R) Architecture
processors", not AVX-512). oneDNN, which torch already uses for bf16 products and convolutions,
picks by instruction set: on a 2-core AVX-512 AMD EPYC (torch 2.14.1) its fp32 products of ViT
shapes ran 8-20% faster (MKL 170-198 GFLOP/s, oneDNN 200-226), and it can apply GELU while it
writes the output, saving the MLP a pass over its widest activation. The op,
`torch.ops.mkldnn._linear_pointwise`, is the one torch's compiler (inductor) emits for CPU linears.

When: as `use_onednn` says; the backend is `"onednn"` by default on x86 CPUs that are not Intel's,
where the measurement was made (`VITKIT_CPU_LINEAR=onednn|torch` or `set_cpu_linear` choose).
Tracing, scripting, compiling and exporting see `F.linear`, so exported graphs hold only standard
ops. Results equal `F.linear`'s up to fp32 rounding (the libraries sum in different orders, ~1e-6).

Training: the forward product and the input gradient use oneDNN; the weight gradient, a long
reduction over all tokens, stays with MKL, which was the faster of the two for that shape here.
"""

from __future__ import annotations

import functools
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn

from .helpers import cpuinfo

BACKENDS = ("auto", "onednn", "torch")
_choice = os.environ.get("VITKIT_CPU_LINEAR", "auto")


@functools.cache
def _onednn_works() -> bool:
    """The op exists in this torch build and agrees with `F.linear` on a small product."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 24), (12, 24), (12,)))
        with torch.no_grad():
            ok = torch.allclose(op(x, w, b, "none", [], ""), F.linear(x, w, b), atol=1e-5)
            ok = ok and torch.allclose(op(x, w, b, "gelu", [], "none"), F.gelu(F.linear(x, w, b)), atol=1e-5)
        return bool(ok)
    except (RuntimeError, TypeError):
        return False


@functools.cache
def _resolve(choice: str) -> str:
    if choice not in BACKENDS:
        raise ValueError(f"VITKIT_CPU_LINEAR / set_cpu_linear must be one of {', '.join(BACKENDS)}, got {choice!r}")
    if choice == "torch":
        return "torch"
    # auto: only where the vendor is known and is not Intel (where the measurement was made).
    if choice == "auto" and (platform.machine().lower() not in ("x86_64", "amd64")
                             or cpuinfo("vendor_id") in ("", "GenuineIntel")):
        return "torch"
    return "onednn" if _onednn_works() else "torch"


def cpu_linear_backend() -> str:
    """`"onednn"` or `"torch"`: what fp32 linear layers on the CPU use in this process."""
    return _resolve(_choice)


def set_cpu_linear(choice: str) -> str:
    """Choose `auto`, `onednn` or `torch` for this process; returns the previous choice."""
    global _choice
    _resolve(choice)  # validates
    previous, _choice = _choice, choice
    return previous


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when the product `x @ weight.T` takes oneDNN (see the module docstring)."""
    return (
        type(x) is torch.Tensor  # not a fake, functional or traced tensor
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling())
        and not torch.is_autocast_enabled("cpu")
        and cpu_linear_backend() == "onednn"
    )


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str = "none") -> torch.Tensor:
    # attr "gelu" with algorithm "none" is the exact (erf) GELU, as nn.GELU() computes it.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], "none" if act == "gelu" else "")


class _OneDNNLinear(torch.autograd.Function):
    """`x @ weight.T + bias` with oneDNN forward and input gradient, MKL weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _pointwise(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _pointwise(grad, weight.t(), None)  # grad @ weight
        flat = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = flat.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat.sum(0)
        return grad_x, grad_w, grad_b


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, through oneDNN where `use_onednn` says so."""
    if not use_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _pointwise(x, weight, bias)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`gelu(F.linear(x, weight, bias))` in one oneDNN pass when no gradient is needed; None otherwise
    (the caller then runs the two steps: training needs the pre-activation for GELU's backward)."""
    if torch.is_grad_enabled() or not use_onednn(x, weight):
        return None
    return _pointwise(x, weight, bias, "gelu")


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, names and initialisation) whose product goes through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
