"""The Backend protocol and its ONNX Runtime and PyTorch-reference implementations."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from app.errors import BundleError, UsageError
from app.runtime.manifest import Bundle

BackendName = Literal["auto", "onnxruntime", "tensorrt", "torch"]


class Backend(Protocol):
    """Runs one bundle component on named torch tensors and returns named torch tensors."""

    name: str

    def run(self, component: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def describe(self) -> str: ...


def ort_session_options():
    """Session options for every bundle ONNX, FP8 included.

    onnxruntime 1.32 runs FP8 Q/DQ graphs at every optimisation level; 1.24-1.31 fail at the default level
    (MatMulIntegerToFloat fusion), so with those the level drops to BASIC rather than failing."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if (major, minor) >= (1, 32)
        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    so.log_severity_level = 3
    return so


class OrtBackend:
    """ONNX Runtime: CUDA EP when present and asked for, otherwise CPU. Sessions open on first use."""

    def __init__(self, bundle: Bundle, device: Literal["cpu", "cuda"] = "cpu"):
        import onnxruntime as ort

        self.bundle, self.device = bundle, device
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise UsageError("ONNX Runtime here has no CUDA provider; install onnxruntime-gpu or use --backend onnxruntime")
        self.providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + ["CPUExecutionProvider"]
        self.name = f"onnxruntime-{device}"
        self._sessions: dict[str, object] = {}
        self._dtypes: dict[str, dict[str, np.dtype]] = {}

    def session(self, component: str):
        if component not in self._sessions:
            import onnxruntime as ort

            spec = self.bundle.components()[component]
            self._sessions[component] = ort.InferenceSession(
                str(self.bundle.onnx_path(component)), sess_options=ort_session_options(), providers=self.providers
            )
            self._dtypes[component] = {i["name"]: np.dtype(i["dtype"]) for i in spec["inputs"]}
        return self._sessions[component]

    def run(self, component, inputs):
        sess = self.session(component)
        dtypes = self._dtypes[component]
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=dtypes[k]) for k, v in inputs.items()}
        names = [o.name for o in sess.get_outputs()]
        return {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, sess.run(names, feeds))}

    def describe(self) -> str:
        return f"ONNX Runtime {self.device.upper()} ({self.bundle.precision})"


class TorchBackend:
    """The PyTorch reference: the diffusers modules from the bundle's source folder, in the export wrappers."""

    name = "torch"

    def __init__(self, bundle: Bundle, model: Path | None = None):
        from app.runtime.files import sha256_file
        from app.runtime.modelfolder import inspect_folder

        self.bundle = bundle
        src = Path(model or bundle.manifest["source"]["path"])
        if not (src / "model_index.json").is_file():
            raise BundleError(f"the PyTorch reference needs the source model folder {src}, which is not here; "
                              "pass --model DIR or use --backend onnxruntime")
        if sha256_file(src / "model_index.json") != bundle.manifest["source"]["model_index_sha256"]:
            raise BundleError(f"{src} is not the model this bundle was exported from; pass the right --model")
        self.folder = inspect_folder(src, bundle.manifest["family"])
        self._modules: dict[str, torch.nn.Module] = {}

    def module(self, component: str) -> torch.nn.Module:
        if component not in self._modules:
            from app.runtime.modelfolder import load_component
            from app.runtime.wrappers import wrap

            spec = self.folder.family.component(component)
            self._modules[component] = wrap(spec, load_component(self.folder, spec.source))
        return self._modules[component]

    def run(self, component, inputs):
        spec = self.folder.family.component(component)
        with torch.no_grad():
            out = self.module(component)(*[inputs[t.name] for t in spec.inputs])
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(spec.outputs, out)}

    def describe(self) -> str:
        return "PyTorch reference (diffusers modules, FP32)"


def make_backend(bundle: Bundle, requested: BackendName = "auto", model: Path | None = None) -> tuple[Backend, str]:
    """The backend to use and a sentence saying why; explicit requests never fall back silently."""
    if requested == "torch":
        return TorchBackend(bundle, model), "PyTorch reference, as requested"
    choice, reason = _choice(bundle, requested)
    if choice == "tensorrt":
        from app.runtime.trt_backend import TensorRTBackend

        backend = TensorRTBackend(bundle.root, _engines_by_component(bundle),
                                  source_model=bundle.manifest["source"]["path"])
        return backend, reason
    return OrtBackend(bundle, "cuda" if choice == "onnxruntime-cuda" else "cpu"), reason


def _engines_by_component(bundle: Bundle) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for rec in bundle.manifest.get("engines", []):
        out.setdefault(rec["component"], []).append(rec)
    return out


def _choice(bundle: Bundle, requested: str) -> tuple[str, str]:
    import onnxruntime as ort

    from app.runtime.gpu import read_gpus
    from app.runtime.trt_backend import choose_backend, installed_versions

    return choose_backend(
        requested, gpus=read_gpus(), engines=_engines_by_component(bundle), installed=installed_versions(),
        ort_providers=ort.get_available_providers(), torch_cuda=torch.cuda.is_available(),
        source=bundle.manifest["source"]["path"], bundle=str(bundle.root),
    )
