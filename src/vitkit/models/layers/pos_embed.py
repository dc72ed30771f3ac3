"""Position embeddings: fixed 2-D sin-cos, resampling of learned tables to a new grid, relative offsets."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d_pos_embed(
    grid: tuple[int, int], dim: int, temperature: float = 10000.0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding `(1, H*W, dim)` (MoCo v3; Beyer et al. 2022 "Better plain ViT baselines").

    A quarter of the channels each for sin/cos of the row and of the column coordinate, as in
    big_vision's `posemb_sincos_2d`.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    h, w = grid
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4 - 1 or 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    pe = torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)
    return pe.unsqueeze(0).to(dtype)


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 0,
    antialias: bool = True,
) -> torch.Tensor:
    """Bicubically resample a learned table `(1, prefix + H*W, D)` to `new_grid`.

    Prefix tokens (class, distillation) keep their embeddings. Interpolation runs in float32 with
    anti-aliasing, as timm does, so a checkpoint resized by either library gives the same table.
    transformers' DINOv2, CLIP and SigLIP interpolate without (`antialias=False`); torch's two bicubic
    kernels differ even when upsampling, so a converted model resamples as its source does.
    """
    n = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = int(round(n**0.5))
        if side * side != n:
            raise ValueError(f"cannot infer a square grid from {n} position embeddings; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"position table has {n} patch entries, which does not match grid {old_grid}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid_pe = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid_pe.shape[-1]
    grid_pe = grid_pe.float().reshape(1, *old_grid, D).permute(0, 3, 1, 2)  # (1, D, H, W)
    grid_pe = F.interpolate(grid_pe, size=new_grid, mode="bicubic", antialias=antialias, align_corners=False)
    grid_pe = grid_pe.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid_pe], dim=1)


def window_offset_index(window: tuple[int, int]) -> torch.Tensor:
    """`(N, N)`: for each (query, key) pair of the N positions of `window`, the row of their 2-D offset in
    a row-major table of all `(2H-1)(2W-1)` offsets (the relative position bias of Swin and BEiT)."""
    H, W = window
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N): query position minus key position
    return (rel[0] + H - 1) * (2 * W - 1) + (rel[1] + W - 1)


def resample_loaded_pos_embed(state_dict: dict, key: str, pos_embed: torch.Tensor | None, grid: tuple[int, int],
                              num_prefix_tokens: int, antialias: bool = True) -> None:
    """In a state dict about to be loaded (a load pre-hook): a learned table `key` made for another grid is
    resampled to `grid`, so a checkpoint trained at another resolution loads directly. A fixed (buffer) or
    absent table, a missing key or another width is left for the load to judge."""
    if not isinstance(pos_embed, torch.nn.Parameter) or key not in state_dict:
        return
    pe = state_dict[key]
    if pe.shape != pos_embed.shape and pe.shape[-1] == pos_embed.shape[-1]:
        state_dict[key] = resample_abs_pos_embed(pe, grid, num_prefix_tokens=num_prefix_tokens, antialias=antialias)
