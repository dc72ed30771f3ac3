"""transformers' pretrained backbones -> vitkit: DINOv2 (with registers), the CLIP and SigLIP image
towers (the ViT family) and DINOv3 (`models/eva.py`). All are headless feature extractors in
transformers (`Dinov2Model`, `CLIPVisionModel`, `SiglipVisionModel`, `DINOv3ViTModel`); vitkit builds
them with `num_classes=0`, so `model(x)` is transformers' `pooler_output` (CLIP with projection:
`image_embeds`; DINOv3: the class token, `global_pool="token"`). A whole CLIP or SigLIP
checkpoint (image and text towers) converts too: its image tower is kept, the text tower dropped.

Where transformers computes the same thing differently from timm's layout, the weights are folded:
DINOv2 with registers adds the class token's position embedding to the token itself (timm's
`no_embed_class` layout, as timm converts the original release); SigLIP's `nn.MultiheadAttention`
pooling head is split into the query and key/value projections of `AttentionPoolLatent`; DINOv3's
separate projections are packed into `qkv` with `q_bias`/`v_bias` (timm's `Eva` layout).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .common import Target, config_class, rename, square
from .hf import merge_qkv

# model_type -> (the architectures that convert, vitkit's family)
ARCHITECTURES: dict[str, tuple[tuple[str, ...], str]] = {
    "dinov2": (("Dinov2Model",), "dinov2"),
    "dinov2_with_registers": (("Dinov2WithRegistersModel",), "dinov2"),
    "clip_vision_model": (("CLIPVisionModel", "CLIPVisionModelWithProjection"), "clip"),
    "clip": (("CLIPModel",), "clip"),
    "siglip_vision_model": (("SiglipVisionModel",), "siglip"),
    "siglip": (("SiglipModel",), "siglip"),
    "dinov3_vit": (("DINOv3ViTModel",), "dinov3"),
}
# transformers' config defaults for the fields read here (a config.json saved with `use_diff` omits them).
_DINO = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
             layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True, layerscale_value=1.0,
             use_swiglu_ffn=False)
_TOWER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
              image_size=224, patch_size=16)
DEFAULTS: dict[str, dict[str, Any]] = {
    "dinov2": {**_DINO, "num_register_tokens": 0}, "dinov2_with_registers": {**_DINO, "num_register_tokens": 4},
    "clip": {**_TOWER, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "siglip": {**_TOWER, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "vision_use_head": True},
    "dinov3": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                   hidden_act="gelu", layer_norm_eps=1e-5, rope_theta=100.0, image_size=224, patch_size=16,
                   num_channels=3, query_bias=True, key_bias=False, value_bias=True, proj_bias=True, mlp_bias=True,
                   layerscale_value=1.0, use_gated_mlp=False, num_register_tokens=0),
}
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}



def _qkv(layer: str, attn: str) -> tuple[str, Target]:
    """transformers' `q_proj`/`k_proj`/`v_proj` -> `blocks.N.{attn}.query|key|value` (merged into `qkv` later)."""
    return (layer + r"([qkv])_proj\.(weight|bias)",
            lambda m: f"blocks.{m[1]}.{attn}.{dict(q='query', k='key', v='value')[m[2]]}.{m[3]}")


_DL = r"(?:dinov2\.)?encoder\.layer\.(\d+)\."
DINOV2_KEYS: list[tuple[str, Target]] = [
    (r"(?:dinov2\.)?embeddings\.cls_token", "cls_token"),
    (r"(?:dinov2\.)?embeddings\.register_tokens", "reg_token"),
    (r"(?:dinov2\.)?embeddings\.position_embeddings", "pos_embed"),
    (r"(?:dinov2\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed.proj.{0}"),
    (_DL + r"norm([12])\.(weight|bias)", "blocks.{0}.norm{1}.{2}"),
    # transformers < 5 saved attention.attention.{query,key,value} and attention.output.dense
    (_DL + r"attention\.(?:attention\.)?(query|key|value)\.(weight|bias)", "blocks.{0}.attn.{1}.{2}"),  # -> qkv
    _qkv(_DL + r"attention\.", "attn"),
    (_DL + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)", "blocks.{0}.attn.proj.{1}"),
    (_DL + r"layer_scale([12])\.lambda1", "blocks.{0}.ls{1}.gamma"),
    (_DL + r"mlp\.(?:fc1|weights_in)\.(weight|bias)", "blocks.{0}.mlp.fc1.{1}"),
    (_DL + r"mlp\.(?:fc2|weights_out)\.(weight|bias)", "blocks.{0}.mlp.fc2.{1}"),
    (r"(?:dinov2\.)?layernorm\.(weight|bias)", "norm.{0}"),
]
_V = r"(?:vision_model\.)?"
_TL = _V + r"encoder\.layers\.(\d+)\."
TOWER_KEYS: list[tuple[str, Target]] = [
    (_V + r"embeddings\.class_embedding", "cls_token"),
    (_V + r"embeddings\.patch_embedding\.(weight|bias)", "patch_embed.proj.{0}"),
    (_V + r"embeddings\.position_embedding\.weight", "pos_embed"),
    (_V + r"pre_layrnorm\.(weight|bias)", "norm_pre.{0}"),  # sic: transformers' name
    (_TL + r"layer_norm([12])\.(weight|bias)", "blocks.{0}.norm{1}.{2}"),
    _qkv(_TL + r"self_attn\.", "attn"),
    (_TL + r"self_attn\.out_proj\.(weight|bias)", "blocks.{0}.attn.proj.{1}"),
    (_TL + r"mlp\.(fc[12])\.(weight|bias)", "blocks.{0}.mlp.{1}.{2}"),
    (_V + r"post_layernorm\.(weight|bias)", "norm.{0}"),
    (r"visual_projection\.weight", "head.weight"),
    (_V + r"head\.probe", "attn_pool.latent"),
    (_V + r"head\.attention\.in_proj_(weight|bias)", "attn_pool.in_proj.{0}"),  # -> q, kv
    (_V + r"head\.attention\.out_proj\.(weight|bias)", "attn_pool.proj.{0}"),
    (_V + r"head\.layernorm\.(weight|bias)", "attn_pool.norm.{0}"),
    (_V + r"head\.mlp\.(fc[12])\.(weight|bias)", "attn_pool.mlp.{0}.{1}"),
]
_D3 = r"(?:model\.)?layer\.(\d+)\."  # saved without "model." by save_pretrained
DINOV3_KEYS: list[tuple[str, Target]] = [
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.register_tokens", "reg_token"),
    (r"embeddings\.patch_embeddings\.(weight|bias)", "patch_embed.proj.{0}"),
    (_D3 + r"norm([12])\.(weight|bias)", "blocks.{0}.norm{1}.{2}"),
    _qkv(_D3 + r"attention\.", "attn"),
    (_D3 + r"attention\.o_proj\.(weight|bias)", "blocks.{0}.attn.proj.{1}"),
    (_D3 + r"layer_scale([12])\.lambda1", "blocks.{0}.gamma_{1}"),
    (_D3 + r"mlp\.gate_proj\.(weight|bias)", "blocks.{0}.mlp.fc1_g.{1}"),
    (_D3 + r"mlp\.up_proj\.(weight|bias)", "blocks.{0}.mlp.up.{1}"),  # fc1 or, gated, fc1_x: see _dinov3
    (_D3 + r"mlp\.down_proj\.(weight|bias)", "blocks.{0}.mlp.fc2.{1}"),
    (r"norm\.(weight|bias)", "norm.{0}"),
]
# Parts of a checkpoint that are not the image tower: the text tower, its projection, the loss scale.
_NOT_IMAGE = ("text_model.", "text_projection.", "logit_scale", "logit_bias", "embeddings.mask_token",
              "dinov2.embeddings.mask_token")


def convert_backbone(config: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> tuple[dict, Any]:
    """The state dict in vitkit's names and the `ViTConfig` that rebuilds the model exactly."""
    model_type = config["model_type"]
    if model_type in ("clip", "siglip"):  # image and text towers: the image tower's config and weights
        config = {**config.get("vision_config", {}), "model_type": model_type}
    kind = model_type.split("_")[0] if model_type.startswith(("clip", "siglip", "dinov3")) else model_type
    c = {**DEFAULTS[kind], **config}
    state = {k: v for k, v in state.items() if not k.startswith(_NOT_IMAGE) and not k.endswith("position_ids")}
    if kind == "dinov3":
        return _dinov3(c, rename(state, DINOV3_KEYS, source), source)
    D = int(c["hidden_size"])
    if c["hidden_act"] not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {c['hidden_act']!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    size = c["image_size"]
    common = dict(img_size=square(size if isinstance(size, int) else tuple(size)), patch_size=int(c["patch_size"]),
                  in_chans=int(c["num_channels"]), norm_eps=float(c["layer_norm_eps"]), embed_dim=D,
                  depth=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
                  act_layer=ACTIVATIONS[c["hidden_act"]], num_classes=0)
    if kind.startswith("dinov2"):
        state, fields = _dinov2(c, merge_qkv(rename(state, DINOV2_KEYS, source)), D)
    else:
        state, fields = _tower(kind, c, merge_qkv(rename(state, TOWER_KEYS, source)), D)
    # transformers resamples positions without anti-aliasing, but for DINOv2 with registers.
    common["pos_embed_antialias"] = model_type == "dinov2_with_registers"
    return state, config_class(ARCHITECTURES[model_type][1])(**{**common, **fields})


def _dinov2(c: dict[str, Any], state: dict[str, torch.Tensor], D: int) -> tuple[dict, dict[str, Any]]:
    hidden = int(D * c["mlp_ratio"])
    fields: dict[str, Any] = dict(qkv_bias=bool(c["qkv_bias"]), init_values=float(c["layerscale_value"]))
    if c["use_swiglu_ffn"]:  # transformers sizes SwiGLU's hidden layer as the original: 2/3, rounded up to 8
        hidden = 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)  # packed: value and gate
        fields.update(mlp_layer="swiglu_packed", act_layer="silu")
    fields["mlp_ratio"] = _ratio(hidden, D)
    registers = int(c["num_register_tokens"])
    if registers:  # timm's layout: the class token carries its position embedding, the table covers the patches
        pos = state["pos_embed"]
        state = {**state, "cls_token": state["cls_token"] + pos[:, :1], "pos_embed": pos[:, 1:]}
        fields.update(reg_tokens=registers, no_embed_class=True)
    return state, fields


def _dinov3(c: dict[str, Any], state: dict[str, torch.Tensor], source: str) -> tuple[dict, Any]:
    """`DINOv3ViTModel` -> the `Eva` layout. A key bias shifts all logits of a query by the same amount, which
    the softmax cancels: dropping it is exact (the release has none). Biases a config leaves out become zeros."""
    D, gated = int(c["hidden_size"]), bool(c["use_gated_mlp"])
    if c["hidden_act"] != ("silu" if gated else "gelu"):
        raise ValueError(f"{source}: hidden_act {c['hidden_act']!r} with use_gated_mlp={gated} is not supported "
                         f"(vitkit's DINOv3: gelu, or silu when gated)")
    qv_bias = bool(c["query_bias"] or c["value_bias"])
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == "reg_token" and not v.numel():  # transformers keeps a (1, 0, D) table without registers
            continue
        if m := re.fullmatch(r"(blocks\.\d+\.attn)\.(query|key|value)\.bias", k):
            if m[2] != "key":
                out[f"{m[1]}.{m[2][0]}_bias"] = v
        else:
            out[k.replace(".mlp.up.", ".mlp.fc1_x." if gated else ".mlp.fc1.")] = v
    out = merge_qkv(out)  # the weights; their biases are q_bias and v_bias now
    for k in [k for k in out if k.endswith(".weight") and (".mlp." in k or ".attn." in k)]:
        if k.endswith(".attn.qkv.weight"):
            if qv_bias:
                for name in ("q_bias", "v_bias"):
                    out.setdefault(k.replace("qkv.weight", name), out[k].new_zeros(D))
        else:  # mlp_bias / proj_bias False
            out.setdefault(k[: -len("weight")] + "bias", out[k].new_zeros(out[k].shape[0]))
    size = c["image_size"]
    cfg = dict(img_size=square(size if isinstance(size, int) else tuple(size)), patch_size=int(c["patch_size"]),
               in_chans=int(c["num_channels"]), embed_dim=D, depth=int(c["num_hidden_layers"]),
               num_heads=int(c["num_attention_heads"]), mlp_ratio=_ratio(int(c["intermediate_size"]), D),
               mlp_layer="swiglu" if gated else "mlp", qkv_bias=qv_bias,
               reg_tokens=int(c["num_register_tokens"]), init_values=float(c["layerscale_value"]),
               rope_temperature=float(c["rope_theta"]), norm_eps=float(c["layer_norm_eps"]), num_classes=0,
               pos_embed="none", rope="dinov3", rope_ref_grid=None, fc_norm=False, global_pool="token")
    return out, config_class("dinov3")(**cfg)


def _tower(kind: str, c: dict[str, Any], state: dict[str, torch.Tensor], D: int) -> tuple[dict, dict[str, Any]]:
    fields: dict[str, Any] = dict(mlp_ratio=_ratio(int(c["intermediate_size"]), D))
    state = {**state, "pos_embed": state["pos_embed"].unsqueeze(0)}  # an nn.Embedding table: (N, D) -> (1, N, D)
    if kind == "clip":
        state["cls_token"] = state["cls_token"].reshape(1, 1, D)
        if "head.weight" in state:  # the projection to the joint space has no bias
            state["head.bias"] = state["head.weight"].new_zeros(state["head.weight"].shape[0])
            fields["num_classes"] = state["head.weight"].shape[0]
        return state, dict(fields, pre_norm=True)
    fields.update(class_token=False)
    if "attn_pool.in_proj.weight" in state:  # nn.MultiheadAttention's packed projections -> q and kv
        for leaf in ("weight", "bias"):
            packed = state.pop(f"attn_pool.in_proj.{leaf}")
            state[f"attn_pool.q.{leaf}"], state[f"attn_pool.kv.{leaf}"] = packed[:D], packed[D:]
        return state, dict(fields, global_pool="map")
    return state, dict(fields, global_pool="avg", fc_norm=False)  # no head: the mean of the normalised tokens


def _ratio(hidden: int, dim: int) -> float:
    """An `mlp_ratio` for which vitkit's `int(dim * mlp_ratio)` is `hidden` (timm writes ViT-g's as 2.66667 * 2)."""
    for ratio in (hidden / dim, round(hidden / dim, 5) + 1e-5):
        if int(dim * ratio) == hidden:
            return ratio
    raise ValueError(f"an MLP of {hidden} hidden units on width {dim} is not one vitkit builds")
