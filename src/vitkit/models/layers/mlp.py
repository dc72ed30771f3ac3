"""The transformer's position-wise feed-forward network."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .linear import Linear, linear_gelu


class QuickGELU(nn.Module):
    """`x * sigmoid(1.702 x)`: the GELU approximation OpenAI's CLIP was trained with (its weights need it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GELUTanh(nn.GELU):
    """GELU's tanh approximation: what the SigLIP release computes (transformers' `gelu_pytorch_tanh`)."""

    def __init__(self) -> None:
        super().__init__(approximate="tanh")


ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "gelu_tanh": GELUTanh, "quick_gelu": QuickGELU,
                                           "silu": nn.SiLU}


class Mlp(nn.Module):
    """Linear -> activation -> dropout -> linear -> dropout; names follow timm (`fc1`, `fc2`)."""

    def __init__(
        self, in_features: int, hidden_features: int | None = None, out_features: int | None = None, *,
        act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fuse_gelu():
            # Inference on the CPU: fc1 and the exact GELU in one oneDNN pass (layers.linear).
            h = linear_gelu(x, self.fc1.weight, self.fc1.bias)
            if h is not None:
                return self.drop2(self.fc2(h))
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def _fuse_gelu(self) -> bool:
        # Only when nothing else would see fc1's output: no hooks, no active dropout, exact GELU.
        return (
            type(self.act) is nn.GELU
            and self.act.approximate == "none"
            and not (self.training and self.drop1.p > 0)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in (self.fc1, self.act))
        )


class GluMlp(nn.Module):
    """Gated linear unit MLP, packed: `fc1` computes the value and the gate side by side, then
    `fc2(act(x1) * x2)` (Shazeer 2020). With SiLU it is SwiGLU, as timm's `SwiGLUPacked` (DINOv2 ViT-g).
    `hidden_features` counts both halves, as in timm."""

    def __init__(
        self, in_features: int, hidden_features: int, *, act_layer: type[nn.Module] = nn.SiLU, drop: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_features % 2:
            raise ValueError(f"a packed GLU needs an even hidden width, got {hidden_features}")
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()  # timm's slot for a norm on the gated features; none of these models uses one
        self.fc2 = Linear(hidden_features // 2, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)  # the gate is the first half (timm: gate_last=False)
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(x1) * x2))))


class SwiGLU(nn.Module):
    """SwiGLU with separate gate and value projections (timm's `SwiGLU`: `fc1_g`, `fc1_x`), then
    `fc2(norm(silu(gate) * value))`. EVA-02 B/L normalise the gated features (`norm_layer`, NormFormer's
    "scale MLP"); `align_to` rounds the hidden width up to a multiple (DINOv3 S+)."""

    def __init__(
        self, in_features: int, hidden_features: int, *, act_layer: type[nn.Module] = nn.SiLU, drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] | None = None, align_to: int = 0,
    ) -> None:
        super().__init__()
        if align_to:
            hidden_features += -hidden_features % align_to
        self.fc1_g = Linear(in_features, hidden_features)
        self.fc1_x = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden_features) if norm_layer else nn.Identity()
        self.fc2 = Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1_g(x)) * self.fc1_x(x)))))


MLP_LAYERS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu_packed": GluMlp, "swiglu": SwiGLU}
