"""Training, evaluation and inference on top of the model contract."""

from .config import TrainConfig
from .inference import Run, evaluate_run, expand_images, load_run
from .optim import create_optimizer, param_groups, warmup_cosine
from .runtime import Runtime
from .loop import classification_loss, evaluate, train, train_one_epoch

__all__ = [
    "Run",
    "Runtime",
    "TrainConfig",
    "classification_loss",
    "create_optimizer",
    "evaluate",
    "evaluate_run",
    "expand_images",
    "load_run",
    "param_groups",
    "train",
    "train_one_epoch",
    "warmup_cosine",
]
