"""The engine bundle's manifest: schema, loading, and verification before any native code touches a file."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from app.bundle.families import FAMILIES, FamilySpec
from app.bundle.files import inside, sha256_file
from app.bundle.trust import SIG_NAME
from app.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. `manifest` is the parsed manifest.json."""

    root: Path
    manifest: dict
    manifest_sha256: str
    # The signature check's result (app.bundle.trust.SignatureState); None when loaded with verify=False.
    signature: object = None

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
        text = self.manifest.get("text_encoder_precision", "fp32")
        text = f" --text-encoder-precision {text}" if text != "fp32" else ""
        return (f"edgegen export --model {src} --out {self.root} --family {self.manifest['family']} "
                f"--precision {self.precision}{text} --overwrite")


def read_manifest_bytes(root: Path) -> bytes:
    """The exact manifest.json bytes: read once, so the signature check and the parser see the same bytes."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist; export one with: edgegen export --model DIR --out {root}")
    path = root / MANIFEST_NAME
    if path.is_symlink():  # the manifest vouches for everything else, so it must be the bundle's own file
        raise BundleError(f"{path} is a symlink; a bundle's manifest must be a regular file, re-export the bundle")
    if not path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}, so it is not a complete edgegen bundle "
                          "(an interrupted export leaves none); re-run edgegen export")
    return path.read_bytes()


def parse_manifest(root: Path, raw: bytes) -> dict:
    path = Path(root) / MANIFEST_NAME
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}); the bundle is damaged, "
                          "re-export it") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path} is not a JSON object; the bundle is damaged, re-export it")
    return manifest


def read_manifest(root: Path) -> tuple[dict, str]:
    """Parsed manifest and its sha256, with no signature or file checks (metadata for listings)."""
    raw = read_manifest_bytes(root)
    return parse_manifest(root, raw), hashlib.sha256(raw).hexdigest()


def _check_schema(root: Path, manifest: dict) -> None:
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


def load_bundle(root: Path, verify: bool = True) -> Bundle:
    """Open a bundle. verify=True (anything that will run it) checks, in this order and before any model file
    is parsed or deserialised: the signature and trust policy over the manifest bytes; the schema; that every
    path the manifest names stays inside the bundle; that the tree holds only listed regular files; the
    sha256 of every file (each streamed once); that every ONNX's external data stays inside the bundle.
    verify=False only parses the manifest, for listings; `signature` is then None."""
    from app.bundle.trust import verify_signature

    root = Path(root)
    raw = read_manifest_bytes(root)
    signature = verify_signature(root, raw) if verify else None
    manifest = parse_manifest(root, raw)
    _check_schema(root, manifest)
    bundle = Bundle(root.resolve(), manifest, hashlib.sha256(raw).hexdigest(), signature)
    if verify:
        verify_files(bundle)
    return bundle


def check_bundle(root: Path, raw: bytes) -> Bundle:
    """Every check of load_bundle except the signature (what `edgegen sign` runs before signing)."""
    manifest = parse_manifest(root, raw)
    _check_schema(Path(root), manifest)
    bundle = Bundle(Path(root).resolve(), manifest, hashlib.sha256(raw).hexdigest())
    verify_files(bundle)
    return bundle


def _damaged(what: str) -> BundleError:
    return BundleError(f"{what}; the bundle is damaged or crafted, re-export it")


def _listed_files(bundle: Bundle) -> dict[str, str]:
    listed = bundle.manifest.get("files", {})
    if not isinstance(listed, dict):
        raise _damaged("the manifest's 'files' is not a mapping of path to sha256")
    for rel, want in listed.items():
        # Canonical POSIX form only, so the tree walk below compares like with like.
        if not isinstance(rel, str) or PurePosixPath(rel).as_posix() != rel or rel in UNLISTED_OK:
            raise _damaged(f"the manifest lists '{rel}', which is not a plain bundle path")
        bundle.path(rel)  # absolute, '..', backslashes and symlinks that leave are refused here
        if not isinstance(want, str) or not _SHA256.fullmatch(want):
            raise _damaged(f"the manifest's sha256 for {rel} is malformed")
    return listed


def _check_references(bundle: Bundle, listed: dict[str, str]) -> set[str]:
    """Every path the manifest names must stay inside the bundle and be listed (so it is hashed).
    Returns the ONNX files to inspect."""
    def listed_path(rel, what: str) -> str:
        if not isinstance(rel, str):
            raise _damaged(f"{what} names {rel!r}, not a path")
        bundle.path(rel)
        if rel not in listed:
            raise _damaged(f"{what} names {rel}, which the manifest's file list does not cover")
        return rel

    m = bundle.manifest
    for key, kind in (("components", dict), ("tokenizers", list), ("engines", list)):
        if not isinstance(m.get(key, kind()), kind):
            raise _damaged(f"the manifest's '{key}' is not a {kind.__name__}")
    onnx = {rel for rel in listed if rel.endswith(".onnx")}
    for name, comp in bundle.manifest.get("components", {}).items():
        if isinstance(comp, dict) and "onnx" in comp:
            onnx.add(listed_path(comp["onnx"], f"component {name}"))
    if "scheduler" in bundle.manifest:
        listed_path(bundle.manifest["scheduler"], "the scheduler entry")
    for name in bundle.manifest.get("tokenizers", []):
        if not isinstance(name, str):
            raise _damaged(f"tokenizer entry {name!r} is not a path")
        path = bundle.path(name)
        prefix = name.rstrip("/") + "/"
        if not path.is_dir() or not any(rel.startswith(prefix) for rel in listed):
            raise _damaged(f"tokenizer folder {name} is missing or holds no listed files")
    for rec in bundle.manifest.get("engines", []):
        what = f"engine record for {rec.get('component', '?')}" if isinstance(rec, dict) else "an engine record"
        if not isinstance(rec, dict):
            raise _damaged(f"{what} is not an object")
        rel = listed_path(rec.get("file"), what)
        if rec.get("sha256") != listed[rel]:
            raise _damaged(f"the {what} and the file list disagree about the sha256 of {rel}")
        if rec.get("host_code_allowed") or rec.get("plugins"):
            # A plan with host code or plugins runs native code on deserialisation; edgegen never builds one.
            raise BundleError(f"bundle engine {rel} embeds host code or plugins, which edgegen never loads; "
                              f"re-export with: {bundle.rebuild_hint()}")
    return onnx


def _check_tree(bundle: Bundle, listed: dict[str, str]) -> None:
    """Only listed regular files and plain folders: no symlinks (they could point anywhere, and change after the
    check), no FIFOs or devices (reading one would hang or touch hardware), nothing unlisted."""
    root = str(bundle.root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise BundleError(f"bundle holds a symlink {rel}; bundles must contain only regular files, "
                                  "re-export the bundle")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise _damaged(f"bundle holds {rel}, which is not a regular file")
            if rel not in listed and rel not in UNLISTED_OK:
                raise BundleError(f"bundle holds {rel}, which its manifest does not list; remove it or "
                                  "re-export the bundle")


def verify_files(bundle: Bundle, use_cache: bool = True) -> None:
    """Paths and tree first (cheap, read nothing), then each file's sha256 in one streaming read, then the
    ONNX protobufs, parsed from the very bytes that were hashed.

    A file whose identity (device, inode, size, mtime_ns, ctime_ns) and sha256 match what this user's cache
    recorded after its last full check under this same manifest is not re-read (app.bundle.verified); any
    change re-hashes it. The signature and policy were already checked over the manifest bytes by the caller."""
    from app.bundle import verified

    listed = _listed_files(bundle)
    onnx = _check_references(bundle, listed)
    _check_tree(bundle, listed)
    cache = use_cache and verified.enabled()
    seen = verified.known(bundle.root, bundle.manifest_sha256) if cache else {}
    checked: dict[str, tuple] = {}
    for rel, want in listed.items():
        path = bundle.path(rel)
        if not path.is_file():
            raise BundleError(f"bundle file {rel} is missing; re-export with: {bundle.rebuild_hint()}")
        before = verified.identity(path)
        if seen.get(rel) == (before, want):
            checked[rel] = (before, want)
            continue
        if rel in onnx:
            # ONNX protobufs are capped at 2 GiB (large weights live in external data files), and parsing needs
            # the whole file anyway: read it once and hash and parse the same bytes, so nothing can swap it
            # between the check and the parse.
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
        else:
            data, digest = None, sha256_file(path)
        if digest != want:
            if cache:
                verified.forget(bundle.root)
            raise BundleError(f"bundle file {rel} does not match its sha256 in the manifest (changed or "
                              f"corrupted); re-export with: {bundle.rebuild_hint()}")
        if data is not None:
            check_onnx_external_data(bundle, rel, data, listed)
        if verified.identity(path) == before:  # not written to while it was read
            checked[rel] = (before, want)
    if cache and len(checked) == len(listed) and any(seen.get(r) != c for r, c in checked.items()):
        verified.record(bundle.root, bundle.manifest_sha256, checked)


def _onnx_tensors(model):
    """Every TensorProto in the model that could carry external data: initializers, sparse initializers and
    tensor attributes, in the main graph, in every subgraph (If/Loop/Scan bodies) and in model functions."""
    from onnx import AttributeProto

    def sparse(sp):
        yield sp.values
        yield sp.indices

    def graph(g):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield from sparse(sp)
        yield from nodes(g.node)

    def nodes(ns):
        for n in ns:
            for a in n.attribute:
                if a.type == AttributeProto.TENSOR:
                    yield a.t
                elif a.type == AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == AttributeProto.SPARSE_TENSOR:
                    yield from sparse(a.sparse_tensor)
                elif a.type == AttributeProto.SPARSE_TENSORS:
                    for sp in a.sparse_tensors:
                        yield from sparse(sp)
                elif a.type == AttributeProto.GRAPH:
                    yield from graph(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from graph(g)

    yield from graph(model.graph)
    for f in model.functions:
        yield from nodes(f.node)


def check_onnx_external_data(bundle: Bundle, rel: str, data: bytes, listed: dict[str, str]) -> None:
    """Refuse an ONNX whose external-data `location` leaves the bundle or names a file the manifest does not
    cover (onnx has had path-traversal CVEs here, and ONNX Runtime opens these paths itself). Parses only the
    protobuf: no external data is loaded."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError):
        raise _damaged(f"bundle file {rel} is not a readable ONNX model") from None
    base = PurePosixPath(rel).parent
    for t in _onnx_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL and not len(t.external_data):
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        win = PureWindowsPath(location)
        # ONNX Runtime resolves `location` against the model's folder with the host's path rules, so refuse
        # anything absolute or drive-qualified on either OS, and '..' even where it would land inside the bundle
        # (the exporter never writes it).
        if (not location or win.drive or win.root or PurePosixPath(location).is_absolute()
                or ".." in win.parts or ".." in PurePosixPath(location).parts):
            raise _damaged(f"{rel} stores tensor {t.name!r} in '{location}', outside the bundle")
        target = (base / location).as_posix()
        try:
            bundle.path(target)  # also refuses a path through a symlink that leaves
        except BundleError:
            raise _damaged(f"{rel} stores tensor {t.name!r} in '{location}', outside the bundle") from None
        if target not in listed:
            raise _damaged(f"{rel} stores tensor {t.name!r} in '{location}', which the manifest does not list")


# Files that legitimately sit beside the listed ones: the manifest itself and its detached signature.
UNLISTED_OK = frozenset({MANIFEST_NAME, SIG_NAME})
_SHA256 = re.compile(r"[0-9a-f]{64}")
