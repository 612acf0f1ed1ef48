"""Writes a bundle into a hidden temporary folder and renames it into place only when it is complete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from app.bundle.files import sha256_file
from app.bundle.manifest import MANIFEST_NAME, SCHEMA_VERSION
from app.errors import UsageError


class BundleWriter:
    """with BundleWriter(out) as w: write files under w.tmp; w.commit(manifest) hashes, writes, renames.

    Until commit, nothing exists at `out`; the partial folder has no manifest.json, so it never loads."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite and (not self.out.is_dir() or any(self.out.iterdir())):
            raise UsageError(f"{self.out} already exists; choose another --out or pass --overwrite")
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"

    def __enter__(self) -> "BundleWriter":
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, manifest: dict) -> Path:
        files = {}
        for path in sorted(self.tmp.rglob("*")):
            if path.is_file():
                files[path.relative_to(self.tmp).as_posix()] = sha256_file(path)
        manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
        with open(self.tmp / MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.flush()
            os.fsync(f.fileno())
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        if self.out.exists():
            os.rename(self.out, old)  # keep the previous bundle until the new one is in place
        os.rename(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)
        return self.out
