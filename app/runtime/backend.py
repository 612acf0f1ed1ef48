"""The Backend protocol and the one place that chooses a backend for a bundle on this machine.

auto: a matching engine first, then ONNX Runtime CUDA, then ONNX Runtime CPU. An explicit --backend that
cannot work raises instead of silently falling back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from app.bundle.manifest import Bundle
from app.errors import BundleError, UsageError
from app.planning.devices import GpuInfo
from app.runtime.engine.compat import check_engine_compatible, find_engine, rebuild_command
from app.runtime.engine.trt import LABELS, short_version

BackendName = Literal["auto", "onnxruntime", "tensorrt", "torch"]


class Backend(Protocol):
    """Runs one bundle component on named torch tensors and returns named torch tensors, all on `device`.

    Inputs must already be on `device` (a tensor elsewhere is a caller bug, refused or raised by torch). Returned
    tensors are valid until the next run of the same component: engine backends reuse their output buffers, so
    a caller copies what it keeps across runs of one component."""

    name: str
    device: torch.device

    def run(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def release(self, component: str) -> None:
        """Free what `component` holds on the device (low-VRAM staging); it reloads on its next run."""

    def describe(self) -> str: ...


class RoutedBackend:
    """Components split over backends on one device: engines where the bundle has them, the rest elsewhere."""

    def __init__(self, main: Backend, others: Mapping[str, Backend]):
        self.main, self.others = main, dict(others)
        self.name, self.device = main.name, main.device
        for c, b in self.others.items():
            if b.device != self.device:
                raise ValueError(f"{c} would run on {b.device}, the rest on {self.device}")

    def run(self, component, inputs):
        return self.others.get(component, self.main).run(component, inputs)

    def release(self, component: str) -> None:
        self.others.get(component, self.main).release(component)

    def describe(self) -> str:
        rest = {}
        for c, b in self.others.items():
            rest.setdefault(b.describe(), []).append(c)
        return self.main.describe() + "".join(f"; {', '.join(cs)} on {d}" for d, cs in rest.items())


def make_backend(bundle: Bundle, requested: BackendName = "auto", model: Path | None = None,
                 device: torch.device | None = None) -> tuple[Backend, str]:
    """The backend to use and a sentence saying why; explicit requests never fall back silently.

    `device` (from --device) picks the GPU; by default CUDA device 0 when torch can use it, else the CPU."""
    from app.runtime.device import resolve

    dev = resolve(device)
    if requested == "torch":
        from app.runtime.torch_backend import TorchBackend

        return TorchBackend(bundle, model, dev.torch), f"PyTorch reference on {dev}, as requested"
    choice, reason = _choice(bundle, requested, dev)
    if choice == "tensorrt":
        from app.runtime.engine.runner import TensorRTBackend

        engines = _engines_by_component(bundle)
        backend = TensorRTBackend(bundle.root, engines, source_model=bundle.manifest["source"]["path"],
                                  device=dev.torch.index, gpu=dev.gpu)
        missing = [c for c in bundle.components() if not engines.get(c)]
        if missing:
            from app.runtime.ort_backend import OrtBackend

            rest = OrtBackend(bundle, dev.torch)  # refuses with the fix when ONNX Runtime has no CUDA provider
            backend = RoutedBackend(backend, {c: rest for c in missing})
        return backend, reason
    from app.runtime.ort_backend import OrtBackend

    return OrtBackend(bundle, dev.torch if choice == "onnxruntime-cuda" else torch.device("cpu")), reason


def _engines_by_component(bundle: Bundle) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for rec in bundle.manifest.get("engines", []):
        out.setdefault(rec["component"], []).append(rec)
    return out


def _choice(bundle: Bundle, requested: str, dev) -> tuple[str, str]:
    import onnxruntime as ort

    from app.planning.devices import read_gpus
    from app.runtime.engine.trt import installed_versions

    # The resolved CUDA device's GPU, not NVML's first one: the two can number GPUs differently.
    gpus = [dev.gpu] if dev.is_cuda else read_gpus()
    return choose_backend(
        requested, gpus=gpus, engines=_engines_by_component(bundle), installed=installed_versions(),
        ort_providers=ort.get_available_providers(), torch_cuda=dev.is_cuda,
        source=bundle.manifest["source"]["path"], bundle=str(bundle.root), components=list(bundle.components()),
    )


def choose_backend(
    requested: str,
    *,
    gpus: Sequence[GpuInfo],
    engines: Mapping[str, Sequence[Mapping[str, Any]]],
    installed: Mapping[str, str | None],
    ort_providers: Sequence[str],
    torch_cuda: bool = True,
    source: str = "<model>",
    bundle: str | Path = "<bundle>",
    components: Sequence[str] | None = None,
) -> tuple[str, str]:
    """(choice, one-sentence reason) for --backend: tensorrt, onnxruntime-cuda, onnxruntime-cpu or torch.

    auto: a matching engine first, then ONNX Runtime CUDA, then ONNX Runtime CPU. An explicit --backend that
    cannot work raises instead of silently falling back.
    """
    if requested not in ("auto", "tensorrt", "onnxruntime", "torch"):
        raise UsageError(f"--backend {requested} is not a backend; use auto, onnxruntime, tensorrt or torch.")
    if requested == "torch":
        return "torch", "PyTorch: requested with --backend torch"
    gpu = gpus[0] if gpus else None  # CUDA device 0 is the one the runtime uses
    has_cuda_ort = gpu is not None and "CUDAExecutionProvider" in ort_providers
    if requested == "onnxruntime":
        if has_cuda_ort:
            return (
                "onnxruntime-cuda",
                f"ONNX Runtime CUDA: requested with --backend onnxruntime on {gpu.name}",
            )
        why = "no NVIDIA GPU found" if gpu is None else "ONNX Runtime's CUDA provider is not installed"
        return "onnxruntime-cpu", f"ONNX Runtime CPU: requested with --backend onnxruntime and {why}"

    with_engines = {c: r for c, r in engines.items() if r}
    if gpu is None:
        if requested == "tensorrt":
            raise UsageError("--backend tensorrt needs an NVIDIA GPU and none was found; use --backend auto.")
        return "onnxruntime-cpu", "ONNX Runtime CPU: no NVIDIA GPU found, so no TensorRT engine can run"
    if not with_engines:
        why_not = "the bundle has no TensorRT engines"
        if requested == "tensorrt":
            raise BundleError(
                f"The bundle {bundle} has no TensorRT engines; rebuild it with: "
                f"{rebuild_command(source, bundle, gpu.sm)}"
            )
    else:
        bad = {}
        for comp, recs in with_engines.items():
            rec, reasons = find_engine(recs, gpu.sm, installed)
            if rec is None:
                bad[comp] = reasons[0]
        if bad and requested == "tensorrt":
            comp = next(iter(bad))
            check_engine_compatible(
                with_engines[comp], component=comp, gpu=gpu, installed=installed, source=source, bundle=bundle
            )
        if not bad and not torch_cuda:
            why_not = (
                "PyTorch here is a CPU build, so TensorRT engines cannot be fed (install the CUDA build)"
            )
            if requested == "tensorrt":
                raise UsageError(f"--backend tensorrt: {why_not}.")
        elif not bad and (rest := sorted(set(components or engines) - set(with_engines))) and not has_cuda_ort:
            # Components without an engine would have to run on ONNX Runtime CUDA next to the engines; without
            # that provider the whole pipeline runs on ONNX Runtime CPU (never half on the CPU, half on the GPU).
            why_not = (f"the bundle has no engine for {', '.join(rest)} and ONNX Runtime here has no CUDA provider "
                       f"(rebuild: {rebuild_command(source, bundle, gpu.sm)})")
            if requested == "tensorrt":
                raise BundleError(f"--backend tensorrt: {why_not}; or install onnxruntime-gpu.")
        elif not bad:
            rec0 = find_engine(next(iter(with_engines.values())), gpu.sm, installed)[0]
            tail = f"; {', '.join(rest)} without an engine run on ONNX Runtime CUDA" if rest else ""
            return "tensorrt", (
                f"{LABELS[rec0['flavour']]} {short_version(rec0['version'])}: the bundle's engines match "
                f"{gpu.name} (sm{gpu.sm}){tail}"
            )
        else:
            comp, why = next(iter(bad.items()))
            prec = with_engines[comp][0].get("precision")
            cmd = rebuild_command(source, bundle, gpu.sm, prec)
            why_not = f"the {comp} engine cannot run because {why} (rebuild: {cmd})"
            if why.endswith("is not installed"):
                label = LABELS[with_engines[comp][0]["flavour"]]
                why_not = f"the {comp} engine needs {label}, which is not installed"
    if has_cuda_ort:
        return "onnxruntime-cuda", f"ONNX Runtime CUDA: {why_not}"
    return (
        "onnxruntime-cpu",
        f"ONNX Runtime CPU: {why_not}, and ONNX Runtime's CUDA provider is not installed",
    )

