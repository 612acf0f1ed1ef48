"""Reading a local diffusers model folder safely: checks and family detection, without loading weights."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from app.bundle.families import FamilySpec, family_for, read_model_index
from app.errors import ModelFolderError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


@dataclass(frozen=True)
class ModelFolder:
    path: Path
    index: dict
    family: FamilySpec
    # source -> (parameter count, bytes of tensor data), from the safetensors headers (no weights read)
    weights: dict = field(default_factory=dict, compare=False, repr=False)

    def present(self, source: str) -> bool:
        entry = self.index.get(source)
        return isinstance(entry, list) and entry[0] is not None and entry[1] is not None


def inspect_folder(path: Path, family: str = "auto") -> ModelFolder:
    """Refuse, with the fix, anything that is not a complete safetensors diffusers folder of a known family."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist; pass --model a local diffusers folder")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ModelFolderError(f"{path} is not a diffusers model folder (no model_index.json); pass the folder "
                               "that holds model_index.json")
    index = read_model_index(path)
    fam = family_for(index, family)
    folder = ModelFolder(path.resolve(), index, fam)
    for spec in fam.components:
        if not folder.present(spec.source):
            if spec.optional:
                continue
            raise ModelFolderError(f"{path} lacks the {spec.source} component that {fam.name} needs; "
                                   "copy the complete model folder")
        sub = path / spec.source
        weights = [p for p in sub.glob("*") if p.suffix in WEIGHT_SUFFIXES] if sub.is_dir() else []
        if not weights:
            raise ModelFolderError(f"{sub} has no weights; copy the complete model folder")
        if not any(p.suffix == ".safetensors" for p in weights):
            raise ModelFolderError(f"{sub} holds only pickle weights ({weights[0].name}); edgegen loads "
                                   "safetensors only, convert them first (pickle files can run code)")
        params = nbytes = 0
        for f in sorted(p for p in weights if p.suffix == ".safetensors"):
            for t in read_safetensors_header(f).values():
                n = 1
                for d in t["shape"]:
                    n *= d
                params += n
                nbytes += t["data_offsets"][1] - t["data_offsets"][0]
        folder.weights[spec.source] = (params, nbytes)
    for tok in fam.tokenizers:
        if folder.present(tok) and not (path / tok).is_dir():
            raise ModelFolderError(f"{path} lacks the {tok} folder; copy the complete model folder")
    return folder




HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own cap on the JSON header


def read_safetensors_header(path: Path) -> dict:
    """The tensors a .safetensors file declares ({name: {dtype, shape, data_offsets}}), checked against the file's
    size so a truncated or foreign file is refused here, in one line, instead of deep inside a loader."""
    path = Path(path)

    def bad(why: str) -> ModelFolderError:
        return ModelFolderError(f"{path} is not a complete safetensors file ({why}); copy it again from the source")

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > HEADER_LIMIT or 8 + n > size:
                raise bad(f"header of {n} bytes does not fit in the file's {size} bytes")
            raw = fh.read(n)
    except OSError as e:
        raise ModelFolderError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, t in header.items():
        try:
            start, end = (int(x) for x in t["data_offsets"])
            shape = [int(d) for d in t["shape"]]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has no readable shape and data_offsets") from None
        if not 0 <= start <= end <= data or any(d < 0 for d in shape):
            raise bad(f"tensor {name!r} ends at byte {end}, past the {data} bytes of data (truncated?)")
        t["shape"] = shape
    return header


def own_defaults(folder: Path) -> dict:
    """The model folder's edgegen_defaults.json (a model may carry its own defaults, as the demo model does),
    or {} when there is none; refuses a damaged one in one line."""
    path = Path(folder) / "edgegen_defaults.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is not valid JSON ({getattr(e, 'msg', e.__class__.__name__)}); fix or "
                               "delete it") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path} is not a JSON object; fix or delete it")
    for key in ("steps", "width", "height", "min_size", "max_size", "max_sequence_length"):
        if key in data and (not isinstance(data[key], int) or isinstance(data[key], bool) or data[key] <= 0):
            raise ModelFolderError(f"{path}: {key} = {data[key]!r} is not a positive integer; fix or delete it")
    if "guidance" in data and (not isinstance(data["guidance"], (int, float)) or isinstance(data["guidance"], bool)
                               or not 0 <= data["guidance"] < 1e4):
        raise ModelFolderError(f"{path}: guidance = {data['guidance']!r} is not a number >= 0; fix or delete it")
    return data
