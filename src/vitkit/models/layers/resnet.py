"""The ResNet-V2 backbone of the hybrid ViTs (Dosovitskiy et al. 2021, sec. 3.1 "Hybrid Architecture").

A ResNet with the BiT changes (Kolesnikov et al. 2020, "Big Transfer"): GroupNorm instead of
BatchNorm and weight-standardised convolutions, but with the ordinary post-activation bottleneck
(ResNet v1.5: stride on the 3x3 conv), not the pre-activation one of BiT. The weights were trained
in JAX, so every convolution and the stem pooling pad TensorFlow-style ("SAME"). Parameter names
follow timm's `ResNetV2` (`stem.conv`, `stages.0.blocks.0.conv1`, ...) so hybrid checkpoints load.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

STEM_STRIDE = 4  # the stride-2 7x7 conv, then the stride-2 max pool
GROUPS = 32  # GroupNorm groups, as in BiT


def backbone_reduction(layers: tuple[int, ...]) -> int:
    """Total stride of a `ResNetV2Backbone` with these stage depths: the stem, then 2 per stage after the first."""
    return STEM_STRIDE * 2 ** (len(layers) - 1)


def pad_same(x: torch.Tensor, kernel_size: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """Pad `x` (B, C, H, W) as TensorFlow's "SAME": output side ceil(H / stride), the extra pixel at the end.

    PyTorch's symmetric padding differs for even inputs with stride 2 (TF pads 0 before, 1 after),
    which shifts every feature by a pixel; the JAX-trained weights need TF's placement.
    """
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((math.ceil(size / stride) - 1) * stride + kernel_size - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


class StdConv2dSame(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al. 2019) and TF "SAME" padding; no bias.

    Each filter is normalised to zero mean and unit variance before use. Together with GroupNorm
    this replaces BatchNorm, whose batch statistics break down at BiT's per-device batch sizes and
    when transferring; timm's hybrid backbone uses eps=1e-8 (the JAX code's value).
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int, stride: int = 1, eps: float = 1e-8) -> None:
        super().__init__(in_chans, out_chans, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (w - mean) / sqrt(var + eps) over each output filter's in * k * k weights: batch norm of the
        # weights viewed as (1, out, in * k * k). One kernel, and bit-identical to timm; a hand-written
        # mean/var rounds differently, ~4e-4 apart after the 16 R50 blocks.
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(pad_same(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class Bottleneck(nn.Module):
    """Post-activation bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand, each GroupNorm'd; ReLU after the sum.
    `downsample` (1x1 conv + GroupNorm) projects the shortcut in the first block of a stage."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, bottle_ratio: float = 0.25) -> None:
        super().__init__()
        mid = int(out_chans * bottle_ratio)
        self.downsample = None
        if stride != 1 or in_chans != out_chans:
            self.downsample = nn.Sequential(
                OrderedDict(conv=StdConv2dSame(in_chans, out_chans, 1, stride=stride), norm=_group_norm(out_chans))
            )
        self.conv1 = StdConv2dSame(in_chans, mid, 1)
        self.norm1 = _group_norm(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = _group_norm(mid)
        self.conv3 = StdConv2dSame(mid, out_chans, 1)
        self.norm3 = _group_norm(out_chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    """`depth` bottlenecks; the first changes width and applies the stage's stride."""

    def __init__(self, in_chans: int, out_chans: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(Bottleneck(in_chans if i == 0 else out_chans, out_chans, stride if i == 0 else 1) for i in range(depth))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """7x7 stride-2 conv, GroupNorm, ReLU, 3x3 stride-2 max pool: a quarter of the resolution."""

    def __init__(self, in_chans: int = 3, out_chans: int = 64) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chans, out_chans, 7, stride=2)
        self.norm = _group_norm(out_chans)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm(self.conv(x)))
        # Pad with -inf, as TF's max pool does, so padding never wins the max.
        return self.pool(pad_same(x, 3, 2, value=-math.inf))


class ResNetV2Backbone(nn.Module):
    """Stem and bottleneck stages of a ResNet-V2, without pooling or head: `(B, C, H, W)` ->
    `(B, num_features, H / reduction, W / reduction)`.

    `layers` are the stage depths: (3, 4, 9) is the R50 of ViT-B/16 hybrid (three stages, stride 16),
    (2, 2, 2, 2) the R26 of the AugReg hybrids (stride 32).
    """

    def __init__(
        self,
        layers: tuple[int, ...],
        in_chans: int = 3,
        channels: tuple[int, ...] = (256, 512, 1024, 2048),
        stem_chans: int = 64,
    ) -> None:
        super().__init__()
        if not 1 <= len(layers) <= len(channels):
            raise ValueError(f"a ResNetV2Backbone has 1 to {len(channels)} stages, got layers={layers}")
        self.stem = ResNetStem(in_chans, stem_chans)
        stages, prev = [], stem_chans
        for i, (depth, chans) in enumerate(zip(layers, channels)):
            stages.append(ResNetStage(prev, chans, depth, stride=1 if i == 0 else 2))
            prev = chans
        self.stages = nn.Sequential(*stages)
        self.num_features = prev
        self.reduction = backbone_reduction(layers)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's ResNetV2 init (He et al. 2015, fan-out); GroupNorm starts as the identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


def _group_norm(chans: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, chans, eps=1e-5)
