"""vitkit: Vision Transformers from images to a trained, evaluated classifier.

The names below load their part of the package on first use, so `import vitkit.models` (or a tool
that only runs a trained model) does not import the training engine and the data layer.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "create_model": "vitkit.models", "list_models": "vitkit.models",
    "Run": "vitkit.run", "RunRecord": "vitkit.run", "load_run": "vitkit.run",
    "TrainConfig": "vitkit.engine", "PretrainConfig": "vitkit.engine", "evaluate_run": "vitkit.engine",
    "fit": "vitkit.engine", "pretrain": "vitkit.engine", "train": "vitkit.engine",
}
__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vitkit' has no attribute {name!r}")
