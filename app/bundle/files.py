"""File primitives every writer and loader shares: streaming sha256, atomic writes, bundle-relative paths."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from app.errors import BundleError

_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Stream the file once; never holds more than one chunk."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data) -> tuple[str, int]:
    """Write bytes-like `data` to a temporary file in the same directory, fsync, then rename over the target.

    Returns (sha256, size) of what was written, so callers record the checksum of the very bytes on disk."""
    path = Path(path)
    view = memoryview(data).cast("B")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(view).hexdigest(), view.nbytes


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
