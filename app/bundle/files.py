"""File primitives every writer and loader shares: streaming sha256, atomic writes, bundle-relative paths."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from app.atomic import atomic_write_bytes  # noqa: F401  (re-exported: every writer imports it from here)
from app.errors import BundleError

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Stream the file once; never holds more than one chunk."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def inside(root: Path, rel: str) -> Path:
    """Resolve a bundle-relative path, refusing absolute paths, '..' and symlinks that leave the bundle."""
    if not rel or os.path.isabs(rel) or ".." in Path(rel).parts or "\\" in rel:
        raise BundleError(f"bundle path '{rel}' is not a plain relative path inside the bundle; "
                          "the bundle is damaged or crafted, re-export it")
    root = Path(root).resolve()
    full = (root / rel).resolve()
    if full != root and root not in full.parents:
        raise BundleError(f"bundle path '{rel}' resolves outside the bundle (symlink?); re-export the bundle")
    return full
