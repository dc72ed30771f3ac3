"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

A block's output token i is `x_i + sum_j A_ij v_j`: the residual keeps half of what flows through,
so the block is modelled as `0.5 * A + 0.5 * I`, rows renormalised; the product of the blocks'
matrices, first to last, says in row `q` how much of output token `q` comes from each input token.
As in the reference code (jacobgil/vit-explain): fuse heads (mean, max or min), zero the lowest
`discard_ratio` of the fused entries, add the identity, renormalise. Pure tensor algebra:
`vitkit.explain.maps` obtains the probabilities through the model contract.
"""

from __future__ import annotations

from typing import Sequence

import torch

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attn: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """`(B, heads, Nq, Nk)` -> `(B, Nq, Nk)` by the mean, max or min over heads."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {', '.join(HEAD_FUSIONS)}, got {head_fusion!r}")
    if attn.dim() != 4:
        raise ValueError(f"expected attention probabilities (B, heads, Nq, Nk), got shape {tuple(attn.shape)}")
    if head_fusion == "mean":
        return attn.mean(dim=1)
    return attn.amax(dim=1) if head_fusion == "max" else attn.amin(dim=1)


def discard_lowest(attn: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest `ratio` of the entries of each image's matrix `(B, N, M)` (and any tied with them)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {ratio}")
    k = int(attn[0].numel() * ratio)
    if k == 0:
        return attn
    flat = attn.flatten(1)
    threshold = flat.kthvalue(k, dim=1, keepdim=True).values  # (B, 1): the k-th smallest entry
    return (flat * (flat > threshold)).view_as(attn)


def rollout_matrices(attentions: Sequence[torch.Tensor], *, head_fusion: str = "mean",
                     discard_ratio: float = 0.0) -> torch.Tensor:
    """Roll attention out over blocks, first to last: one per block, `(B, heads, N, N)` or `(B, N, N)`
    fused, -> `(B, N, N)` `R = Ã_L ... Ã_1` with `Ã = rownorm(fused(A) + I)`; with mean fusion and no
    discarding `Ã = 0.5 * A + 0.5 * I` exactly (rows of A sum to 1).
    """
    if not attentions:
        raise ValueError("attention rollout needs the attention of at least one block")
    result = None
    for attn in attentions:
        a = fuse_heads(attn.float(), head_fusion) if attn.dim() == 4 else attn.float()
        if a.shape[-1] != a.shape[-2]:
            raise ValueError(f"rollout composes square token-to-token matrices, got {tuple(a.shape[-2:])}")
        a = discard_lowest(a, discard_ratio)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def hierarchical_rollout(query: torch.Tensor, stages: Sequence[tuple[torch.Tensor, int]],
                         downsamples: Sequence[torch.Tensor]) -> torch.Tensor:
    """Trace a pooled output back through stages that change resolution (Swin, CvT).

    query: `(B, T_last)` weights of the tokens the head reads in the last stage. stages: per stage,
    first to last, `(R, P)`: its rollout `(B, T, T)` over `P` prefix then `N` map tokens. downsamples:
    `D_s` `(N_s, N_{s-1})` for s >= 1, spreading each token of stage s over the tokens of stage s-1
    it was made from. Returns `(B, N_0)`, the relevance of the first stage's map tokens. Prefix
    tokens (CvT's class token) have no place on the image: their share is dropped when leaving a
    stage, as plain rollout drops the class-token column.
    """
    if len(downsamples) != len(stages) - 1:
        raise ValueError(f"{len(stages)} stages need {len(stages) - 1} downsampling matrices, got {len(downsamples)}")
    v = query.float()
    for s in range(len(stages) - 1, -1, -1):
        R, P = stages[s]
        if v.shape[1] == R.shape[-1] - P:  # a stage's own prefix tokens do not leave it: no relevance
            v = torch.cat([v.new_zeros(v.shape[0], P), v], dim=1)
        v = (v.unsqueeze(1) @ R).squeeze(1)[:, P:]  # (B, N_s): relevance of the stage's input map
        if s > 0:
            v = v @ downsamples[s - 1]  # (B, N_{s-1})
    return v
