"""Which bundles this server serves, by name (a ComfyUI client's ckpt_name), and their manifests for checks."""

from __future__ import annotations

import threading
from pathlib import Path

from app.bundle.locations import MANIFEST_NAME, engine_dirs, find_bundles


class BundleIndex:
    """Bundles named by folder name: explicit --bundle folders first, then folders holding bundles.

    A client's `ckpt_name` may carry a file suffix ("demo.safetensors"); it is matched by stem too. Only
    names are matched, never paths, so a request cannot point the server at an arbitrary folder."""

    def __init__(self, paths: tuple[Path, ...] = (), search_default: bool = True):
        self.paths = tuple(Path(p) for p in paths)
        self.search_default = search_default
        self._lock = threading.Lock()
        self._manifests: dict[Path, tuple[float, dict]] = {}

    def all(self) -> dict[str, Path]:
        found: dict[str, Path] = {}
        holders = []
        for p in self.paths:
            if (p / MANIFEST_NAME).is_file():
                found.setdefault(p.name, p.resolve())
            elif p.is_dir():
                holders.append(p)
        dirs = holders + (engine_dirs() if self.search_default else [])
        for b in find_bundles(dirs):
            found.setdefault(b.name, b.resolve())
        return found

    def names(self) -> list[str]:
        return sorted(self.all())

    def find(self, name: str) -> Path | None:
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            return None
        found = self.all()
        if name in found:
            return found[name]
        stem = Path(name).stem
        return found.get(stem)

    def manifest(self, bundle_dir: Path) -> dict:
        """manifest.json parsed without verification (the worker verifies before running), cached by mtime."""
        from app.bundle.manifest import read_manifest

        path = Path(bundle_dir) / MANIFEST_NAME
        mtime = path.stat().st_mtime
        with self._lock:
            hit = self._manifests.get(path)
            if hit and hit[0] == mtime:
                return hit[1]
        manifest, _ = read_manifest(Path(bundle_dir))
        with self._lock:
            self._manifests[path] = (mtime, manifest)
        return manifest
