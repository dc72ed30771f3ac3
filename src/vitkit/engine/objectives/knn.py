"""k-NN classification on frozen features (Wu et al. 2018; the weighted vote of DINO's evaluation, Caron
et al. 2021): a zero-training baseline for a pretrained backbone, reported like any run.

The training split (without augmentation) is embedded once: L2-normalised pooled features, the
classifier's input (`forward_head(..., pre_logits=True)`). Each validation image takes the `k` most
cosine-similar training images, each voting for its class with weight `exp(similarity / T)`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ...data import make_loader
from . import Context, Objective


@torch.no_grad()
def embed_split(model: nn.Module, loader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features `(N, D)` (fp32) and labels `(N,)` of every image a loader yields."""
    feats, labels = [], []
    for x, y in loader:
        f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True).float()
        feats.append(F.normalize(f, dim=-1).cpu())
        labels.append(y.cpu())
    return torch.cat(feats), torch.cat(labels)


def knn_scores(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Class scores `(B, C)`: the summed `exp(cos / T)` of each query's `k` nearest bank features, per class."""
    k = min(k, bank.shape[0])
    out = []
    for q in query.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (b, k)
        out.append(torch.zeros(q.shape[0], num_classes).scatter_add_(1, bank_labels[idx], (sim / temperature).exp()))
    return torch.cat(out)


class KNN(Objective):
    """No training: `final_evaluation` classifies the validation split by its nearest training images."""

    name = "knn"
    title = "k-NN evaluation of"
    trains: ClassVar[bool] = False

    def __init__(self, model: nn.Module, bank_loader, k: int, temperature: float, num_classes: int) -> None:
        super().__init__(model)
        self.bank_loader, self.k, self.temperature, self.num_classes = bank_loader, k, temperature, num_classes

    @classmethod
    def build(cls, model: nn.Module, ctx: Context) -> KNN:
        for p in model.parameters():
            p.requires_grad_(False)
        bank = make_loader(ctx.data.train, train=False, **ctx.loader_args)
        return cls(model, bank, ctx.cfg.knn_k, ctx.cfg.knn_temperature, ctx.data.num_classes)

    def final_evaluation(self, loader, runtime) -> dict[str, Any]:
        self.model.eval()
        bank, bank_labels = embed_split(self.model, self.bank_loader, runtime.device)
        query, labels = embed_split(self.model, loader, runtime.device)
        scores = knn_scores(query, bank, bank_labels, self.num_classes, self.k, self.temperature)
        top5 = scores.topk(min(5, self.num_classes), dim=1).indices
        return {"acc1": 100 * (top5[:, 0] == labels).float().mean().item(),
                "acc5": 100 * (top5 == labels[:, None]).any(1).float().mean().item(),
                "n": len(labels), "knn_k": self.k, "knn_temperature": self.temperature, "bank": len(bank_labels),
                "tta_views": 1}

    def describe(self, final: dict[str, Any]) -> str:
        return (f"acc1 {final['acc1']:.2f}%  acc5 {final['acc5']:.2f}% ({final['knn_k']}-NN over {final['bank']} "
                f"training images, T {final['knn_temperature']})")
