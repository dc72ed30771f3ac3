"""Image to token sequence: the ViT patch projection, a small convolutional stem and a CNN backbone."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .helpers import to_2tuple


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping `patch_size` patches and project each linearly.

    A strided convolution is exactly a per-patch linear map; timm's name is `proj`. Any input whose
    sides are multiples of the patch size is accepted; the grid is returned with the tokens so
    position embeddings can follow it. `norm_layer` normalises the tokens (Swin; timm's `norm`); CLIP's
    projection has no bias (its pre-norm would cancel one).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 norm_layer: Callable[[int], nn.Module] | None = None, bias: bool = True) -> None:
        super().__init__()
        self.patch_size = to_2tuple(patch_size)
        self.reduction = self.patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        _check_divisible(x, self.reduction)
        x = self.proj(x)  # (B, D, H/p, W/p)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid  # (B, N, D)


class ConvStem(nn.Module):
    """Convolutional tokenizer for small data (Xiao et al. 2021 "Early convolutions help transformers
    see better"; Hassani et al. 2021, CCT): stride-2 3x3 conv-BN-GELU layers, then a 1x1 projection.

    Overlapping convolutions give the locality prior that a plain patch projection lacks, which is
    what lets a tiny ViT learn from a few thousand images. `patch_size` must be a power of two: one
    stride-2 conv per factor of two.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 192) -> None:
        super().__init__()
        p = to_2tuple(patch_size)
        if p[0] != p[1] or p[0] < 2 or p[0] & (p[0] - 1):
            raise ValueError(f"ConvStem needs a square power-of-two patch size, got {patch_size}")
        self.patch_size = p
        self.reduction = p
        layers: list[nn.Module] = []
        chans, n = in_chans, p[0].bit_length() - 1
        for i in range(n):
            out = embed_dim // 2 ** (n - i)
            layers += [nn.Conv2d(chans, out, 3, 2, 1, bias=False), nn.BatchNorm2d(out), nn.GELU()]
            chans = out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(chans, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        _check_divisible(x, self.reduction)
        x = self.proj(self.stem(x))
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class HybridEmbed(nn.Module):
    """Tokens from a CNN feature map (Dosovitskiy et al. 2021, sec. 3.1 "Hybrid Architecture").

    The backbone (e.g. `ResNetV2Backbone`, which must expose `num_features` and an integer total
    stride `reduction`) turns the image into a feature map; `proj` cuts that map into `patch_size`
    patches and projects each to a token. The paper's hybrids use `patch_size=1`: one token per
    feature-map position. Names as timm's: `backbone.*`, `proj.*`.
    """

    def __init__(self, backbone: nn.Module, patch_size: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.backbone = backbone
        self.patch_size = to_2tuple(patch_size)
        self.reduction = (backbone.reduction * self.patch_size[0], backbone.reduction * self.patch_size[1])
        self.proj = nn.Conv2d(backbone.num_features, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        # The backbone pads "SAME" and takes any size, but the grid must be exactly H / reduction.
        _check_divisible(x, self.reduction)
        x = self.proj(self.backbone(x))  # (B, D, H/r, W/r)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid  # (B, N, D)


def _check_divisible(x: torch.Tensor, reduction: tuple[int, int]) -> None:
    H, W = x.shape[-2:]
    if H % reduction[0] or W % reduction[1]:
        raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {reduction[0]}x{reduction[1]}")
