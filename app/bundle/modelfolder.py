"""Reading a local diffusers model folder safely: checks and family detection, without loading weights."""

from __future__ import annotations

from dataclasses import dataclass
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
    for tok in fam.tokenizers:
        if folder.present(tok) and not (path / tok).is_dir():
            raise ModelFolderError(f"{path} lacks the {tok} folder; copy the complete model folder")
    return folder


