"""Swin Transformer v1 (Liu et al. 2021, "Hierarchical Vision Transformer using Shifted Windows").

Self-attention is restricted to non-overlapping `M x M` windows (linear, not quadratic, in the image
area), with a learned relative position bias inside each window. Every second block shifts the
window grid by `M // 2` so that information crosses window borders; the shift is a cyclic
`torch.roll` of the feature map plus an attention mask that keeps tokens which wrapped around the
border from attending to their new neighbours (paper Sec. 3.2, Fig. 4). Four stages halve the
resolution and double the width by patch merging; the classifier pools the last map.

Input sizes. Attention masks are built for the actual feature-map size on every call, so any input
whose sides are multiples of the patch size works, not only `img_size`:
  * A map side larger than the window but not a multiple of it is padded at the bottom/right to a
    multiple of the window, attended, and cropped back. The padding is a region of its own in the
    attention mask, so no real token attends to a padded one (timm attends to its zeros instead, so
    the two libraries agree only on sizes the windows divide).
  * A map side no larger than the window is attended as a single, smaller window, unshifted
    (shifting would only cut it apart); the bias of such a window is the matching corner of the
    full window's bias. timm applies the same rule, fixed at construction for `img_size`.
  * Patch merging pads an odd side with one row/column of zeros, as timm does.

Parameter names follow timm >= 0.9 (`layers.{i}.downsample` opens stages 1-3, `head.fc`) so timm
state dicts of the same configuration load strictly. Checkpoints made for another window size need
their bias tables resized by a converter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .contract import AttentionStage, BlockOutputs, VisionModel
from .layers import Attention, Block, Linear, PatchEmbed
from .layers.drop import drop_path_rates
from .layers.helpers import check_ranges, classifier_head, init_linears
from .layers.pos_embed import window_offset_index
from .registry import ModelEntry, register_model

# Logit offset of masked pairs, as in the reference implementation: exp(-100) vanishes next to any
# real logit, and a finite value keeps half precision free of inf - inf.
MASK_VALUE = -100.0


@dataclass(frozen=True)
class SwinConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 96  # width of stage 0; stage i has embed_dim * 2**i channels
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0  # before the head
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1  # timm's default; the paper trains T/S/B with 0.2/0.3/0.5
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        positive = ("patch_size", "in_chans", "embed_dim", "window_size", "mlp_ratio", "depths", "num_heads")
        rates = ("drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
        check_ranges(self, positive=positive, nonnegative=("num_classes",), rates=rates)
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(f"depths {self.depths} and num_heads {self.num_heads} need one entry per stage")
        for i, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**i) % heads:
                raise ValueError(f"stage {i} width {self.embed_dim * 2**i} is not divisible by {heads} heads")
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


# -- windows ----------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """`(B, H, W, C)` -> `(B * num_windows, wh, ww, C)`; windows of one image are consecutive."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


def window_reverse(windows: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `window_partition`: `(B * num_windows, wh, ww, C)` -> `(B, H, W, C)`."""
    (H, W), (wh, ww), C = size, windows.shape[1:3], windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def shifted_window_mask(
    size: tuple[int, int], window: tuple[int, int], shift: tuple[int, int],
    device: torch.device | None = None, dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """Additive mask `(num_windows, N, N)` for a map of real `size` rolled by `-shift` and then padded.

    Along each axis a row (column) is in place, wrapped around by the roll (the last `shift`
    real ones), or padding. Tokens attend only within their region, so wrapped tokens never meet
    their new neighbours and nobody attends to padding. `None` when nothing needs masking.
    """
    H, W = size
    if not any(shift) and H % window[0] == 0 and W % window[1] == 0:
        return None

    def regions(n: int, win: int, s: int) -> torch.Tensor:  # 0: in place, 1: wrapped, 2: padding
        r = torch.zeros(n + (-n) % win, dtype=torch.long, device=device)
        r[n - s : n] = 1
        r[n:] = 2
        return r

    # One label per (row region, column region) pair: 9 regions of the padded map.
    label = regions(H, window[0], shift[0])[:, None] * 3 + regions(W, window[1], shift[1])[None, :]  # (Hp, Wp)
    label = window_partition(label[None, :, :, None], window).flatten(1)  # (num_windows, N)
    blocked = label[:, :, None] != label[:, None, :]  # (num_windows, N query, N key)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, MASK_VALUE)


# -- modules ----------------------------------------------------------------------------------------
class WindowAttention(Attention):
    """W-MSA / SW-MSA: `Attention` over the tokens of each window plus a relative position bias (eq. 4).

    The shared layer's fused and explicit paths are reused: the bias and the shift mask enter as its
    `attn_bias`. timm names: `qkv`, `proj`, `relative_position_bias_table`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.window_size = window_size
        # One learned bias per head for each of the (2M-1)^2 offsets two tokens of a window can have.
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", window_offset_index((window_size,) * 2), persistent=False)

    def relative_position_bias(self, window: tuple[int, int]) -> torch.Tensor:
        """Bias `(heads, N, N)` for a `window` of at most `M x M` tokens."""
        M = self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index]  # (M*M, M*M, heads)
        if window != (M, M):
            # A smaller window has the same offsets as the top-left corner of a full one.
            keep = (torch.arange(window[0], device=bias.device)[:, None] * M
                    + torch.arange(window[1], device=bias.device)).flatten()
            bias = bias[keep][:, keep]
        return bias.permute(2, 0, 1)

    def forward(
        self, x: torch.Tensor, window: tuple[int, int], mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x` `(B * num_windows, N, C)`, `mask` `(num_windows, N, N)` -> output and, with
        `need_weights`, probabilities `(B * num_windows, heads, N, N)`."""
        bias = self.relative_position_bias(window).unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:
            # Window w of image b is batch row b * num_windows + w: tile the per-window mask over images.
            bias = (bias + mask.unsqueeze(1)).repeat(x.shape[0] // mask.shape[0], 1, 1, 1)
        return super().forward(x, bias, need_weights)


class SwinTransformerBlock(Block):
    """Pre-norm block with (shifted) window attention, on maps `(B, H, W, C)` (paper eq. 3)."""

    def __init__(self, dim: int, num_heads: int, *, window_size: int = 7, shift_size: int = 0, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, attn_layer=partial(WindowAttention, window_size=window_size), **kwargs)
        self.window_size = window_size
        self.shift_size = shift_size

    def window_and_shift(self, H: int, W: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Window and shift for an `H x W` map: a side that fits in one window is neither split nor shifted."""
        M, s = self.window_size, self.shift_size
        return (min(M, H), min(M, W)), (s if H > M else 0, s if W > M else 0)

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, H, W, C)` -> same shape, and the window attention probabilities when `need_weights`."""
        y, attn = self._window_attention(self.norm1(x), need_weights)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, attn

    def _window_attention(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, H, W, C = x.shape
        window, shift = self.window_and_shift(H, W)
        if any(shift):  # cyclic shift: the shifted windows become regular windows of the rolled map
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        pad_h, pad_w = -H % window[0], -W % window[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))  # (B, Hp, Wp, C), padding at the bottom/right
        mask = shifted_window_mask((H, W), window, shift, x.device, x.dtype)
        windows = window_partition(x, window).flatten(1, 2)  # (B * num_windows, wh * ww, C)
        windows, attn = self.attn(windows, window, mask, need_weights)
        x = window_reverse(windows.view(-1, *window, C), (H + pad_h, W + pad_w))[:, :H, :W]  # (B, H, W, C)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x, attn


class PatchMerging(nn.Module):
    """Concatenate each 2x2 neighbourhood and project 4C -> 2C: half the resolution, twice the width."""

    def __init__(self, dim: int, out_dim: int, norm_layer: Callable[[int], nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.norm = norm_layer(4 * dim)
        self.reduction = Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, C)` -> `(B, ceil(H/2), ceil(W/2), out_dim)`; an odd side is zero-padded."""
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        # The reference order: (even row, even col), (odd, even), (even, odd), (odd, odd).
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nn.Module):
    """Patch merging (stages after the first), then blocks alternating regular and shifted windows;
    `kwargs` go to every block."""

    def __init__(
        self, dim: int, out_dim: int, num_heads: int, *, downsample: bool, window_size: int, drop_path: list[float],
        norm_layer: Callable[[int], nn.Module], **kwargs: Any,
    ) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim, out_dim, norm_layer) if downsample else nn.Identity()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(out_dim, num_heads, window_size=window_size, drop_path=rate, norm_layer=norm_layer,
                                 shift_size=window_size // 2 if i % 2 else 0, **kwargs)
            for i, rate in enumerate(drop_path)
        )

    def forward(self, x: torch.Tensor, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, H, W, C)` -> `(B, H', W', C')` and, with `need_weights`, the last block's probabilities."""
        x = self.downsample(x)
        attn = None
        for i, blk in enumerate(self.blocks):
            x, attn = blk(x, need_weights=need_weights and i == len(self.blocks) - 1)
        return x, attn


class ClassifierHead(nn.Module):
    """Global average pool of the map, dropout, linear; timm's `ClassifierHead` names (`fc`)."""

    def __init__(self, dim: int, num_classes: int, drop: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop)
        self.fc = classifier_head(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean(dim=(1, 2)))  # (B, H, W, C) -> (B, C)
        return x if pre_logits else self.fc(x)


class SwinTransformer(VisionModel):
    staged = True

    def __init__(self, cfg: SwinConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = len(cfg.depths)
        dims = [cfg.embed_dim * 2**i for i in range(n)]
        self.num_classes = cfg.num_classes
        self.num_features = dims[-1]
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.embed_dim, norm_layer)
        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))  # over all blocks of all stages
        starts = [sum(cfg.depths[:i]) for i in range(n)]
        self.layers = nn.ModuleList(
            SwinTransformerStage(
                dims[max(i - 1, 0)], dims[i], cfg.num_heads[i], downsample=i > 0, window_size=cfg.window_size,
                drop_path=rates[starts[i] : starts[i] + cfg.depths[i]], norm_layer=norm_layer, mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias, proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
            )
            for i in range(n)
        )
        self.norm = norm_layer(self.num_features)
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's init: truncated normal (std .02) linears and bias tables, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, WindowAttention):
                nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    # -- the model contract ---------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.layers)

    def attention_stages(self, grids: list[tuple[int, int]]) -> list[AttentionStage]:
        """One entry per stage (its last block's shifted windows); patch merging (2x2, stride 2) links the stages."""
        return [AttentionStage(0, *stage.blocks[-1].window_and_shift(*grid), embed_conv=(2, 2, 0) if i else None)
                for i, (stage, grid) in enumerate(zip(self.layers, grids))]

    def no_weight_decay(self) -> set[str]:
        return {"relative_position_bias_table"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = ClassifierHead(self.num_features, num_classes, self.cfg.drop_rate)
        init_linears(self.head)
        self.head.to(self.norm.weight.device)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x, grid = self.patch_embed(x)
        return x.unflatten(1, grid)  # (B, H, W, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` -> normalised last-stage map `(B, H/32, W/32, num_features)` (NHWC, as timm)."""
        x = self._embed(x)
        for stage in self.layers:
            x, _ = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def iter_blocks(self, x: torch.Tensor, need_weights: set[int]) -> BlockOutputs:
        """Stage outputs `(B, H_i, W_i, C_i)`; attentions: the probabilities `(B * num_windows, heads, N, N)`
        of the stage's last block, windows in row-major order over the rolled and padded map (see module doc)."""
        x = self._embed(x)
        for i, stage in enumerate(self.layers):
            x, attn = stage(x, need_weights=i in need_weights)
            yield x, x.shape[1:3], attn


# -- variants ---------------------------------------------------------------------------------------
# timm's names and configurations (paper Table 1 and Sec. 3.3).
_T = SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_B = SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
VARIANTS: dict[str, SwinConfig] = {
    "swin_tiny_patch4_window7_224": _T,
    "swin_small_patch4_window7_224": replace(_T, depths=(2, 2, 18, 2)),
    "swin_base_patch4_window7_224": _B,
    "swin_base_patch4_window12_384": replace(_B, img_size=384, window_size=12),
    # Small images (CIFAR at 32 px; MNIST with img_size=28, in_chans=1): 2-px patches and three
    # stages give 16x16, 8x8 and 4x4 maps, so 4x4 windows shift in the first two stages and the
    # last stage is one global window.
    "swin_pico_patch2_window4_32": SwinConfig(
        img_size=32, patch_size=2, num_classes=10, embed_dim=48, depths=(2, 2, 2), num_heads=(3, 6, 12),
        window_size=4,
    ),
}

for _name, _cfg in VARIANTS.items():
    register_model(ModelEntry(name=_name, family="swin", config=_cfg, builder=SwinTransformer))
