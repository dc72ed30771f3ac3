"""Multi-head self-attention (Vaswani et al. 2017) with a fused and an explicit path.

The fused path (`scaled_dot_product_attention`) is fast but never materialises the attention
probabilities. Whoever needs the maps (attention rollout, explain) calls the module with
`need_weights=True`, which takes the explicit path and returns the probabilities; nothing relies on
forward hooks that a fused kernel would silently bypass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Self-attention over a token sequence `(B, N, D)`; parameter names follow timm (`qkv`, `proj`)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values side by side, `(B, N, 3 * D)`; a family with another bias overrides it."""
        return self.qkv(x)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return `(output, probabilities)`; probabilities `(B, H, N, N)` only when `need_weights`.

        `attn_bias` is added to the logits (relative position bias, shifted-window mask) and must
        broadcast to `(B, H, N, N)`.
        """
        B, N, D = x.shape
        qkv = self.project_qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        if need_weights:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_bias is not None:
                attn = attn + attn_bias
            attn = attn.softmax(dim=-1)
            x = self.attn_drop(attn) @ v
        else:
            attn = None
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x)), attn
