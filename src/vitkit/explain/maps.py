"""Heat maps of what a classifier looks at: `attention_map`, `rollout` and `gradcam`.

Maps come through the model contract: `forward_intermediates(..., return_attn=True)` returns the
probabilities of the explicit attention path, so no forward hook that a fused kernel would skip is
needed. A model whose probabilities are missing or cannot be placed on the image raises `ValueError`;
a map is never silently empty. Functions take normalised images `(B, C, H, W)` and return maps
`(B, H, W)` (or `(B, heads, H, W)`) scaled to [0, 1] per image, at the input's resolution.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import geometry
from .rollout import discard_lowest, fuse_heads, hierarchical_rollout, rollout_matrices

METHODS = ("rollout", "attention", "gradcam")


@dataclass
class Stage:
    """A stretch of the network on one token map: `prefix` tokens, then a `grid` map in row-major order."""

    grid: tuple[int, int]
    prefix: int
    attentions: list[torch.Tensor]  # in the family's layout, as the contract returns them
    to_square: Callable[[torch.Tensor], torch.Tensor]  # (B', heads, ., .) -> (B, heads, T, T)

    @property
    def tokens(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]


@dataclass
class Capture:
    """What the contract gave for a batch: stages first to last, and the links between them."""

    stages: list[Stage]
    downsamples: list[torch.Tensor] = field(default_factory=list)  # (N_s, N_{s-1}) for s >= 1
    features: torch.Tensor | None = None


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _check_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a batch (B, C, H, W) of normalised images, got {shape}")
    p = next(model.parameters(), None)
    return images.to(p.device if p is not None else images.device, torch.float32)


def _name(model: nn.Module) -> str:
    return type(model).__name__


def capture(model: nn.Module, images: torch.Tensor) -> Capture:
    """Run the model once with attention probabilities on, and place them on token maps."""
    out = model.forward_intermediates(images, None, output_fmt="NCHW", return_attn=True)
    attns, maps = list(out.attentions), list(out.intermediates)
    if not attns or len(attns) != len(maps) or any(a is None for a in attns):
        raise ValueError(f"{_name(model)}.forward_intermediates(return_attn=True) returned no attention "
                         f"probabilities ({len(attns)} for {len(maps)} blocks); attention maps need a model whose "
                         "contract returns them")
    grids = [tuple(m.shape[-2:]) for m in maps]
    return _family_capture(model, images.shape[0], grids, attns, out.features)


def _family_capture(model: nn.Module, batch: int, grids: list, attns: list, features: torch.Tensor) -> Capture:
    """Place each attention on its token map as `attention_stages` describes: entries on one map form a
    stage; a new stage starts where an entry says how its map was embedded from the previous one."""
    stages: list[Stage] = []
    downs: list[torch.Tensor] = []  # (N_s, N_{s-1})
    for grid, attn, where in zip(grids, attns, model.attention_stages(grids)):
        if where.window is not None:
            square = lambda a, g=grid, w=where: geometry.swin_to_global(a, g, w.window, w.shift)  # noqa: E731
        elif where.kv_conv is not None:
            square = lambda a, g=grid, w=where: geometry.cvt_to_square(a, g, w.prefix, *w.kv_conv)  # noqa: E731
        else:
            attn = geometry.check_global(attn, batch, grid, where.prefix, _name(model))
            square = _identity
        if stages and where.embed_conv is None:
            if (grid, where.prefix) != (stages[-1].grid, stages[-1].prefix):
                raise ValueError(f"{_name(model)} changes its token map between blocks ({grids}) without saying how")
            stages[-1].attentions.append(attn)
            continue
        if stages:
            downs.append(geometry.receptive_field_matrix(grid, stages[-1].grid, *where.embed_conv))
        stages.append(Stage(grid, where.prefix, [attn], square))
    return Capture(stages, downs, features)


def _identity(a: torch.Tensor) -> torch.Tensor:
    return a


def head_query(model: nn.Module, features: torch.Tensor, stage: Stage) -> torch.Tensor:
    """`(B, T)` weights of the last stage's tokens that the classifier reads (a non-zero gradient of the
    logits), summing to 1: the `query` row of rollout. A class-token model reads its prefix token(s)
    (DeiT both: its inference averages the two heads), a pooling model every map token."""
    f = features.detach().float().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_logits(model, f).sum(), f)
    g = grad.flatten(1, -2) if grad.dim() == 4 else grad  # Swin's NHWC map -> (B, H*W, C)
    if g.shape[1] != stage.tokens:
        raise ValueError(f"{_name(model)} features have {g.shape[1]} tokens, expected {stage.tokens}")
    reads = (g.abs().sum(dim=(0, 2)) > 0).float()  # (T,)
    if not reads.any():  # a head of zeros reads nothing: weigh every map token
        reads[stage.prefix :] = 1.0
    return (reads / reads.sum()).expand(features.shape[0], -1)


def _logits(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The head's logits; a model with two heads (DeiT) predicts their average."""
    logits = model.forward_head(features)
    return sum(logits) / len(logits) if isinstance(logits, tuple) else logits


def to_image(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Token relevance `(B, ..., H_grid * W_grid)` -> maps `(B, ..., H, W)` upsampled and scaled to [0, 1]."""
    lead = maps.shape[:-1]
    m = maps.float().reshape(-1, 1, *grid)
    m = F.interpolate(m, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)
    lo = m.flatten(-2).amin(-1)[..., None, None]
    hi = m.flatten(-2).amax(-1)[..., None, None]
    return torch.where(hi > lo, (m - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(m))


@torch.no_grad()
def rollout(model: nn.Module, images: torch.Tensor, *, head_fusion: str = "mean",
            discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) from the tokens the head reads to the input, `(B, H, W)`.

    ViT, DeiT, BEiT and hybrids: every block. Swin and CvT: each stage's last block (what the
    contract returns), composed through the stages (see `geometry`); a stage's other blocks count
    as the identity of their residual path. head_fusion: mean, max or min over heads;
    discard_ratio: the share of each block's fused entries (each window's, for Swin) zeroed.
    """
    images = _check_images(model, images)
    with _eval_mode(model):
        cap = capture(model, images)
        query = head_query(model, cap.features, cap.stages[-1])
        rolled = []
        for st in cap.stages:
            # Fuse and discard on the attention as computed (per window, over squeezed keys), then place it.
            fused = [discard_lowest(fuse_heads(a.float(), head_fusion), discard_ratio) for a in st.attentions]
            square = [st.to_square(a.unsqueeze(1)).squeeze(1) for a in fused]
            rolled.append((rollout_matrices(square), st.prefix))
        relevance = hierarchical_rollout(query, rolled, cap.downsamples)
    return to_image(relevance, cap.stages[0].grid, tuple(images.shape[-2:]))


@torch.no_grad()
def attention_map(model: nn.Module, images: torch.Tensor, *, per_head: bool = False,
                  head_fusion: str = "mean") -> torch.Tensor:
    """The last block's attention from the tokens the head reads (the class token, or all tokens of
    a pooling model): `(B, H, W)` with heads fused, or `(B, heads, H, W)` with `per_head`. Swin's
    windows are placed on the map, CvT's squeezed keys spread over the tokens under their kernel.
    """
    images = _check_images(model, images)
    with _eval_mode(model):
        cap = capture(model, images)
        st = cap.stages[-1]
        attn = st.to_square(st.attentions[-1].float())  # (B, heads, T, T)
        query = head_query(model, cap.features, st)  # (B, T)
        per = (query[:, None, None, :] @ attn).squeeze(2)[..., st.prefix :]  # (B, heads, N)
        maps = per if per_head else fuse_heads(per.unsqueeze(2), head_fusion).squeeze(1)
    return to_image(maps, st.grid, tuple(images.shape[-2:]))


def gradcam(model: nn.Module, images: torch.Tensor, *, target: int | torch.Tensor | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017) on the last block's tokens, `(B, H, W)`; works for every family.

    Channel weights are the map-averaged gradients of the target logit (default: the predicted
    class); the map is the ReLU of the weighted channel sum. The tokens are the last block's output
    when the head reads map tokens (Swin, BEiT, GAP ViTs; there Grad-CAM is CAM), else the input of
    the last block (stage, for CvT), which its attention mixes into the class token.
    """
    images = _check_images(model, images)
    n = model.num_blocks
    with _eval_mode(model):
        with torch.no_grad():
            grids = [tuple(m.shape[-2:]) for m in model.forward_intermediates(images[:1], None).intermediates]
        with torch.enable_grad():
            out = model.forward_intermediates(images, [n - 2, n - 1] if n > 1 else [n - 1], output_fmt="NLC")
            feats = out.features
            logits = _logits(model, feats)
            score = logits.gather(1, _target(logits, target)[:, None]).sum()
            last = Stage(grids[-1], _prefix(model, n - 1), [], _identity)
            reads_map = head_query(model, feats, last)[0, last.prefix :].sum() > 0
            if reads_map:
                tokens, grid, prefix = feats, last.grid, last.prefix
            elif n > 1:
                tokens, grid, prefix = out.intermediates[0], grids[-2], _prefix(model, n - 2)
            else:
                raise ValueError(f"gradcam: {_name(model)} has one block and its head reads no map token")
            (grad,) = torch.autograd.grad(score, tokens, allow_unused=True)
        if grad is None:
            raise ValueError(f"gradcam: {_name(model)}.forward_intermediates returns tokens outside the autograd graph")
        if tokens.dim() == 4:  # Swin's NHWC map -> (B, H*W, C)
            tokens, grad = tokens.flatten(1, 2), grad.flatten(1, 2)
        A, G = tokens[:, prefix:].detach().float(), grad[:, prefix:].float()  # (B, N, C)
        cam = F.relu((A * G.mean(dim=1, keepdim=True)).sum(-1))  # (B, N)
    return to_image(cam, grid, tuple(images.shape[-2:]))


def _prefix(model: nn.Module, index: int) -> int:
    """Prefix tokens at block (or stage) `index`: CvT's class token joins in its last stage only."""
    stages = getattr(model, "stages", None)
    if stages is not None and hasattr(stages[index], "num_prefix_tokens"):
        return stages[index].num_prefix_tokens
    return int(getattr(model, "num_prefix_tokens", 0))


def _target(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target, device=logits.device).long().expand(logits.shape[0]).clone()
    if (t < 0).any() or (t >= logits.shape[1]).any():
        raise ValueError(f"target class {target} is out of range for {logits.shape[1]} classes")
    return t


def explain(model: nn.Module, images: torch.Tensor, method: str = "rollout", **kwargs) -> torch.Tensor:
    """Dispatch to `rollout`, `attention_map` or `gradcam` by name."""
    fns = {"rollout": rollout, "attention": attention_map, "gradcam": gradcam}
    if method not in fns:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return fns[method](model, images, **kwargs)
