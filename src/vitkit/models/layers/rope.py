"""Rotary position embeddings (RoPE; Su et al. 2021) on a 2-D patch grid, as EVA-02 and DINOv3 use them.

Instead of adding a position vector to each token, RoPE rotates pairs of query and key channels by
angles proportional to the token's position, so the attention logit of two patches depends on their
offset. The axial 2-D form gives half of each head's channel pairs the row and half the column. The
two named models differ in coordinates, frequencies and channel pairing, and each weight file expects
its own (timm's `RotaryEmbeddingCat` and `RotaryEmbeddingDinoV3`, reproduced here to the last bit):

- "eva" (EVA-02): integer patch indices, frequencies `1 / T^(i / n)`, adjacent channels paired
  (interleaved). On another grid the indices are rescaled to the pre-training grid (`ref_grid`), so
  the angles span the range the weights were trained on.
- "dinov3": patch centres normalised to [-1, 1] per axis (any grid covers the same range), periods
  `T^(2i / (Dh / 2))`, angles `2 pi x / period`, channel i paired with i + Dh/2 ("rotate half").

The prefix tokens (class, registers) carry no position and are not rotated. The embedding is
recomputed for each forward (a few hundred sines), so it follows any grid and always stays fp32.
An exported graph holds it as a constant for the exported size.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn

RopeKind = Literal["eva", "dinov3"]


class Rope(NamedTuple):
    """What the attention needs: `emb` `(N, 2 Dh)` (sines then cosines, fp32) or `(B, 1, N, 2 Dh)` for a
    per-image subset of patches, the number of leading tokens left unrotated, and the channel pairing."""

    emb: torch.Tensor
    prefix: int
    half: bool


class RotaryEmbedding2d(nn.Module):
    """Builds the `Rope` of a patch grid for heads of `head_dim` channels; holds no parameters."""

    def __init__(self, head_dim: int, kind: RopeKind = "eva", temperature: float = 10000.0,
                 ref_grid: tuple[int, int] | None = None, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D rotary embeddings need a head width divisible by 4, got {head_dim}")
        if kind not in ("eva", "dinov3"):
            raise ValueError(f"rope kind {kind!r} is not one of eva, dinov3")
        self.head_dim, self.kind, self.temperature = head_dim, kind, float(temperature)
        self.ref_grid, self.num_prefix_tokens = ref_grid, num_prefix_tokens

    def forward(self, grid: tuple[int, int], device: torch.device | None = None) -> Rope:
        # Plain ints: under tracing (ONNX export) the grid would otherwise be recorded as shape arithmetic
        # and the table recomputed in the graph; as ints it is a constant of the exported input size.
        angles = self._angles((int(grid[0]), int(grid[1])))  # (N, Dh / 2): one angle per channel pair
        half = self.kind == "dinov3"
        sin, cos = _layout(angles.sin(), half), _layout(angles.cos(), half)
        return Rope(torch.cat([sin, cos], dim=-1).to(device), self.num_prefix_tokens, half)

    def _angles(self, grid: tuple[int, int]) -> torch.Tensor:
        n = self.head_dim // 4  # frequencies per axis
        if self.kind == "eva":
            bands = 1.0 / self.temperature ** (torch.arange(n, dtype=torch.float32) / n)
            t = [torch.arange(s, dtype=torch.float32) for s in grid]
            if self.ref_grid is not None:  # the operation order of timm's grid, for bitwise parity
                t = [x / s * r for x, s, r in zip(t, grid, self.ref_grid)]
            coords = torch.stack(torch.meshgrid(t, indexing="ij"), dim=-1).flatten(0, 1)  # (N, 2)
            return (coords.unsqueeze(-1) * bands).flatten(1)
        periods = self.temperature ** (2.0 * torch.arange(n, dtype=torch.float32) / (self.head_dim // 2))
        t = [torch.arange(0.5, s, dtype=torch.float32) / s for s in grid]  # patch centres in [0, 1]
        coords = 2.0 * torch.stack(torch.meshgrid(t, indexing="ij"), dim=-1).flatten(0, 1) - 1.0
        return (2 * math.pi * coords.unsqueeze(-1) / periods).flatten(1)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, kind={self.kind!r}, temperature={self.temperature}, ref_grid={self.ref_grid}"


def _layout(x: torch.Tensor, half: bool) -> torch.Tensor:
    """Per-pair values `(..., Dh/2)` -> per-channel `(..., Dh)`: `[a, b, a, b]` (half) or `[a, a, b, b]`."""
    return torch.cat([x, x], dim=-1) if half else torch.stack([x, x], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate queries or keys `(B, H, N, Dh)` after their prefix tokens; returns `x`'s dtype."""
    p = rope.prefix
    t = x[:, :, p:]
    sin, cos = rope.emb.chunk(2, dim=-1)
    if rope.half:
        t1, t2 = t.chunk(2, dim=-1)
        turned = torch.cat([-t2, t1], dim=-1)
    else:
        turned = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).reshape(t.shape)
    rotated = (t * cos + turned * sin).to(x.dtype)
    return torch.cat([x[:, :, :p], rotated], dim=2) if p else rotated
