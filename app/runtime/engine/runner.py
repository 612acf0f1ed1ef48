"""Engine backends: sessions per component on one CUDA device; TensorRTBackend loads them from checked plans.

`EngineBackend` is the part every engine shares (open a session on first use, run it, release it for
low-VRAM staging). `TensorRTBackend` adds deserialisation, the TensorRT-RTX runtime cache and weight
streaming; that part is written against the documented TensorRT 11 / TensorRT-RTX 1.7 Python API and has
NEVER run on a GPU (VERIFIED_ON_HARDWARE). The CPU suite drives EngineBackend and EngineSession with a
stand-in context on fake CUDA tensors (tests/test_device_pipeline.py); the tests marked `gpu` cover the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.bundle.files import atomic_write_bytes
from app.errors import BundleError, EdgegenError, UsageError
from app.planning.devices import GpuInfo
from app.runtime.engine.compat import (
    check_engine_compatible,
    engine_file,
    rebuild_command,
    runtime_cache_path,
)
from app.runtime.engine.session import EngineSession
from app.runtime.engine.shapes import Shape
from app.runtime.engine.trt import LABELS, _logger, import_trt, installed_versions, short_version

VERIFIED_ON_HARDWARE = False  # deserialise/execute/runtime-cache paths have never run on a GPU


class EngineBackend:
    """Runs each component through an EngineSession on one CUDA device; subclasses say how a session opens.

    Not thread-safe: one caller at a time (the app and server run one job per GPU)."""

    name = "tensorrt"

    def __init__(self, device: torch.device):
        self.device = device
        self._sessions: dict[str, EngineSession] = {}

    def open_session(self, component: str) -> EngineSession:
        raise NotImplementedError

    def session(self, component: str) -> EngineSession:
        if component not in self._sessions:
            self._sessions[component] = self.open_session(component)
        return self._sessions[component]

    def run(self, component: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inputs on `self.device`; outputs on it too, valid until the next run of the same component."""
        return self.session(component)(inputs)

    def release(self, component: str) -> None:
        """Free a component's engine, buffers and activation memory (low-VRAM staging)."""
        s = self._sessions.pop(component, None)
        if s is not None:
            s.release()
        self.on_release(component)

    def on_release(self, component: str) -> None:
        pass

    def close(self) -> None:
        for c in list(self._sessions):
            self.release(c)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class _Loaded:
    record: Mapping[str, Any]
    runtime: Any
    engine: Any
    context: Any
    runtime_config: Any = None
    runtime_cache: Any = None
    cache_path: Path | None = None
    cache_saved: bool = False


class TensorRTBackend(EngineBackend):
    """Each component's engine from the bundle, loaded on first use and released for low-VRAM staging.

    `engines` maps component -> candidate engine records from the manifest (one per target SM); the one built
    for this GPU is chosen and checked before anything is deserialised.
    """

    def __init__(
        self,
        bundle_dir: Path,
        engines: Mapping[str, Sequence[Mapping[str, Any]]],
        *,
        source_model: str,
        device: int = 0,
        gpu: GpuInfo | None = None,
        installed: Mapping[str, str | None] | None = None,
        weight_streaming_budget: Mapping[str, int] | None = None,
        runtime_cache_dir: Path | None = None,
    ):
        from app.planning.devices import current_cuda_gpu

        super().__init__(torch.device("cuda", device))
        self.bundle_dir = Path(bundle_dir)
        self.source_model = source_model
        self.gpu = gpu or current_cuda_gpu(device)
        if self.gpu is None:
            raise UsageError(
                "The TensorRT backend needs an NVIDIA GPU and a CUDA build of PyTorch, and this machine "
                "has no usable one; run with --backend onnxruntime."
            )
        installed = installed if installed is not None else installed_versions()
        self.records = {
            c: check_engine_compatible(
                r, component=c, gpu=self.gpu, installed=installed, source=source_model, bundle=self.bundle_dir
            )
            for c, r in engines.items()
        }
        self.budgets = dict(weight_streaming_budget or {})
        self.runtime_cache_dir = runtime_cache_dir
        self._loaded: dict[str, _Loaded] = {}

    def describe(self) -> str:
        flav = {LABELS[r["flavour"]] + " " + short_version(r["version"]) for r in self.records.values()}
        parts = ", ".join(f"{c} {r.get('precision', '?')}" for c, r in self.records.items())
        return f"{' + '.join(sorted(flav))} on {self.gpu.name} (sm{self.gpu.sm}): {parts}"

    def _rebuild(self) -> str:
        return rebuild_command(self.source_model, self.bundle_dir, self.gpu.sm)

    # -- loading
    def open_session(self, component: str) -> EngineSession:
        if component not in self.records:
            raise BundleError(f"the bundle {self.bundle_dir} has no engine for {component}; rebuild it with: "
                              f"{self._rebuild()}")
        index = self.device.index
        rec = self.records[component]
        path = engine_file(self.bundle_dir, rec)
        blob = path.read_bytes()
        # Hash the very bytes we deserialise: a plan is executable code, and a check on another read is racy.
        if hashlib.sha256(blob).hexdigest() != rec.get("sha256"):
            raise BundleError(
                f"{path} does not match its checksum in the manifest; the bundle was modified or "
                f"damaged; rebuild it with: {self._rebuild()}"
            )
        torch.cuda.set_device(index)
        torch.zeros(1, device=self.device)  # make the primary CUDA context current for TensorRT
        trt = import_trt(rec["flavour"])
        runtime = trt.Runtime(_logger(trt))
        runtime.engine_host_code_allowed = False  # never run host code embedded in a plan
        if hasattr(runtime, "get_engine_validity"):
            validity, diag = runtime.get_engine_validity(memoryview(blob))
            if validity == trt.EngineValidity.INVALID:
                raise BundleError(
                    f"{LABELS[rec['flavour']]} reports the {component} engine invalid on this machine "
                    f"(diagnostics {int(diag):#x}); rebuild it with: "
                    f"{self._rebuild()}"
                )
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise EdgegenError(
                f"{LABELS[rec['flavour']]} could not load {path.name}; rebuild it with: {self._rebuild()}"
            )
        del blob
        if rec.get("weight_streaming") and component in self.budgets:
            engine.weight_streaming_budget_v2 = int(self.budgets[component])
        # Activation memory sized per request (the session asks for the size of the shapes at hand), not
        # STATIC for the profile's largest shapes: a 256..2048 profile would reserve 2048-px activations.
        user_memory = hasattr(trt.ExecutionContextAllocationStrategy, "USER_MANAGED")
        strategy = (
            trt.ExecutionContextAllocationStrategy.USER_MANAGED if user_memory
            else trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
        )
        rc = cache = cache_path = None
        if hasattr(engine, "create_runtime_config"):
            rc = engine.create_runtime_config()
            rc.set_execution_context_allocation_strategy(strategy)
            if rec["flavour"] == "tensorrt-rtx":
                cache = rc.create_runtime_cache()
                cache_path = runtime_cache_path(self.gpu.uuid, rec["version"], self.runtime_cache_dir)
                if cache_path.is_file():
                    cache.deserialize(
                        cache_path.read_bytes()
                    )  # False on mismatch: start empty, overwrite later
                rc.set_runtime_cache(cache)
            context = engine.create_execution_context(rc)
        else:
            context = engine.create_execution_context(strategy)
        if context is None:
            raise EdgegenError(
                f"Not enough GPU memory to run the {component} engine; close other GPU programs "
                "or use a smaller size."
            )
        io: dict[str, dict[str, dict]] = {"inputs": {}, "outputs": {}}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "inputs" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "outputs"
            io[mode][name] = {
                "dtype": engine.get_tensor_dtype(name).name,
                "shape": list(engine.get_tensor_shape(name)),
            }

        def profile_shape(name: str, p: int) -> tuple[Shape, Shape, Shape]:
            static = tuple(io["inputs"][name]["shape"])
            if all(d >= 0 for d in static):
                return static, static, static  # fixed inputs have no profile range to ask for
            return tuple(tuple(s) for s in engine.get_tensor_profile_shape(name, p))

        profiles = [
            {n: profile_shape(n, p) for n in io["inputs"]} for p in range(engine.num_optimization_profiles)
        ]
        self._loaded[component] = _Loaded(rec, runtime, engine, context, rc, cache, cache_path)
        return EngineSession(component, io, profiles, context, self.device,
                             stream=lambda: torch.cuda.current_stream(self.device).cuda_stream,
                             label=LABELS[rec["flavour"]], user_memory=user_memory)

    def run(self, component: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().run(component, inputs)
        L = self._loaded[component]
        if L.runtime_cache is not None and not L.cache_saved:
            # Kernels are JIT-compiled on the first run; keep them even if the process dies later. This one
            # synchronisation happens once per component and process, never in the steady state.
            torch.cuda.current_stream(self.device).synchronize()
            self._save_cache(L)
        return out

    def _save_cache(self, L: _Loaded) -> None:
        if L.runtime_cache is None or L.cache_path is None:
            return
        try:
            atomic_write_bytes(L.cache_path, L.runtime_cache.serialize())
            L.cache_saved = True
        except OSError:
            pass  # a cache is an optimisation; a read-only home must not break generation

    def on_release(self, component: str) -> None:
        L = self._loaded.pop(component, None)
        if L is None:
            return
        self._save_cache(L)
        del L
        torch.cuda.empty_cache()
