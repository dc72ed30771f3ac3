"""Export a trained run for use outside vitkit: ONNX, TorchScript or `torch.export`, int8, parity checks.
ONNX and int8 need the `export` extra (onnx, onnxruntime)."""

from .checks import PARITY_TOL, int8_accuracy, max_abs_diff, onnx_runner, quantize_int8
from .exporters import FORMATS, INT8_FILE, MODEL_FILES, ExportResult, export_run, load_exported
from .preprocess import PREPROCESS_FILE, Preprocess, read_preprocess, write_preprocess

__all__ = ["FORMATS", "INT8_FILE", "MODEL_FILES", "PARITY_TOL", "PREPROCESS_FILE", "ExportResult", "Preprocess",
           "export_run", "int8_accuracy", "load_exported", "max_abs_diff", "onnx_runner", "quantize_int8",
           "read_preprocess", "write_preprocess"]
