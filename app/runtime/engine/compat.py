"""Whether an engine record can run on this GPU with the installed TensorRT, decided before deserialising.

A serialised engine is executable code tied to one compute capability and one TensorRT release; each check
here refuses with the exact `edgegen export` command that rebuilds it.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from app.errors import BundleError
from app.planning.devices import GpuInfo, normalise_uuid
from app.planning.policy import choose_precision, engine_flavour_for_sm, normalise_sm, precision_supported
from app.runtime.engine.trt import LABELS, short_version

EXPORTABLE_PRECISIONS = ("fp32", "bf16", "fp8")  # what `edgegen export --precision` accepts (export/exporter.py)


def rebuild_command(source: str, bundle: str | Path, sm: str, precision: str | None = None) -> str:
    """The exact export command that rebuilds a bundle (in place, hence --overwrite) for a GPU of SM `sm`."""
    sm = normalise_sm(sm)
    cmd = (
        f"edgegen export --model {shlex.quote(str(source))} --out {shlex.quote(str(bundle))} "
        f"--target {engine_flavour_for_sm(sm)} --sm {sm}"
    )
    if precision and not precision_supported(precision, sm):
        # e.g. an FP8 bundle moved to an sm86 GPU: the precision the plan prefers there (bf16), when export
        # writes it; fp32 otherwise.
        best = choose_precision("transformer", sm)
        cmd += f" --precision {best if best in EXPORTABLE_PRECISIONS else 'fp32'}"
    return cmd + " --overwrite"


def incompatibility(
    record: Mapping[str, Any], gpu_sm: str, installed: Mapping[str, str | None]
) -> str | None:
    """Why this engine record cannot run on a GPU of `gpu_sm` with these TensorRT installs; None if it can."""
    label = LABELS.get(record.get("flavour", ""), str(record.get("flavour")))
    if record.get("host_code_allowed") or record.get("plugins"):
        return "it embeds host code or plugins, which edgegen never loads"  # plan = executable artefact
    if record.get("flavour") not in LABELS:
        return f"its target '{record.get('flavour')}' is unknown"
    if normalise_sm(record["sm"]) != normalise_sm(gpu_sm):
        return f"it was built for sm{normalise_sm(record['sm'])} and this GPU is sm{normalise_sm(gpu_sm)}"
    have = installed.get(record["flavour"])
    if have is None:
        return f"{label} is not installed"
    if str(have) != str(record["version"]):  # engines are tied to the exact release that built them
        return f"it was built with {label} {record['version']} and {label} {have} is installed"
    return None


def find_engine(
    records: Sequence[Mapping[str, Any]], gpu_sm: str, installed: Mapping[str, str | None]
) -> tuple[Mapping[str, Any] | None, list[str]]:
    """The first record that runs here, else (None, why each one does not)."""
    reasons = []
    for rec in records:
        why = incompatibility(rec, gpu_sm, installed)
        if why is None:
            return rec, []
        reasons.append(why)
    return None, reasons


def check_engine_compatible(
    records: Sequence[Mapping[str, Any]],
    *,
    component: str,
    gpu: GpuInfo,
    installed: Mapping[str, str | None],
    source: str,
    bundle: str | Path,
) -> Mapping:
    """The engine record to use, or BundleError naming the fix. Runs BEFORE anything is deserialised."""
    rec, reasons = find_engine(records, gpu.sm, installed)
    if rec is not None:
        return rec
    if not records:
        raise BundleError(
            f"The bundle {bundle} has no TensorRT engine for {component}; rebuild it with: "
            f"{rebuild_command(source, bundle, gpu.sm)}"
        )
    first = records[0]
    why = reasons[0]
    if why.endswith("is not installed"):
        fix = (
            "pip install 'edgegen[rtx]'"
            if first["flavour"] == "tensorrt-rtx"
            else "install the [gpu] extra from NVIDIA's index"
        )
        raise BundleError(
            f"The {component} engine in {bundle} needs {LABELS[first['flavour']]}, which is not "
            f"installed; {fix}, or run with --backend onnxruntime."
        )
    raise BundleError(
        f"The {component} engine in {bundle} cannot run on {gpu.name} (sm{gpu.sm}) because {why}; "
        f"rebuild it with: {rebuild_command(source, bundle, gpu.sm, first.get('precision'))}"
    )


def engine_file(bundle_dir: Path, record: Mapping[str, Any]) -> Path:
    """The engine's path inside the bundle; refuses names that climb out of it (path traversal)."""
    name = str(record.get("file", ""))
    root = Path(bundle_dir).resolve()
    path = (root / name).resolve()
    if not name or Path(name).is_absolute() or root not in path.parents:
        raise BundleError(
            f"The bundle {bundle_dir} names engine file '{name}' outside itself; re-export the bundle."
        )
    return path


def runtime_cache_path(gpu_uuid: str, version: str, cache_dir: Path | None = None) -> Path:
    """Where TensorRT-RTX keeps JIT-compiled kernels for one GPU (by UUID) and one release."""
    from platformdirs import user_cache_path

    base = cache_dir or user_cache_path("edgegen") / "trtrtx-runtime"
    return Path(base) / f"trtrtx-{short_version(version)}-{normalise_uuid(gpu_uuid)}.cache"

