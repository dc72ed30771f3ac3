"""The image files under a folder, listed once and cached, so a run over a million files starts at once.

A listing is every image file's path relative to the root. It is cached as JSON under
`$VITKIT_CACHE/listings/` (default `~/.cache/vitkit/listings/`) together with the modification time of
every directory it walked. A directory's mtime changes whenever an entry is added to it, removed or
renamed, so the cache is valid exactly while every recorded directory still has its mtime: checking
that costs one `stat` per directory (a thousand for ImageNet), not one per file. Files rewritten in
place keep the listing valid (their names did not change); their pixels are read at training time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..preprocess import IMG_EXTENSIONS

_VERSION = 1
_EXTENSIONS = frozenset(IMG_EXTENSIONS)


def listing_cache_dir() -> Path:
    return Path(os.environ.get("VITKIT_CACHE", Path.home() / ".cache" / "vitkit")) / "listings"


def _walk(root: Path) -> tuple[dict[str, int], list[str]]:
    """`({relative dir: mtime_ns}, [relative image paths])`, hidden entries left out, symlinked files kept."""
    dirs: dict[str, int] = {}
    files: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        path = os.path.join(root, rel) if rel else str(root)
        dirs[rel] = os.stat(path).st_mtime_ns
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                sub = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir():
                    stack.append(sub)
                elif os.path.splitext(e.name)[1].lower() in _EXTENSIONS and e.is_file():
                    files.append(sub)
    files.sort(key=lambda r: r.split("/"))  # the order `sorted(Path.rglob())` gives: by path component
    return dirs, files


def _cache_file(root: Path) -> Path:
    return listing_cache_dir() / f"{hashlib.sha256(str(root).encode()).hexdigest()[:24]}.json"


def _unchanged(root: Path, dirs: dict[str, int]) -> bool:
    try:
        return all(os.stat(os.path.join(root, d) if d else root).st_mtime_ns == m for d, m in dirs.items())
    except OSError:  # a directory was removed
        return False


def list_images(root: str | Path, *, cache: bool = True) -> tuple[list[str], bool]:
    """Image files under `root` (relative, `/`-separated, sorted) and whether they came from the cache.
    A missing or unwritable cache only costs the walk; a stale one is replaced."""
    root = Path(root).expanduser().resolve()
    path = _cache_file(root)
    if cache:
        try:
            cached = json.loads(path.read_text())
            if cached.get("version") == _VERSION and cached["root"] == str(root) and _unchanged(root, cached["dirs"]):
                return cached["files"], True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    dirs, files = _walk(root)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".listing-")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _VERSION, "root": str(root), "dirs": dirs, "files": files}, f)
            os.replace(tmp, path)  # atomic: two runs starting together never read half a listing
        except OSError:
            pass
    return files, False
