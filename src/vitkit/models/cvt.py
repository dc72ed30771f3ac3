"""CvT (Wu et al. 2021, "CvT: Introducing Convolutions to Vision Transformers").

Three stages, each opened by a *convolutional token embedding* (Sec. 3.1): an overlapping strided
convolution turns the previous stage's map into a smaller, wider one whose pixels are the tokens,
normalised by LayerNorm. Inside the blocks the linear q/k/v projections become *convolutional
projections* (Sec. 3.2): a depth-wise convolution and BatchNorm on the token map, then a linear
layer. Keys and values are taken with stride 2 ("squeezed"), so each query attends to a quarter as
many tokens. The convolutions carry the spatial prior, so there are no position embeddings and any
input size works. The class token joins only in the last stage; its final LayerNorm feeds the head.

The reference is the authors' microsoft/CvT, ported as transformers' `CvtForImageClassification`
(`vitkit.convert.hf_cvt` converts those weights). Two details follow the reference rather than the
textbook, because the trained weights depend on them:
  * attention logits are scaled by `1 / sqrt(C)` with `C` the stage width, not the head width;
  * the class token is not on the map, so it skips the convolutions and meets only the linear layers.
Stochastic depth follows the authors' code (per stage, linear over its blocks, on both residual
branches); transformers' port differs there, which matters only in training.

Parameter names are timm-style (`stages.{i}.patch_embed.proj`, `...attn.conv_proj_q.conv`, `head`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from .contract import AttentionStage, BlockOutputs, VisionModel, tokens_to_nchw
from .layers import Block, Linear, attend
from .layers.drop import drop_path_rates
from .layers.helpers import check_ranges, classifier_head, init_linears
from .registry import ModelEntry, register_model

PER_STAGE_FIELDS = (
    "embed_dim", "depth", "num_heads", "patch_sizes", "patch_stride", "patch_padding", "kernel_qkv", "stride_kv",
    "padding_kv", "mlp_ratio", "qkv_bias", "cls_token", "drop_rate", "attn_drop_rate", "drop_path_rate",
)


@dataclass(frozen=True)
class CvtConfig:
    """CvT hyper-parameters; every tuple holds one entry per stage (paper Table 2; defaults: CvT-13)."""

    img_size: int | tuple[int, int] = 224  # the training resolution; any input size runs
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: tuple[int, ...] = (64, 192, 384)
    depth: tuple[int, ...] = (1, 2, 10)
    num_heads: tuple[int, ...] = (1, 3, 6)
    patch_sizes: tuple[int, ...] = (7, 3, 3)  # kernel of the convolutional token embedding
    patch_stride: tuple[int, ...] = (4, 2, 2)
    patch_padding: tuple[int, ...] = (2, 1, 1)
    # Convolutional projection. Queries use stride 1 and "same" padding (the residual adds the
    # attention output to every token), so only the key/value stride and padding are free.
    kernel_qkv: tuple[int, ...] = (3, 3, 3)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    padding_kv: tuple[int, ...] = (1, 1, 1)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 4.0)
    qkv_bias: tuple[bool, ...] = (True, True, True)
    cls_token: tuple[bool, ...] = (False, False, True)
    drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)  # after the embedding, the attention and the MLP
    attn_drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.1)  # per stage, reached by its last block
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        n = len(self.depth)
        if n == 0:
            raise ValueError("a CvT needs at least one stage")
        for name in PER_STAGE_FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} {getattr(self, name)} needs one entry per stage ({n}, from depth)")
        positive = ("embed_dim", "depth", "num_heads", "patch_sizes", "patch_stride", "kernel_qkv", "stride_kv",
                    "in_chans", "mlp_ratio", "img_size")
        rates = ("drop_rate", "attn_drop_rate", "drop_path_rate")
        check_ranges(self, positive=positive, nonnegative=("patch_padding", "padding_kv", "num_classes"), rates=rates)
        for i, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads)):
            if dim % heads:
                raise ValueError(f"stage {i} width {dim} is not divisible by {heads} heads")
        if any(k % 2 == 0 for k in self.kernel_qkv):
            raise ValueError(f"kernel_qkv must be odd so queries keep the map size, got {self.kernel_qkv}")

    @property
    def patch_size(self) -> int:
        """The total stride: the image side behind one last-stage token, as `patch_size` is for a ViT."""
        return math.prod(self.patch_stride)


# -- modules ----------------------------------------------------------------------------------------
class ConvEmbed(nn.Module):
    """Convolutional token embedding (Sec. 3.1): an overlapping strided convolution, then LayerNorm."""

    def __init__(
        self, in_chans: int, dim: int, *, patch_size: int, stride: int, padding: int,
        norm_layer: Callable[[int], nn.Module],
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Map `(B, C_in, H, W)` -> tokens `(B, H' * W', C)` in row-major order, and the grid `(H', W')`."""
        x = self.proj(x)  # (B, C, H', W')
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


class ConvProjection(nn.Module):
    """The convolutional half of a projection (Sec. 3.2): depth-wise convolution and BatchNorm."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int) -> None:
        super().__init__()
        # No conv bias: BatchNorm's shift replaces it.
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, groups=dim, bias=False)
        self.bn = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map `(B, C, H, W)` -> tokens `(B, H' * W', C)`."""
        return self.bn(self.conv(x)).flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """Multi-head attention with convolutional projections and squeezed keys/values.

    Unlike `layers.Attention` (one fused q/k/v linear layer, as many keys as queries), q, k and v
    each have their own convolution and the keys are subsampled; only `attend` is shared.
    """

    def __init__(
        self, dim: int, num_heads: int, *, kernel_size: int = 3, stride_kv: int = 2, padding_kv: int = 1,
        qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        # The authors scale by the full width (`dim_out ** -0.5` in microsoft/CvT); the weights expect it.
        self.scale = dim**-0.5
        self.conv_proj_q = ConvProjection(dim, kernel_size, 1, kernel_size // 2)
        self.conv_proj_k = ConvProjection(dim, kernel_size, stride_kv, padding_kv)
        self.conv_proj_v = ConvProjection(dim, kernel_size, stride_kv, padding_kv)
        self.proj_q = Linear(dim, dim, bias=qkv_bias)
        self.proj_k = Linear(dim, dim, bias=qkv_bias)
        self.proj_v = Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 0, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`x` `(B, P + H * W, C)`: P prefix tokens, then the `grid` map in row-major order -> the output
        (same shape) and, with `need_weights`, the probabilities `(B, heads, P + H * W, P + H_kv * W_kv)`."""
        B, N, C = x.shape
        prefix = x[:, :num_prefix_tokens]
        fmap = x[:, num_prefix_tokens:].transpose(1, 2).reshape(B, C, *grid)  # (B, C, H, W)
        # The class token has no place on the map: it skips the convolutions (as in the reference).
        q = self._split_heads(self.proj_q(torch.cat([prefix, self.conv_proj_q(fmap)], dim=1)))  # (B, h, N, Dh)
        k = self._split_heads(self.proj_k(torch.cat([prefix, self.conv_proj_k(fmap)], dim=1)))  # (B, h, Nkv, Dh)
        v = self._split_heads(self.proj_v(torch.cat([prefix, self.conv_proj_v(fmap)], dim=1)))
        x, attn = attend(q, k, v, self.scale, self.attn_drop, need_weights=need_weights)  # attn (B, h, N, Nkv)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x)), attn

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.view(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)  # (B, h, N, Dh)


class CvtStage(nn.Module):
    """Convolutional token embedding, an optional class token, then the stage's blocks."""

    def __init__(self, cfg: CvtConfig, stage: int) -> None:
        super().__init__()
        dim, depth = cfg.embed_dim[stage], cfg.depth[stage]
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.patch_embed = ConvEmbed(cfg.in_chans if stage == 0 else cfg.embed_dim[stage - 1], dim,
                                     patch_size=cfg.patch_sizes[stage], stride=cfg.patch_stride[stage],
                                     padding=cfg.patch_padding[stage], norm_layer=norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_token[stage] else None
        self.num_prefix_tokens = int(cfg.cls_token[stage])
        self.embed_drop = nn.Dropout(cfg.drop_rate[stage])
        attn_layer = partial(ConvAttention, kernel_size=cfg.kernel_qkv[stage], stride_kv=cfg.stride_kv[stage],
                             padding_kv=cfg.padding_kv[stage])
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads[stage], mlp_ratio=cfg.mlp_ratio[stage], qkv_bias=cfg.qkv_bias[stage],
                  proj_drop=cfg.drop_rate[stage], attn_drop=cfg.attn_drop_rate[stage], drop_path=rate,
                  norm_layer=norm_layer, attn_layer=attn_layer)
            for rate in drop_path_rates(cfg.drop_path_rate[stage], depth)
        )

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
        """Map `(B, C_in, H, W)` -> tokens `(B, P + H' * W', C)` (class token first), grid `(H', W')`
        and, with `need_weights`, the last block's attention probabilities."""
        x, grid = self.patch_embed(x)  # (B, N, C)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, C)
        x = self.embed_drop(x)
        attn = None
        for j, blk in enumerate(self.blocks):
            x, attn = blk(x, grid, self.num_prefix_tokens, need_weights=need_weights and j == len(self.blocks) - 1)
        return x, grid, attn


class Cvt(VisionModel):
    first_conv = "stages.0.patch_embed.proj"  # stage 0's token embedding
    staged = True

    def __init__(self, cfg: CvtConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = cfg.embed_dim[-1]
        self.num_prefix_tokens = int(cfg.cls_token[-1])
        self.stages = nn.ModuleList(CvtStage(cfg, i) for i in range(len(cfg.depth)))
        self.norm = nn.LayerNorm(self.num_features, eps=cfg.norm_eps)
        self.head = self._new_head(cfg.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The authors' "trunc_norm" init: linears and class tokens N(0, .02) truncated, zero biases;
        # convolutions keep PyTorch's default, norms start as the identity.
        init_linears(self)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    def _new_head(self, num_classes: int) -> nn.Module:
        head = classifier_head(self.num_features, num_classes)
        init_linears(head)
        return head

    # -- the model contract ---------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.stages)

    def attention_stages(self, grids: list[tuple[int, int]]) -> list[AttentionStage]:
        """One entry per stage: keys squeezed by the strided convolution; the convolutional token
        embedding links the stages."""
        c = self.cfg
        return [AttentionStage(stage.num_prefix_tokens, kv_conv=(c.kernel_qkv[i], c.stride_kv[i], c.padding_kv[i]),
                               embed_conv=(c.patch_sizes[i], c.patch_stride[i], c.patch_padding[i]) if i else None)
                for i, stage in enumerate(self.stages[: len(grids)])]

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = self._new_head(num_classes).to(self.norm.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` -> the last stage's tokens `(B, P + N, num_features)`, class token first,
        all normalised: LayerNorm acts per token, so this equals the reference's norm of the class token."""
        for stage in self.stages:
            tokens, grid, _ = stage(x)
            x = tokens_to_nchw(tokens, stage.num_prefix_tokens, grid)  # (B, C, H', W'), the next stage's input
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalised tokens -> logits: the class token, or the mean of all tokens without one (as the reference)."""
        x = x[:, 0] if self.num_prefix_tokens else x.mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def iter_blocks(self, x: torch.Tensor, need_weights: set[int]) -> BlockOutputs:
        """Stage outputs `(B, P + H_i * W_i, C_i)`; attentions: the probabilities `(B, heads, P + H_i * W_i,
        P + H_kv * W_kv)` of the stage's last block (keys are squeezed: fewer keys than queries)."""
        for i, stage in enumerate(self.stages):
            tokens, grid, attn = stage(x, need_weights=i in need_weights)
            x = tokens_to_nchw(tokens, stage.num_prefix_tokens, grid)  # (B, C, H', W'), the next stage's input
            yield tokens, grid, attn


# -- variants ---------------------------------------------------------------------------------------
# The paper's Table 2 (and transformers' microsoft/cvt-13, cvt-21, cvt-w24-384-22k configs).
# Stochastic depth (0, 0, 0.1) is the authors' ImageNet recipe for CvT-13/21 and transformers' value for W24.
VARIANTS: dict[str, CvtConfig] = {
    "cvt_13": CvtConfig(),
    "cvt_21": CvtConfig(depth=(1, 4, 16)),
    "cvt_w24": CvtConfig(img_size=384, embed_dim=(192, 768, 1024), depth=(2, 2, 20), num_heads=(3, 12, 16)),
    # Small images (MNIST at 28 px; CIFAR with in_chans=3 at 32 px) on a CPU: 3x3 stride-2 token
    # embeddings give 14x14, 7x7 and 4x4 maps at 28 px (16, 8, 4 at 32), 32 channels per head.
    "cvt_pico_28": CvtConfig(
        img_size=28, in_chans=1, num_classes=10, embed_dim=(32, 64, 128), depth=(1, 1, 3), num_heads=(1, 2, 4),
        patch_sizes=(3, 3, 3), patch_stride=(2, 2, 2), patch_padding=(1, 1, 1),
    ),
}

for _name, _cfg in VARIANTS.items():
    register_model(ModelEntry(name=_name, family="cvt", config=_cfg, builder=Cvt))
