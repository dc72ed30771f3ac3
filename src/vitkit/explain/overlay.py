"""Heat maps overlaid on the images a run's model saw, saved as PNG: what `vitkit explain` writes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..run import atomic_write
from .maps import METHODS, attention_map, gradcam, rollout


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heat map `(H, W)` over an image `(H, W)` or `(H, W, 3)` in [0, 1]; RGB float `(H, W, 3)`."""
    from matplotlib import colormaps

    rgb = np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]
    colour = colormaps[cmap](np.clip(heat, 0, 1))[..., :3]
    return np.clip((1 - alpha) * rgb + alpha * colour, 0, 1)


def figure_png(image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], title: str) -> bytes:
    """The input, then one overlay per panel `(label, heat map)`, in a row; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels) + 1
    cols = min(n, 7)  # many heads wrap onto more rows
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * max(cols, 2), 2.3 * rows + 0.5), squeeze=False)
    axes = axes.flatten()
    axes[0].imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title("input", fontsize=8)
    for ax, (label, heat) in zip(axes[1:], panels):
        ax.imshow(overlay(image, heat), interpolation="bilinear")
        ax.set_title(label, fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalised input `(C, H, W)` back to [0, 1] pixels, `(H, W)` or `(H, W, 3)`: what the model saw."""
    img = x.cpu().float() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0, 1).numpy()
    return img[0] if img.shape[0] == 1 else img[:3].transpose(1, 2, 0)


def explain_files(run: Any, files: Sequence[str | Path], out_dir: str | Path, *, methods: Sequence[str] = ("rollout",),
                  head_fusion: str = "mean", discard_ratio: float = 0.0, target: str | None = None) -> list[Path]:
    """Write `OUT/<image stem>_<method>.png` for every image and method; return the paths.

    run: a `vitkit.run.Run` (`load_run`). target: a class name for Grad-CAM (default: the predicted
    class). Errors (unknown method, a model without attention maps) are raised before anything is written.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method {bad[0]!r}: choose from {', '.join(METHODS)}")
    if target is not None and target not in run.classes:
        raise ValueError(f"--target {target!r} is not one of the run's classes ({', '.join(run.classes[:10])}...)")
    tgt = run.classes.index(target) if target is not None else None
    what = f"class {target}" if target is not None else "the predicted class"
    titles = {"rollout": f"rollout, heads {head_fusion}, discard {discard_ratio:g}",
              "attention": "last-block attention", "gradcam": f"Grad-CAM for {what}"}
    out, written, used = Path(out_dir), [], set()
    for start in range(0, len(files), 16):
        chunk = list(files[start : start + 16])
        x = run.preprocess(chunk).to(run.device)
        with torch.no_grad():
            conf, pred = run.model(x).float().softmax(dim=-1).max(dim=-1)
        panels = {}  # method -> [(label, maps (B, H, W))]
        for m in methods:  # every map first, so a model that cannot explain itself writes nothing
            if m == "rollout":
                panels[m] = [("rollout", rollout(run.model, x, head_fusion=head_fusion, discard_ratio=discard_ratio))]
            elif m == "attention":
                heads = attention_map(run.model, x, per_head=True)
                panels[m] = [(f"heads: {head_fusion}", attention_map(run.model, x, head_fusion=head_fusion))]
                panels[m] += [(f"head {h}", heads[:, h]) for h in range(heads.shape[1])]
            else:
                panels[m] = [("Grad-CAM", gradcam(run.model, x, target=tgt))]
        for i, f in enumerate(chunk):
            img = _display(x[i], run.record.mean, run.record.std)
            head = f"{Path(f).name}: predicted {run.classes[int(pred[i])]} ({100 * float(conf[i]):.0f}%)"
            for m in methods:
                name = f"{Path(f).stem}_{m}.png"
                k = 1
                while name in used:  # two inputs with one name (from different folders)
                    k += 1
                    name = f"{Path(f).stem}-{k}_{m}.png"
                used.add(name)
                figure = figure_png(img, [(label, maps[i].cpu().numpy()) for label, maps in panels[m]],
                                    f"{head}\n{titles[m]}")
                atomic_write(out / name, figure)
                written.append(out / name)
    return written
