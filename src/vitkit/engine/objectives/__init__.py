"""What a run optimises: `nn.Module` plug-ins around an unchanged backbone, run by the one loop in `engine.loop`,
each owning its extra modules (decoder, tokenizer, teacher), loss, logs and evaluation:

    classify.py  cross-entropy with label smoothing and Mixup/CutMix
    distill.py   DeiT distillation: classification plus a frozen teacher's hard or soft targets
    mae.py       masked autoencoder: pixels of masked patches
    beit.py      BEiT masked image modeling: visual tokens of masked patches (tokenizer.py)
    knn.py       k-NN classification on frozen features: no training, a baseline (lora.py: LoRA for classify)

The loop never branches on which objective it runs; a new objective is a file here and a line in `objective_class`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ...models import implements


@dataclass
class Context:
    """What an objective may need to build itself: the run's config, data and preprocessing."""

    cfg: Any  # the run's FitConfig
    data: Any  # vitkit.data.DataBundle
    runtime: Any  # vitkit.engine.runtime.Runtime
    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tta: tuple[bool, int]  # test-time (flip, shift) of the final evaluation
    run_dir: Path
    resuming: bool
    loader_args: dict[str, Any]  # batch size, preprocessing and process layout, for `make_loader`


class Objective(nn.Module):
    """A loss around a backbone (`self.model`, a `VisionModel`). Class attributes tell the loop how to set the run
    up: whether the data needs labels, whether the backbone keeps a classifier, and build-only model arguments."""

    name: ClassVar[str]
    title: ClassVar[str] = "training"
    """How the run's first line names what it does."""
    requires: ClassVar[tuple[str, str] | None] = None
    """A contract method the backbone must implement, and what to tell a user whose model lacks it."""
    labels: ClassVar[bool] = True
    classifier: ClassVar[bool] = True
    trains: ClassVar[bool] = True
    """False: no epochs, the run is its final evaluation (k-NN on frozen features)."""
    build_args: ClassVar[dict[str, Any]] = {}
    model_methods: ClassVar[tuple[str, ...]] = ("evaluate", "final_evaluation", "on_epoch_end")
    """The methods besides `forward` that run the model: under FSDP (`Runtime.wrap`) they gather its shards as
    `forward` does, so every process calls them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @classmethod
    def build(cls, model: nn.Module, ctx: Context) -> Objective:
        return cls(model)

    @classmethod
    def check_backbone(cls, model: nn.Module, name: str) -> None:
        """Refuse, in one line, a backbone without the capability this objective needs."""
        if cls.requires is not None and not implements(model, cls.requires[0]):
            raise ValueError(f"{cls.name} needs {cls.requires[1]}; {name} is not one")

    @classmethod
    def augment_overrides(cls, cfg: Any) -> dict[str, Any]:
        """Overrides of the augmentation preset from the config (`resolve_augment` keywords)."""
        return {}

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training batch -> the loss and per-sample means to log (e.g. `train_acc1`)."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, loader, runtime) -> dict[str, float]:
        """Validation metrics of `self.model`, keys prefixed `val_`."""
        raise NotImplementedError

    def final_evaluation(self, loader, runtime) -> dict[str, Any] | None:
        """The run's closing evaluation (written to eval.json), or None."""
        return None

    def describe(self, final: dict[str, Any]) -> str:
        """The closing evaluation in a few words, for the run's last line."""
        return str(final)

    def on_epoch_end(self, run_dir: Path, epoch: int, runtime) -> None:
        """Pictures and other files the objective writes each epoch: every process calls it (a sharded model runs
        on all of them together), the main one (`runtime.is_main`) writes."""

    def backbone_state(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The backbone's weights as fine-tuning and inference load them (`model` instead of `self.model`: the EMA copy)."""
        return (model or self.model).state_dict()

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()}


def objective_class(name: str) -> type[Objective]:
    from .beit import BeitMIM
    from .classify import Classify
    from .distill import Distill
    from .knn import KNN
    from .mae import MaskedAutoencoder

    classes = {c.name: c for c in (Classify, Distill, MaskedAutoencoder, BeitMIM, KNN)}
    if name not in classes:
        raise ValueError(f"unknown objective {name!r}; choose from {', '.join(classes)}")
    return classes[name]
