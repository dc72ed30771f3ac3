"""Hugging Face transformers' `CvtForImageClassification` -> vitkit `Cvt` (`vitkit.models.cvt`).

Covers transformers' port of microsoft/CvT (hub: `microsoft/cvt-13`, `cvt-21`, `cvt-w24-384-22k`, ...):

    hf = transformers.CvtForImageClassification.from_pretrained("microsoft/cvt-13")
    model = Cvt(CvtConfig(**cvt_config_from_hf(hf.config.to_dict())))
    model.load_state_dict(convert_hf_cvt(hf.state_dict()))

Every key has a vitkit counterpart (BatchNorm's `num_batches_tracked` too), so nothing is dropped; a key
outside the table raises, and shapes are checked against the stage widths of the token embeddings.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

_STAGE = "cvt.encoder.stages.{i}."
_LAYER = _STAGE + "layers.{j}."
_ATTN = _LAYER + "attention.attention."
_CONV_PROJ = _ATTN + "convolution_projection_"  # + query/key/value
_BLOCK = "stages.{i}.blocks.{j}."

# (Hugging Face module, vitkit module, kind); the kind fixes which tensors a module has and their shapes.
KEY_TABLE: tuple[tuple[str, str, str], ...] = (
    (_STAGE + "cls_token", "stages.{i}.cls_token", "token"),
    (_STAGE + "embedding.convolution_embeddings.projection", "stages.{i}.patch_embed.proj", "embed_conv"),
    (_STAGE + "embedding.convolution_embeddings.normalization", "stages.{i}.patch_embed.norm", "layer_norm"),
    (_LAYER + "layernorm_before", _BLOCK + "norm1", "layer_norm"),
    (_CONV_PROJ + "query.convolution_projection.convolution", _BLOCK + "attn.conv_proj_q.conv", "dw_conv"),
    (_CONV_PROJ + "query.convolution_projection.normalization", _BLOCK + "attn.conv_proj_q.bn", "batch_norm"),
    (_CONV_PROJ + "key.convolution_projection.convolution", _BLOCK + "attn.conv_proj_k.conv", "dw_conv"),
    (_CONV_PROJ + "key.convolution_projection.normalization", _BLOCK + "attn.conv_proj_k.bn", "batch_norm"),
    (_CONV_PROJ + "value.convolution_projection.convolution", _BLOCK + "attn.conv_proj_v.conv", "dw_conv"),
    (_CONV_PROJ + "value.convolution_projection.normalization", _BLOCK + "attn.conv_proj_v.bn", "batch_norm"),
    (_ATTN + "projection_query", _BLOCK + "attn.proj_q", "linear"),
    (_ATTN + "projection_key", _BLOCK + "attn.proj_k", "linear"),
    (_ATTN + "projection_value", _BLOCK + "attn.proj_v", "linear"),
    (_LAYER + "attention.output.dense", _BLOCK + "attn.proj", "linear"),
    (_LAYER + "layernorm_after", _BLOCK + "norm2", "layer_norm"),
    (_LAYER + "intermediate.dense", _BLOCK + "mlp.fc1", "fc1"),
    (_LAYER + "output.dense", _BLOCK + "mlp.fc2", "fc2"),
    ("layernorm", "norm", "layer_norm"),
    ("classifier", "head", "head"),
)
# The tensors each kind of module holds; every other kind has a weight and, optionally, a bias.
_LEAVES = {
    "token": ("",),
    "dw_conv": ("weight",),  # no bias: BatchNorm follows
    "batch_norm": ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"),
}
_WEIGHT_BIAS = ("weight", "bias")

# transformers' CvtConfig defaults (CvT-13): a hub config.json saved with `use_diff` omits them.
HF_DEFAULTS: dict[str, Any] = {
    "num_channels": 3, "patch_sizes": [7, 3, 3], "patch_stride": [4, 2, 2], "patch_padding": [2, 1, 1],
    "embed_dim": [64, 192, 384], "num_heads": [1, 3, 6], "depth": [1, 2, 10], "mlp_ratio": [4.0, 4.0, 4.0],
    "attention_drop_rate": [0.0, 0.0, 0.0], "drop_rate": [0.0, 0.0, 0.0], "drop_path_rate": [0.0, 0.0, 0.1],
    "qkv_bias": [True, True, True], "cls_token": [False, False, True], "qkv_projection_method": ["dw_bn"] * 3,
    "kernel_qkv": [3, 3, 3], "padding_kv": [1, 1, 1], "stride_kv": [2, 2, 2], "padding_q": [1, 1, 1],
    "stride_q": [1, 1, 1],
}
# vitkit's per-stage CvtConfig fields and the type of each stage's value; transformers renames one.
_STAGE_TYPES = {"embed_dim": int, "depth": int, "num_heads": int, "patch_sizes": int, "patch_stride": int,
                "patch_padding": int, "kernel_qkv": int, "stride_kv": int, "padding_kv": int, "mlp_ratio": float,
                "qkv_bias": bool, "cls_token": bool, "drop_rate": float, "attn_drop_rate": float,
                "drop_path_rate": float}
_HF_NAMES = {"attn_drop_rate": "attention_drop_rate"}


def _pattern(template: str) -> re.Pattern[str]:
    body = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
    return re.compile(rf"{body}(?:\.(?P<leaf>\w+))?")


_PATTERNS = [(_pattern(hf), ours, kind) for hf, ours, kind in KEY_TABLE]


def convert_hf_cvt(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a `CvtForImageClassification` state dict to vitkit's `Cvt` names, sharing the tensors.
    ValueError lists the keys outside the table, or names a shape that does not fit the stage widths."""
    widths = _stage_widths(state_dict)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        hit = _match(key)
        if hit is None:
            unknown.append(key)
            continue
        ours, kind, stage, leaf = hit
        stage = len(widths) - 1 if stage is None else stage  # the final norm and head follow the last stage
        if stage >= len(widths):
            raise ValueError(f"{key}: stage {stage} has no token embedding in the state dict")
        expected = _expected_shape(kind, leaf, tensor, widths, stage)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected {expected} for {ours}")
        out[ours] = tensor
    if unknown:
        raise ValueError(f"{len(unknown)} key(s) are not in the Hugging Face CvT conversion table: "
                         f"{', '.join(sorted(unknown))}")
    return out


def _match(key: str) -> tuple[str, str, int | None, str] | None:
    """`(vitkit key, kind, stage or None, leaf)` for a table key, else None."""
    for pattern, ours, kind in _PATTERNS:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        leaf = m["leaf"] or ""
        if leaf not in _LEAVES.get(kind, _WEIGHT_BIAS):
            return None
        groups = {k: v for k, v in m.groupdict().items() if k in ("i", "j") and v is not None}
        name = ours.format(**groups) + (f".{leaf}" if leaf else "")
        return name, kind, int(groups["i"]) if "i" in groups else None, leaf
    return None


def _stage_widths(state_dict: dict[str, Tensor]) -> list[int]:
    """Each stage's width, read from its token-embedding convolution `(C_i, C_in, k, k)`."""
    found = {}
    embed = re.compile(r"cvt\.encoder\.stages\.(\d+)\.embedding\.convolution_embeddings\.projection\.weight")
    for key, tensor in state_dict.items():
        if m := embed.fullmatch(key):
            found[int(m[1])] = tensor.shape[0]
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(f"token-embedding convolutions found for stages {sorted(found)}; expected 0, 1, ...")
    return [found[i] for i in range(len(found))]


def _expected_shape(kind: str, leaf: str, tensor: Tensor, widths: list[int], stage: int) -> tuple[int, ...]:
    """The shape a tensor must have; free sizes (kernels, MLP width, classes) are read from the tensor."""
    dim = widths[stage]
    if kind == "token":
        return (1, 1, dim)
    if kind in ("layer_norm", "batch_norm"):
        return () if leaf == "num_batches_tracked" else (dim,)
    if leaf == "bias":
        return (tensor.shape[0],) if kind in ("fc1", "head") else (dim,)
    k = tensor.shape[-1]
    return {"embed_conv": (dim, tensor.shape[1] if stage == 0 else widths[stage - 1], k, k), "dw_conv": (dim, 1, k, k),
            "linear": (dim, dim), "fc1": (tensor.shape[0], dim), "fc2": (dim, tensor.shape[1]),
            "head": (tensor.shape[0], dim)}[kind]


def cvt_config_from_hf(config_dict: dict[str, Any]) -> dict[str, Any]:
    """vitkit `CvtConfig` fields from transformers' `CvtConfig.to_dict()` or a hub `config.json`, rejecting
    projections other than "dw_bn" (transformers' "avg" branch builds no pooling and cannot run) and
    strided or non-"same" query projections. `layer_norm_eps` is ignored: transformers uses 1e-5 always."""
    c = {**HF_DEFAULTS, **config_dict}
    if c.get("model_type", "cvt") != "cvt":
        raise ValueError(f"not a CvT config: model_type {c['model_type']!r}")
    if set(c["qkv_projection_method"]) != {"dw_bn"}:
        raise ValueError(f"only 'dw_bn' projections are supported, got {c['qkv_projection_method']}")
    if any(s != 1 for s in c["stride_q"]) or any(p != k // 2 for p, k in zip(c["padding_q"], c["kernel_qkv"])):
        raise ValueError(f"queries must keep the map size (stride 1, padding kernel // 2), got stride_q "
                         f"{c['stride_q']}, padding_q {c['padding_q']} for kernel_qkv {c['kernel_qkv']}")
    # transformers stores the class count as id2label; `num_labels` appears only in hand-written dicts.
    num_classes = c.get("num_labels", len(c["id2label"]) if c.get("id2label") else 2)
    stages = {k: tuple(kind(v) for v in c[_HF_NAMES.get(k, k)]) for k, kind in _STAGE_TYPES.items()}
    return {"in_chans": int(c["num_channels"]), "num_classes": int(num_classes), **stages}
