"""Data sets, preprocessing and loaders."""

from .augment import PRESETS, AugmentSpec, BatchMix, resolve_augment
from .datasets import (BUILTIN, IMG_EXTENSIONS, TORCHVISION, DataBundle, FolderCheck, FolderSplit, TensorSplit,
                       check_folder, load_data, subset_split)
from .loader import FolderLoader, SkipLog, TensorLoader, make_loader
from .transforms import check_image, eval_transform, load_image, train_transform

__all__ = ["PRESETS", "AugmentSpec", "BatchMix", "resolve_augment", "subset_split", "BUILTIN", "IMG_EXTENSIONS",
           "TORCHVISION", "DataBundle", "FolderCheck", "check_folder", "FolderLoader", "FolderSplit", "SkipLog", "TensorLoader", "TensorSplit", "check_image",
           "eval_transform", "load_data", "load_image", "make_loader", "train_transform"]
