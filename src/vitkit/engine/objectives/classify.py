"""Classification: cross-entropy with label smoothing, on Mixup/CutMix batches where the recipe mixes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data import BatchMix, resolve_augment
from ..evaluate import describe_tta, evaluate, tta_view_count
from . import Context, Objective, lora


def classification_loss(outputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor,
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy in fp32, averaged over a model's heads (DeiT), each trained on the labels: class indices, or
    probability vectors after Mixup/CutMix (soft-target cross-entropy; label smoothing applies on top)."""
    outs = outputs if isinstance(outputs, tuple) else (outputs,)
    return sum(F.cross_entropy(o.float(), targets, label_smoothing=label_smoothing) for o in outs) / len(outs)


def mean_logits(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return sum(outputs) / len(outputs) if isinstance(outputs, tuple) else outputs


class Classify(Objective):
    """Every head on the (mixed) labels; top-1/top-5 each epoch on mirrors, at the end on every view in fp32."""

    name = "classify"

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, mix: BatchMix | None = None,
                 tta: tuple[bool, int] = (False, 0), lora: dict[str, Any] | None = None) -> None:
        super().__init__(model)
        self.label_smoothing, self.mix, self.tta = label_smoothing, mix, tta
        self.lora = lora  # the adapter's PEFT config when fine-tuning with LoRA

    @classmethod
    def augment_overrides(cls, cfg: Any) -> dict[str, Any]:
        return dict(policy=cfg.auto_augment, random_erasing=cfg.random_erasing, mixup=cfg.mixup, cutmix=cfg.cutmix)

    @classmethod
    def build(cls, model: nn.Module, ctx: Context) -> Classify:
        adapter = cls.adapt(model, ctx.cfg)
        if ctx.cfg.finetune != "full" and ctx.runtime.is_main:
            trainable, total = (sum(p.numel() for p in model.parameters() if p.requires_grad or not only)
                                for only in (True, False))
            print(f"fine-tuning ({ctx.cfg.finetune}): {trainable:,} of {total:,} parameters train "
                  f"({100 * trainable / total:.2f}%)")
        return cls(model, label_smoothing=ctx.cfg.label_smoothing, mix=cls.batch_mix(ctx), tta=ctx.tta, lora=adapter)

    @staticmethod
    def adapt(model: nn.Module, cfg: Any) -> dict[str, Any] | None:
        """What fine-tuning trains (`--finetune`); the optimizer sees trainable parameters only. The LoRA config, if any."""
        if cfg.finetune == "linear":  # only the classifier learns
            heads = tuple(model.head_prefixes)
            for n, p in model.named_parameters():
                p.requires_grad_(n.startswith(heads))
        elif cfg.finetune == "lora":
            return lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, list(cfg.lora_targets))
        return None

    def backbone_state(self, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Plain weights: LoRA adapters merged, so every tool loads the run as it loads any other."""
        return lora.merged_state(model or self.model) if self.lora else super().backbone_state(model)

    def on_epoch_end(self, run_dir: Path, epoch: int, runtime) -> None:
        if self.lora and runtime.is_main:
            lora.save_adapter(self.model, self.lora, run_dir)

    @classmethod
    def batch_mix(cls, ctx: Context) -> BatchMix | None:
        spec = resolve_augment(ctx.cfg.augment, **cls.augment_overrides(ctx.cfg))
        return BatchMix(ctx.data.num_classes, spec.mixup, spec.cutmix) if spec.mixup or spec.cutmix else None

    def loss(self, x: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return classification_loss(outputs, targets, self.label_smoothing)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, targets = (x, y) if self.mix is None else self.mix(x, y)  # the teacher of `Distill` sees the mixed x
        out = self.model(x)
        correct = (mean_logits(out).detach().argmax(-1) == y).float().mean()
        return self.loss(x, out, targets), {"train_acc1": 100 * correct}

    @torch.no_grad()
    def evaluate(self, loader, runtime) -> dict[str, float]:
        r = evaluate(self.model, loader, runtime, tta_flip=self.tta[0])  # each epoch: the cheap mirrored views
        row = {"val_loss": r["loss"], "val_acc1": r["acc1"], "val_acc5": r["acc5"]}
        if "acc1_heads" in r:
            row["val_acc1_cls"], row["val_acc1_dist"] = r["acc1_heads"]
        return row

    def final_evaluation(self, loader, runtime) -> dict[str, Any]:
        """What `vitkit eval RUN` gives: every test-time view, fp32 (the loop passes the EMA weights when kept)."""
        flip, shift = self.tta
        r = evaluate(self.model, loader, runtime, tta_flip=flip, tta_shift=shift, autocast=False)
        return {"tta_views": tta_view_count(flip, shift), **r}

    def describe(self, final: dict[str, Any]) -> str:
        return f"acc1 {final['acc1']:.2f}%  acc5 {final['acc5']:.2f}%  loss {final['loss']:.4f} ({describe_tta(*self.tta)})"
