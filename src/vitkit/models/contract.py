"""The model contract every family implements; engine, explain, export and convert use only this."""

from __future__ import annotations

import functools
import re
from typing import Iterator, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# What `VisionModel.iter_blocks` yields: per entry its output, its grid and its attention (or None).
BlockOutputs = Iterator[tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]]


class Intermediates(NamedTuple):
    """What `forward_intermediates` returns.

    features: the `forward_features` output, ready for `forward_head`.
    intermediates: one tensor per requested block (or stage); `(B, C, H, W)` for `output_fmt="NCHW"`
        (prefix tokens dropped) or `(B, N, C)` with all tokens for `"NLC"`.
    attentions: their attention probabilities `(B, heads, N, N)`, from the explicit (non-fused) path;
        empty unless `return_attn=True`.
    """

    features: torch.Tensor
    intermediates: list[torch.Tensor]
    attentions: list[torch.Tensor]


class AttentionStage(NamedTuple):
    """Where the attention probabilities of one `forward_intermediates` entry sit on the image.

    The tokens are `prefix` tokens (class, distillation, register tokens: left out of maps), then a
    row-major grid; by default every query attends to every token. `window`/`shift`: attention inside
    (shifted) windows of that size, in the window layout (Swin). `kv_conv`: keys and values are the
    grid squeezed by a convolution `(kernel, stride, padding)` (CvT). `embed_conv`: this entry starts a
    new map, made from the previous one by a convolution or patch merging `(kernel, stride, padding)`.
    """

    prefix: int
    window: tuple[int, int] | None = None
    shift: tuple[int, int] | None = None
    kv_conv: tuple[int, int, int] | None = None
    embed_conv: tuple[int, int, int] | None = None


class VisionModel(nn.Module):
    """Base class of all vitkit classifiers.

    `forward(x) == forward_head(forward_features(x))`. Subclasses set `num_classes`,
    `num_features`, `num_prefix_tokens` and implement the methods below.
    """

    num_classes: int
    num_features: int
    num_prefix_tokens: int = 0
    head_prefixes: tuple[str, ...] = ("head.", "head_dist.")
    """State-dict prefixes of the classifier(s): re-initialised when fine-tuning to new classes."""
    first_conv: str = "patch_embed.proj"
    """The convolution that takes the image (timm's pretrained_cfg name): loading weights trained on
    another number of input channels adapts its weight (`weights.adapt_input_conv`)."""
    staged: bool = False
    """`forward_intermediates` indexes stages, not blocks (Swin, CvT)."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        *,
        norm: bool = False,
        output_fmt: str = "NCHW",
        return_attn: bool = False,
    ) -> Intermediates:
        """The outputs of the blocks (stages if `staged`) in `indices` (see `resolve_indices`); `norm`
        applies the final norm, to the last stage only if `staged` (it is sized for that one)."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = set(resolve_indices(indices, self.num_blocks))
        feats, attns = [], []
        for i, (out, grid, attn) in enumerate(self.iter_blocks(x, take if return_attn else set())):
            if i in take:
                y = self.norm(out) if norm and (not self.staged or i == self.num_blocks - 1) else out
                if y.ndim == 4:  # a map (B, H, W, C)
                    y = y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y.flatten(1, 2)
                elif output_fmt == "NCHW":  # tokens (B, prefix + H*W, C)
                    y = tokens_to_nchw(y, y.shape[1] - grid[0] * grid[1], grid)
                feats.append(y)
                if return_attn:
                    attns.append(attn)
        return Intermediates(self.norm(out), feats, attns)

    def iter_blocks(self, x: torch.Tensor, need_weights: set[int]) -> BlockOutputs:
        """Run images `x` through the encoder, yielding for each `forward_intermediates` entry its output
        (tokens `(B, prefix + H*W, C)` or a map `(B, H, W, C)`), its grid `(H, W)` and, for the entries
        in `need_weights`, its attention probabilities (else None)."""
        raise NotImplementedError

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Logits of each classifier head (DeiT: class and distillation head), in eval mode; `forward`
        returns their mean."""
        return (self(x),)

    def attention_stages(self, grids: list[tuple[int, int]]) -> list[AttentionStage]:
        """How to place each attention map `forward_intermediates(return_attn=True)` returns, given
        the grids of its intermediates: global attention over the prefix tokens and one map."""
        return [AttentionStage(self.num_prefix_tokens) for _ in grids]

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder tokens `(B, prefix + K, D)` of the K patches `ids_keep` `(B, K)` only (MAE's
        encoder). Families that can drop tokens implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode a subset of its patches")

    def forward_masked(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Patch tokens `(B, N, D)` with the masked patches replaced by a learned [MASK] embedding
        (BEiT's masked image modeling). Families with a mask token implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no [MASK] embedding")

    def reset_classifier(self, num_classes: int) -> None:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that must not be weight-decayed besides norms and biases."""
        return set()

    @property
    def num_blocks(self) -> int:
        """How many entries `forward_intermediates` indexes: the transformer blocks, or the stages."""
        return len(self.blocks)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each transformer block's activations during backward instead of storing them
        (activation checkpointing: memory for ~30% more compute). timm's name for the switch."""
        for name in transformer_block_names(self):
            block = self.get_submodule(name)
            if enable:
                # An instance attribute shadows the class's forward; removing it restores the original.
                block.forward = functools.partial(_checkpointed_forward, block)
            else:
                block.__dict__.pop("forward", None)


def implements(model: nn.Module, method: str) -> bool:
    """True when `model`'s family provides contract method `method` (rather than the base's refusal)."""
    return isinstance(model, VisionModel) and getattr(type(model), method) is not getattr(VisionModel, method)


_BLOCK_NAME = re.compile(r"(?:^|.*\.)blocks\.\d+")


def transformer_block_names(model: nn.Module) -> list[str]:
    """Module names of the transformer blocks, in forward order.

    Every family follows timm's naming (`blocks.N`, inside Swin's `layers.S` and CvT's `stages.S`);
    a hybrid's CNN stem lives under `patch_embed` and is not a transformer block.
    """
    return [n for n, _ in model.named_modules() if _BLOCK_NAME.fullmatch(n) and not n.startswith("patch_embed.")]


def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    forward = type(block).forward
    if block.training and torch.is_grad_enabled():
        return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
    return forward(block, *args, **kwargs)


def tokens_to_nchw(x: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """Tokens `(B, prefix + H*W, D)` -> patch feature map `(B, D, H, W)`, prefix tokens dropped."""
    return x[:, num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, *grid)


def resolve_indices(indices: int | list[int] | None, num_blocks: int) -> list[int]:
    """`None` -> every block; an int `n` -> the last `n` blocks; a list -> those (negatives allowed)."""
    if indices is None:
        return list(range(num_blocks))
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"asked for the last {indices} blocks of a model with {num_blocks}")
        return list(range(num_blocks - indices, num_blocks))
    out = []
    for i in indices:
        j = i + num_blocks if i < 0 else i
        if not 0 <= j < num_blocks:
            raise ValueError(f"block index {i} is out of range for a model with {num_blocks} blocks")
        out.append(j)
    return sorted(set(out))
