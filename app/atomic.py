"""The one atomic write: temporary file in the same folder, fsync, rename. Core: imports nothing of edgegen."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


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
