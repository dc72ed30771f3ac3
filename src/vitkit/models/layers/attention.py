"""Multi-head self-attention (Vaswani et al. 2017) with a fused and an explicit path.

The fused path (`scaled_dot_product_attention`) is fast but never materialises the attention
probabilities: whoever needs the maps (attention rollout, explain) passes `need_weights=True`, which
takes the explicit path and returns them, rather than relying on hooks a fused kernel would bypass.

bf16 on a CPU also takes the explicit path: there the fused kernel measured 1.3 to 2 times slower
than two bf16 matrix products and a softmax (forward + backward, 50 to 1,025 tokens, torch 2.14 on
AVX-512 bf16; `benchmarks/attention.py`). It is timm's computation with fused attention off: the
probabilities are rounded to bf16 (the fused kernel keeps fp32) and held for the backward pass,
B x H x N x N values per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import Linear, linear
from .rope import Rope, apply_rope


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    attn_drop: nn.Dropout,
    attn_bias: torch.Tensor | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T * scale + bias) v for `(B, H, N, Dh)` queries and `(B, H, Nkv, Dh)` keys/values;
    returns `(output, probabilities or None)`. Explicit with `need_weights` or bf16 on a CPU, fused otherwise."""
    if need_weights or (q.dtype == torch.bfloat16 and q.device.type == "cpu"):
        attn = (q * scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            attn = attn + attn_bias.to(attn.dtype)
        attn = attn.softmax(dim=-1)
        x = attn_drop(attn) @ v
        return x, (attn if need_weights else None)
    dropout_p = attn_drop.p if attn_drop.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=scale), None


class Attention(nn.Module):
    """Self-attention over a token sequence `(B, N, D)`; parameter names follow timm (`qkv`, `proj`)."""

    def __init__(
        self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values side by side, `(B, N, 3 * D)`; a family with another bias overrides it."""
        return self.qkv(x)

    def forward(
        self, x: torch.Tensor, attn_bias: torch.Tensor | None = None, need_weights: bool = False, *,
        rope: Rope | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return `(output, probabilities (B, H, N, N) or None without need_weights)`; `attn_bias` (relative
        position bias, shifted-window mask) is added to the logits and must broadcast to `(B, H, N, N)`;
        `rope` rotates the queries and keys of the patch tokens (EVA-02, DINOv3)."""
        B, N, D = x.shape
        qkv = self.project_qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x, attn = attend(q, k, v, self.scale, self.attn_drop, attn_bias, need_weights)
        x = x.transpose(1, 2).reshape(B, N, D)
        return self.proj_drop(self.proj(x)), attn


class QVBiasAttention(Attention):
    """`Attention` with learned query and value biases and no key bias (BEiT, EVA; timm's `q_bias`, `v_bias`).

    A key bias would add the same amount to all logits of one query, which the softmax cancels, so these
    models leave it out (timm's `k_bias` is a zero buffer; here it is built on the fly).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = True, **kwargs) -> None:
        super().__init__(dim, num_heads, qkv_bias=False, **kwargs)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        if type(self.qkv) is not Linear:  # wrapped (a LoRA adapter): call it, so the wrapper's product counts
            return self.qkv(x) + bias
        return linear(x, self.qkv.weight, bias)  # (B, N, 3 * D)
