"""Training, evaluation and inference on top of the model contract."""

from .config import TrainConfig
from .inference import Run, evaluate_run, expand_images, load_run
from .optim import create_optimizer, param_groups, warmup_cosine
from .report import classification_report, expected_calibration_error, write_report
from .runtime import Runtime
from .loop import classification_loss, evaluate, train, train_one_epoch

__all__ = [
    "Run",
    "Runtime",
    "TrainConfig",
    "classification_loss",
    "classification_report",
    "create_optimizer",
    "evaluate",
    "evaluate_run",
    "expand_images",
    "expected_calibration_error",
    "load_run",
    "param_groups",
    "train",
    "train_one_epoch",
    "warmup_cosine",
    "write_report",
]
