"""Find engine bundles in a folder and say for each: family, precision, engine target, and whether it fits here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from app.bundle.manifest import MANIFEST_NAME, Bundle, load_bundle
from app.errors import EdgegenError
from app.planning.devices import GpuReader, read_gpus
from app.planning.gpus import GpuSpec, gpu_spec_from_info
from app.planning.components import bundle_plan
from app.planning.plan import Plan
from app.planning.policy import GIB


@dataclass(frozen=True)
class BundleEntry:
    """One bundle as the model picker shows it. `error` is set (and the rest may be empty) if it won't load."""

    path: Path
    name: str
    family: str = ""
    precision: str = ""
    target: str = ""
    fit: str = ""
    error: str = ""

    def label(self) -> str:
        """Short, for the picker itself."""
        if self.error:
            return f"{self.name} (cannot be used)"
        return f"{self.name} ({self.family}, {self.precision})"

    def details(self) -> str:
        """Everything the picker says about the bundle, under it."""
        if self.error:
            return self.error
        return f"{self.family} · {self.precision} · {self.target} · {self.fit}"


def engine_target(manifest: dict) -> str:
    """'ONNX' or e.g. 'TensorRT-RTX sm89/120': what the bundle carries besides its ONNX files."""
    engines = manifest.get("engines") or []
    if not engines:
        return "ONNX"
    names = {"tensorrt-rtx": "TensorRT-RTX", "tensorrt": "TensorRT"}
    flavours: dict[str, set[str]] = {}
    for rec in engines:
        flavours.setdefault(names.get(rec.get("flavour", ""), rec.get("flavour", "?")), set()).add(str(rec.get("sm")))
    return ", ".join(f"{f} sm{'/'.join(sorted(sms, key=lambda s: int(s) if s.isdigit() else 0))}"
                     for f, sms in sorted(flavours.items()))


def this_gpu(reader: GpuReader | None = None) -> GpuSpec | None:
    """The GPU the runtime will use: CUDA device 0 joined to its NVML record by UUID (CUDA and NVML can number
    GPUs differently), else NVML's first GPU when this PyTorch cannot use CUDA (the plan still helps)."""
    from app.planning.devices import current_cuda_gpu

    g = current_cuda_gpu(0, reader) or next(iter(read_gpus(reader)), None)
    return gpu_spec_from_info(g) if g else None


def plan_for(bundle: Bundle, gpu: GpuSpec | None, width: int, height: int, batch: int = 1,
             references: int = 0) -> Plan:
    """The runtime's own plan: the bundle's real bytes per component, the same staging it will do; FLUX.2
    Klein's input images (references, and the image inpainted: its tokens condition every step) grow the
    transformer's activations."""
    return bundle_plan(bundle, gpu, width, height, batch, references=references)


def fit_text(plan: Plan) -> str:
    if plan.gpu is None:
        return "CPU only (no NVIDIA GPU)"
    if plan.strategy == "does-not-fit":
        return f"won't fit {plan.gpu.name}"
    if plan.strategy == "cannot-run":
        return f"cannot run on {plan.gpu.name} (SM {int(plan.gpu.sm) / 10:.1f}): re-export with --precision bf16"
    return f"fits {plan.gpu.name} ({plan.staging_text()}, peak {plan.peak_bytes / GIB:.1f} GiB)"


def fit_warning(plan: Plan) -> str:
    """'' when the plan fits, else one sentence for the user."""
    if plan.strategy == "cannot-run":
        return plan.cannot_run
    if plan.strategy != "does-not-fit":
        return ""
    return (f"The plan says {plan.width}x{plan.height} needs about {plan.peak_bytes / GIB:.1f} GiB but only "
            f"{(plan.usable_bytes or 0) / GIB:.1f} GiB of VRAM is usable on {plan.gpu.name}; "
            "pick a smaller size or close other GPU programs.")


def describe(path: Path, gpu: GpuSpec | None) -> BundleEntry:
    path = Path(path)
    try:
        bundle = load_bundle(path, verify=False)  # checksums are verified when the model is loaded to run
        d = bundle.defaults
        return BundleEntry(path=path, name=path.name,
                           family=bundle.manifest["family"], precision=bundle.precision,
                           target=engine_target(bundle.manifest), fit=fit_text(plan_for(bundle, gpu, d["width"],
                                                                                          d["height"])))
    except (EdgegenError, KeyError, TypeError, ValueError) as e:
        return BundleEntry(path=path, name=path.name, error=str(e) or type(e).__name__)


def find_bundles(folders: list[Path], gpu: GpuSpec | None, extra: list[Path] = ()) -> list[BundleEntry]:
    """Every bundle directly inside `folders` (hidden, half-written exports skipped), plus `extra` ones."""
    from app.bundle.locations import find_bundles as bundles_in

    found = bundles_in([Path(f) for f in folders if Path(f).is_dir()])
    for p in extra:
        if p and (Path(p) / MANIFEST_NAME).is_file() and Path(p).resolve() not in {f.resolve() for f in found}:
            found.insert(0, Path(p))
    return [describe(p, gpu) for p in found]
