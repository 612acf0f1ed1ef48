"""Per-user cache of bundle files already hashed: an unchanged bundle loads without re-reading its bytes.

A file counts as verified when its identity (st_dev, st_ino, size, mtime_ns, ctime_ns) and its manifest
sha256 are exactly what they were when its bytes last hashed correctly, under a manifest with the same
sha256. Any difference means a full re-hash. ctime is the kernel's own change time: every write, rename or
utime() moves it to "now", and no system call sets it back, so restoring mtime after an edit is still caught.
Threat model and limits: docs/TRUST.md ("Verified-file cache").
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

CACHE_NAME = "verified-files.json"
FORMAT = 1
MAX_BUNDLES = 64  # oldest entries are dropped beyond this
ENV_FULL = "EDGEGEN_FULL_VERIFY"  # 1: hash every byte on every load (site policy "full_verification": true too)

# A file changed within this window of the check is not remembered (re-hashed next time): on file systems with
# coarse timestamps an edit in the same tick as the check could otherwise keep the recorded identity (git's
# "racy clean" problem).
RACY_NS = 2_000_000_000

Identity = tuple[int, int, int, int, int]


def cache_path() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgegen")) / CACHE_NAME


def enabled() -> bool:
    """Off when asked (environment or site policy), and on Windows, whose st_ctime is the creation time, not a
    change time, so an in-place edit with mtime restored would go unseen there."""
    if os.environ.get(ENV_FULL, "").strip().lower() in ("1", "true", "on", "yes"):
        return False
    if sys.platform == "win32":
        return False
    from app.bundle.trust import POLICY_NAME, _read_policy_file, site_config_dir

    return _read_policy_file(site_config_dir() / POLICY_NAME).get("full_verification") is not True


def identity(path: Path) -> Identity:
    st = os.lstat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read() -> dict:
    """The whole cache, or an empty one when it is missing, unreadable, damaged or from another format."""
    try:
        data = json.loads(cache_path().read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("bundles"), dict):
        return {}
    return data["bundles"]


def known(root: Path, manifest_sha256: str) -> dict[str, tuple[Identity, str]]:
    """{relative path: (identity, sha256)} recorded for this bundle folder under this exact manifest."""
    entry = _read().get(str(root))
    if not isinstance(entry, dict) or entry.get("manifest_sha256") != manifest_sha256:
        return {}
    out = {}
    for rel, rec in (entry.get("files") or {}).items():
        if isinstance(rec, list) and len(rec) == 6 and all(isinstance(x, int) for x in rec[:5]) \
                and isinstance(rec[5], str):
            out[rel] = (tuple(rec[:5]), rec[5])
    return out


def record(root: Path, manifest_sha256: str, files: dict[str, tuple[Identity, str]]) -> None:
    """Remember a fully verified bundle. Written atomically; failing to write only costs the next load time."""
    from app.bundle.files import atomic_write_bytes

    now = time.time_ns()
    settled = {rel: [*ident, sha] for rel, (ident, sha) in files.items()
               if max(ident[3], ident[4]) <= now - RACY_NS}
    bundles = _read()
    bundles.pop(str(root), None)
    bundles[str(root)] = {"manifest_sha256": manifest_sha256, "verified_at": now // 10**9, "files": settled}
    while len(bundles) > MAX_BUNDLES:
        bundles.pop(next(iter(bundles)))
    try:
        atomic_write_bytes(cache_path(), json.dumps({"format": FORMAT, "bundles": bundles}).encode())
    except OSError:
        pass


def forget(root: Path) -> None:
    bundles = _read()
    if bundles.pop(str(root), None) is not None:
        from app.bundle.files import atomic_write_bytes

        try:
            atomic_write_bytes(cache_path(), json.dumps({"format": FORMAT, "bundles": bundles}).encode())
        except OSError:
            pass
