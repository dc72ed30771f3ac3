"""Where each family's attention probabilities sit on the image: rollout needs square token-to-token
matrices on one map and, for hierarchical models, matrices linking a stage's map to the previous one.

* ViT, DeiT, BEiT, hybrids: global attention over `P` prefix tokens and the patch grid, already square.
* Swin (Liu et al. 2021): each stage's last block, `(B * windows, heads, n, n)` over the rolled, padded
  map; `swin_to_global` puts each window back with the model's `window_partition` on token indices.
* CvT (Wu et al. 2021): keys are squeezed by a strided convolution, `(P + H*W) x (P + H_kv*W_kv)`;
  each key is spread evenly over the tokens under its kernel (`receptive_field_matrix`).
* Between stages (Swin's patch merging, CvT's convolutional embedding) each token comes from a small
  window of the previous map; `receptive_field_matrix` spreads it evenly over that window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def receptive_field_1d(n_out: int, n_in: int, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """`(n_out, n_in)` 0/1 matrix: output position a sees inputs `a*stride - padding ... + kernel - 1`."""
    m = torch.zeros(n_out, n_in)
    for a in range(n_out):
        lo = max(0, a * stride - padding)
        hi = min(n_in, a * stride - padding + kernel)
        if hi <= lo:
            raise ValueError(f"output {a} of a kernel {kernel}, stride {stride}, padding {padding} sees none of "
                             f"{n_in} inputs")
        m[a, lo:hi] = 1.0
    return m


def receptive_field_matrix(out_grid: tuple[int, int], in_grid: tuple[int, int], kernel: int, stride: int,
                           padding: int) -> torch.Tensor:
    """`(H_out * W_out, H_in * W_in)`, row-major maps: each output token spread evenly over the input
    tokens under its (square) kernel; rows sum to 1."""
    rows = receptive_field_1d(out_grid[0], in_grid[0], kernel, stride, padding)
    cols = receptive_field_1d(out_grid[1], in_grid[1], kernel, stride, padding)
    m = torch.kron(rows, cols)  # (Ho*Wo, Hi*Wi): kron of row- and column-windows is the 2-D window
    return m / m.sum(dim=1, keepdim=True)


def with_prefix(m: torch.Tensor, prefix: int) -> torch.Tensor:
    """Block-diagonal `[[I_prefix, 0], [0, m]]`: prefix tokens map to themselves."""
    return torch.block_diag(torch.eye(prefix, dtype=m.dtype, device=m.device), m)


def check_global(attn: torch.Tensor, batch: int, grid: tuple[int, int], prefix: int, what: str) -> torch.Tensor:
    """Global attention must be `(B, heads, P + H*W, P + H*W)`."""
    T = prefix + grid[0] * grid[1]
    if attn.dim() != 4 or attn.shape[0] != batch or attn.shape[-2:] != (T, T):
        raise ValueError(f"{what} returned attention of shape {tuple(attn.shape)}, not global attention over "
                         f"{prefix} prefix tokens and a {grid[0]}x{grid[1]} map, (B={batch}, heads, {T}, {T}); "
                         "vitkit.explain reads global attention (ViT, DeiT, BEiT, hybrids), Swin's windows and "
                         "CvT's squeezed keys")
    return attn


def swin_window_index(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """`(num_windows, wh * ww)`: for each token of each window, its row-major index on the unrolled,
    unpadded map, or -1 for padding. The same roll, pad and `window_partition` as the model's block."""
    from ..models.swin import window_partition

    H, W = grid
    idx = torch.arange(H * W).view(1, H, W, 1)
    if any(shift):
        idx = torch.roll(idx, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    idx = F.pad(idx, (0, 0, 0, -W % window[1], 0, -H % window[0]), value=-1)
    return window_partition(idx, window).flatten(1)


def swin_to_global(attn: torch.Tensor, grid: tuple[int, int], window: tuple[int, int],
                   shift: tuple[int, int]) -> torch.Tensor:
    """Windowed probabilities `(B * num_windows, heads, n, n)` -> `(B, heads, H*W, H*W)` on the map: zero
    between windows (no attention in this block), rows renormalised without the (masked) padding keys."""
    index = swin_window_index(grid, window, shift).to(attn.device)  # (nW, n)
    nW, n = index.shape
    if attn.dim() != 4 or attn.shape[0] % nW or attn.shape[-2:] != (n, n):
        raise ValueError(f"Swin attention of shape {tuple(attn.shape)} does not match {nW} windows of {n} tokens")
    B, heads, N = attn.shape[0] // nW, attn.shape[1], grid[0] * grid[1]
    a = attn.reshape(B, nW, heads, n, n)
    out = attn.new_zeros(B, heads, N, N)
    for w in range(nW):
        keep = (index[w] >= 0).nonzero().squeeze(1)
        tok = index[w, keep]
        out[:, :, tok[:, None], tok[None, :]] = a[:, w][:, :, keep[:, None], keep[None, :]]
    return out / out.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def cvt_to_square(attn: torch.Tensor, grid: tuple[int, int], prefix: int, kernel: int, stride: int,
                  padding: int) -> torch.Tensor:
    """Squeezed-key probabilities `(B, heads, P + H*W, P + Hkv*Wkv)` -> `(B, heads, P + H*W, P + H*W)`."""
    n_kv = attn.shape[-1] - prefix
    kv_grid = tuple((g + 2 * padding - kernel) // stride + 1 for g in grid)
    if attn.dim() != 4 or attn.shape[-2] != prefix + grid[0] * grid[1] or n_kv != kv_grid[0] * kv_grid[1]:
        raise ValueError(f"CvT attention of shape {tuple(attn.shape)} does not match a {grid[0]}x{grid[1]} map "
                         f"with {prefix} prefix tokens and {kv_grid[0]}x{kv_grid[1]} keys")
    spread = with_prefix(receptive_field_matrix(kv_grid, grid, kernel, stride, padding), prefix)
    return attn @ spread.to(attn)
