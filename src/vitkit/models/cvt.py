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

from .contract import AttentionStage, Intermediates, VisionModel, check_output_fmt, resolve_indices, tokens_to_nchw
from .layers import DropPath, Linear, Mlp, attend
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
        for name in ("embed_dim", "depth", "num_heads", "patch_sizes", "patch_stride", "kernel_qkv", "stride_kv"):
            if min(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("patch_padding", "padding_kv"):
            if min(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.in_chans < 1 or self.num_classes < 0:
            raise ValueError(f"need in_chans >= 1 and num_classes >= 0, got {self.in_chans}, {self.num_classes}")
        for i, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads)):
            if dim % heads:
                raise ValueError(f"stage {i} width {dim} is not divisible by {heads} heads")
        if any(k % 2 == 0 for k in self.kernel_qkv):
            raise ValueError(f"kernel_qkv must be odd so queries keep the map size, got {self.kernel_qkv}")
        if min(self.mlp_ratio) <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not all(0.0 <= r < 1.0 for r in getattr(self, name)):
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else self.img_size
        if min(size) < 1:
            raise ValueError(f"img_size must be positive, got {self.img_size}")

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

    The shared `layers.Attention` projects q, k and v from one sequence with one fused linear layer
    and assumes as many keys as queries; here each has its own convolution and the keys are
    subsampled, so this module does its own projections and shares only `attend` (fused by default,
    explicit with `need_weights`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kernel_size: int = 3,
        stride_kv: int = 2,
        padding_kv: int = 1,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
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
        """`x` `(B, P + H * W, C)`: P prefix tokens, then the `grid` map in row-major order.

        Returns the output (same shape) and, with `need_weights`, the probabilities
        `(B, heads, P + H * W, P + H_kv * W_kv)`.
        """
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


class CvtBlock(nn.Module):
    """Pre-norm block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`, each branch with drop path."""

    def __init__(self, cfg: CvtConfig, stage: int, drop_path: float) -> None:
        super().__init__()
        dim, drop = cfg.embed_dim[stage], cfg.drop_rate[stage]
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.norm1 = norm_layer(dim)
        self.attn = ConvAttention(
            dim,
            cfg.num_heads[stage],
            kernel_size=cfg.kernel_qkv[stage],
            stride_kv=cfg.stride_kv[stage],
            padding_kv=cfg.padding_kv[stage],
            qkv_bias=cfg.qkv_bias[stage],
            attn_drop=cfg.attn_drop_rate[stage],
            proj_drop=drop,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio[stage]), drop=drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return `(tokens, attention probabilities or None)`; see `ConvAttention.forward`."""
        y, attn = self.attn(self.norm1(x), grid, num_prefix_tokens, need_weights)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, attn


class CvtStage(nn.Module):
    """Convolutional token embedding, an optional class token, then the stage's blocks."""

    def __init__(self, cfg: CvtConfig, stage: int) -> None:
        super().__init__()
        dim, depth = cfg.embed_dim[stage], cfg.depth[stage]
        self.patch_embed = ConvEmbed(
            cfg.in_chans if stage == 0 else cfg.embed_dim[stage - 1],
            dim,
            patch_size=cfg.patch_sizes[stage],
            stride=cfg.patch_stride[stage],
            padding=cfg.patch_padding[stage],
            norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps),
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_token[stage] else None
        self.num_prefix_tokens = int(cfg.cls_token[stage])
        self.embed_drop = nn.Dropout(cfg.drop_rate[stage])
        rates = [cfg.drop_path_rate[stage] * j / max(1, depth - 1) for j in range(depth)]
        self.blocks = nn.ModuleList(CvtBlock(cfg, stage, rates[j]) for j in range(depth))

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
            x, attn = blk(x, grid, self.num_prefix_tokens, need_weights and j == len(self.blocks) - 1)
        return x, grid, attn


class Cvt(VisionModel):
    # The convolution that takes the image (timm's pretrained_cfg `first_conv`): loading weights
    # trained on another number of input channels adapts its weight (`weights.adapt_input_conv`).
    first_conv = "stages.0.patch_embed.proj"  # stage 0's token embedding

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
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for stage in self.stages:
            if stage.cls_token is not None:
                nn.init.trunc_normal_(stage.cls_token, std=0.02)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.num_features, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    # -- the model contract ---------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        """The number of stages: `forward_intermediates` indexes stages, not blocks."""
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
        """Images `(B, C, H, W)` -> the last stage's tokens, normalised, `(B, P + N, num_features)`.

        The class token (if the last stage has one) comes first. The final LayerNorm acts per token,
        so normalising all of them and then taking the class token equals the reference, which
        normalises the class token alone.
        """
        for stage in self.stages:
            tokens, grid, _ = stage(x)
            x = tokens_to_nchw(tokens, stage.num_prefix_tokens, grid)  # (B, C, H', W'), the next stage's input
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Normalised tokens -> logits: the class token, or the mean of all tokens without one (as the reference)."""
        x = x[:, 0] if self.num_prefix_tokens else x.mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NCHW",
        return_attn: bool = False,
    ) -> Intermediates:
        """Stage outputs; `indices` refer to the stages (`num_blocks` of them).

        intermediates: `(B, C_i, H_i, W_i)` for `"NCHW"` (class token dropped), `(B, P + H_i * W_i, C_i)`
            for `"NLC"`. `norm` applies the final norm to the last stage only: it is sized for it.
        attentions: per requested stage, the probabilities `(B, heads, P + H_i * W_i, P + H_kv * W_kv)`
            of its last block (keys are squeezed, so there are fewer keys than queries).
        """
        check_output_fmt(output_fmt)
        take = set(resolve_indices(indices, self.num_blocks))
        feats, attns = [], []
        for i, stage in enumerate(self.stages):
            tokens, grid, attn = stage(x, need_weights=return_attn and i in take)
            x = tokens_to_nchw(tokens, stage.num_prefix_tokens, grid)
            if i in take:
                y = self.norm(tokens) if norm and i == self.num_blocks - 1 else tokens
                feats.append(tokens_to_nchw(y, stage.num_prefix_tokens, grid) if output_fmt == "NCHW" else y)
                if return_attn:
                    attns.append(attn)
        return Intermediates(self.norm(tokens), feats, attns)


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
