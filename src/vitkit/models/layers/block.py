"""The pre-norm transformer encoder block (Dosovitskiy et al. 2021, eq. 2-3)."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .attention import Attention
from .drop import DropPath, LayerScale, drop_path_rates
from .mlp import Mlp


class Block(nn.Module):
    """`x + attn(norm1(x))` then `x + mlp(norm2(x))`, each branch with optional layer scale and drop path.

    `attn_layer(dim, num_heads, qkv_bias=, attn_drop=, proj_drop=)` builds the attention (a family's own),
    `mlp_layer(dim, hidden, act_layer=, drop=)` the feed-forward network (`Mlp`, or a gated `GluMlp`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        attn_layer: Callable[..., nn.Module] = Attention,
        mlp_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_layer(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp_layer(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, *args: object, need_weights: bool = False, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return `(tokens, attention probabilities or None)`; `args` and `kwargs` (`Attention.forward`'s
        `attn_bias` and `rope`, a family's grid) go to the attention."""
        y, attn = self.attn(self.norm1(x), *args, need_weights=need_weights, **kwargs)
        x = x + self.drop_path1(self.ls1(y))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, attn


class GammaBlock(Block):
    """`Block` with its layer scales as bare parameters `gamma_1` and `gamma_2`: timm's names in BEiT and EVA."""

    def __init__(self, dim: int, num_heads: int, *, init_values: float | None = None, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_values)) if init_values else None
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_values)) if init_values else None

    def forward(
        self, x: torch.Tensor, *args: object, need_weights: bool = False, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, attn = self.attn(self.norm1(x), *args, need_weights=need_weights, **kwargs)
        x = x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        x = x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)
        return x, attn


def rescale_residual_outputs(blocks: nn.ModuleList) -> None:
    """BEiT's "fix_init_weight" (also EVA's): divide the output projection of each residual branch of block l
    (`attn.proj`, `mlp.fc2`) by sqrt(2 l), so the residual stream does not grow with depth at initialisation."""
    with torch.no_grad():
        for layer, blk in enumerate(blocks, start=1):
            blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))


def encoder_blocks(cfg: Any, block: Callable[..., nn.Module] = Block, **kwargs: Any) -> nn.ModuleList:
    """The `cfg.depth` blocks of a ViT-style config (ViT, BEiT), stochastic depth rising linearly over
    them; `kwargs` go to every block."""
    return nn.ModuleList(
        block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, init_values=cfg.init_values,
              proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=rate, **kwargs)
        for rate in drop_path_rates(cfg.drop_path_rate, cfg.depth)
    )
