"""Training and evaluation: one loop (`fit`) for every objective, on top of the model contract;
`train` (classification, distillation) and `pretrain` (MAE, BEiT) are `fit` with their configs."""

from .config import BEiTConfig, DistillConfig, FitConfig, MAEConfig, PretrainConfig, TrainConfig
from .evaluate import evaluate, evaluate_run, tta_view_count, tta_views
from .loop import fit, pretrain, train, train_one_epoch
from .objectives.classify import classification_loss
from .optim import create_optimizer, param_groups, warmup_cosine
from .report import classification_report, expected_calibration_error, write_report
from .runtime import Runtime

__all__ = [
    "BEiTConfig", "DistillConfig", "FitConfig", "MAEConfig", "PretrainConfig", "Runtime", "TrainConfig",
    "classification_loss", "classification_report", "create_optimizer", "evaluate", "evaluate_run",
    "expected_calibration_error", "fit", "param_groups", "pretrain", "train", "train_one_epoch", "tta_view_count",
    "tta_views", "warmup_cosine", "write_report",
]
