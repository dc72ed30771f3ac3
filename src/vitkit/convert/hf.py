"""Hugging Face checkpoint directories -> vitkit.

transformers directories (`config.json` with `model_type`; `model.safetensors` or `pytorch_model.bin`):
ViT, DeiT, Swin, BEiT; CvT through `hf_cvt`; DINOv2, CLIP and SigLIP through `hf_backbones`. The
architecture is mapped to the nearest registered variant plus overrides, so the rebuilt model is
exactly the source's. timm's hub directories
(`config.json` with `architecture`) hold a timm state dict and go to `convert.timm`. The key tables
rename the parameters; `merge_qkv` concatenates transformers' query, key and value into timm's `qkv`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..models import get_model_entry, list_models, model_config, read_state_dict
from .common import Checkpoint, Target, closest_variant, config_class, rename, square
from .timm import convert_timm, timm_overrides

# The classification heads each model type converts from; headless models (ViTModel, ...) carry
# a pooler and no head, which vitkit does not build.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "vit": ("ViTForImageClassification",),
    "deit": ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification"),
    "swin": ("SwinForImageClassification",), "beit": ("BeitForImageClassification",),
    "cvt": ("CvtForImageClassification",),
}
# Older transformers saved this buffer; it is a function of the window.
DROPPED = ("relative_position_index",)


def _layer_keys(hf: str, ours: str) -> list[tuple[str, Target]]:
    """The norms, attention output and MLP of a transformers encoder layer: `hf` matches the layer's
    prefix, `ours` is vitkit's block (`blocks.{0}.`); the weight/bias leaf fills the next field."""
    leaf = "{" + str(ours.count("{")) + "}"
    parts = [("layernorm_before", "norm1"), (r"attention\.output\.dense", "attn.proj"), ("layernorm_after", "norm2"),
             (r"intermediate\.dense", "mlp.fc1"), (r"output\.dense", "mlp.fc2")]
    return [(hf + theirs + r"\.(weight|bias)", f"{ours}{mine}.{leaf}") for theirs, mine in parts]


_VIT = r"(?:vit|deit)\."
_VL = _VIT + r"encoder\.layer\.(\d+)\."
VIT_KEYS: list[tuple[str, Target]] = [
    (_VIT + r"embeddings\.cls_token", "cls_token"),
    (r"deit\.embeddings\.distillation_token", "dist_token"),
    (_VIT + r"embeddings\.position_embeddings", "pos_embed"),
    (_VIT + r"embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed.proj.{0}"),
    (_VL + r"attention\.attention\.(query|key|value)\.(weight|bias)", "blocks.{0}.attn.{1}.{2}"),  # -> qkv
    *_layer_keys(_VL, "blocks.{0}."),
    (_VIT + r"layernorm\.(weight|bias)", "norm.{0}"),
    (r"(?:classifier|cls_classifier)\.(weight|bias)", "head.{0}"),
    (r"distillation_classifier\.(weight|bias)", "head_dist.{0}"),
]

_BL = r"beit\.encoder\.layer\.(\d+)\."
BEIT_KEYS: list[tuple[str, Target]] = [
    (r"beit\.embeddings\.cls_token", "cls_token"),
    (r"beit\.embeddings\.mask_token", "mask_token"),
    (r"beit\.embeddings\.position_embeddings", "pos_embed"),
    (r"beit\.embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed.proj.{0}"),
    (r"beit\.encoder\.relative_position_bias\.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
    (_BL + r"lambda_([12])", "blocks.{0}.gamma_{1}"),  # layer scale
    (_BL + r"attention\.attention\.(query|key|value)\.weight", "blocks.{0}.attn.{1}.weight"),  # -> qkv
    (_BL + r"attention\.attention\.query\.bias", "blocks.{0}.attn.q_bias"),  # BEiT has no key bias
    (_BL + r"attention\.attention\.value\.bias", "blocks.{0}.attn.v_bias"),
    (_BL + r"attention\.attention\.relative_position_bias\.relative_position_bias_table",
     "blocks.{0}.attn.relative_position_bias_table"),
    *_layer_keys(_BL, "blocks.{0}."),
    (r"beit\.layernorm\.(weight|bias)", "norm.{0}"),  # class-token pooling
    (r"beit\.pooler\.layernorm\.(weight|bias)", "fc_norm.{0}"),  # mean pooling
    (r"classifier\.(weight|bias)", "head.{0}"),
]

_SL = r"swin\.encoder\.layers\.(\d+)\.blocks\.(\d+)\."
SWIN_KEYS: list[tuple[str, Target]] = [
    (r"swin\.embeddings\.patch_embeddings\.projection\.(weight|bias)", "patch_embed.proj.{0}"),
    (r"swin\.embeddings\.norm\.(weight|bias)", "patch_embed.norm.{0}"),
    (_SL + r"attention\.self\.(query|key|value)\.(weight|bias)", "layers.{0}.blocks.{1}.attn.{2}.{3}"),  # -> qkv
    (_SL + r"attention\.self\.relative_position_bias_table", "layers.{0}.blocks.{1}.attn.relative_position_bias_table"),
    *_layer_keys(_SL, "layers.{0}.blocks.{1}."),
    # transformers merges patches at the END of stage i, timm and vitkit at the START of stage i + 1.
    (r"swin\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)",
     lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}.{m[3]}"),
    (r"swin\.layernorm\.(weight|bias)", "norm.{0}"),
    (r"classifier\.(weight|bias)", "head.fc.{0}"),
]


def merge_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`*.attn.{query,key,value}.{weight,bias}` -> `*.attn.qkv.{weight,bias}`, rows in q, k, v order."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(.*\.attn)\.(query|key|value)\.(weight|bias)", key):
            parts.setdefault(f"{m[1]}.qkv.{m[3]}", {})[m[2]] = value
        else:
            out[key] = value
    for key, qkv in parts.items():
        if set(qkv) != {"query", "key", "value"}:
            raise ValueError(f"{key}: found only {sorted(qkv)} of query, key, value")
        q, k, v = qkv["query"], qkv["key"], qkv["value"]
        if not q.shape == k.shape == v.shape or (q.ndim == 2 and q.shape[0] != q.shape[1]):
            raise ValueError(f"{key}: query/key/value shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        out[key] = torch.cat([q, k, v])  # (3 D, D) or (3 D,)
    return out


# transformers' config defaults for the fields read here: a config.json saved with `use_diff` omits them.
_VIT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     hidden_act="gelu", layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3)
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit": {**_VIT_DEFAULTS, "qkv_bias": True}, "deit": {**_VIT_DEFAULTS, "qkv_bias": True},
    "beit": {**_VIT_DEFAULTS, "use_mask_token": False, "use_absolute_position_embeddings": False,
             "use_relative_position_bias": False, "use_shared_relative_position_bias": False,
             "layer_scale_init_value": 0.1, "use_mean_pooling": True},
    "swin": dict(hidden_act="gelu", layer_norm_eps=1e-5, image_size=224, patch_size=4, num_channels=3, embed_dim=96,
                 depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, mlp_ratio=4.0, qkv_bias=True,
                 use_absolute_embeddings=False),
}


def _common(c: dict[str, Any]) -> dict[str, Any]:
    """Fields every transformers config here states the same way."""
    if c["hidden_act"] != "gelu":
        raise ValueError(f"hidden_act {c['hidden_act']!r} is not supported: vitkit's MLP uses exact GELU")
    size = c["image_size"]
    return dict(img_size=square(size if isinstance(size, int) else tuple(size)), patch_size=int(c["patch_size"]),
                in_chans=int(c["num_channels"]), norm_eps=float(c["layer_norm_eps"]))


def _vit_like(c: dict[str, Any]) -> dict[str, Any]:
    """`_common` and the width, depth, heads and MLP ratio of a ViT, DeiT or BEiT config."""
    common, D = _common(c), int(c["hidden_size"])
    ratio = c["intermediate_size"] / D
    if int(D * ratio) != c["intermediate_size"]:  # vitkit builds int(dim * mlp_ratio) hidden units
        raise ValueError(f"intermediate_size {c['intermediate_size']} / hidden_size {D} is not a ratio vitkit builds")
    return dict(**common, embed_dim=D, depth=int(c["num_hidden_layers"]), num_heads=int(c["num_attention_heads"]),
                mlp_ratio=ratio)


def vit_config_from_hf(c: dict[str, Any], num_classes: int) -> Any:
    return config_class("vit")(**_vit_like(c), num_classes=num_classes, qkv_bias=bool(c["qkv_bias"]),
                               distilled=c["model_type"] == "deit")


def beit_config_from_hf(c: dict[str, Any], num_classes: int) -> Any:
    scale = c["layer_scale_init_value"]
    return config_class("beit")(
        **_vit_like(c), num_classes=num_classes, use_abs_pos_emb=bool(c["use_absolute_position_embeddings"]),
        use_rel_pos_bias=bool(c["use_relative_position_bias"]),
        use_shared_rel_pos_bias=bool(c["use_shared_relative_position_bias"]),
        init_values=float(scale) if scale and scale > 0 else None,  # 0 turns layer scale off, as in transformers
        use_mean_pooling=bool(c["use_mean_pooling"]), use_mask_token=bool(c["use_mask_token"]))


def swin_config_from_hf(c: dict[str, Any], num_classes: int) -> Any:
    if c["use_absolute_embeddings"]:
        raise ValueError("Swin with use_absolute_embeddings=True is not supported: vitkit's Swin has no absolute "
                         "position embedding")
    return config_class("swin")(
        **_common(c), num_classes=num_classes, embed_dim=int(c["embed_dim"]),
        depths=tuple(int(d) for d in c["depths"]), num_heads=tuple(int(h) for h in c["num_heads"]),
        window_size=int(c["window_size"]), mlp_ratio=float(c["mlp_ratio"]), qkv_bias=bool(c["qkv_bias"]))


# model_type -> (key table, config builder, family preferred among equal variants)
CONVERTERS: dict[str, tuple[list[tuple[str, Target]], Callable[[dict[str, Any], int], Any], str]] = {
    "vit": (VIT_KEYS, vit_config_from_hf, "vit"), "deit": (VIT_KEYS, vit_config_from_hf, "deit"),
    "beit": (BEIT_KEYS, beit_config_from_hf, "beit"), "swin": (SWIN_KEYS, swin_config_from_hf, "swin"),
}


def read_hf(path: Path, name: str | None = None) -> Checkpoint:
    """Read and convert a Hugging Face directory; `name` picks the registered variant to build on."""
    config = json.loads((path / "config.json").read_text())
    state = _read_weights(path)
    if "model_type" not in config and "architecture" in config:
        return _timm_hub(config, state, name)
    model_type = config.get("model_type")
    from . import hf_backbones  # here: it builds on this module's tables

    if model_type in hf_backbones.ARCHITECTURES:
        return _backbone(path, config, state, name)
    if model_type not in ARCHITECTURES:
        supported = [*ARCHITECTURES, *hf_backbones.ARCHITECTURES]
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(supported)}")
    arch = (config.get("architectures") or [ARCHITECTURES[model_type][0]])[0]
    if arch not in ARCHITECTURES[model_type]:
        raise ValueError(f"{path}: {arch} is not supported; for {model_type}: {', '.join(ARCHITECTURES[model_type])}")
    state = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DROPPED}
    if model_type == "cvt":
        return _cvt(path, config, state, name)
    table, config_from_hf, family = CONVERTERS[model_type]
    state = merge_qkv(rename(state, table, str(path)))
    if arch == "DeiTForImageClassification":
        warnings.warn(f"{path}: DeiTForImageClassification classifies from the class token only; its classifier "
                      "is folded into vitkit's two DeiT heads (class head doubled, distillation head zero) so that "
                      "eval logits match")
        state = _fold_single_deit_head(state)
    head = state.get("head.weight", state.get("head.fc.weight"))
    num_classes = 0 if head is None else head.shape[0]
    name, overrides = closest_variant(config_from_hf({**HF_DEFAULTS[model_type], **config}, num_classes), family, name)
    mean, std = _normalisation(path)
    return Checkpoint(state, name, overrides, _labels(config, num_classes), mean, std, family)


def _backbone(path: Path, config: dict[str, Any], state: dict[str, torch.Tensor], name: str | None) -> Checkpoint:
    """DINOv2, CLIP and SigLIP image towers (`hf_backbones`): headless, so no class names."""
    from . import hf_backbones

    archs, family = hf_backbones.ARCHITECTURES[config["model_type"]]
    arch = (config.get("architectures") or [archs[0]])[0]
    if arch not in archs:
        raise ValueError(f"{path}: {arch} is not supported; for {config['model_type']}: {', '.join(archs)}")
    state, target = hf_backbones.convert_backbone(config, state, str(path))
    name, overrides = closest_variant(target, family, name)
    return Checkpoint(state, name, overrides, None, *_normalisation(path), family)


def _fold_single_deit_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`DeiTForImageClassification` has the distillation token but classifies from the class token
    alone. vitkit's distilled model averages two heads in eval mode, so the class head is doubled and
    the distillation head zeroed: the average is exactly transformers' logits (training sees both)."""
    W, b = state["head.weight"], state["head.bias"]
    return {**state, "head.weight": 2 * W, "head.bias": 2 * b,
            "head_dist.weight": torch.zeros_like(W), "head_dist.bias": torch.zeros_like(b)}


def _cvt(path: Path, config: dict[str, Any], state: dict[str, torch.Tensor], name: str | None) -> Checkpoint:
    if importlib.util.find_spec("vitkit.convert.hf_cvt") is None:
        raise NotImplementedError(f"{path}: CvT checkpoints need vitkit.convert.hf_cvt, which this install lacks")
    from . import hf_cvt

    target = config_class("cvt")(**hf_cvt.cvt_config_from_hf(config))
    name, overrides = closest_variant(target, "cvt", name)
    classes = _labels(config, target.num_classes)
    return Checkpoint(hf_cvt.convert_hf_cvt(state), name, overrides, classes, *_normalisation(path), "cvt")


def _timm_hub(config: dict[str, Any], state: dict[str, torch.Tensor], name: str | None) -> Checkpoint:
    """timm's hub layout: `config.json` names the timm architecture, the weights are a timm state dict."""
    state = convert_timm(state)
    registered = config["architecture"] if config["architecture"] in list_models() else None
    family = get_model_entry(registered).family if registered else None
    if name is None and registered is None:  # a timm model vitkit does not register: loadable into a given model only
        return Checkpoint(state)
    if registered is not None:  # the named architecture as overrides of the variant asked for
        own = model_config(registered, **timm_overrides(state, get_model_entry(registered).config))
        name, overrides = closest_variant(own, family, name or registered)
    else:
        overrides = timm_overrides(state, get_model_entry(name).config)
    labels = config.get("label_names")
    n = overrides.get("num_classes", get_model_entry(name).config.num_classes)
    classes = list(labels) if labels and len(labels) == n else None
    return Checkpoint(state, name, overrides, classes, *_stats(config.get("pretrained_cfg", {}), "mean", "std"), family)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    for file in ("model.safetensors", "pytorch_model.bin"):
        if (path / file).exists():
            return read_state_dict(path / file)  # safetensors, or torch.load(weights_only=True)
    if (path / "model.safetensors.index.json").exists():
        raise ValueError(f"{path}: sharded checkpoints are not supported; merge the shards into model.safetensors")
    raise FileNotFoundError(f"{path} has a config.json but neither model.safetensors nor pytorch_model.bin")


def _labels(config: dict[str, Any], num_classes: int) -> list[str] | None:
    """Class names from `id2label` (keys are strings in JSON), if they cover the classifier."""
    id2label = config.get("id2label") or {}
    if len(id2label) != num_classes or num_classes == 0:
        return None
    return [str(id2label[k]) for k in sorted(id2label, key=int)]


def _normalisation(path: Path) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """`image_mean`/`image_std` from `preprocessor_config.json`, when the directory has one."""
    file = path / "preprocessor_config.json"
    return _stats(json.loads(file.read_text()), "image_mean", "image_std") if file.exists() else (None, None)


def _stats(d: dict[str, Any], mean: str, std: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """`d[mean]` and `d[std]` as tuples, None where missing or empty."""
    return (tuple(d[mean]) if d.get(mean) else None), (tuple(d[std]) if d.get(std) else None)
