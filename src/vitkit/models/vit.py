"""Vision Transformer (Dosovitskiy et al. 2021) and the backbones built on it: DeiT, DeiT III, DINOv2,
the CLIP and SigLIP image towers.

The image is cut into patches, each projected to a token; a class token (or global average
pooling) summarises the sequence after a stack of pre-norm encoder blocks. DeiT is the same
architecture plus a distillation token with its own head. The hybrids (ViT paper, sec. 3.1) take
their tokens from a ResNet's feature map instead of from pixels. DINOv2 (Oquab et al. 2024) adds
LayerScale and, in its `reg4` variants, register tokens (Darcet et al. 2024: extra prefix tokens
that soak up the high-norm artefacts attention maps otherwise show); CLIP normalises the embedded
tokens before the blocks (`pre_norm`); SigLIP pools with an attention head (`global_pool="map"`).
Parameter names follow timm's `VisionTransformer` so timm state dicts load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from .contract import BlockOutputs, VisionModel
from .layers.attention_pool import AttentionPoolLatent
from .layers.helpers import check_ranges, classifier_head, init_linears, to_2tuple
from .layers import ConvStem, PatchEmbed, resample_abs_pos_embed, sincos_2d_pos_embed
from .layers.pos_embed import resample_loaded_pos_embed
from .layers.block import encoder_blocks
from .layers.mlp import ACTIVATIONS, MLP_LAYERS
from .layers.patch_embed import HybridEmbed
from .layers.resnet import ResNetV2Backbone, backbone_reduction
from .registry import INCEPTION_MEAN, INCEPTION_STD, ModelEntry, register_model


@dataclass(frozen=True)
class ViTConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    reg_tokens: int = 0  # register tokens (DINOv2 reg4): prefix tokens after the class token, left out of maps
    global_pool: Literal["token", "avg", "map"] = "token"  # map: attention pooling over the patches (SigLIP)
    fc_norm: bool | None = None  # None: on with avg pooling, as in timm (norm after pooling)
    pos_embed: Literal["learn", "sincos", "none"] = "learn"
    # Resampling the learned table for another grid: anti-aliased bicubic as timm, plain bicubic as
    # transformers' DINOv2, CLIP and SigLIP (the two differ by up to 1e-2; set by the converter).
    pos_embed_antialias: bool = True
    embed_layer: Literal["patch", "conv", "hybrid"] = "patch"
    # "hybrid": stage depths of the ResNet-V2 backbone; `patch_size` then counts feature-map pixels.
    backbone_layers: tuple[int, ...] = ()
    distilled: bool = False  # DeiT: add a distillation token and head
    no_embed_class: bool = False  # DeiT III: position embeddings for the patches only, not the prefix tokens
    init_values: float | None = None  # layer scale
    pre_norm: bool = False  # CLIP: a LayerNorm on the embedded tokens before the first block
    act_layer: Literal["gelu", "gelu_tanh", "quick_gelu", "silu"] = "gelu"  # quick_gelu: OpenAI's CLIP weights
    mlp_layer: Literal["mlp", "swiglu_packed", "swiglu"] = "mlp"  # swiglu_packed: DINOv2 ViT-g (hidden counts both halves)
    drop_rate: float = 0.0  # before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if self.distilled and not self.class_token:
            raise ValueError("a distilled (DeiT) model needs class_token=True")
        check_ranges(self, positive=("in_chans", "embed_dim", "depth", "num_heads", "patch_size"),
                     nonnegative=("num_classes", "reg_tokens"))
        for field, valid in (("act_layer", ACTIVATIONS), ("mlp_layer", MLP_LAYERS)):
            if getattr(self, field) not in valid:
                raise ValueError(f"{field} {getattr(self, field)!r} is not one of {', '.join(valid)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_layer == "hybrid") != bool(self.backbone_layers):
            raise ValueError("embed_layer='hybrid' and backbone_layers go together: set both or neither")
        size = to_2tuple(self.img_size)
        if size[0] % self.reduction or size[1] % self.reduction:
            what = f"patch_size {self.patch_size}"
            if self.embed_layer == "hybrid":
                what = f"{self.reduction} (the backbone's stride times patch_size {self.patch_size})"
            raise ValueError(f"img_size {self.img_size} is not a multiple of {what}")

    @property
    def reduction(self) -> int:
        """Pixels per token side: the patch size, times the backbone's total stride for a hybrid."""
        if self.embed_layer == "hybrid":
            return backbone_reduction(self.backbone_layers) * self.patch_size
        return self.patch_size


class VisionTransformer(VisionModel):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.first_conv = {"patch": "patch_embed.proj", "conv": "patch_embed.stem.0",
                           "hybrid": "patch_embed.backbone.stem.conv"}[cfg.embed_layer]
        self.num_classes = cfg.num_classes
        self.num_features = D
        self.global_pool = cfg.global_pool
        self.num_prefix_tokens = int(cfg.class_token) + int(cfg.distilled) + cfg.reg_tokens
        self.num_pos_prefix = 0 if cfg.no_embed_class else self.num_prefix_tokens  # prefix rows of the position table
        self.grid = (to_2tuple(cfg.img_size)[0] // cfg.reduction, to_2tuple(cfg.img_size)[1] // cfg.reduction)

        if cfg.embed_layer == "hybrid":
            backbone = ResNetV2Backbone(cfg.backbone_layers, cfg.in_chans)
            self.patch_embed = HybridEmbed(backbone, cfg.patch_size, D)
        else:
            if cfg.embed_layer == "patch":
                self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D, bias=not cfg.pre_norm)
            else:
                self.patch_embed = ConvStem(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        n_pos = self.grid[0] * self.grid[1] + self.num_pos_prefix
        if cfg.pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, n_pos, D) * 0.02)
        elif cfg.pos_embed == "sincos":  # fixed, so a buffer; not saved, recomputed for any grid
            self.register_buffer("pos_embed", self._sincos(self.grid), persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.norm_pre = norm_layer(D) if cfg.pre_norm else nn.Identity()

        act_layer = ACTIVATIONS[cfg.act_layer]
        self.blocks = encoder_blocks(cfg, norm_layer=norm_layer, act_layer=act_layer, mlp_layer=MLP_LAYERS[cfg.mlp_layer])
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = nn.Identity() if use_fc_norm else norm_layer(D)
        self.attn_pool = (AttentionPoolLatent(D, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                                              norm_layer=norm_layer, act_layer=act_layer)
                          if cfg.global_pool == "map" else None)
        self.fc_norm = norm_layer(D) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = classifier_head(D, cfg.num_classes)
        self.head_dist = classifier_head(D, cfg.num_classes) if cfg.distilled else None
        self._init_weights()
        # Checkpoints made at another resolution load directly: their position table is resampled.
        self._register_load_state_dict_pre_hook(self._resample_pos_embed_hook)

    # -- construction helpers -------------------------------------------------------------------
    def _sincos(self, grid: tuple[int, int]) -> torch.Tensor:
        pe = sincos_2d_pos_embed(grid, self.cfg.embed_dim)
        return torch.cat([pe.new_zeros(1, self.num_pos_prefix, pe.shape[-1]), pe], dim=1)

    def _init_weights(self) -> None:
        # timm's "vit" init: truncated normal (std .02) linears, zero biases, tiny token init.
        for tok in (self.cls_token, self.dist_token, self.reg_token):
            if tok is not None:
                nn.init.normal_(tok, std=0.02 if tok is self.dist_token else 1e-6)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        init_linears(self)

    def _resample_pos_embed_hook(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        resample_loaded_pos_embed(state_dict, prefix + "pos_embed", self.pos_embed, self.grid, self.num_pos_prefix,
                                  self.cfg.pos_embed_antialias)

    # -- the model contract ---------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token", "reg_token", "latent"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs a class token")
            if (global_pool == "map") != (self.attn_pool is not None):
                raise ValueError("the attention-pooling head is part of the architecture: build with global_pool='map'")
            self.global_pool = global_pool
        self.head = classifier_head(self.num_features, num_classes)
        if self.head_dist is not None:
            self.head_dist = classifier_head(self.num_features, num_classes)
        for h in (self.head, self.head_dist):
            if h is not None:
                init_linears(h)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x, grid = self.patch_embed(x)  # (B, N, D)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token, self.reg_token)
                  if t is not None]
        if self.cfg.no_embed_class and self.pos_embed is not None:  # DeiT III: positions before the prefix joins
            x = x + self._pos_embed_for(grid)
        x = torch.cat(prefix + [x], dim=1)
        if not self.cfg.no_embed_class and self.pos_embed is not None:
            x = x + self._pos_embed_for(grid)
        return self.norm_pre(self.pos_drop(x)), grid

    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        if grid == self.grid:
            return self.pos_embed
        if self.cfg.pos_embed == "sincos":
            return self._sincos(grid).to(self.pos_embed)
        # Any input size that is a multiple of the patch: resample the learned table on the fly.
        return resample_abs_pos_embed(self.pos_embed, grid, self.grid, self.num_pos_prefix, self.cfg.pos_embed_antialias)

    def forward_features(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens `(B, prefix + N, D)`. With `ids_keep` `(B, K)` (patch indices), the blocks see
        the prefix tokens and those K patches only: the encoder of a masked autoencoder (He et al. 2022)."""
        x, _ = self._embed(x)  # position embeddings are added before the selection, so kept patches keep theirs
        if ids_keep is not None:
            P = self.num_prefix_tokens
            kept = x[:, P:].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
            x = torch.cat([x[:, :P], kept], dim=1)
        for blk in self.blocks:
            x, _ = blk(x)
        return self.norm(x)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ids_keep=ids_keep)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.head_dist is None:
            return (self(x),)
        cls, dist = (self.head_drop(self.fc_norm(p)) for p in self.pool(self.forward_features(x)))
        return self.head(cls), self.head_dist(dist)

    def pool(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Tokens `(B, N, D)` -> pooled features `(B, D)` (a pair for DeiT: class and distillation)."""
        if self.dist_token is not None:
            return x[:, 0], x[:, 1]
        if self.attn_pool is not None:
            return self.attn_pool(x[:, self.num_prefix_tokens :])
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens :].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        pooled = self.pool(x)
        if isinstance(pooled, tuple):  # DeiT
            cls, dist = (self.head_drop(self.fc_norm(p)) for p in pooled)
            if pre_logits:
                return (cls + dist) / 2
            logits, logits_dist = self.head(cls), self.head_dist(dist)
            # Training returns both heads (the distillation loss needs them); inference averages them.
            return (logits, logits_dist) if self.training else (logits + logits_dist) / 2
        x = self.head_drop(self.fc_norm(pooled))
        return x if pre_logits else self.head(x)

    def iter_blocks(self, x: torch.Tensor, need_weights: set[int]) -> BlockOutputs:
        x, grid = self._embed(x)
        for i, blk in enumerate(self.blocks):
            x, attn = blk(x, need_weights=i in need_weights)
            yield x, grid, attn


# -- variants ---------------------------------------------------------------------------------------
# timm's names and configurations; small-image variants for data sets that fit on a laptop.
_TI = ViTConfig(embed_dim=192, depth=12, num_heads=3)
_S = ViTConfig(embed_dim=384, depth=12, num_heads=6)
_B = ViTConfig(embed_dim=768, depth=12, num_heads=12)
_L = ViTConfig(embed_dim=1024, depth=24, num_heads=16)
_INCEPTION = dict(mean=INCEPTION_MEAN, std=INCEPTION_STD)  # timm's augreg ViT weights expect [-1, 1]

VARIANTS: dict[str, tuple[ViTConfig, dict[str, Any]]] = {
    "vit_tiny_patch16_224": (_TI, _INCEPTION),
    "vit_small_patch16_224": (_S, _INCEPTION),
    "vit_base_patch16_224": (_B, _INCEPTION),
    "vit_large_patch16_224": (_L, _INCEPTION),
    "vit_base_patch32_224": (replace(_B, patch_size=32), _INCEPTION),
    "deit_tiny_patch16_224": (_TI, {}),
    "deit_small_patch16_224": (_S, {}),
    "deit_base_patch16_224": (_B, {}),
    "deit_tiny_distilled_patch16_224": (replace(_TI, distilled=True), {}),
    "deit_small_distilled_patch16_224": (replace(_S, distilled=True), {}),
    "deit_base_distilled_patch16_224": (replace(_B, distilled=True), {}),
}
# DeiT III (Touvron et al. 2022, "DeiT III: Revenge of the ViT"): LayerScale (1e-6) and no position
# embedding on the class token, timm's `deit3_*` layout.
_DEIT3 = dict(init_values=1e-6, no_embed_class=True)
VARIANTS.update({
    "deit3_small_patch16_224": (replace(_S, **_DEIT3), {}),
    "deit3_medium_patch16_224": (replace(_B, embed_dim=512, num_heads=8, **_DEIT3), {}),
    "deit3_base_patch16_224": (replace(_B, **_DEIT3), {}),
    "deit3_large_patch16_224": (replace(_L, **_DEIT3), {}),
})
# Small images (Beyer et al. 2022 and the CCT recipe): global average pooling, fixed sin-cos
# position embeddings, small patches; "conv" variants replace the patch projection by a small
# convolutional stem, which is what makes a ViT learn from a few thousand images in minutes.
_SMALL = dict(class_token=False, global_pool="avg", pos_embed="sincos", mlp_ratio=2.0)
_PICO = dict(img_size=28, in_chans=1, num_classes=10, patch_size=4, embed_dim=96, depth=4, num_heads=4)
_NANO = dict(img_size=32, num_classes=10, patch_size=4, embed_dim=192, depth=6, num_heads=3)
VARIANTS.update({
    "vit_pico_patch4_28": (ViTConfig(**_PICO, **_SMALL), {}),
    "vit_pico_conv4_28": (ViTConfig(**_PICO, **_SMALL, embed_layer="conv"), {}),
    "deit_pico_distilled_conv4_28": (ViTConfig(**_PICO, embed_layer="conv", distilled=True, mlp_ratio=2.0), {}),
    "vit_nano_patch4_32": (ViTConfig(**_NANO, **_SMALL), {}),
    "vit_nano_conv4_32": (ViTConfig(**_NANO, **_SMALL, embed_layer="conv"), {}),
    "vit_micro_patch4_64": (ViTConfig(img_size=64, num_classes=10, patch_size=4, embed_dim=256, depth=8, num_heads=4,
                                      **_SMALL), {}),
})

# Hybrids (ViT paper sec. 3.1; AugReg, Steiner et al. 2022): a ResNet-V2 backbone, then one token per
# feature-map position. R50 keeps three stages (stride 16), R26 four (stride 32). timm's only 224 px
# R50 weights are the ImageNet-21k ones with the classifier dropped, hence num_classes=0 as in timm.
_HYBRID = dict(embed_layer="hybrid", patch_size=1)
VARIANTS.update({
    "vit_small_r26_s32_224": (replace(_S, backbone_layers=(2, 2, 2, 2), **_HYBRID), _INCEPTION),
    "vit_base_r50_s16_224": (replace(_B, backbone_layers=(3, 4, 9), num_classes=0, **_HYBRID), _INCEPTION),
})

# DINOv2 (Oquab et al. 2024): patch 14 at 518 px (37 x 37 patches), LayerScale 1e-5, headless
# feature extractors (num_classes=0) as timm registers them; reg4 adds 4 register tokens (Darcet et al.
# 2024), whose position table covers the patches only. ViT-g has a packed SwiGLU MLP of 2 x 4096 units.
_DINO = dict(patch_size=14, img_size=518, num_classes=0, init_values=1e-5)
_REG4 = dict(reg_tokens=4, no_embed_class=True)
_G = ViTConfig(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed",
               act_layer="silu")
for _size, _base in (("small", _S), ("base", _B), ("large", _L), ("giant", _G)):
    VARIANTS[f"vit_{_size}_patch14_dinov2"] = (replace(_base, **_DINO), {})
    VARIANTS[f"vit_{_size}_patch14_reg4_dinov2"] = (replace(_base, **_DINO, **_REG4), {})
# Image towers of contrastive image-text models. CLIP (Radford et al. 2021): a LayerNorm before the blocks,
# epsilon 1e-5; OpenAI's weights were trained with QuickGELU (the quickgelu variants), LAION's with GELU.
# The class counts are those of timm's default weights (an ImageNet head, or the 512/768-d projection).
# SigLIP (Zhai et al. 2023): no class token; attention pooling (MAP), or the average without fc_norm (gap).
_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_CLIP_STATS = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
for _name, _base, _classes, _stats in (("vit_base_patch32", replace(_B, patch_size=32), (1000, 512), (_CLIP_STATS,) * 2),
                                       ("vit_base_patch16", _B, (1000, 512), (_CLIP_STATS,) * 2),
                                       ("vit_large_patch14", replace(_L, patch_size=14), (1000, 768), (_HALF, _CLIP_STATS))):
    VARIANTS[f"{_name}_clip_224"] = (replace(_base, **_CLIP, num_classes=_classes[0]), _stats[0])
    VARIANTS[f"{_name}_clip_quickgelu_224"] = (replace(_base, **_CLIP, num_classes=_classes[1], act_layer="quick_gelu"),
                                               _stats[1])
_SIGLIP = dict(class_token=False, num_classes=0)
VARIANTS["vit_base_patch16_siglip_224"] = (replace(_B, **_SIGLIP, global_pool="map"), _HALF)
VARIANTS["vit_base_patch16_siglip_gap_224"] = (replace(_B, **_SIGLIP, global_pool="avg", fc_norm=False), _HALF)

_FAMILIES = {"dinov2": "dinov2", "clip": "clip", "siglip": "siglip"}
for _name, (_cfg, _pre) in VARIANTS.items():
    _family = next((f for tag, f in _FAMILIES.items() if tag in _name), None)
    _family = _family or ("hybrid" if _cfg.embed_layer == "hybrid" else "deit" if _name.startswith("deit") else "vit")
    register_model(ModelEntry(name=_name, family=_family, config=_cfg, builder=VisionTransformer, **_pre))
