"""Building blocks shared by every model family."""

from .attention import Attention, attend
from .block import Block
from .drop import DropPath, LayerScale, drop_path
from .linear import Linear, cpu_linear_backend, linear, set_cpu_linear
from .mlp import Mlp
from .patch_embed import ConvStem, PatchEmbed
from .pos_embed import resample_abs_pos_embed, sincos_2d_pos_embed

__all__ = [
    "Attention",
    "attend",
    "cpu_linear_backend",
    "linear",
    "set_cpu_linear",
    "Block",
    "ConvStem",
    "DropPath",
    "LayerScale",
    "Linear",
    "Mlp",
    "PatchEmbed",
    "drop_path",
    "resample_abs_pos_embed",
    "sincos_2d_pos_embed",
]
