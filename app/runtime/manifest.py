"""The engine bundle's manifest: schema, loading, and verification before any native code touches a file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from app.errors import BundleError
from app.runtime.families import FAMILIES, FamilySpec
from app.runtime.files import inside, sha256_file

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. `manifest` is the parsed manifest.json."""

    root: Path
    manifest: dict
    manifest_sha256: str

    @property
    def family(self) -> FamilySpec:
        return FAMILIES[self.manifest["family"]]

    @property
    def defaults(self) -> dict:
        return self.manifest["defaults"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def components(self) -> dict[str, dict]:
        return self.manifest["components"]

    def path(self, rel: str) -> Path:
        return inside(self.root, rel)

    def onnx_path(self, component: str) -> Path:
        return self.path(self.components()[component]["onnx"])

    def rebuild_hint(self) -> str:
        src = self.manifest.get("source", {}).get("path", "MODEL_DIR")
        return (f"edgegen export --model {src} --out {self.root} --family {self.manifest['family']} "
                f"--precision {self.precision} --overwrite")


def read_manifest(root: Path) -> tuple[dict, str]:
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist; export one with: edgegen export --model DIR --out {root}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}, so it is not a complete edgegen bundle "
                          "(an interrupted export leaves none); re-run edgegen export")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e.msg}); the bundle is damaged, re-export it") from None
    import hashlib

    return manifest, hashlib.sha256(raw).hexdigest()


def load_bundle(root: Path, verify: bool = True) -> Bundle:
    """Read and check the manifest, then (verify=True) the sha256 of every file, streaming each once."""
    root = Path(root)
    manifest, digest = read_manifest(root)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        src = manifest.get("source", {}).get("path", "MODEL_DIR")
        raise BundleError(
            f"bundle schema version {version!r} is not supported (this edgegen reads version {SCHEMA_VERSION}); "
            f"re-export it with: edgegen export --model {src} --out {root} --overwrite"
        )
    if manifest.get("family") not in FAMILIES:
        raise BundleError(f"bundle family {manifest.get('family')!r} is unknown to this edgegen; "
                          f"supported: {', '.join(FAMILIES)}")
    bundle = Bundle(root.resolve(), manifest, digest)
    if verify:
        verify_files(bundle)
    return bundle


def verify_files(bundle: Bundle) -> None:
    listed: dict[str, str] = bundle.manifest.get("files", {})
    for rel, want in listed.items():
        path = bundle.path(rel)
        if not path.is_file():
            raise BundleError(f"bundle file {rel} is missing; re-export with: {bundle.rebuild_hint()}")
        if sha256_file(path) != want:
            raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest (changed or "
                              f"corrupted); re-export with: {bundle.rebuild_hint()}")
    for path in bundle.root.rglob("*"):
        rel = path.relative_to(bundle.root).as_posix()
        if path.is_symlink() or (path.is_file() and rel not in listed and rel not in UNLISTED_OK):
            raise BundleError(f"bundle holds {rel}, which its manifest does not list; remove it or re-export "
                              "the bundle")


# Files that legitimately sit beside the listed ones: the manifest itself and its detached signature.
UNLISTED_OK = frozenset({MANIFEST_NAME, "manifest.sig"})
