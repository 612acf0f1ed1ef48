"""Which local bundle a replica runs for a requested one: same model, best engine for this replica's GPU.

A site keeps one bundle per GPU generation under the same model (e.g. `klein4b` built for sm89 and
`klein4b-sm120` for sm120, or one bundle holding engines for both). The server names the bundle a client asked
for and its identity (family, source model, fused LoRAs); each replica looks at the bundles on its own node
with that identity and takes the one the runtime's own backend choice ranks best for its GPU: engines that
match the GPU (TensorRT), then ONNX Runtime CUDA, then ONNX Runtime CPU. Ties go to the requested name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from app.bundle.locations import MANIFEST_NAME, engine_dirs, find_bundles
from app.errors import BundleError
from app.planning.devices import GpuInfo

RANK = {"tensorrt": 0, "onnxruntime-cuda": 1, "onnxruntime-cpu": 2, "torch": 3}


def identity(manifest: Mapping[str, Any]) -> dict:
    """What makes two bundles the same model for a client: family, source model files, fused LoRAs."""
    src = manifest.get("source", {})
    return {"family": manifest.get("family"), "model_index_sha256": src.get("model_index_sha256"),
            "loras": json.loads(json.dumps(manifest.get("loras", []), sort_keys=True))}


def local_bundles(paths: Sequence[Path]) -> list[Path]:
    """Bundles on this node: the given bundle folders or folders of bundles that exist here, then engines/."""
    found: list[Path] = []
    holders = []
    for p in map(Path, paths):
        if (p / MANIFEST_NAME).is_file():
            found.append(p)
        elif p.is_dir():
            holders.append(p)
    found += find_bundles(holders + engine_dirs())
    return list(dict.fromkeys(p.resolve() for p in found))


def pick_bundle(name: str, wanted: Mapping[str, Any], candidates: Sequence[Path], gpu: GpuInfo | None, *,
                installed: Mapping[str, str | None], ort_providers: Sequence[str],
                torch_cuda: bool) -> tuple[Path, str]:
    """(bundle folder, why) for the bundle `name` with identity `wanted` on a replica with `gpu`."""
    from app.bundle.manifest import read_manifest
    from app.runtime.backend import choose_backend

    ranked = []
    for path in candidates:
        try:
            manifest, _ = read_manifest(path)
        except Exception:  # noqa: BLE001, S112 - an unreadable bundle is not a candidate
            continue
        if identity(manifest) != dict(wanted):
            continue
        engines: dict[str, list] = {}
        for rec in manifest.get("engines", []):
            engines.setdefault(rec["component"], []).append(rec)
        try:
            choice, reason = choose_backend(
                "auto", gpus=[gpu] if gpu else [], engines=engines, installed=installed,
                ort_providers=ort_providers, torch_cuda=torch_cuda, source=manifest["source"].get("path", ""),
                bundle=str(path), components=list(manifest.get("components", {})))
        except Exception as e:  # noqa: BLE001 - an unusable candidate; the others may do
            choice, reason = "unusable", str(e)
        ranked.append((RANK.get(choice, 9), path.name != name, path, reason))
    if not ranked:
        raise BundleError(f"No bundle '{name}' for this model on this node; copy the bundle's folder to this node's "
                          "engines folder (or the same --bundle path) and restart its replica")
    rank, _, path, reason = min(ranked, key=lambda r: r[:2])
    if rank == 9:
        raise BundleError(f"No bundle for '{name}' can run on this node: {reason}")
    return path, reason
