"""EVA-02 (Fang et al. 2023, "EVA-02: A Visual Representation for Neon Genesis") and DINOv3 (Siméoni et
al. 2025): ViTs with rotary position embeddings, as timm's `Eva` implements both.

EVA-02 grew out of BEiT: query and value biases without a key bias, average pooling with `fc_norm`,
a near-zero classifier at initialisation. To the ViT's learned position table it adds 2-D RoPE in
every block (`layers.rope`, indices rescaled to the pre-training grid for other sizes) and a SwiGLU
MLP (Shazeer 2020) with 2/3 of the usual width, so it costs what a GELU MLP costs; B and L keep the
query, key and value projections apart and normalise the gated features (NormFormer's "scale MLP").
DINOv3 has no position table at all, only RoPE on normalised patch centres, so one set of weights
serves any resolution; four register tokens (Darcet et al. 2024), LayerScale 1e-5, no query-key-value
bias except in the `qkvb` variants (timm's: biases present, released as zeros).

Module and parameter names follow timm's `Eva`, so its state dicts load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from .contract import BlockOutputs, VisionModel
from .layers import Linear, PatchEmbed, resample_abs_pos_embed
from .layers.attention import QVBiasAttention
from .layers.block import GammaBlock, encoder_blocks, rescale_residual_outputs
from .layers.helpers import check_ranges, classifier_head, init_linears, init_small_head, to_2tuple
from .layers.mlp import GluMlp, Mlp, SwiGLU
from .layers.pos_embed import resample_loaded_pos_embed
from .layers.rope import Rope, RopeKind, RotaryEmbedding2d
from .registry import ModelEntry, register_model

_CLIP_STATS = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


@dataclass(frozen=True)
class EvaConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 14
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4 * 2 / 3  # of the SwiGLU's hidden width (each of its two halves)
    qkv_bias: bool = True  # query and value biases; the key bias is always zero
    qkv_fused: bool = True  # one `qkv` projection; False: `q_proj`, `k_proj`, `v_proj` (EVA-02 B/L)
    mlp_layer: Literal["mlp", "swiglu_packed", "swiglu"] = "swiglu_packed"
    swiglu_norm: bool = False  # a LayerNorm on the gated features (EVA-02 B/L; timm's scale_mlp)
    swiglu_align_to: int = 0  # round the SwiGLU's hidden width up to a multiple (DINOv3 S+)
    class_token: bool = True
    reg_tokens: int = 0
    pos_embed: Literal["learn", "none"] = "learn"  # a learned table over prefix and patches (EVA-02)
    pos_embed_antialias: bool = True
    rope: RopeKind = "eva"
    rope_temperature: float = 10000.0
    rope_ref_grid: int | None = 16  # "eva" RoPE: the pre-training grid that other grids are rescaled to
    init_values: float | None = None  # layer scale
    global_pool: Literal["avg", "token"] = "avg"
    fc_norm: bool | None = None  # None: on with avg pooling (norm after pooling), as in timm
    drop_rate: float = 0.0  # before the head
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing with depth
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        rates = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
        check_ranges(self, positive=("in_chans", "embed_dim", "depth", "num_heads", "patch_size"),
                     nonnegative=("num_classes", "reg_tokens", "swiglu_align_to"), rates=rates)
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim {self.embed_dim} / num_heads {self.num_heads} must be a whole head width "
                             "divisible by 4 (2-D rotary embeddings)")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if self.swiglu_norm and self.mlp_layer != "swiglu":
            raise ValueError("swiglu_norm needs mlp_layer='swiglu' (the packed SwiGLU has no norm)")
        size = to_2tuple(self.img_size)
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")


class EvaAttention(QVBiasAttention):
    """Query and value biases (`layers.QVBiasAttention`), with the projections fused (`qkv`) or apart
    (`q_proj`, `k_proj`, `v_proj`: EVA-02 B/L); RoPE comes with each call."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, qkv_fused: bool = True, **kwargs) -> None:
        super().__init__(dim, num_heads, qkv_bias=qkv_bias and qkv_fused, **kwargs)
        if not qkv_fused:
            del self.qkv
            self.q_proj = Linear(dim, dim, bias=qkv_bias)
            self.k_proj = Linear(dim, dim, bias=False)
            self.v_proj = Linear(dim, dim, bias=qkv_bias)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        return super().project_qkv(x)


class Eva(VisionModel):
    def __init__(self, cfg: EvaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.num_features = D
        self.global_pool = cfg.global_pool
        self.num_prefix_tokens = int(cfg.class_token) + cfg.reg_tokens
        size = to_2tuple(cfg.img_size)
        self.grid = (size[0] // cfg.patch_size, size[1] // cfg.patch_size)

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, D)) if cfg.reg_tokens else None
        n_pos = self.grid[0] * self.grid[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, n_pos, D)) if cfg.pos_embed == "learn" else None
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        ref = None if cfg.rope_ref_grid is None else to_2tuple(cfg.rope_ref_grid)
        self.rope = RotaryEmbedding2d(D // cfg.num_heads, cfg.rope, cfg.rope_temperature, ref, self.num_prefix_tokens)

        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        mlp_layer: Any = {"mlp": Mlp, "swiglu_packed": lambda d, h, **kw: GluMlp(d, 2 * h, **kw),
                          "swiglu": partial(SwiGLU, norm_layer=norm_layer if cfg.swiglu_norm else None,
                                            align_to=cfg.swiglu_align_to)}[cfg.mlp_layer]
        self.blocks = encoder_blocks(
            cfg, GammaBlock, norm_layer=norm_layer, mlp_layer=mlp_layer,
            act_layer=nn.GELU if cfg.mlp_layer == "mlp" else nn.SiLU,
            attn_layer=partial(EvaAttention, qkv_fused=cfg.qkv_fused))
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm
        self.norm = nn.Identity() if use_fc_norm else norm_layer(D)
        self.fc_norm = norm_layer(D) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = classifier_head(D, cfg.num_classes)
        self._init_weights()
        # Checkpoints made at another resolution load directly: their position table is resampled.
        self._register_load_state_dict_pre_hook(self._resample_pos_embed_hook)

    def _init_weights(self) -> None:
        # timm's EVA init: truncated normal (std .02) for linears and tokens, and BEiT's depth rescaling
        # of each residual branch's output projection by sqrt(2 l).
        init_linears(self)
        for tok in (self.cls_token, self.reg_token, self.pos_embed):
            if tok is not None:
                nn.init.trunc_normal_(tok, std=0.02)
        rescale_residual_outputs(self.blocks)
        init_small_head(self.head)  # EVA's fine-tuning starts from a near-zero classifier, as BEiT's

    def _resample_pos_embed_hook(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        resample_loaded_pos_embed(state_dict, prefix + "pos_embed", self.pos_embed, self.grid, self.num_prefix_tokens,
                                  self.cfg.pos_embed_antialias)

    # -- the model contract ---------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", "token") or (global_pool == "token" and self.cls_token is None):
                raise ValueError(f"global_pool {global_pool!r}: use 'avg', or 'token' with a class token")
            self.global_pool = global_pool
        self.head = classifier_head(self.num_features, num_classes).to(self.patch_embed.proj.weight)
        init_small_head(self.head)

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], Rope]:
        x, grid = self.patch_embed(x)  # (B, N, D)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1)
        if self.pos_embed is not None:  # resampled on the fly for another input size
            x = x + resample_abs_pos_embed(self.pos_embed, grid, self.grid, self.num_prefix_tokens,
                                           self.cfg.pos_embed_antialias)
        return self.pos_drop(x), grid, self.rope(grid, x.device)

    def forward_features(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens `(B, prefix + N, D)`; with `ids_keep` `(B, K)` the prefix and those K patches only,
        each keeping its own rotary angles (MAE's encoder)."""
        x, _, rope = self._embed(x)
        if ids_keep is not None:
            P = self.num_prefix_tokens
            kept = x[:, P:].gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, K, D)
            x = torch.cat([x[:, :P], kept], dim=1)
            emb = rope.emb[ids_keep].unsqueeze(1)  # (B, 1, K, 2 Dh): per image, broadcast over heads
            rope = rope._replace(emb=emb)
        for blk in self.blocks:
            x, _ = blk(x, rope=rope)
        return self.norm(x)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x, ids_keep=ids_keep)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def iter_blocks(self, x: torch.Tensor, need_weights: set[int]) -> BlockOutputs:
        x, grid, rope = self._embed(x)
        for i, blk in enumerate(self.blocks):
            x, attn = blk(x, rope=rope, need_weights=i in need_weights)
            yield x, grid, attn


# -- variants ---------------------------------------------------------------------------------------
# timm's names and configurations. EVA-02 at 224 px are the MIM-pre-trained feature extractors
# (num_classes=0, as timm's default weights); the 336/448 px ones are fine-tuned on ImageNet-1k.
_TI = dict(embed_dim=192, num_heads=3)
_S = dict(embed_dim=384, num_heads=6)
_B = dict(embed_dim=768, num_heads=12, qkv_fused=False, mlp_layer="swiglu", swiglu_norm=True)
_L = dict(embed_dim=1024, depth=24, num_heads=16, qkv_fused=False, mlp_layer="swiglu", swiglu_norm=True)
VARIANTS: dict[str, tuple[EvaConfig, dict[str, Any]]] = {}
for _size, _kw, _big in (("tiny", _TI, 336), ("small", _S, 336), ("base", _B, 448), ("large", _L, 448)):
    VARIANTS[f"eva02_{_size}_patch14_224"] = (EvaConfig(**_kw, num_classes=0), _CLIP_STATS)
    VARIANTS[f"eva02_{_size}_patch14_{_big}"] = (EvaConfig(**_kw, img_size=_big), _CLIP_STATS)

# DINOv3: patch 16, 256 px (its pre-training and timm's input size; any multiple of 16 works), no
# position table, RoPE on normalised centres (temperature 100), 4 registers, LayerScale 1e-5, epsilon
# 1e-5, a GELU MLP of 4x (S+: SwiGLU), average pooling after the final norm (pass global_pool="token"
# for the class token, as upstream). `qkvb`: query-key-value biases present (zeros in the release).
_DINOV3 = dict(patch_size=16, img_size=256, num_classes=0, pos_embed="none", rope="dinov3", rope_temperature=100.0,
               rope_ref_grid=None, reg_tokens=4, init_values=1e-5, mlp_ratio=4.0, mlp_layer="mlp", fc_norm=False,
               norm_eps=1e-5)
for _size, _kw in (("small", dict(embed_dim=384, num_heads=6)),
                   ("small_plus", dict(embed_dim=384, num_heads=6, mlp_layer="swiglu", swiglu_align_to=8)),
                   ("base", dict(embed_dim=768, num_heads=12)), ("large", dict(embed_dim=1024, depth=24, num_heads=16))):
    for _tag, _bias in (("", False), ("_qkvb", True)):
        VARIANTS[f"vit_{_size}_patch16_dinov3{_tag}"] = (EvaConfig(**{**_DINOV3, **_kw}, qkv_bias=_bias), {})

for _name, (_cfg, _pre) in VARIANTS.items():
    register_model(ModelEntry(name=_name, family="dinov3" if "dinov3" in _name else "eva02", config=_cfg,
                              builder=Eva, **_pre))
