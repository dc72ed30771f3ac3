"""Checks that an export still gives the run's answers: logit parity and the int8 accuracy change."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# fp32 logits of the same graph in two runtimes differ by summation order only (~1e-6 here).
PARITY_TOL = 1e-4


def max_abs_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float((torch.as_tensor(a).float() - torch.as_tensor(b).float()).abs().max())


def onnx_runner(path: str | Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """`x (B, C, H, W) float32 -> logits` through an onnxruntime CPU session."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation of an ONNX model's linear layers (onnxruntime): constant MatMul/Gemm
    weights (every `nn.Linear`) are stored as int8, activations quantised per batch at run time;
    attention's activation products, the convolutions and the norms stay in fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # onnxruntime advises its pre-processing pass on the root logger; on our exports it changes nothing
    # that is quantised (checked: the same 17 MatMulInteger nodes for vit_pico_conv4_28 either way).
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        logging.disable(logging.NOTSET)
    return Path(dst)


def int8_accuracy(run, fp32_file: str | Path, int8_file: str | Path, *, batch_size: int = 256) -> dict[str, Any]:
    """Top-1 of the fp32 and int8 ONNX models on the run's validation split: `fp32_acc1`, `int8_acc1` (%),
    `change` (points), `agreement` (% of images with the same top-1 class), `n`, and both file sizes."""
    from ..data import load_data, make_loader

    rec = run.record
    if rec.data is None:
        raise ValueError(f"{run.path} names no data set (converted weights): --int8 needs validation images to measure on")
    bundle = load_data(rec.data, seed=rec.seed, val_fraction=rec.val_fraction)
    if list(bundle.classes) != list(run.classes):
        raise ValueError(f"{rec.data} now has classes {bundle.classes[:10]}, the run was trained on {run.classes[:10]}")
    loader = make_loader(bundle.val, train=False, batch_size=batch_size, img_size=rec.img_size, mean=rec.mean,
                         std=rec.std, num_workers=2)
    fp32, int8 = onnx_runner(fp32_file), onnx_runner(int8_file)
    right32 = right8 = same = n = 0
    for x, y in loader:
        p32, p8 = fp32(x.numpy()).argmax(1), int8(x.numpy()).argmax(1)
        y = y.numpy()
        right32 += int((p32 == y).sum())
        right8 += int((p8 == y).sum())
        same += int((p32 == p8).sum())
        n += len(y)
    if not n:
        raise ValueError(f"{rec.data} has no validation images to measure the int8 model on")
    acc32, acc8 = 100 * right32 / n, 100 * right8 / n
    return {"fp32_acc1": acc32, "int8_acc1": acc8, "change": acc8 - acc32, "agreement": 100 * same / n, "n": n,
            "fp32_bytes": Path(fp32_file).stat().st_size, "int8_bytes": Path(int8_file).stat().st_size}
