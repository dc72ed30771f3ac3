"""The evaluation report, written as JSON, PNGs and one self-contained HTML page.

    OUT/
      report.json                 every number below
      confusion_matrix.png        row-normalised (each true class sums to 1)
      reliability.png             reliability diagram and confidence histogram, with the ECE
      most_confident_wrong.png    the wrong predictions the model was surest of
      report.html                 all of it with the run's training curves, images inlined

Calibration follows Guo et al. 2017: predictions are binned by confidence (the top softmax
probability) into equal-width bins `(lo, hi]`; ECE = sum_b (n_b / n) * |accuracy_b - confidence_b|.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..run import atomic_write

REPORT_JSON = "report.json"
CONFUSION_PNG = "confusion_matrix.png"
RELIABILITY_PNG = "reliability.png"
WRONG_PNG = "most_confident_wrong.png"
REPORT_HTML = "report.html"

ImageGetter = Callable[[int], np.ndarray]  # dataset index -> (H, W) or (H, W, 3) uint8


# -- numbers ------------------------------------------------------------------------------------
def calibration_bins(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> list[dict[str, float]]:
    """Equal-width confidence bins `(lo, hi]` (the first also holds 0) with count, accuracy and mean confidence."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, ok = confidences.double().flatten(), correct.double().flatten()
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()  # bin b holds (b/n, (b+1)/n]; 0 in the first
    bins = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        acc, mean_conf = (float(ok[sel].mean()), float(conf[sel].mean())) if n else (0.0, 0.0)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": n, "accuracy": acc, "confidence": mean_conf})
    return bins


def expected_calibration_error(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """ECE: the count-weighted mean gap between accuracy and confidence over the bins."""
    n = confidences.numel()
    if n == 0:
        raise ValueError("ECE needs at least one prediction")
    bins = calibration_bins(confidences, correct, n_bins)
    return sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins)


def classification_report(logits: torch.Tensor, targets: torch.Tensor, classes: list[str], *, n_bins: int = 15,
                          n_confused: int = 20) -> dict[str, Any]:
    """Top-1/top-5/loss, per-class precision/recall/F1/support, the confusion matrix, confused pairs, calibration."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    logits, targets = logits.float().cpu(), targets.long().cpu()
    K = len(classes)
    if logits.dim() != 2 or logits.shape[1] != K or len(targets) != len(logits) or not len(targets):
        raise ValueError(f"need logits (N, {K}) and N targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    probs = logits.softmax(dim=1)
    conf, pred = probs.max(dim=1)
    topk = logits.topk(min(5, K), dim=1).indices
    labels = list(range(K))
    y, p = targets.numpy(), pred.numpy()
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    cm = confusion_matrix(y, p, labels=labels)
    summary: dict[str, Any] = {
        "n": len(y),
        "acc1": 100 * float((pred == targets).float().mean()),
        "acc5": 100 * float((topk == targets[:, None]).any(dim=1).float().mean()),
        "loss": float(F.cross_entropy(logits, targets)),
        "ece": expected_calibration_error(conf, pred == targets, n_bins),
    }
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y, p, labels=labels, average=avg, zero_division=0)
        summary.update({f"{avg}_precision": float(ap), f"{avg}_recall": float(ar), f"{avg}_f1": float(af)})
    per_class = [{"class": c, "precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                  "support": int(sup[i])} for i, c in enumerate(classes)]
    off = cm.copy()
    np.fill_diagonal(off, 0)
    pairs = sorted(zip(*np.nonzero(off)), key=lambda ij: (-off[ij], ij))[:n_confused]
    confused = [{"true": classes[i], "pred": classes[j], "count": int(off[i, j]),
                 "rate": float(off[i, j] / cm[i].sum())} for i, j in pairs]
    calibration = {"n_bins": n_bins, "ece": summary["ece"], "bins": calibration_bins(conf, pred == targets, n_bins)}
    return {"summary": summary, "per_class": per_class, "confusion_matrix": cm.tolist(), "most_confused": confused,
            "calibration": calibration}


def most_confident_wrong(logits: torch.Tensor, targets: torch.Tensor, classes: list[str],
                         k: int = 16) -> list[dict[str, Any]]:
    """The `k` wrong predictions with the highest confidence: dataset index, true and predicted class."""
    conf, pred = logits.float().softmax(dim=1).max(dim=1)
    wrong = (pred != targets).nonzero().squeeze(1)
    order = wrong[conf[wrong].argsort(descending=True)][:k]
    return [{"index": int(i), "true": classes[int(targets[i])], "pred": classes[int(pred[i])],
             "confidence": float(conf[i])} for i in order]


# -- pictures -----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig, bbox_inches: str | None = "tight") -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches=bbox_inches)
    _pyplot().close(fig)
    return buf.getvalue()


def plot_confusion_matrix(cm: np.ndarray | list, classes: list[str]) -> bytes:
    """Row-normalised confusion matrix as a PNG, readable up to a few hundred classes: the figure grows with
    the class count, a square-root colour scale keeps rare confusions visible next to a bright diagonal; up to
    20 classes cells carry their percentage, beyond that lines every 10 classes guide the eye."""
    from matplotlib.colors import PowerNorm

    plt = _pyplot()
    cm = np.asarray(cm, dtype=float)
    K = len(classes)
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = float(np.clip(2.5 + 0.17 * K, 5, 30))
    font = float(np.clip(160 / K, 6, 10))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(rates, cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    names = [c if len(c) <= 18 else c[:17] + "…" for c in classes]
    ax.set_xticks(range(K), names, rotation=90, fontsize=font)
    ax.set_yticks(range(K), names, fontsize=font)
    ax.set(xlabel="predicted class", ylabel="true class")
    acc = np.trace(cm) / max(1, cm.sum())
    ax.set_title(f"Confusion matrix, rows normalised ({int(cm.sum())} images, top-1 {100 * acc:.1f}%)")
    if K <= 20:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=font,
                    color="white" if rates[i, j] > 0.5 else "black")
    else:
        for t in range(10, K, 10):
            ax.axhline(t - 0.5, color="0.8", lw=0.4)
            ax.axvline(t - 0.5, color="0.8", lw=0.4)
        # Too many cells to number them all: number the largest confusions (>= 5% of a class), in red.
        off = np.where(np.eye(K, dtype=bool), 0, rates)
        for flat in np.argsort(off, axis=None)[::-1][:3 * K // 10]:
            i, j = divmod(int(flat), K)
            if off[i, j] >= 0.05:
                ax.text(j, i, f"{100 * off[i, j]:.0f}", ha="center", va="center", fontsize=font, color="darkred")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="share of the true class")
    return _png(fig)


def plot_reliability(calibration: dict[str, Any]) -> bytes:
    """Reliability diagram (accuracy per confidence bin against the diagonal) over a histogram of confidences."""
    plt = _pyplot()
    bins = calibration["bins"]
    lo, acc, conf, count = (np.array([b[k] for b in bins]) for k in ("lo", "accuracy", "confidence", "count"))
    width = bins[0]["hi"] - bins[0]["lo"]
    fig, (a, h) = plt.subplots(2, 1, figsize=(4.6, 5.6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    has = count > 0
    a.bar(lo[has], acc[has], width=width, align="edge", color="tab:blue", edgecolor="k", lw=0.5, label="accuracy")
    a.bar(lo[has], (conf - acc)[has], bottom=acc[has], width=width, align="edge", fill=False, hatch="///",
          edgecolor="tab:red", lw=0.5, label="gap to mean confidence")
    a.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    a.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"Reliability  (ECE {100 * calibration['ece']:.2f}%)")
    a.legend(loc="upper left", fontsize=8)
    h.bar(lo, count, width=width, align="edge", color="0.5", edgecolor="k", lw=0.5)
    h.set(xlabel="confidence (top softmax probability)", ylabel="images")
    fig.tight_layout()
    return _png(fig)


def plot_wrong(items: list[dict[str, Any]], images: ImageGetter, empty: str = "no wrong predictions") -> bytes:
    """A grid of the most confidently wrong images, each titled with its true and predicted class (`empty`: the
    text without any)."""
    plt = _pyplot()
    n = len(items)
    cols = min(8, max(1, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.95 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    short = lambda s: s if len(s) <= 12 else s[:11] + "…"  # noqa: E731
    for ax, it in zip(axes.flat, items):
        img = images(it["index"])
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, interpolation="nearest")
        ax.set_title(f"true {short(it['true'])}\npred {short(it['pred'])} {100 * it['confidence']:.0f}%", fontsize=8)
    if not items:
        axes[0, 0].text(0.5, 0.5, empty, ha="center", va="center")
    fig.suptitle("Most confidently wrong", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def split_images(split: Any) -> ImageGetter | None:
    """Image `i` of a data split (in memory, or read by index: a folder, an on-disk HF dataset), as the person
    would see it; None for a stream (shards, a streamed dataset), whose images cannot be fetched by index."""
    if not hasattr(split, "images") and not hasattr(split, "read"):
        return None

    def image(i: int) -> np.ndarray:
        if not hasattr(split, "images"):
            return np.asarray(split.read(i))
        x = split.images[i].numpy()  # (C, H, W) uint8
        return x[0] if x.shape[0] == 1 else x[:3].transpose(1, 2, 0)

    return image


# -- the page -----------------------------------------------------------------------------------
def _img(png: bytes, alt: str, width: str = "") -> str:
    style = f' style="max-width:{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}"{style}>'


def render_html(report: dict[str, Any], pngs: dict[str, bytes], curves: bytes | None = None) -> str:
    """One self-contained page: every picture inlined as base64, no external file or script."""
    s = report["summary"]
    esc = html.escape
    rows = [("data", s.get("data", "")), ("images", s["n"]), ("top-1", f"{s['acc1']:.2f}%"),
            ("top-5", f"{s['acc5']:.2f}%"), ("loss", f"{s['loss']:.4f}"), ("ECE", f"{100 * s['ece']:.2f}%"),
            ("macro precision / recall / F1",
             f"{s['macro_precision']:.3f} / {s['macro_recall']:.3f} / {s['macro_f1']:.3f}")]
    summary = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in rows)
    worst = sorted(range(len(report["per_class"])), key=lambda i: report["per_class"][i]["f1"])[:5]
    per_class = "".join(
        f"<tr{' class=low' if i in worst else ''}><td>{esc(c['class'])}</td><td>{c['precision']:.3f}</td>"
        f"<td>{c['recall']:.3f}</td><td>{c['f1']:.3f}</td><td>{c['support']}</td></tr>"
        for i, c in enumerate(report["per_class"])
    )
    confused = "".join(
        f"<tr><td>{esc(c['true'])}</td><td>{esc(c['pred'])}</td><td>{c['count']}</td>"
        f"<td>{100 * c['rate']:.1f}%</td></tr>"
        for c in report["most_confused"]
    ) or "<tr><td colspan=4>no confusions</td></tr>"
    curves_html = _img(curves, "training curves", "900px") if curves else "<p>(the run has no curves.png)</p>"
    title = esc(f"vitkit evaluation: {s.get('run', '')}")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: .2em .6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.low td {{ background: #fde8e8; }}
img {{ max-width: 100%; height: auto; }}
.row {{ display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }}
</style></head><body>
<h1>{title}</h1>
<table>{summary}</table>
<h2>Training curves</h2>
{curves_html}
<h2>Confusion matrix</h2>
{_img(pngs[CONFUSION_PNG], "confusion matrix")}
<h3>Most confused pairs</h3>
<table><tr><th>true</th><th>predicted</th><th>images</th><th>share of true class</th></tr>{confused}</table>
<div class="row"><div><h2>Calibration</h2>{_img(pngs[RELIABILITY_PNG], "reliability diagram")}</div>
<div><h2>Most confidently wrong</h2>{_img(pngs[WRONG_PNG], "most confidently wrong images")}</div></div>
<h2>Per class</h2>
<p>The five classes with the lowest F1 are shaded.</p>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class}</table>
</body></html>
"""


def write_report(out_dir: str | Path, logits: torch.Tensor, targets: torch.Tensor, classes: list[str], *,
                 images: ImageGetter | None = None, curves: str | Path | None = None,
                 summary: dict[str, Any] | None = None, n_wrong: int = 16, n_bins: int = 15) -> dict[str, Any]:
    """Write `report.json`, the PNGs and `report.html` to `out_dir`; return the report. images: dataset index ->
    picture, for the grid of wrong predictions (none without); curves: the run's `curves.png`, embedded when it
    exists; summary: values that take precedence in the summary (run, data, and `evaluate`'s numbers)."""
    out = Path(out_dir)
    report = classification_report(logits, targets, classes, n_bins=n_bins)
    report["summary"].update(summary or {})
    wrong = most_confident_wrong(logits, targets, classes, n_wrong)
    report["most_confident_wrong"] = wrong
    pngs = {CONFUSION_PNG: plot_confusion_matrix(report["confusion_matrix"], classes),
            RELIABILITY_PNG: plot_reliability(report["calibration"])}
    if images is not None:
        pngs[WRONG_PNG] = plot_wrong(wrong, images)
    curves_png = Path(curves).read_bytes() if curves is not None and Path(curves).is_file() else None
    report["files"] = {name: name for name in pngs} | {"html": REPORT_HTML}
    for name, data in pngs.items():
        atomic_write(out / name, data)
    if WRONG_PNG not in pngs:  # the page says why there is no picture (the JSON still lists them)
        pngs[WRONG_PNG] = plot_wrong([], lambda i: np.zeros((1, 1)), empty="no images to show\n(streamed data)"
                                     if wrong else "no wrong predictions")
    atomic_write(out / REPORT_HTML, render_html(report, pngs, curves_png).encode())
    atomic_write(out / REPORT_JSON, (json.dumps(report, indent=2) + "\n").encode())
    return report
