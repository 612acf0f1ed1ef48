"""Where the shipped assets and the engine bundles are: a source checkout, an offline install, or the cwd.

An offline install (installer/install.sh) puts assets and bundles under PREFIX/share/edgegen and its
launcher points EDGEGEN_ASSETS / EDGEGEN_ENGINES there; a checkout uses <repo>/assets and <repo>/engines.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_ASSETS = "EDGEGEN_ASSETS"
ENV_ENGINES = "EDGEGEN_ENGINES"  # one folder or several, separated by os.pathsep
REPO_ROOT = Path(__file__).resolve().parents[2]
from app.bundle.manifest import MANIFEST_NAME


def assets_dir() -> Path:
    """$EDGEGEN_ASSETS, else <repo>/assets when running from a checkout, else ./assets."""
    if os.environ.get(ENV_ASSETS):
        return Path(os.environ[ENV_ASSETS])
    repo = REPO_ROOT / "assets"
    return repo if repo.is_dir() else Path.cwd() / "assets"


def engine_dirs() -> list[Path]:
    """Folders that hold bundles, existing ones only, each once: $EDGEGEN_ENGINES, <repo>/engines, ./engines."""
    candidates = [Path(p) for p in os.environ.get(ENV_ENGINES, "").split(os.pathsep) if p]
    candidates += [REPO_ROOT / "engines", Path.cwd() / "engines"]
    out: list[Path] = []
    for c in candidates:
        if c.is_dir() and all(c.resolve() != o.resolve() for o in out):
            out.append(c)
    return out


def find_bundles(dirs: list[Path] | None = None) -> list[Path]:
    """Every direct subfolder of the engine folders that holds a manifest.json (hidden partial exports skipped)."""
    found: list[Path] = []
    for d in engine_dirs() if dirs is None else dirs:
        for sub in sorted(p for p in Path(d).iterdir() if p.is_dir() and not p.name.startswith(".")):
            if (sub / MANIFEST_NAME).is_file():
                found.append(sub)
    return found
