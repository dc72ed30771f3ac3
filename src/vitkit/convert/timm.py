"""timm checkpoints (ViT, DeiT, DINOv2, CLIP, SigLIP, Swin, BEiT) -> vitkit: near identity, since vitkit
uses timm's names; also the original DINOv2 release files. What a timm file holds beyond vitkit's
parameters is dropped (listed below); the strict load reports the rest."""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from ..models.beit import NUM_CLS_ENTRIES, resize_rel_pos_bias_table
from .common import Target, rename

# Buffers that older timm versions (< 0.9) and the original BEiT and Swin releases saved although
# they are computed from the configuration; vitkit rebuilds them, so they are dropped.
DROPPED_BUFFERS: dict[str, str] = {
    "relative_position_index": "BEiT and Swin: the index into the bias table, a function of the window",
    "attn_mask": "Swin: the shifted-window mask, a function of the feature-map size",
}

# Swin checkpoints of timm < 0.9 and of microsoft/Swin-Transformer put patch merging at the END of
# stage i (timm >= 0.9 and vitkit: the START of stage i + 1) and name the classifier `head`.
OLD_SWIN_LAYOUT: list[tuple[str, Target]] = [
    (r"layers\.(\d+)\.downsample\.(.+)", lambda m: f"layers.{int(m[1]) + 1}.downsample.{m[2]}"),
    (r"head\.(weight|bias)", "head.fc.{0}"),
    (r"(.+)", "{0}"),  # everything else as is
]

_SWIN_TABLE = re.compile(r"layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table")


def convert_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the buffers of `DROPPED_BUFFERS` and move an old Swin layout to the current one."""
    out = {k: v for k, v in state.items() if k.rsplit(".", 1)[-1] not in DROPPED_BUFFERS}
    # Stage 0 never downsamples in the new layout, so its merging layer marks the old one.
    if "layers.0.downsample.reduction.weight" in out:
        out = rename(out, OLD_SWIN_LAYOUT, "old Swin layout")
    if "mask_token" in out and "blocks.0.ls1.gamma" in out:
        out = _dinov2_release(out)
    return out


def _dinov2_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/dinov2's files -> timm's layout, as timm converts them: the [MASK] token (used in
    pre-training only) dropped, `register_tokens` renamed, and with registers the class token's position
    embedding added to the token (the table then covers the patches: `no_embed_class`); ViT-g's SwiGLU
    `w12`/`w3` are `fc1`/`fc2`."""
    out = {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v
           for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
        out["pos_embed"] = out["pos_embed"][:, 1:]
    return out


def timm_overrides(state: dict[str, torch.Tensor], cfg: Any) -> dict[str, Any]:
    """Config fields that a timm state dict fixes and that differ from the variant `cfg`: the class count
    (classifier rows), input channels (patch projection) and, where a table has a square grid (ViT
    `pos_embed`, BEiT bias tables), the image size; Swin's tables depend on the window only. Behind a
    convolutional stem or a hybrid's ResNet, `patch_embed.proj` sees features, not pixels: channels and
    size are left to the variant (a differing channel count is adapted on loading).
    """
    found: dict[str, Any] = {}
    head = state.get("head.weight", state.get("head.fc.weight"))
    if head is not None:
        found["num_classes"] = head.shape[0]
    elif any("patch_embed." in k for k in state):  # a headless transformer; torchvision CNNs name theirs fc, classifier
        found["num_classes"] = 0
    proj = state.get("patch_embed.proj.weight")
    patch = getattr(cfg, "patch_size", None)
    if proj is not None and getattr(cfg, "embed_layer", "patch") == "patch" and isinstance(patch, int):
        if hasattr(cfg, "in_chans"):
            found["in_chans"] = proj.shape[1]
        grid = _grid(state) if proj.shape[-1] == patch else None
        if grid is not None:
            found["img_size"] = grid * patch
    return {k: v for k, v in found.items() if hasattr(cfg, k) and getattr(cfg, k) != v}


def _grid(state: dict[str, torch.Tensor]) -> int | None:
    """The side of the square patch grid a ViT or BEiT state dict was trained on, if it tells."""
    if "pos_embed" in state:
        prefix = sum(k in state for k in ("cls_token", "dist_token"))
        for n in (state["pos_embed"].shape[1] - prefix, state["pos_embed"].shape[1]):  # DeiT III: no prefix rows
            side = math.isqrt(n)
            if side * side == n:
                return side
        return None
    for key in ("rel_pos_bias.relative_position_bias_table", "blocks.0.attn.relative_position_bias_table"):
        if key in state:  # BEiT: (2g - 1)^2 offsets plus the class-token entries
            side = math.isqrt(state[key].shape[0] - NUM_CLS_ENTRIES)
            return (side + 1) // 2 if side * side == state[key].shape[0] - NUM_CLS_ENTRIES else None
    return None


def resize_swin_bias_tables(state: dict[str, torch.Tensor], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Resize Swin bias tables made for another window to the model's `shapes`, as timm does.

    timm's Swin `checkpoint_filter_fn` uses BEiT's fine-tuning interpolation (geometric offsets, then
    piecewise linear) without class-token entries; vitkit's BEiT resizer keeps three class-token rows
    as they are, so three zero rows are added and removed again.
    """
    out = dict(state)
    for key, table in state.items():
        if not _SWIN_TABLE.fullmatch(key) or key not in shapes or table.shape == shapes[key]:
            continue
        old, new = math.isqrt(table.shape[0]), math.isqrt(shapes[key][0])
        if old * old != table.shape[0] or new * new != shapes[key][0] or table.shape[1] != shapes[key][1]:
            raise ValueError(f"{key}: shape {tuple(table.shape)} cannot be resized to {tuple(shapes[key])}")
        padded = torch.cat([table, table.new_zeros(NUM_CLS_ENTRIES, table.shape[1])])
        window = ((new + 1) // 2,) * 2
        out[key] = resize_rel_pos_bias_table(padded, window, ((old + 1) // 2,) * 2)[:-NUM_CLS_ENTRIES]
    return out
