"""Component sizes for `edgegen plan`, read from safetensors headers or a bundle manifest (no weights loaded)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from app.planning.plan import ComponentInfo

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E4M3": 1, "BOOL": 1}


def safetensors_headers(folder: Path):
    """The JSON header of every *.safetensors file in a folder, in name order (no weights read)."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            yield json.loads(fh.read(n))


def safetensors_names(folder: Path) -> set[str]:
    """Tensor names of every *.safetensors file in a folder, from the headers alone."""
    return {name for header in safetensors_headers(folder) for name in header if name != "__metadata__"}


def safetensors_params(folder: Path) -> int:
    """Parameter count from the JSON headers of every *.safetensors file in a folder."""
    total = 0
    for header in safetensors_headers(folder):
        for name, t in header.items():
            if name != "__metadata__":
                count = 1
                for d in t["shape"]:
                    count *= d
                total += count
    return total


def components_for(model: Path | None = None, bundle: Path | None = None):
    """(ComponentInfo list, FamilySpec, defaults) for a model folder or a bundle."""
    if bundle is not None:
        from app.bundle.manifest import load_bundle

        b = load_bundle(bundle, verify=False)
        return bundle_components(b), b.family, b.defaults
    from app.bundle.modelfolder import inspect_folder

    folder = inspect_folder(model)
    comps = [ComponentInfo(name=s.name, kind=s.role, param_count=safetensors_params(folder.path / s.source))
             for s in folder.family.components
             if folder.present(s.source) and (not s.on_request or folder.family.encoder_by_default)]
    d = folder.family.defaults(folder.index, folder.path)
    return comps, folder.family, {"width": d.width, "height": d.height}


def component_bytes(bundle, name: str, sm: str | None = None) -> int:
    """What a component holds in memory as exported: its engine for `sm` if the bundle has one, else its ONNX
    graph with external data (file sizes; no bytes are read)."""
    for rec in bundle.manifest.get("engines", []):
        if rec.get("component") == name and sm is not None and str(rec.get("sm")) == str(sm) and rec.get("bytes"):
            return int(rec["bytes"])
    folder = bundle.components()[name]["onnx"].rsplit("/", 1)[0] + "/"
    return sum(bundle.path(rel).stat().st_size for rel in bundle.manifest.get("files", {}) if rel.startswith(folder))


def bundle_components(bundle, sm: str | None = None) -> list[ComponentInfo]:
    """A bundle's components with their real bytes and exported precision, for plans of that bundle."""
    return [ComponentInfo(name=n, kind=c["role"], param_count=c["parameters"], precision=c.get("precision"),
                          weights_bytes=component_bytes(bundle, n, sm))
            for n, c in bundle.components().items()]


def reference_pixels(pipeline: dict, references: int, width: int, height: int) -> int:
    """Pixels of `references` input images as the transformer sees them: each at most the bundle's reference
    area (FLUX.2 Klein scales larger ones down to 1 MP), estimated at the output's size."""
    return references * min(width * height, pipeline.get("reference_max_pixels", 1 << 20))


def bundle_plan(bundle, gpu, width: int, height: int, batch: int = 1, references: int = 0):
    """The plan for running `bundle` on `gpu` (a GpuSpec, or None for the CPU) at one size.

    `references`: how many input images the transformer sees as extra tokens (FLUX.2 Klein), each estimated at
    the output's size up to the bundle's reference area (1 MP)."""
    from app.planning.plan import make_plan

    def up16(v: int) -> int:  # tiny test bundles allow sizes the plan's 16-px grid does not; estimate above them
        return max(16, -(-int(v) // 16) * 16)

    cfg = bundle.family.uses_negative_prompt or not bundle.manifest["pipeline"].get("is_distilled", True)
    ref_pixels = reference_pixels(bundle.manifest["pipeline"], references, up16(width), up16(height))
    return make_plan(gpu, bundle_components(bundle, gpu.sm if gpu else None), up16(width), up16(height),
                     batch=batch, cfg=cfg, reference_pixels=ref_pixels,
                     source=(bundle.manifest.get("source") or {}).get("path"))
