"""The model card of a run directory (`README.md` with Hugging Face Hub metadata), and `push` to the Hub.

Everything on the card comes from the run directory itself: the record (`config.yaml`), the weights'
shapes, the epochs (`metrics.jsonl`) and the latest evaluation (`eval.json`). Training writes it when
the run ends, `vitkit eval` and `vitkit convert` refresh or write it; the card never states a number
the run directory does not hold.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .run import EMA_WEIGHTS, EVAL, WEIGHTS, RunRecord, atomic_write, front_matter, read_metrics

CARD = "README.md"
# What `push` uploads: the card, the record, the weights, the measurements; not the resume checkpoint.
PUSHED = (CARD, "config.yaml", WEIGHTS, EMA_WEIGHTS, EVAL, "metrics.jsonl", "curves.png", "adapter_model.safetensors",
          "adapter_config.json")
_OBJECTIVES = {"classify": "trained as a classifier", "distill": "trained as a classifier with DeiT distillation",
               "mae": "pre-trained as a masked autoencoder (MAE, no labels)",
               "beit": "pre-trained by BEiT masked image modeling (no labels)", "converted": "converted",
               "knn": "evaluated by k-NN on its frozen features (nothing trained)"}


def describe_hardware(device: torch.device, world_size: int = 1) -> str:
    """Where a run trains, in words: the accelerator or the CPU, its vector instructions, processes."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        cpu = _cpu_name()
        what = f"CPU {cpu} ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return what + (f" x {world_size} processes" if world_size > 1 else "")


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _params(run_dir: Path) -> int:
    """Parameters in the run's weights, from the file's header (nothing is loaded)."""
    with safe_open(str(run_dir / WEIGHTS), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _spread(ev: dict[str, Any]) -> str:
    """The binomial standard error of top-1 on n images: how far a rerun on other images could land."""
    n, p = ev.get("n"), ev["acc1"] / 100
    return f"; top-1's standard error on {n} images is +-{100 * math.sqrt(p * (1 - p) / n):.1f} points" if n else ""


def model_card(run_dir: str | Path) -> str:
    """The card's text for the run in `run_dir`."""
    run_dir = Path(run_dir)
    rec = RunRecord.read(run_dir)
    ev = json.loads((run_dir / EVAL).read_text()) if (run_dir / EVAL).exists() else None
    rows = read_metrics(run_dir)
    meta: dict[str, Any] = {"library_name": "vitkit", "tags": ["vitkit", "vision-transformer", rec.model]}
    if rec.classes:
        meta["pipeline_tag"] = "image-classification"
    named_data = rec.data is not None and not Path(rec.data).exists()  # a data set's name, not a local folder
    if named_data:
        meta["datasets"] = [rec.data]
    if ev is not None and "acc1" in ev:
        meta["model-index"] = [{"name": run_dir.name, "results": [{
            "task": {"type": "image-classification"},
            "dataset": {"name": str(ev.get("data", rec.data)), "type": str(ev.get("data", rec.data))},
            "metrics": [{"type": "accuracy", "name": "top-1", "value": round(ev["acc1"], 2)},
                        {"type": "accuracy", "name": "top-5", "value": round(ev["acc5"], 2)}]}]}]
    n_params = _params(run_dir)
    h, w = rec.img_size
    arch = {k: v for k, v in rec.model_args.items() if k not in ("num_classes", "in_chans", "img_size")}
    arch_note = f" with {', '.join(f'{k}={v}' for k, v in arch.items())}" if arch else ""
    out = [front_matter(meta), "", f"# {run_dir.name}", "",
           f"`{rec.model}`{arch_note} ({n_params / 1e6:.2f}M parameters, {h}x{w} px, {rec.in_chans} channel"
           f"{'s' if rec.in_chans > 1 else ''}), {_OBJECTIVES.get(rec.objective, rec.objective)}"
           + (f" on `{rec.data}`" if rec.data else "") + (f", from `{rec.source}`" if rec.source else "")
           + (f", starting from `{rec.pretrained}`" if rec.pretrained else "") + ", with vitkit.", ""]
    out += ["## Results", ""]
    if ev is not None and "acc1" in ev:
        out += ["| metric | value |", "|---|---|", f"| top-1 | {ev['acc1']:.2f}% |", f"| top-5 | {ev['acc5']:.2f}% |",
                *([f"| loss | {ev['loss']:.4f} |"] if "loss" in ev else []), "",
                f"Measured by vitkit on {ev.get('n', '?')} images of `{ev.get('data', rec.data)}` (the run's "
                f"held-out split unless named otherwise), {ev.get('weights', 'raw')} weights, "
                f"{ev.get('tta_views', 1)} test-time view(s) per image" + _spread(ev) + "."]
    else:
        out += ["Not evaluated: " + ("a pre-training run has no classifier; fine-tune it with "
                                     f"`vitkit train --pretrained {run_dir}`." if not rec.classes else
                                     "run `vitkit eval` (it refreshes this card).")]
    out += ["", "## Training", ""]
    if rows:
        total = sum(r.get("time_s", 0.0) for r in rows)
        out += [f"- {len(rows)} epochs in {total / 60:.1f} min on {rec.hardware or 'unrecorded hardware'}, "
                f"precision {rec.precision}, seed {rec.seed}."]
        recipe = [f"{k} {v}" for k, v in rec.recipe().items()]
        out += ["- Recipe: AdamW, " + ", ".join(recipe) + ". The whole configuration is `config.yaml`."]
    elif rec.objective == "knn" and ev is not None:
        out += [f"- No training: each image is classified by its {ev['knn_k']} most similar training images "
                f"({ev['bank']}, frozen features, votes weighted exp(cos / {ev['knn_temperature']})), a k-NN "
                f"baseline; on {rec.hardware or 'unrecorded hardware'}. The classifier in the weights is untrained."]
    else:
        out += ["- Nothing was trained here: the weights were converted from " + f"`{rec.source}`."]
    if rec.classes:
        shown = ", ".join(rec.classes[:20]) + (", ..." if len(rec.classes) > 20 else "")
        out += [f"- {len(rec.classes)} classes: {shown}"]
    out += ["", "## Intended use and limits", "",
            ("A baseline: how well the frozen features separate these classes; to classify, train a head "
             "(`vitkit train --pretrained ... --finetune linear`). " if rec.objective == "knn" else
             f"Classifying {h}x{w} px images into the classes above. " if rec.classes else
             "A backbone to fine-tune (`vitkit train --pretrained`) or to embed images with (`vitkit embed`). ")
            + "It was measured only as stated under Results: images from another source, another resolution or "
              "other classes may fare differently, and nothing here tests fairness or robustness.", "",
            "## How to use", "", "```python", "import vitkit", "", f'run = vitkit.load_run("{run_dir.name}")'
            "  # this directory (e.g. after `hf download REPO --local-dir ...`)",
            'print(run.predict(["image.png"]))' if rec.classes and rec.objective != "knn" else
            'features = run.embed(["image.png"])', "```", "",
            f"Preprocessing: resize to {h}x{w}, {'grey' if rec.in_chans == 1 else 'RGB'}, normalised with mean "
            f"{list(rec.mean)} and std {list(rec.std)} (`run.preprocess` does it).", ""]
    return "\n".join(out)


def write_card(run_dir: str | Path) -> Path:
    """Write (or refresh) `RUN/README.md`, atomically."""
    path = Path(run_dir) / CARD
    atomic_write(path, model_card(run_dir).encode())
    return path


def push(run_dir: str | Path, repo_id: str, *, private: bool = False, dry_run: bool = False) -> list[Path]:
    """Upload the run's card, record, weights and measurements to a Hugging Face model repository (created
    if needed); `dry_run` only lists them. Needs huggingface_hub, a token (`hf auth login` or HF_TOKEN) and a
    network. Returns the files."""
    run_dir = Path(run_dir)
    RunRecord.read(run_dir)  # a run directory, or a clear error
    write_card(run_dir)
    files = [run_dir / f for f in PUSHED if (run_dir / f).exists()]
    if dry_run:
        return files
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise ImportError("vitkit push needs huggingface_hub: pip install huggingface_hub") from None
    if get_token() is None:
        raise PermissionError("no Hugging Face token: run `hf auth login` or set HF_TOKEN (a write token), then push again")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), allow_patterns=[f.name for f in files],
                          commit_message=f"vitkit run {run_dir.name}")
    except Exception as e:  # no network, no access, a bad name: one line
        raise OSError(f"could not push {run_dir} to {repo_id}: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    return files
