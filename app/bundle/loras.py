"""The site LoRA library: a folder of .safetensors LoRAs, each with a record and, optionally, a signature.

    NAME.safetensors     the LoRA as it was added (diffusers, kohya or ComfyUI key layout)
    NAME.lora.json       its record: sha256, size, family, rank, the layers it targets with their shapes
    NAME.lora.sig        an Ed25519 signature over the record's exact bytes (edgegen lora sign), which covers
                         the file through its sha256, as manifest.sig covers a bundle

The folder is $EDGEGEN_LORAS, else the user's data folder's `loras`; cluster replicas point at the same one.
A run-time LoRA bundle (export --runtime-lora) takes any of them per request: docs/LORA.md. This module reads
records and checks files and signatures; it imports no torch (app/runtime/loras.py reads the tensors).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from app.bundle.files import atomic_write_bytes, sha256_file
from app.errors import UsageError

ENV_LORAS = "EDGEGEN_LORAS"
RECORD_FORMAT = "edgegen-lora"
RECORD_SUFFIX = ".lora.json"
SIG_SUFFIX = ".lora.sig"
# ComfyUI's LoraLoader allows -100..100; past a few units a LoRA only breaks images. Strength 0 is allowed (the
# LoRA's layers get zeros): a slider at zero must not be an error.
STRENGTH_RANGE = (-10.0, 10.0)
FAMILY_LABELS = {"flux2-klein": "FLUX.2 Klein", "sd3.5": "Stable Diffusion 3.5"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def library_dir() -> Path:
    if os.environ.get(ENV_LORAS):
        return Path(os.environ[ENV_LORAS])
    import platformdirs

    return Path(platformdirs.user_data_dir("edgegen", appauthor=False)) / "loras"


def check_name(name: str) -> str:
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
    if not _NAME.match(stem) or stem.endswith(".lora"):
        raise UsageError(f"LoRA name {name!r} is not a plain name (letters, digits, '.', '_', '-', at most 100); "
                         "pick one with --name")
    return stem


def check_strength(value, what: str = "LoRA strength") -> float:
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {value!r} is not a number; use e.g. 0.8") from None
    lo, hi = STRENGTH_RANGE
    if not math.isfinite(s) or not lo <= s <= hi:
        raise UsageError(f"{what} {value} is outside {lo:g}..{hi:g}; use e.g. 0.8")
    return s


def parse_lora_choice(text: str) -> tuple[str, float]:
    """NAME[:STRENGTH] as --lora takes it (strength 1 by default)."""
    text = str(text)
    name, sep, strength = text.rpartition(":")
    if not sep:
        name, strength = text, "1"
    return check_name(name), check_strength(strength, f"--lora {text}: strength")


def safetensors_header(path: Path) -> dict:
    """The file's safetensors header (tensor names, dtypes, shapes), read without loading any tensor. Refuses
    anything that is not safetensors: pickle checkpoints run code when loaded."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"LoRA file {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 * 2**20):
            raise UsageError(f"{path} is not a safetensors file (pickle .ckpt/.pt/.bin LoRAs are refused: they can "
                             "run code); convert it to .safetensors")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise UsageError(f"{path} has a damaged safetensors header; copy the LoRA again")
    return header


@dataclass(frozen=True)
class LoraRecord:
    name: str
    path: Path  # the .safetensors file
    sha256: str
    size: int
    family: str
    layout: str
    rank: int  # the largest rank over its layers: what it adds to the engine inputs' lora_rank
    targets: dict  # module -> [in, out, rank]
    data: dict  # the whole record, as written

    @property
    def record_path(self) -> Path:
        return self.path.with_name(self.name + RECORD_SUFFIX)


def _record(path: Path) -> LoraRecord:
    try:
        d = json.loads(path.read_bytes())
        if d.get("format") != RECORD_FORMAT:
            raise ValueError
        name = path.name[: -len(RECORD_SUFFIX)]
        return LoraRecord(name, path.with_name(d["file"]), d["sha256"], int(d["size"]), d["family"], d["layout"],
                          int(d["rank"]), dict(d["targets"]), d)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"{path} is not an edgegen LoRA record; remove it and add the LoRA again with: "
                         "edgegen lora add FILE") from None


def list_records(folder: Path | None = None) -> list[LoraRecord]:
    folder = Path(folder or library_dir())
    if not folder.is_dir():
        return []
    return [_record(p) for p in sorted(folder.glob("*" + RECORD_SUFFIX))]


def names(folder: Path | None = None) -> list[str]:
    folder = Path(folder or library_dir())
    return [p.name[: -len(RECORD_SUFFIX)] for p in sorted(folder.glob("*" + RECORD_SUFFIX))] if folder.is_dir() else []


def find_record(name: str, folder: Path | None = None) -> LoraRecord:
    folder = Path(folder or library_dir())
    stem = check_name(name)
    path = folder / (stem + RECORD_SUFFIX)
    if not path.is_file():
        have = names(folder)
        raise UsageError(f"no LoRA named {stem!r} in the library {folder}; "
                         + (f"it has: {', '.join(have)}" if have else "add one with: edgegen lora add FILE"))
    return _record(path)


# sha256 of files already checked in this process, keyed by (path, size, mtime): a LoRA switched back to is not
# hashed again unless the file changed.
_CHECKED: dict[tuple[str, int, int], str] = {}


def verify_record(rec: LoraRecord):
    """The file's sha256 against the record, then the signature policy; returns the SignatureState."""
    from app.bundle.trust import load_lora_policy, verify_bytes

    if not rec.path.is_file():
        raise UsageError(f"LoRA {rec.name}: {rec.path} is missing; add it again with: edgegen lora add FILE")
    st = rec.path.stat()
    key = (str(rec.path), st.st_size, st.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = sha256_file(rec.path) if st.st_size == rec.size else ""
    if _CHECKED[key] != rec.sha256:
        raise UsageError(f"LoRA {rec.name}: {rec.path} does not match its record's sha256 (changed or damaged); "
                         "add it again from a trusted copy")
    policy = load_lora_policy()
    return verify_bytes(
        rec.record_path.read_bytes(), rec.path.with_name(rec.name + SIG_SUFFIX), policy.require_signed_bundles,
        policy.sources, subject=f"LoRA {rec.name}",
        resign=f"sign it with: edgegen lora sign {rec.name} --key KEY", target=rec.record_path.name,
        changed="the record was changed after signing; add the LoRA again from a trusted copy", what="signed LoRAs")


def write_record(folder: Path, name: str, data: dict) -> LoraRecord:
    path = Path(folder) / (name + RECORD_SUFFIX)
    atomic_write_bytes(path, (json.dumps({"format": RECORD_FORMAT, "version": 1, **data}, indent=2) + "\n").encode())
    return _record(path)


def sign_record(name: str, key: Path, folder: Path | None = None):
    from app.bundle.trust import sign_bytes

    rec = find_record(name, folder)
    verify_record_file_only(rec)
    return sign_bytes(rec.record_path.read_bytes(), rec.path.with_name(rec.name + SIG_SUFFIX), key)


def verify_record_file_only(rec: LoraRecord) -> None:
    """The sha256 check alone (signing states that the file is the one recorded)."""
    if not rec.path.is_file() or rec.path.stat().st_size != rec.size or sha256_file(rec.path) != rec.sha256:
        raise UsageError(f"LoRA {rec.name}: {rec.path} is missing or does not match its record; add it again")


def check_against(rec: LoraRecord, family: str, slots: list[dict] | None, max_rank: int | None,
                  bundle: str = "the bundle") -> None:
    """Refuse a LoRA a bundle cannot take: another family, a layer it lacks, other shapes."""
    if rec.family != family:
        raise UsageError(f"LoRA {rec.name} is for {FAMILY_LABELS.get(rec.family, rec.family)}; {bundle} is "
                         f"{FAMILY_LABELS.get(family, family)}: pick a LoRA made for it")
    if slots is None:
        raise UsageError(f"{bundle} has no run-time LoRA inputs; re-export it with --runtime-lora MAX_RANK "
                         f"(or fuse this LoRA at export with --lora {rec.path})")
    shapes = {s["module"]: (int(s["in"]), int(s["out"])) for s in slots}
    for module, (i, o, _r) in rec.targets.items():
        if module not in shapes:
            raise UsageError(f"LoRA {rec.name} targets {module}, which {bundle}'s transformer does not have: it was "
                             "made for another model of this family")
        if shapes[module] != (int(i), int(o)):
            raise UsageError(f"LoRA {rec.name}: {module} is {i}->{o} in the LoRA but {shapes[module][0]}->"
                             f"{shapes[module][1]} in {bundle}: it was made for another size of this family")
    if max_rank is not None and rec.rank > max_rank:
        raise UsageError(f"LoRA {rec.name} has rank {rec.rank}, above the {max_rank} that {bundle}'s engine inputs "
                         f"allow; re-export with --runtime-lora {rec.rank} or more")
