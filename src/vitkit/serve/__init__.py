"""Serve a run directory or an ONNX export over HTTP, with a web page to try the model (`vitkit serve`).
Needs the `serve` extra (fastapi, uvicorn, python-multipart)."""

from .app import BackgroundServer, UploadLimit, create_app, serve
from .batcher import Capacity, MicroBatcher, QueueFull
from .predictor import OnnxPredictor, TorchPredictor, load_predictor

__all__ = ["BackgroundServer", "Capacity", "MicroBatcher", "OnnxPredictor", "QueueFull", "TorchPredictor",
           "UploadLimit", "create_app", "load_predictor", "serve"]
