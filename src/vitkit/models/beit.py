"""BEiT (Bao et al. 2022, "BEiT: BERT Pre-Training of Image Transformers").

A ViT encoder with three changes: no absolute position embedding, but a learned relative position
bias added to the attention logits of every block (or one table shared by all blocks, as in BEiT
pre-training); layer scale (CaiT, Touvron et al. 2021) on both residual branches; query and value
biases without a key bias. Classification averages the patch tokens and normalises them (`fc_norm`).

For masked image modeling the encoder can own a learned `[MASK]` embedding (`use_mask_token`):
`forward_masked` replaces the masked patches by it and returns per-patch outputs. The objective
itself (tokenizer, head, loss) is a wrapper around this backbone, not part of it.

Module and parameter names follow timm's `Beit`, so timm state dicts load unchanged.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .contract import BlockOutputs, VisionModel
from .layers.helpers import check_ranges, classifier_head, init_linears, init_small_head, to_2tuple
from .layers import PatchEmbed, resample_abs_pos_embed
from .layers.attention import QVBiasAttention
from .layers.block import GammaBlock, encoder_blocks, rescale_residual_outputs
from .layers.pos_embed import window_offset_index
from .registry import INCEPTION_MEAN, INCEPTION_STD, ModelEntry, register_model

# Pairs involving the class token have no spatial offset; BEiT gives them three extra table rows:
# class-to-patch, patch-to-class and class-to-class.
NUM_CLS_ENTRIES = 3


@dataclass(frozen=True)
class BeitConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # learned query and value biases; the key bias is always zero
    use_abs_pos_emb: bool = False
    use_rel_pos_bias: bool = True  # a relative position bias table in every block
    use_shared_rel_pos_bias: bool = False  # one table for all blocks (BEiT pre-training)
    init_values: float | None = 0.1  # layer scale initial value; None turns layer scale off
    use_mean_pooling: bool = True  # mean of patch tokens then `fc_norm`; False: class token after `norm`
    use_mask_token: bool = False  # a learned [MASK] embedding for masked image modeling
    drop_rate: float = 0.0  # before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        positive = ("in_chans", "embed_dim", "depth", "num_heads", "patch_size")
        rates = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
        check_ranges(self, positive=positive, nonnegative=("num_classes",), rates=rates)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        size = to_2tuple(self.img_size)
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.init_values is not None and self.init_values <= 0:
            raise ValueError(f"init_values must be positive or None (no layer scale), got {self.init_values}")


# -- relative position bias ---------------------------------------------------------------------------
def num_relative_positions(window: tuple[int, int]) -> int:
    """Rows of a bias table: every 2-D offset between two patches of `window`, plus the class entries."""
    return (2 * window[0] - 1) * (2 * window[1] - 1) + NUM_CLS_ENTRIES


def relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    """Row of the bias table for every (query, key) pair, `(1 + N, 1 + N)` with the class token first."""
    num_offsets = (2 * window[0] - 1) * (2 * window[1] - 1)
    index = F.pad(window_offset_index(window), (1, 0, 1, 0))  # (1 + N, 1 + N): row and column 0 are the class token
    index[0, :] = num_offsets  # class -> patch
    index[:, 0] = num_offsets + 1  # patch -> class
    index[0, 0] = num_offsets + 2  # class -> class
    return index


def relative_position_bias(
    table: torch.Tensor, index: torch.Tensor, window: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """Attention bias `(1, heads, 1 + N, 1 + N)` for a `grid` of patches from a table learned for `window`.

    A grid other than the configured window (another input size) resizes the table and rebuilds the
    index on the fly, so any input that is a multiple of the patch size works.
    """
    if grid != window:
        table = resize_rel_pos_bias_table(table, grid, window)
        index = relative_position_index(grid).to(table.device)
    n = index.shape[0]
    bias = table[index.view(-1)].view(n, n, -1)  # (1 + N, 1 + N, heads)
    return bias.permute(2, 0, 1).unsqueeze(0).contiguous()  # fused kernels want a dense mask


def resize_rel_pos_bias_table(
    table: torch.Tensor, new_window: tuple[int, int], old_window: tuple[int, int] | None = None
) -> torch.Tensor:
    """Resize a bias table `((2H-1)(2W-1) + 3, heads)` made for `old_window` to `new_window`.

    This is the interpolation of the BEiT fine-tuning code, which timm's `resize_rel_pos_bias_table`
    reproduces: the old offsets are placed on a geometric progression (1, q, q^2, ... steps outwards)
    stretched to span the new offset range, so the near offsets, which carry most of the signal, stay
    nearly in place; each head is then interpolated (piecewise linear, separable) at the new integer
    offsets. The three class-token entries are kept. `old_window=None` assumes a square old window,
    which is what a checkpoint table's length allows one to infer.
    """
    heads = table.shape[1]
    n_grid = table.shape[0] - NUM_CLS_ENTRIES
    if old_window is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid or side % 2 == 0:
            raise ValueError(f"cannot infer a square window from a table of {table.shape[0]} rows; pass old_window")
        old_window = ((side + 1) // 2,) * 2
    old = (2 * old_window[0] - 1, 2 * old_window[1] - 1)
    new = (2 * new_window[0] - 1, 2 * new_window[1] - 1)
    if old[0] * old[1] != n_grid:
        raise ValueError(f"table has {table.shape[0]} rows, which does not fit window {tuple(old_window)}")
    if old == new:
        return table
    offsets, cls_entries = table[:n_grid], table[n_grid:]
    z = offsets.float().t().reshape(heads, *old)  # (heads, 2H-1, 2W-1)
    rows = _linear_interp_matrix(_geometric_positions(old[0], new[0]), _integer_positions(new[0])).to(z)
    cols = _linear_interp_matrix(_geometric_positions(old[1], new[1]), _integer_positions(new[1])).to(z)
    z = rows @ z @ cols.t()  # (heads, 2H'-1, 2W'-1)
    return torch.cat([z.reshape(heads, -1).t().to(table.dtype), cls_entries])


def _geometric_positions(src: int, dst: int) -> torch.Tensor:
    """Positions for `src` old offsets: steps 1, q, q^2, ... out from 0 so that they reach about `dst // 2`."""
    n, reach = src // 2, dst // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:  # bisection for q with 1 + q + ... + q^(n-1) = reach; the last midpoint is used
        q = (lo + hi) / 2
        if (1.0 - q**n) / (1.0 - q) > reach:
            hi = q
        else:
            lo = q
    pos = list(itertools.accumulate(q**i for i in range(n)))
    return torch.tensor([-p for p in reversed(pos)] + [0.0] + pos)


def _integer_positions(size: int) -> torch.Tensor:
    return torch.arange(-(size // 2), size // 2 + 1, dtype=torch.float32)


def _linear_interp_matrix(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """`(len(dst), len(src))` weights of piecewise-linear interpolation on the sorted, uneven grid `src`;
    points outside `src` take the nearest end value."""
    right = torch.bucketize(dst, src).clamp(max=len(src) - 1)
    left = (right - 1).clamp(min=0)
    d_left = (dst - src[left]).clamp(min=0)
    d_right = (src[right] - dst).clamp(min=0)
    total = d_left + d_right
    w_right = torch.where(total > 0, d_left / total.clamp(min=1e-12), 0.5)  # 0.5: left == right
    rows = torch.arange(len(dst))
    m = torch.zeros(len(dst), len(src))
    m.index_put_((rows, left), 1.0 - w_right, accumulate=True)
    m.index_put_((rows, right), w_right, accumulate=True)
    return m


class RelativePositionBias(nn.Module):
    """One relative position bias table for all blocks (BEiT's shared bias); timm's `rel_pos_bias`."""

    def __init__(self, window: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.window_size = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_relative_positions(window), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        table, index = self.relative_position_bias_table, self.relative_position_index
        return relative_position_bias(table, index, self.window_size, grid)


# -- encoder --------------------------------------------------------------------------------------------
class BeitAttention(QVBiasAttention):
    """`layers.QVBiasAttention` (query and value biases) with, optionally, this block's own position bias."""

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, window_size: tuple[int, int] | None = None, **kwargs
    ) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, **kwargs)
        self.window_size = window_size
        self.relative_position_bias_table = None
        if window_size is not None:
            rows = num_relative_positions(window_size)
            self.relative_position_bias_table = nn.Parameter(torch.zeros(rows, num_heads))
            self.register_buffer("relative_position_index", relative_position_index(window_size), persistent=False)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        need_weights: bool = False,
        *,
        grid: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`attn_bias`: the shared position bias, if any; this block's own bias is added for `grid`."""
        if self.relative_position_bias_table is not None:
            table, index = self.relative_position_bias_table, self.relative_position_index
            own = relative_position_bias(table, index, self.window_size, grid or self.window_size)
            attn_bias = own if attn_bias is None else own + attn_bias
        return super().forward(x, attn_bias, need_weights)


class BeitBlock(GammaBlock):
    """Pre-norm encoder block with layer scale (`gamma_1`, `gamma_2`) and BEiT's attention."""

    def __init__(self, dim: int, num_heads: int, *, window_size: tuple[int, int] | None, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, attn_layer=partial(BeitAttention, window_size=window_size), **kwargs)

    def forward(
        self,
        x: torch.Tensor,
        grid: tuple[int, int],
        shared_rel_pos_bias: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return `(tokens, attention probabilities or None)`; see `Attention.forward`."""
        return super().forward(x, shared_rel_pos_bias, need_weights=need_weights, grid=grid)


class Beit(VisionModel):
    def __init__(self, cfg: BeitConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_features = D
        self.num_prefix_tokens = 1
        self.grid = (to_2tuple(cfg.img_size)[0] // cfg.patch_size, to_2tuple(cfg.img_size)[1] // cfg.patch_size)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.use_mask_token else None
        n_pos = self.grid[0] * self.grid[1] + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D)) if cfg.use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.rel_pos_bias = RelativePositionBias(self.grid, cfg.num_heads) if cfg.use_shared_rel_pos_bias else None

        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        window = self.grid if cfg.use_rel_pos_bias else None
        self.blocks = encoder_blocks(cfg, BeitBlock, window_size=window, norm_layer=norm_layer)
        # Mean pooling normalises after pooling (`fc_norm`), so there is no per-token final norm.
        self.norm = nn.Identity() if cfg.use_mean_pooling else norm_layer(D)
        self.fc_norm = norm_layer(D) if cfg.use_mean_pooling else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = classifier_head(D, cfg.num_classes)
        self._init_weights()
        # Checkpoints made at another resolution load directly: their position tables are resized.
        self._register_load_state_dict_pre_hook(self._resize_position_tables_hook)

    # -- construction helpers -------------------------------------------------------------------
    def _init_weights(self) -> None:
        # timm's BEiT init: truncated normal (std .02) for linears and tokens, zero biases; position
        # bias tables and q/v biases start at zero, layer scale at `init_values`.
        init_linears(self)
        for tok in (self.cls_token, self.mask_token, self.pos_embed):
            if tok is not None:
                nn.init.trunc_normal_(tok, std=0.02)
        rescale_residual_outputs(self.blocks)
        init_small_head(self.head)

    def _resize_position_tables_hook(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        for name, param in self.named_parameters():
            key = prefix + name
            if key not in state_dict or state_dict[key].shape == param.shape:
                continue
            if name.endswith("relative_position_bias_table"):
                # The checkpoint's window is inferred from its table (square), as timm does.
                state_dict[key] = resize_rel_pos_bias_table(state_dict[key], self.grid)
            elif name == "pos_embed":
                state_dict[key] = resample_abs_pos_embed(state_dict[key], self.grid, num_prefix_tokens=1)

    # -- the model contract ---------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        # Names of parameters (the last dotted component is enough for the optimiser's groups).
        skip = {"pos_embed", "cls_token", "relative_position_bias_table"}
        return skip | ({"mask_token"} if self.mask_token is not None else set())

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = classifier_head(self.num_features, num_classes).to(self.cls_token)
        init_small_head(self.head)

    def _embed(
        self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.patch_embed(x)  # (B, N, D)
        if bool_masked_pos is not None:
            x = self._mask(x, bool_masked_pos)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, D)
        if self.pos_embed is not None:  # resampled on the fly for another input size
            x = x + resample_abs_pos_embed(self.pos_embed, grid, self.grid, num_prefix_tokens=1)
        return self.pos_drop(x), grid

    def _mask(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Replace the patch embeddings where `bool_masked_pos` is True by [MASK]: the corrupted input of BEiT."""
        if self.mask_token is None:
            raise ValueError("masking patches needs a mask token: build the model with use_mask_token=True")
        B, N, _ = x.shape
        mask = bool_masked_pos.reshape(B, -1)  # (B, N); (B, gh, gw) accepted too
        if mask.shape[1] != N:
            raise ValueError(f"bool_masked_pos has {mask.shape[1]} positions per image, the input has {N} patches")
        w = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        return x * (1 - w) + self.mask_token.to(x.dtype) * w

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens `(B, 1 + N, D)`; `bool_masked_pos` `(B, N)` masks patches (see `forward_masked`)."""
        x, grid = self._embed(x, bool_masked_pos)
        shared = self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x, _ = blk(x, grid, shared)
        return self.norm(x)

    def forward_masked(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Masked image modeling: per-patch outputs `(B, N, D)` with the True patches replaced by [MASK]."""
        return self.forward_features(x, bool_masked_pos)[:, self.num_prefix_tokens :]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.cfg.use_mean_pooling else x[:, 0]  # (B, D)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def iter_blocks(self, x: torch.Tensor, need_weights: set[int]) -> BlockOutputs:
        x, grid = self._embed(x)
        shared = self.rel_pos_bias(grid) if self.rel_pos_bias is not None else None
        for i, blk in enumerate(self.blocks):
            x, attn = blk(x, grid, shared, need_weights=i in need_weights)
            yield x, grid, attn


# -- variants ---------------------------------------------------------------------------------------
# timm's names and configurations (layer scale 0.1 for base, 1e-5 for large); BEiT's fine-tuned
# weights expect inputs in [-1, 1]. The pico variant trains from scratch on 28 px digits on a CPU.
_BEIT_NORM = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)
VARIANTS: dict[str, tuple[BeitConfig, dict[str, Any]]] = {
    "beit_base_patch16_224": (BeitConfig(embed_dim=768, depth=12, num_heads=12, init_values=0.1), _BEIT_NORM),
    "beit_large_patch16_224": (BeitConfig(embed_dim=1024, depth=24, num_heads=16, init_values=1e-5), _BEIT_NORM),
    "beit_pico_patch4_28": (BeitConfig(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=4,
                                       num_heads=4, mlp_ratio=2.0, init_values=0.1), {}),
}

for _name, (_cfg, _pre) in VARIANTS.items():
    register_model(ModelEntry(name=_name, family="beit", config=_cfg, builder=Beit, **_pre))
