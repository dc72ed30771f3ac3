"""Self-supervised pre-training: BEiT masked image modeling and masked autoencoders (MAE).

Objectives wrap unchanged backbones and own their masking, decoder or tokenizer, and loss; the run
directory they write fine-tunes with `vitkit train --pretrained RUN`. See docs/pretraining.md.
"""

from .config import PretrainConfig
from .loop import evaluate_loss, pretrain, pretrain_one_epoch
from .mae import MaskedAutoencoder, MaskedOutput, patchify, unpatchify
from .masking import BlockwiseMaskGenerator, RandomMaskGenerator
from .mim import BeitMIM
from .tokenizer import KMeansTokenizer, ModuleTokenizer, build_kmeans_tokenizer, kmeans, load_tokenizer

__all__ = [
    "BeitMIM",
    "BlockwiseMaskGenerator",
    "KMeansTokenizer",
    "MaskedAutoencoder",
    "MaskedOutput",
    "ModuleTokenizer",
    "PretrainConfig",
    "RandomMaskGenerator",
    "build_kmeans_tokenizer",
    "evaluate_loss",
    "kmeans",
    "load_tokenizer",
    "patchify",
    "pretrain",
    "pretrain_one_epoch",
    "unpatchify",
]
