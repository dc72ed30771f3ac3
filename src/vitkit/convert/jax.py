"""JAX ViT `.npz` checkpoints -> vitkit: the ViT paper's release and big_vision's.

google-research/vision_transformer and big_vision save flax parameters as `Module/Submodule/param`
names. They differ in numbering inside an encoder block (table below), in the position table
(big_vision's skips the class token, and may be fixed sin-cos and absent), in an optional `params/`
prefix and in scanned layers (one `Transformer/encoderblock/...` array with a leading depth axis).
The architecture is read from the array shapes; timm's `_load_weights` was the reference for the
transposes. flax's `nn.gelu` is the tanh approximation; the weights are used with exact GELU, as timm does.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .common import Checkpoint, closest_variant, config_class, expect_shape

PREFIXES = ("opt/target/", "params/img/", "params/")  # old google-research, SigLIP image tower, big_vision
NORM_EPS = 1e-6  # flax LayerNorm's default, used by both code bases

# The sub-module names inside `Transformer/encoderblock_{i}/`.
BLOCK_NAMES: dict[str, dict[str, str]] = {
    "google-research": {"attn": "MultiHeadDotProductAttention_1", "norm2": "LayerNorm_2", "mlp": "MlpBlock_3"},
    "big_vision": {"attn": "MultiHeadDotProductAttention_0", "norm2": "LayerNorm_1", "mlp": "MlpBlock_0"},
}
POS_EMBED = {"google-research": "Transformer/posembed_input/pos_embedding", "big_vision": "pos_embedding"}

# (JAX name, vitkit name, layout). Layouts: "conv" HWIO -> OIHW; "dense" (in, out) -> (out, in);
# "heads_in" (D, heads, head_dim) -> (heads * head_dim, D); "heads_bias" (heads, head_dim) -> flat;
# "heads_out" (heads, head_dim, D) -> (D, heads * head_dim); None: as is.
KEYS: list[tuple[str, str, str | None]] = [
    ("embedding/kernel", "patch_embed.proj.weight", "conv"), ("embedding/bias", "patch_embed.proj.bias", None),
    ("cls", "cls_token", None),
    ("Transformer/encoder_norm/scale", "norm.weight", None), ("Transformer/encoder_norm/bias", "norm.bias", None),
    ("head/kernel", "head.weight", "dense"), ("head/bias", "head.bias", None),
]
BLOCK_KEYS: list[tuple[str, str, str | None]] = [
    ("LayerNorm_0/scale", "norm1.weight", None), ("LayerNorm_0/bias", "norm1.bias", None),
    ("{attn}/query/kernel", "attn.q.weight", "heads_in"), ("{attn}/query/bias", "attn.q.bias", "heads_bias"),  # -> qkv
    ("{attn}/key/kernel", "attn.k.weight", "heads_in"), ("{attn}/key/bias", "attn.k.bias", "heads_bias"),
    ("{attn}/value/kernel", "attn.v.weight", "heads_in"), ("{attn}/value/bias", "attn.v.bias", "heads_bias"),
    ("{attn}/out/kernel", "attn.proj.weight", "heads_out"), ("{attn}/out/bias", "attn.proj.bias", None),
    ("{norm2}/scale", "norm2.weight", None), ("{norm2}/bias", "norm2.bias", None),
    ("{mlp}/Dense_0/kernel", "mlp.fc1.weight", "dense"), ("{mlp}/Dense_0/bias", "mlp.fc1.bias", None),
    ("{mlp}/Dense_1/kernel", "mlp.fc2.weight", "dense"), ("{mlp}/Dense_1/bias", "mlp.fc2.bias", None),
]
# A representation layer (dense + tanh) between the pooled token and the head of the ViT paper's
# ImageNet-21k checkpoints; vitkit's ViT has none. It is dropped with the head trained on top of it.
PRE_LOGITS = ("pre_logits/kernel", "pre_logits/bias")


def read_npz(path: Path, name: str | None = None) -> Checkpoint:
    """Read an `.npz` (numpy only: `allow_pickle=False`, so no code runs) and convert it."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return convert_jax(arrays, str(path), name)


def convert_jax(arrays: dict[str, np.ndarray], source: str = "npz", name: str | None = None) -> Checkpoint:
    """JAX ViT arrays -> a vitkit `Checkpoint` (state dict, variant and overrides, inception mean/std)."""
    w = _unscan(_strip_prefix(arrays, source))
    if any(k.startswith("MAPHead") for k in w):
        raise ValueError(f"{source}: attention-pooling heads (MAPHead, big_vision pool_type='map') are not supported")
    naming = _naming(w, source)
    if any(k in w for k in PRE_LOGITS):
        warnings.warn(f"{source}: dropping the pre-logits layer and the head trained on it; train a new head")
        w = {k: v for k, v in w.items() if not k.startswith(("pre_logits/", "head/"))}
    depth = 1 + max(int(k.split("/")[1].split("_")[1]) for k in w if k.startswith("Transformer/encoderblock_"))
    target = _architecture(w, naming, depth)
    table = KEYS + [(f"Transformer/encoderblock_{i}/" + j.format(**BLOCK_NAMES[naming]), f"blocks.{i}.{v}", layout)
                    for i in range(depth) for j, v, layout in BLOCK_KEYS]
    state = {ours: _layout(_tensor(w[jax], jax), layout, target.num_heads) for jax, ours, layout in table if jax in w}
    unused = sorted(set(w) - {jax for jax, _, _ in table} - {POS_EMBED[naming]})
    if unused:
        raise ValueError(f"{source}: {len(unused)} array(s) outside the conversion table: {', '.join(unused)}")
    for i in range(depth):
        for leaf in ("weight", "bias"):
            parts = [state.pop(f"blocks.{i}.attn.{p}.{leaf}", None) for p in "qkv"]
            if all(p is not None for p in parts):
                state[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts)  # (3 D, D) or (3 D,)
    if target.pos_embed == "learn":
        state["pos_embed"] = _pos_embed(w[POS_EMBED[naming]], naming, target.class_token)
    for key, shape in _expected_shapes(target).items():
        if key in state:
            expect_shape(key, state[key], shape)
    name, overrides = closest_variant(target, "vit", name)
    # Both code bases scale inputs to [-1, 1].
    return Checkpoint(state, name, overrides, None, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), family="vit")


def _strip_prefix(arrays: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    for prefix in ("", *PREFIXES):
        if f"{prefix}embedding/kernel" in arrays:
            return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    raise ValueError(f"{source}: not a JAX ViT checkpoint (no embedding/kernel under {', '.join(PREFIXES)} or the root)")


def _unscan(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """big_vision's scanned layers, `Transformer/encoderblock/X` `(depth, ...)`, as `encoderblock_{i}/X`."""
    scanned = "Transformer/encoderblock/"
    out = {k: v for k, v in w.items() if not k.startswith(scanned)}
    for k, v in w.items():
        if k.startswith(scanned):
            for i, block in enumerate(v):
                out[f"Transformer/encoderblock_{i}/{k[len(scanned):]}"] = block
    return out


def _naming(w: dict[str, np.ndarray], source: str) -> str:
    for naming, names in BLOCK_NAMES.items():
        if f"Transformer/encoderblock_0/{names['mlp']}/Dense_0/kernel" in w:
            return naming
    raise ValueError(f"{source}: no Transformer/encoderblock_0 MLP under a known name (MlpBlock_3 or MlpBlock_0)")


def _architecture(w: dict[str, np.ndarray], naming: str, depth: int):
    """The ViT config the arrays imply."""
    p, p2, C, D = w["embedding/kernel"].shape  # HWIO
    if p != p2:
        raise ValueError(f"non-square patches {p}x{p2} are not supported")
    names = BLOCK_NAMES[naming]
    heads = w[f"Transformer/encoderblock_0/{names['attn']}/query/kernel"].shape[1]  # (D, heads, head_dim)
    hidden = w[f"Transformer/encoderblock_0/{names['mlp']}/Dense_0/kernel"].shape[1]
    class_token = "cls" in w
    pos = w.get(POS_EMBED[naming])
    if pos is None and naming == "google-research":
        raise ValueError(f"no {POS_EMBED[naming]}: the ViT paper's models always learn their positions")
    img_size = 224  # sin-cos positions do not tell; the config default
    if pos is not None:
        n = pos.shape[1] - int(class_token and naming == "google-research")  # google-research's includes the class token
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"position table of {pos.shape[1]} entries is not a square grid")
        img_size = side * p
    return config_class("vit")(
        img_size=img_size, patch_size=p, in_chans=C, num_classes=w["head/kernel"].shape[1] if "head/kernel" in w else 0,
        embed_dim=D, depth=depth, num_heads=heads, mlp_ratio=hidden / D,
        qkv_bias=f"Transformer/encoderblock_0/{names['attn']}/query/bias" in w,
        # Without a class token both code bases average the tokens after the final norm ("gap").
        class_token=class_token, global_pool="token" if class_token else "avg", fc_norm=None if class_token else False,
        pos_embed="learn" if pos is not None else "sincos", norm_eps=NORM_EPS)


def _expected_shapes(cfg) -> dict[str, tuple[int, ...]]:
    D, p = cfg.embed_dim, cfg.patch_size
    return {"patch_embed.proj.weight": (D, cfg.in_chans, p, p), "cls_token": (1, 1, D),
            "blocks.0.attn.qkv.weight": (3 * D, D), "blocks.0.attn.proj.weight": (D, D),
            "blocks.0.mlp.fc1.weight": (int(D * cfg.mlp_ratio), D)}


def _tensor(a: np.ndarray, key: str) -> torch.Tensor:
    if a.dtype.kind != "f":  # bfloat16 arrives as raw bytes (dtype 'V2')
        raise ValueError(f"{key}: dtype {a.dtype} is not a float type numpy can read; save the file as float32")
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _layout(t: torch.Tensor, layout: str | None, heads: int) -> torch.Tensor:
    if layout == "conv":
        return t.permute(3, 2, 0, 1)  # (p, p, C, D) -> (D, C, p, p)
    if layout == "dense":
        return t.t()
    if layout == "heads_in":
        assert t.ndim == 3 and t.shape[1] == heads, t.shape
        return t.reshape(t.shape[0], -1).t()  # (D, H, hd) -> (H * hd, D)
    if layout == "heads_bias":
        assert t.ndim == 2 and t.shape[0] == heads, t.shape
        return t.reshape(-1)
    if layout == "heads_out":
        assert t.ndim == 3 and t.shape[0] == heads, t.shape
        return t.reshape(-1, t.shape[-1]).t()  # (H, hd, D) -> (D, H * hd)
    return t


def _pos_embed(pos: np.ndarray, naming: str, class_token: bool) -> torch.Tensor:
    pe = _tensor(pos, "pos_embedding")  # (1, N, D)
    if naming == "big_vision" and class_token:
        # big_vision's class token gets no position: a zero entry in front is the same sum.
        pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
    return pe
