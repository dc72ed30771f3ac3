"""torchvision CNNs behind the vitkit model contract: teachers for DeiT distillation.

`tv:resnet18`, `tv:regnet_y_400mf`, ... are torchvision's own modules, registered under their
torchvision names (`conv1.weight`, `fc.weight`), so a torchvision state-dict file loads unchanged;
`vitkit train --model tv:resnet18` trains one on the user's data like any other model. Two
adaptations: the first convolution takes `in_chans` channels, and for small inputs (<= 64 px) a
ResNet gets the usual CIFAR stem (3x3 stride-1 convolution, no max-pool), since the ImageNet stem
would shrink a 28-px digit to 7x7 before the first block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from .contract import Intermediates, VisionModel
from .layers.helpers import classifier_head
from .registry import ModelEntry, register_model


@dataclass(frozen=True)
class CnnConfig:
    arch: str = "resnet18"
    """A torchvision classification builder: a ResNet/ResNeXt, RegNet, MobileNet or EfficientNet."""
    num_classes: int = 1000
    in_chans: int = 3
    img_size: int | tuple[int, int] = 224
    small_input: bool | None = None
    """ResNets: the CIFAR stem (3x3 stride 1, no max-pool); default: on for inputs of 64 px or less."""


class TorchvisionCNN(VisionModel):
    """A torchvision CNN: its children run in order; the last child is the classifier.

    forward_features returns the pooled, flattened features; forward_head applies the classifier.
    Names are torchvision's: the children are registered on this module directly.
    """

    def __init__(self, cfg: CnnConfig) -> None:
        super().__init__()
        self.cfg = cfg
        try:
            net = torchvision.models.get_model(cfg.arch, weights=None, num_classes=cfg.num_classes)
        except ValueError as e:
            raise ValueError(f"unknown torchvision model {cfg.arch!r}: {e}") from e
        side = cfg.img_size if isinstance(cfg.img_size, int) else min(cfg.img_size)
        small = side <= 64 if cfg.small_input is None else cfg.small_input
        if small and hasattr(net, "conv1") and hasattr(net, "maxpool"):
            net.conv1 = nn.Conv2d(cfg.in_chans, net.conv1.out_channels, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif cfg.in_chans != 3:
            _replace_first_conv(net, cfg.in_chans)
        for name, child in net.named_children():
            self.add_module(name, child)
        self._head_name = list(self._modules)[-1]
        self.first_conv = next(n for n, m in self.named_modules() if isinstance(m, nn.Conv2d))  # conv1, features.0.0
        self.head_prefixes = (self._head_name + ".",)
        self.num_classes = cfg.num_classes
        # The classifier's input width (MobileNetV3's classifier has a hidden layer of its own).
        head = self.get_submodule(self._head_name)
        self.num_features = next(m for m in head.modules() if isinstance(m, nn.Linear)).in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in list(self._modules)[:-1]:
            x = self._modules[name](x)
        return torch.flatten(x, 1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self._modules[self._head_name](x)

    def forward_intermediates(self, *args: Any, **kwargs: Any) -> Intermediates:
        raise ValueError(f"{self.cfg.arch} is a CNN: it has no transformer blocks or attention to return")

    def reset_classifier(self, num_classes: int) -> None:
        head = self._modules[self._head_name]
        linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]  # __init__ found one
        new = classifier_head(linear.in_features, num_classes)
        if isinstance(head, nn.Linear):
            self._modules[self._head_name] = new
        else:  # a Sequential ending in the Linear (MobileNet, EfficientNet)
            head[len(head) - 1] = new
        self.num_classes = num_classes

    @property
    def num_blocks(self) -> int:
        return 0


def _replace_first_conv(net: nn.Module, in_chans: int) -> None:
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None)
            parent = net.get_submodule(name.rpartition(".")[0]) if "." in name else net
            setattr(parent, name.rpartition(".")[2], new)
            return


VARIANTS = ["resnet18", "resnet34", "resnet50", "regnet_y_400mf", "mobilenet_v3_small", "efficientnet_b0"]
for _arch in VARIANTS:
    register_model(ModelEntry(name=f"tv:{_arch}", family="cnn", config=CnnConfig(arch=_arch), builder=TorchvisionCNN,
                              description="torchvision CNN (teacher)"))
