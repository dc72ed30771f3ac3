"""DeiT knowledge distillation: a teacher, its loss, and the `Distill` objective (classification plus the teacher).

Touvron et al. 2021: the student's class head learns from the labels, its distillation head (the distillation
token's) from the teacher: its soft predictions (KL divergence at temperature tau) or its hard decisions (argmax
as a label). A student without a distillation token (or `distill: none`) uses its class head for both terms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models import create_model, load_weights, read_state_dict
from ...run import load_run
from . import Context
from .classify import Classify, classification_loss, mean_logits


class Teacher(nn.Module):
    """A frozen classifier in eval mode that sees the student's input in its own preprocessing: `forward` undoes
    the student's normalisation, applies the teacher's and resizes, so any teacher sees what it was trained on."""

    def __init__(self, model: nn.Module, *, name: str, student_norm: tuple, teacher_norm: tuple,
                 img_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.model, self.name, self.img_size = model.eval().requires_grad_(False), name, img_size
        (sm, ss), (tm, ts) = student_norm, teacher_norm
        self.register_buffer("scale", (torch.tensor(ss) / torch.tensor(ts)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((torch.tensor(sm) - torch.tensor(tm)) / torch.tensor(ts)).view(1, -1, 1, 1),
                             persistent=False)

    def train(self, mode: bool = True) -> Teacher:  # the teacher never leaves eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.scale + self.shift  # (x_s * s_s + m_s - m_t) / s_t
        if self.img_size is not None and tuple(x.shape[-2:]) != tuple(self.img_size):
            x = F.interpolate(x, size=self.img_size, mode="bilinear", antialias=True, align_corners=False)
        return mean_logits(self.model(x)).float()


def load_teacher(spec: str, *, classes: list[str], in_chans: int, img_size: tuple[int, int], student_norm: tuple,
                 weights: str | None = None) -> Teacher:
    """A teacher: a vitkit run directory, or with `weights` a registered model or `timm:NAME`, predicting `classes`."""
    path = Path(spec)
    if path.is_dir():
        run = load_run(path)
        if run.classes != classes:
            raise ValueError(f"teacher {spec} predicts classes {run.classes[:10]}, but the data has {classes[:10]}: "
                             "train the teacher on the same classes")
        rec = run.record
        if rec.in_chans != in_chans:
            raise ValueError(f"teacher {spec} takes {rec.in_chans}-channel images, the data has {in_chans}")
        return Teacher(run.model, name=spec, student_norm=student_norm, teacher_norm=(rec.mean, rec.std), img_size=rec.img_size)
    if weights is None:
        raise ValueError(f"teacher {spec!r} is not a vitkit run directory; a model name needs --teacher-weights FILE "
                         "(a randomly initialised teacher teaches nothing)")
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError as e:
            raise ValueError("a timm: teacher needs timm installed (pip install timm)") from e
        model = timm.create_model(spec[5:], pretrained=False, num_classes=len(classes), in_chans=in_chans)
        try:
            model.load_state_dict(read_state_dict(weights))
        except RuntimeError as e:
            raise ValueError(f"weights {weights} do not fit teacher {spec}: {str(e)[:300]}") from e
        cfg: dict[str, Any] = model.pretrained_cfg or {}
        size = tuple(cfg.get("input_size", (in_chans, *img_size))[-2:])
        norm = (tuple(cfg.get("mean", student_norm[0])), tuple(cfg.get("std", student_norm[1])))
    else:
        model = create_model(spec, num_classes=len(classes), in_chans=in_chans, img_size=img_size)
        try:  # strict: a teacher's classifier must fit the data's classes, never be re-initialised
            load_weights(model, weights)
        except ValueError as e:
            raise ValueError(f"teacher {spec} for the data's {len(classes)} classes: {e}") from e
        size, norm = img_size, student_norm
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, in_chans, *size))
    n = (out[0] if isinstance(out, tuple) else out).shape[-1]
    if n != len(classes):
        raise ValueError(f"teacher {spec} predicts {n} classes, but the data has {len(classes)}")
    return Teacher(model, name=spec, student_norm=student_norm, teacher_norm=norm, img_size=size)


class DistillationLoss(nn.Module):
    """The student's objective with a teacher (DeiT's `DistillationLoss`), by kind:
      - `none`: the base loss only (every head on the labels).
      - `soft`: (1 - alpha) * CE(class head, labels) + alpha * tau^2 * KL(teacher || student) at temperature tau.
      - `hard`: (1 - alpha) * CE(class head, labels) + alpha * CE(distillation head, teacher argmax).
    The label term keeps label smoothing and Mixup/CutMix soft targets; the teacher term has no smoothing (DeiT).
    """

    def __init__(self, teacher: Teacher | None, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in ("none", "soft", "hard"):
            raise ValueError(f"distill must be none, soft or hard, got {kind!r}")
        if kind != "none" and teacher is None:
            raise ValueError(f"distill={kind} needs a teacher")
        self.teacher, self.kind, self.alpha, self.tau, self.label_smoothing = teacher, kind, alpha, tau, label_smoothing

    def forward(self, inputs: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, ...],
                targets: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return classification_loss(outputs, targets, self.label_smoothing)
        cls, dist = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        base = F.cross_entropy(cls.float(), targets, label_smoothing=self.label_smoothing)
        teacher = self.teacher(inputs)
        if self.kind == "soft":
            T = self.tau
            # DeiT's normalisation: the summed KL over the batch and classes, divided by their count.
            kd = F.kl_div(F.log_softmax(dist.float() / T, dim=1), F.log_softmax(teacher / T, dim=1),
                          reduction="sum", log_target=True) * (T * T) / dist.numel()
        else:
            kd = F.cross_entropy(dist.float(), teacher.argmax(dim=1))
        return (1 - self.alpha) * base + self.alpha * kd


class Distill(Classify):
    """Classification with a teacher (`--teacher`): the loss is `DistillationLoss`, the rest is `Classify`'s. The
    frozen teacher is not part of the objective's state: not checkpointed, averaged or synchronised, only run."""

    name = "distill"
    title = "training (distilled from a teacher)"

    @classmethod
    def build(cls, model: nn.Module, ctx: Context) -> Distill:
        objective = super().build(model, ctx)
        d = ctx.cfg.distill
        teacher = load_teacher(d.teacher, classes=ctx.data.classes, in_chans=ctx.data.in_chans, img_size=ctx.img_size,
                               student_norm=(ctx.mean, ctx.std), weights=d.teacher_weights).to(ctx.runtime.device)
        # Kept out of the module tree on purpose (see the class docstring).
        object.__setattr__(objective, "criterion", DistillationLoss(teacher, d.kind, d.alpha, d.tau, ctx.cfg.label_smoothing))
        if ctx.runtime.is_main:
            print(f"distilling from {d.teacher} ({d.kind}, alpha {d.alpha}{f', tau {d.tau}' if d.kind == 'soft' else ''})")
        return objective

    def loss(self, x: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(x, outputs, targets)  # the teacher runs here, on the same (mixed) images
