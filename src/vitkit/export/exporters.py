"""Write a trained run as ONNX, TorchScript or a `torch.export` program, checked against PyTorch.

Every export folder holds the model file and `preprocess.json`, so it is usable alone:

    OUT/
      model.onnx | model.torchscript.pt | model.pt2
      model.int8.onnx    (--int8: linear layers quantised to int8, ONNX only)
      preprocess.json    image size, colour mode, mean/std, class names, and the checks below
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..run import load_run
from .checks import PARITY_TOL, int8_accuracy, max_abs_diff, onnx_runner, quantize_int8
from .preprocess import PREPROCESS_FILE, Preprocess, write_preprocess

FORMATS = ("onnx", "torchscript", "exported-program")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "exported-program": "model.pt2"}
INT8_FILE = "model.int8.onnx"
INPUT_NAME, OUTPUT_NAME = "image", "logits"
ONNX_OPSET = 17  # LayerNormalization is a single op from 17 on; onnxruntime >= 1.18 runs it


@dataclass
class ExportResult:
    """Where the export went and how closely it reproduces the PyTorch model."""

    out_dir: Path
    format: str
    model_file: Path
    preprocess_file: Path
    dynamic_batch: bool
    batch_sizes: tuple[int, ...]  # batch sizes the parity check ran
    max_abs_diff: float  # largest |logit difference| from PyTorch eager over those batches
    int8: dict[str, Any] | None = None  # see `checks.int8_accuracy`

    @property
    def parity_ok(self) -> bool:
        return self.max_abs_diff <= PARITY_TOL


def export_run(run_dir: str | Path, format: str = "onnx", out: str | Path | None = None, *, dynamic_batch: bool = True,
               int8: bool = False, weights: str = "auto") -> ExportResult:
    """Export the model of a run directory to `out` (default `RUN_DIR/export-FORMAT`), compared with PyTorch
    on seeded random inputs of batch 1 and 3 (1 only without a dynamic batch axis); `int8` adds an
    onnxruntime dynamic-int8 copy and its top-1 accuracy change on the run's validation split."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if int8 and format != "onnx":
        raise ValueError("--int8 quantises an ONNX model with onnxruntime; use it with --format onnx")
    run = load_run(run_dir, "cpu", weights)
    pre = run.record.preprocess
    out_dir = Path(out) if out is not None else Path(run_dir) / f"export-{format}"
    out_dir.mkdir(parents=True, exist_ok=True)
    model_file = out_dir / MODEL_FILES[format]

    example = torch.randn(2, pre.in_chans, *pre.img_size, generator=torch.Generator().manual_seed(0))
    _EXPORTERS[format](run.model, example if dynamic_batch else example[:1], model_file, dynamic_batch)
    batch_sizes = (1, 3) if dynamic_batch else (1,)
    diff = _parity(run.model, format, model_file, pre, batch_sizes)
    result = ExportResult(out_dir, format, model_file, out_dir / PREPROCESS_FILE, dynamic_batch, batch_sizes, diff)
    if int8:
        quantize_int8(model_file, out_dir / INT8_FILE)
        result.int8 = {"file": INT8_FILE, **int8_accuracy(run, model_file, out_dir / INT8_FILE)}
    note = "logits; softmax gives class probabilities in the order of `classes`"
    write_preprocess(out_dir, pre, format=format, model_file=model_file.name, int8_file=INT8_FILE if int8 else None,
                     input={"name": INPUT_NAME, "batch": "dynamic" if dynamic_batch else 1},
                     output={"name": OUTPUT_NAME, "note": note},
                     source={"run": str(Path(run_dir).resolve()), "model": run.record.model, "weights": run.weights},
                     parity={"max_abs_diff": diff, "tolerance": PARITY_TOL, "batch_sizes": list(batch_sizes),
                             "reference": "PyTorch eager, fp32, seeded random inputs"}, int8=result.int8)
    return result


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence what tracing always says: shape checks become constants (the image size is fixed on
    purpose), and the TorchScript-based exporters are deprecated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*(feature will be removed|is deprecated).*")
        # The hybrids' weight standardisation calls batch_norm in training mode on the weights, on purpose.
        warnings.filterwarnings("ignore", message=".*operator 'batch_norm' is set to train=True.*")
        yield


def to_onnx(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True) -> None:
    """ONNX through the TorchScript-based exporter: `dynamo=True` needs `onnxscript` and, in torch 2.14,
    fails on Swin's and the plain ViTs' attention reshapes with a symbolic batch; tracing handles every
    family, and the parity check guards what it could get wrong."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with _quiet_tracing():
        torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=ONNX_OPSET)


def to_torchscript(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True) -> None:
    """A traced TorchScript module (the batch size is free either way: tracing records it as a shape)."""
    with _quiet_tracing():
        torch.jit.trace(model, example).save(str(path))


def to_exported_program(model: nn.Module, example: torch.Tensor, path: Path, dynamic_batch: bool = True) -> None:
    """A `torch.export` program saved as `.pt2`; with `dynamic_batch`, the batch dimension is symbolic."""
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=shapes), str(path))


_EXPORTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path, bool], None]] = {
    "onnx": to_onnx, "torchscript": to_torchscript, "exported-program": to_exported_program}


def load_exported(format: str, path: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable `x -> logits` from an export file. TorchScript and `.pt2` archives are unpickled when
    loaded, so open only files you made; ONNX files are protobuf and run in onnxruntime."""
    if format == "onnx":
        run_onnx = onnx_runner(path)
        return lambda x: torch.from_numpy(run_onnx(x.numpy()))
    if format == "torchscript":
        with _quiet_tracing():
            return torch.jit.load(str(path), map_location="cpu")
    if format == "exported-program":
        return torch.export.load(str(path)).module()
    raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")


@torch.no_grad()
def _parity(model: nn.Module, format: str, path: Path, pre: Preprocess, batch_sizes: tuple[int, ...]) -> float:
    """Largest |logit difference| between the reloaded export and the PyTorch model."""
    exported = load_exported(format, path)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, pre.in_chans, *pre.img_size, generator=gen)
        worst = max(worst, max_abs_diff(exported(x), model(x)))
    return worst
