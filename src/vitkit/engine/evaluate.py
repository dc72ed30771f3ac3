"""Classification evaluation: `evaluate` over a loader (with test-time views) and `evaluate_run` on a run directory;
the full report (per-class metrics, confusion, calibration) is `engine.report`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..card import write_card
from ..data import FolderSplit, load_data, make_loader
from ..data.datasets import _list_classes
from ..run import CURVES, RunRecord, load_run, write_eval
from .report import split_images, write_report
from .runtime import Runtime


def tta_views(x: torch.Tensor, flip: bool = False, shift: int = 0) -> list[torch.Tensor]:
    """Test-time augmentation: the image, its mirror (`flip`) and, with `shift`, the four translations by that many
    pixels (edges replicated), and their mirrors. A model trained with translation is nearly but not exactly
    shift-invariant; averaging its logits over the views cancels part of that error (as airbench's flip +
    translate TTA does): +0.25 points on mnist5k, averaged over 13 runs (docs/recipes.md)."""
    views = [x]
    if shift:
        s, (H, W) = shift, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        views += [padded[..., s + dy : s + dy + H, s + dx : s + dx + W] for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s))]
    return views + [v.flip(-1) for v in views] if flip else views


def tta_view_count(flip: bool, shift: int) -> int:
    """How many views `tta_views` makes: 1, 2 (mirror), 5 (shifts) or 10 (both)."""
    return (1 + 4 * bool(shift)) * (1 + bool(flip))


def describe_tta(flip: bool, shift: int) -> str:
    views = [n for n, on in (("flips", flip), (f"{shift} px shifts", shift)) if on]
    return f"test-time {' + '.join(views)}" if views else "no test-time augmentation"


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, *, tta_flip: bool = False, tta_shift: int = 0,
             return_outputs: bool = False, autocast: bool = True) -> dict[str, Any]:
    """Loss, top-1 and top-5 (%) over a loader, summed over processes; optionally the logits and targets too (one
    process). With `tta_flip` / `tta_shift`, each image is scored on the mean logits of its `tta_views`;
    `autocast=False` scores in fp32. The prediction is the mean of the model's heads (`forward_heads`); with
    several (DeiT: class and distillation), each head's top-1 too (`acc1_heads`)."""
    model.eval()
    logits, targets, heads = [], [], []
    for x, y in loader:
        x, y = runtime.to(x, y)
        with runtime.autocast() if autocast else contextlib.nullcontext():
            views = [tuple(o.float() for o in model.forward_heads(v)) for v in tta_views(x, tta_flip, tta_shift)]
        outs = tuple(sum(o) / len(views) for o in zip(*views))
        logits.append((sum(outs) / len(outs)).cpu())
        heads.append([o.cpu() for o in outs])
        targets.append(y.cpu())
    if not targets:  # this process's part of a stream was empty (fewer shards than processes): it adds nothing
        logits, targets, heads = [torch.zeros(0, 5)], [torch.zeros(0, dtype=torch.int64)], [[torch.zeros(0, 5)]]
    logits, targets = torch.cat(logits), torch.cat(targets)
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    several = len(heads[0]) > 1
    per_head = [(torch.cat(h).argmax(1) == targets).sum().item() for h in zip(*heads)] if several else []
    loss_sum, c1, c5, n, *c_heads = runtime.sum([
        F.cross_entropy(logits, targets, reduction="sum").item(), (topk[:, 0] == targets).sum().item(),
        (topk == targets[:, None]).any(dim=1).sum().item(), len(targets), *per_head,
    ])
    result: dict[str, Any] = {"loss": loss_sum / n, "acc1": 100 * c1 / n, "acc5": 100 * c5 / n, "n": int(n)}
    if several:
        result["acc1_heads"] = [100 * c / n for c in c_heads]
    if return_outputs:
        if runtime.world_size > 1:
            raise ValueError("return_outputs needs a single process")
        result.update(logits=logits, targets=targets)
    return result


def evaluate_run(path: str | Path, data: str | None = None, *, batch_size: int = 256, device: str = "cpu",
                 tta: bool | None = None, weights: str = "auto", report_dir: str | Path | None = None,
                 num_workers: int = 2) -> dict[str, Any]:
    """Top-1, top-5 and loss of a run on its validation split, or on `data` (a data-set name: its test split; a
    folder: `FOLDER/val`, else every image under `FOLDER/CLASS/`, with the run's classes), written to RUN/eval.json.
    `report_dir`: also write the full report there. `tta` defaults to the views the run's final evaluation used."""
    run = load_run(path, device, weights)
    rec = run.record
    run.check_classifier()
    if not rec.classes:
        raise ValueError(f"{path} is a {rec.objective} pre-training run: it has no classifier to evaluate; "
                         f"fine-tune it with `vitkit train --pretrained {path}`")
    source = data or rec.data
    if source is None:
        raise ValueError(f"{path} holds converted weights and names no data set: pass --data NAME_OR_FOLDER")
    classes, split = _eval_split(source, rec, explicit=data is not None and data != rec.data)
    if classes != rec.classes:
        raise ValueError(f"{source} has classes {classes[:10]}, but the run was trained on {rec.classes[:10]}")
    if not len(split):
        raise ValueError(f"no images to evaluate in {source}")
    loader = make_loader(split, train=False, batch_size=batch_size, img_size=rec.img_size, mean=rec.mean, std=rec.std,
                         num_workers=num_workers)
    on = rec.tta if tta is None else tta
    flip, shift = (rec.tta_flip, rec.tta_shift) if on else (False, 0)
    result = evaluate(run.model, loader, Runtime(device), tta_flip=flip, tta_shift=shift,
                      return_outputs=report_dir is not None)
    outputs = {k: result.pop(k) for k in ("logits", "targets") if k in result}
    result = {"run": str(path), "data": source, "weights": run.weights, "tta_views": tta_view_count(flip, shift), **result}
    write_eval(path, result)
    write_card(path)  # the card states the latest measurement
    if report_dir is not None:
        write_report(report_dir, outputs["logits"], outputs["targets"], rec.classes, images=split_images(split),
                     curves=Path(path) / CURVES, summary=result)
    return result


def _eval_split(source: str, rec: RunRecord, *, explicit: bool) -> tuple[list[str], Any]:
    """The classes and images to score: a plain class folder as a whole, else the source's validation split."""
    folder = Path(source)
    if explicit and folder.is_dir() and not (folder / "val").is_dir():
        classes, files, labels = _list_classes(folder)
        return classes, FolderSplit(files, labels, rec.mode)
    keys = {k: rec.settings.get(k) for k in ("image_key", "label_key")}  # a stream's entries, as the run read them
    bundle = load_data(source, seed=rec.seed, val_fraction=rec.val_fraction, **keys)
    return bundle.classes, bundle.val
