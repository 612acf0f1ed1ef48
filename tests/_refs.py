"""Reference images for the self-test, drawn by diffusers from a copy of the tiny Klein model (small and quick)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# 64 px, 2 steps, two prompts: enough to catch a wrong backend, a few seconds per backend on the CPU.
TINY_DEFAULTS = {"steps": 2, "guidance": 1.0, "width": 64, "height": 64}
N_REFS = 2


def tiny_references(model: Path, tmp: Path) -> tuple[Path, Path]:
    """(model copy with edgegen_defaults.json, references folder) written with tools.demo.references (first N_REFS)."""
    from tools.demo import references

    copy = tmp / "tiny-klein"
    shutil.copytree(model, copy)  # same model_index.json, so the session bundle still matches it
    (copy / "edgegen_defaults.json").write_text(json.dumps(TINY_DEFAULTS))
    refs = tmp / "refs"
    every = references.REFERENCES
    references.REFERENCES = every[:N_REFS]
    try:
        references.write(copy, refs)
    finally:
        references.REFERENCES = every
    return copy, refs
