"""Peak RSS of one transformer's BF16 export (exporter.export_one), for folders that hold only the transformer.

Writing and exporting a whole SD3.5 Large or Klein 9B folder (text encoders included) takes far longer than the
transformer alone, which is the largest component and sets the export's peak. This measures that step the way
tests/test_export_memory.py does, at full size: VmHWM reset through /proc/self/clear_refs, then export_one.

    python -m benchmarks.realsize_models sd35-large DIR --only transformer
    python -m benchmarks.transformer_memory DIR OUT [COMPONENT]   # one JSON line: RSS before/after (GiB), seconds, cosines
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def status() -> dict[str, float]:
    """GiB of this process's RSS, peak and their anonymous/file-backed parts."""
    from benchmarks.export_memory import proc_status

    return {k: round(v / 2**30, 2) for k, v in proc_status(keys=("VmRSS", "VmHWM", "RssAnon", "RssFile")).items()}


def main(model: Path, out: Path, component: str = "transformer") -> dict:
    from app.bundle.families import family_for, read_model_index
    from app.bundle.modelfolder import ModelFolder
    from benchmarks.export_memory import reset_peak
    from export.exporter import export_one

    index = read_model_index(model)
    family = family_for(index)
    folder = ModelFolder(model, index, family)  # the transformer only: no completeness check
    reset_peak()
    before, t = status(), time.monotonic()
    entry, _ = export_one(folder, family.component(component), out, precision="bf16",
                          progress=lambda m: print(f"{time.monotonic() - t:7.1f}s {m}", flush=True))
    return {"before": before, "after": status(), "seconds": round(time.monotonic() - t, 1),
            "parameters": entry["parameters"], "fidelity": entry["fidelity"]["cosine"],
            "bf16_cosine": entry["fidelity_bf16"]["cosine"]}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), Path(sys.argv[2]), *sys.argv[3:4])), flush=True)
