"""Opt-in cache of exported ONNX graphs (EDGEGEN_EXPORT_CACHE=DIR), keyed by everything the graph depends on.

The test suite exports the same tiny component in many bundles (FP32, FP8 on top of FP32, config variants that
change another component); tracing and optimising it is the slow part. Only the graph file(s) written by
export.onnx_export.save_component are cached: loading the module, the PyTorch references, the ONNX Runtime
check, the gates and the manifest entry run on every export, so a cached graph is checked like a fresh one.

The key covers: the component's files (config and weights, by sha256) and the class model_index.json names for
it, the family and component spec, the precision, the LoRAs fused into it (by sha256 and scale), the trace
sample (values, dtypes and shapes), the source of app/ and export/, and the versions of the libraries that build
the graph. A process that misses locks the entry until it has stored it, so concurrent exports of the same
component (pytest-xdist workers) trace it once. Entries are written to a temporary folder and renamed into
place, recorded with each file's sha256, and copied out (never linked), so a bundle edited later cannot change
the cache. Off unless the variable is set: the test suite sets it to a folder of its own run.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from app.bundle.files import sha256_file

ENV = "EDGEGEN_EXPORT_CACHE"
ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "onnx", "onnxscript", "diffusers", "transformers", "safetensors", "peft")
RECORD = "files.json"
# A process that finds no entry waits (up to this long) for another one exporting the same component to store it.
LOCK_WAIT_S = 300
# entry -> this process's lock on it, held by the Lookup from a miss until store(); weak, so an export that fails
# before storing releases it when its Lookup is collected
_claims: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@functools.lru_cache(maxsize=1)
def _code_and_versions() -> str:
    h = hashlib.sha256()
    for package in ("app", "export"):
        for path in sorted((ROOT / package).rglob("*.py")):
            h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for dist in LIBRARIES:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{dist}={version}\0".encode())
    return h.hexdigest()


def _tensor_bytes(t) -> bytes:
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def graph_key(folder, spec, precision: str, sample: dict, loras=()) -> str:
    """sha256 over everything that decides the exported graph of `spec` from `folder` (see the module doc)."""
    h = hashlib.sha256()

    def part(label: str, data: bytes | str) -> None:
        data = data.encode() if isinstance(data, str) else data
        h.update(f"{label}:{len(data)}:".encode() + data)

    part("code", _code_and_versions())
    part("family", folder.family.name)
    part("spec", repr(spec))
    part("class", json.dumps(folder.index.get(spec.source)))
    part("precision", precision)
    # a ControlNet's source is its own folder; SD3.5 Large's nets also take the transformer's position table
    sources = [folder.path / spec.source] + ([folder.path / "transformer"] if spec.role == "controlnet" else [])
    for source in sources:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            part("file", f"{path.relative_to(source).as_posix()}={sha256_file(path)}")
    if spec.role == "transformer":  # export_one fuses LoRAs into the transformer only
        for path, scale in loras:
            part("lora", f"{sha256_file(Path(path))}*{float(scale)!r}")
    for name in sorted(sample):
        t = sample[name]
        part("sample", f"{name}:{t.dtype}:{tuple(t.shape)}")
        part("values", _tensor_bytes(t))
    return h.hexdigest()


@dataclass
class Lookup:
    """One component's graph in the cache: `hit` when `out_dir` now holds it; `store()` after a fresh export."""

    entry: Path | None  # None: the cache is off
    out_dir: Path
    hit: bool = False
    claim: object = None  # the lock on `entry` while this process exports it
    what: str = ""  # which component of which folder, recorded with the entry for whoever inspects the cache

    @property
    def path(self) -> Path:
        return self.out_dir / "model.onnx"

    def store(self) -> None:
        if self.entry is None or self.hit:
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.entry.name}.", dir=self.entry.parent))
        try:
            files = {}
            for f in sorted(self.out_dir.iterdir()):
                if f.is_file():
                    shutil.copyfile(f, tmp / f.name)
                    files[f.name] = sha256_file(tmp / f.name)
            (tmp / RECORD).write_text(json.dumps({"files": files, "what": self.what}))
            os.rename(tmp, self.entry)  # atomic; fails if another process stored the same key first
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _release(self.entry)
            self.claim = None


def _claim(entry: Path):
    """A lock on `entry` for this process's export of it; None if another process held it for LOCK_WAIT_S."""
    from filelock import FileLock, Timeout

    _release(entry)  # an earlier export of ours that failed before store(): its claim is void
    lock = FileLock(f"{entry}.lock")
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        return None
    _claims[entry] = lock
    return lock


def _release(entry: Path) -> None:
    if (lock := _claims.pop(entry, None)) is not None:
        lock.release(force=True)


def lookup(folder, spec, precision: str, sample: dict, loras, out_dir: Path) -> Lookup:
    """Copy the cached graph for this export into `out_dir` if there is one; a no-op unless EDGEGEN_EXPORT_CACHE
    names a folder."""
    root = os.environ.get(ENV)
    if not root:
        return Lookup(None, out_dir)
    entry = Path(root) / graph_key(folder, spec, precision, sample, loras)
    record = entry / RECORD
    if not record.is_file():
        entry.parent.mkdir(parents=True, exist_ok=True)
        claim = _claim(entry)
        if claim is None:  # another export of it is stuck: go on without the cache
            return Lookup(None, out_dir)
        if not record.is_file():  # still missing after the wait: this export stores it
            return Lookup(entry, out_dir, claim=claim, what=f"{spec.name} ({precision}) of {folder.path}")
    _release(entry)
    files = json.loads(record.read_text())["files"]
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, digest in files.items():
        shutil.copyfile(entry / name, out_dir / name)
        if sha256_file(out_dir / name) != digest:  # a damaged entry: export afresh
            for n in files:
                (out_dir / n).unlink(missing_ok=True)
            return Lookup(None, out_dir)
    return Lookup(entry, out_dir, hit=True)
