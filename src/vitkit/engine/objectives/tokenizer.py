"""Visual tokenizers for BEiT: what turns each image patch into the discrete token BEiT predicts.

BEiT (Bao et al. 2022) takes its targets from DALL-E's discrete VAE (trained on 250M images), BEiT v2 from a
codebook distilled from CLIP; neither ships with vitkit or fits a user's small data. So by default:
- `KMeansTokenizer`: k-means over the training images' patches (normalised pixels, `C * p * p` values per
  patch); a patch's token is its nearest centroid. Built in seconds, saved as RUN/tokenizer.safetensors
  (reusable with `--tokenizer`); its tokens decode back to pixels (the centroids), as the BEiT pictures show.
- `ModuleTokenizer`: an external one, a TorchScript file or a `torch.export` program (`.pt2`) mapping images
  `(B, C, H, W)` in [0, 1] to ids `(B, h, w)` or `(B, N)`; docs/pretraining.md wraps DALL-E's encoder this way.

Every tokenizer maps pixels in [0, 1] to `(B, N)` int64 ids in `[0, vocab_size)`, patches row-major."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ...run import save_weights

KMEANS_FORMAT = "vitkit-kmeans-tokenizer"


class KMeansTokenizer(nn.Module):
    """Nearest-centroid quantiser of normalised pixel patches: `codebook` `(K, C * ph * pw)`."""

    def __init__(self, codebook: torch.Tensor, patch: tuple[int, int], mean: tuple[float, ...],
                 std: tuple[float, ...]) -> None:
        super().__init__()
        self.patch = tuple(int(p) for p in patch)
        self.register_buffer("codebook", codebook.float().clone())
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.vocab_size = codebook.shape[0]
        C, (ph, pw) = len(mean), self.patch
        if codebook.shape[1] != C * ph * pw:
            raise ValueError(f"a codebook of {codebook.shape[1]}-value vectors does not fit {C}-channel {ph}x{pw} patches")

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = patch_vectors((pixels.float() - self.mean) / self.std, self.patch)  # (B, N, d)
        return nearest(x.reshape(-1, x.shape[-1]), self.codebook).view(x.shape[0], x.shape[1])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Pixels `(B, C, H, W)` in [0, 1] with every patch replaced by its token's centroid."""
        B, (gh, gw), C, (ph, pw) = tokens.shape[0], grid, self.mean.shape[1], self.patch
        c = self.codebook[tokens].view(B, gh, gw, C, ph, pw)
        x = c.permute(0, 3, 1, 4, 2, 5).reshape(B, C, gh * ph, gw * pw)
        return (x * self.std + self.mean).clamp(0, 1)

    def save(self, path: str | Path) -> None:
        save_weights(path, {"codebook": self.codebook, "mean": self.mean.flatten(), "std": self.std.flatten()},
                     {"format": KMEANS_FORMAT, "patch": f"{self.patch[0]},{self.patch[1]}"})


def patch_vectors(x: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Each patch of `x` `(B, C, H, W)` flattened channel-first: `(B, N, C * ph * pw)`, row-major patches."""
    return F.unfold(x, kernel_size=patch, stride=patch).transpose(1, 2)


class ModuleTokenizer(nn.Module):
    """An external tokenizer: a module mapping pixels in [0, 1] to ids `(B, h, w)` or `(B, N)`."""

    def __init__(self, module: nn.Module, vocab_size: int, source: str) -> None:
        super().__init__()
        self.module, self.vocab_size, self.source = module, int(vocab_size), source
        self.training = False

    def train(self, mode: bool = True) -> "ModuleTokenizer":
        """A no-op: the tokenizer stays in inference mode, as saved (an exported program cannot switch modes)."""
        return self

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        ids = self.module(pixels)
        if ids.is_floating_point() or ids.ndim not in (2, 3):
            raise ValueError(f"tokenizer {self.source} must return integer ids (B, h, w) or (B, N), "
                             f"got {tuple(ids.shape)} {ids.dtype}")
        return ids.reshape(ids.shape[0], -1).long()


def nearest(x: torch.Tensor, centers: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the nearest center (squared Euclidean) for each row of `x`, in chunks to bound memory."""
    c2 = centers.pow(2).sum(1)
    out = [(c2 - 2 * part @ centers.t()).argmin(1) for part in x.split(chunk)]  # |x|^2 is the same for every center
    return torch.cat(out)


def kmeans(x: torch.Tensor, k: int, *, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means, k-means++ seeding (Arthur & Vassilvitskii 2007); a center that loses its points stays put."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"{n} patches are too few for a codebook of {k} tokens; lower --vocab-size")
    g = torch.Generator().manual_seed(seed)
    x = x.float()
    centers = x.new_empty(k, x.shape[1])
    centers[0] = x[torch.randint(n, (1,), generator=g)]
    d2 = (x - centers[0]).pow(2).sum(1)
    for i in range(1, k):  # each new center drawn with probability proportional to the squared distance
        total = d2.sum()
        idx = torch.multinomial(d2 / total, 1, generator=g) if total > 0 else torch.randint(n, (1,), generator=g)
        centers[i] = x[idx]
        d2 = torch.minimum(d2, (x - centers[i]).pow(2).sum(1))
    for _ in range(iters):
        assign = nearest(x, centers)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
    return centers


def build_kmeans_tokenizer(pixels: torch.Tensor, patch: tuple[int, int], mean: tuple[float, ...],
                           std: tuple[float, ...], *, vocab_size: int = 512, max_patches: int = 100_000,
                           iters: int = 20, seed: int = 0) -> KMeansTokenizer:
    """A k-means codebook over (a seeded sample of `max_patches` of) the patches of `pixels` in [0, 1]."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    x = patch_vectors((pixels.float() - m) / s, patch)
    x = x.reshape(-1, x.shape[-1])
    g = torch.Generator().manual_seed(seed)
    if x.shape[0] > max_patches:
        x = x[torch.randperm(x.shape[0], generator=g)[:max_patches]]
    return KMeansTokenizer(kmeans(x, vocab_size, iters=iters, seed=seed), patch, mean, std)


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> KMeansTokenizer | ModuleTokenizer:
    """A saved tokenizer: vitkit's k-means `.safetensors`, a TorchScript file or a `torch.export` `.pt2` (its size:
    its `vocab_size` attribute, else `vocab_size`). Those run the graph they hold: load only files you trust."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != KMEANS_FORMAT:
            raise ValueError(f"{path} is not a vitkit k-means tokenizer (metadata format {meta.get('format')!r})")
        t = load_file(str(path))
        patch = tuple(int(v) for v in meta["patch"].split(","))
        return KMeansTokenizer(t["codebook"], patch, tuple(t["mean"].tolist()), tuple(t["std"].tolist()))
    try:
        if path.suffix == ".pt2":  # export it from a module in eval mode: the program keeps the mode it was traced in
            module = torch.export.load(str(path)).module()
        elif zipfile.is_zipfile(path) and any(n.split("/")[1:2] == ["code"] for n in zipfile.ZipFile(path).namelist()):
            module = torch.jit.load(str(path), map_location="cpu").eval()
        else:
            raise ValueError("expected a vitkit .safetensors codebook, a TorchScript file or a torch.export .pt2")
    except ValueError as e:
        raise ValueError(f"cannot read tokenizer {path}: {e}") from e
    except Exception as e:  # a damaged archive, an unsupported op
        raise ValueError(f"cannot read tokenizer {path}: {type(e).__name__}: {e}") from e
    size = getattr(module, "vocab_size", None) or vocab_size
    if not size:
        raise ValueError(f"tokenizer {path} has no vocab_size attribute; pass --vocab-size")
    return ModuleTokenizer(module, int(size), str(path))
