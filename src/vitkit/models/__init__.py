"""Model families (ViT/DeiT, hybrid ViTs, Swin, BEiT, CvT, EVA-02 and DINOv3, torchvision CNN teachers), shared layers and the registry.

Imports nothing from data, engine or CLI.
"""

# Importing a family registers its variants.
from . import beit, cnn, cvt, eva, swin, vit  # noqa: F401
from .contract import AttentionStage, Intermediates, VisionModel, implements
from .registry import ModelEntry, create_model, get_model_entry, list_models, model_config, register_model
from .vit import VisionTransformer, ViTConfig
from .weights import load_weights, read_state_dict

__all__ = [
    "AttentionStage",
    "implements",
    "Intermediates",
    "ModelEntry",
    "ViTConfig",
    "VisionModel",
    "VisionTransformer",
    "create_model",
    "get_model_entry",
    "list_models",
    "load_weights",
    "model_config",
    "read_state_dict",
    "register_model",
]
