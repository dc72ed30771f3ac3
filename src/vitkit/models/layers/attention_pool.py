"""Multi-head attention pooling (MAP, Lee et al. 2019; the SigLIP image tower, Zhai et al. 2023).

A learned latent query attends over the patch tokens; the result goes through a residual MLP. It
replaces the class token or the average as the pooled feature. Names follow timm's `AttentionPoolLatent`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .attention import attend
from .linear import Linear
from .mlp import Mlp


class AttentionPoolLatent(nn.Module):
    """Tokens `(B, N, D)` -> pooled `(B, D)`: one latent query, `num_heads` heads, then `x + mlp(norm(x))`."""

    def __init__(self, dim: int, num_heads: int, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim**-0.5
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.latent, std=dim**-0.5)
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = Linear(dim, dim)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y, _ = attend(q, k, v, self.scale, self.attn_drop)
        y = self.proj(y.transpose(1, 2).reshape(B, 1, D))
        return (y + self.mlp(self.norm(y)))[:, 0]
