"""vitkit: Vision Transformers from images to a trained, evaluated classifier."""

from .engine import Run, TrainConfig, evaluate_run, load_run, train
from .models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["Run", "TrainConfig", "__version__", "create_model", "evaluate_run", "list_models", "load_run", "train"]
