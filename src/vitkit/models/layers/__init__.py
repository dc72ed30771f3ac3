"""Building blocks shared by every model family."""

from .attention import Attention, attend
from .block import Block
from .drop import DropPath, LayerScale, drop_path
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed
from .pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed

__all__ = [
    "Attention",
    "attend",
    "Block",
    "ConvStem",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "drop_path",
    "resample_abs_pos_embed",
    "sincos_2d_pos_embed",
]
