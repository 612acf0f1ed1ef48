"""TensorRTBackend: load a checked engine, keep its context, run it on torch CUDA tensors.

Written against the documented TensorRT 11 / TensorRT-RTX 1.7 Python API; it has NEVER run on a GPU
(VERIFIED_ON_HARDWARE). The tests marked `gpu` cover it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.bundle.files import atomic_write_bytes
from app.errors import BundleError, EdgegenError, UsageError
from app.planning.devices import GpuInfo
from app.runtime.engine.compat import (
    check_engine_compatible,
    engine_file,
    rebuild_command,
    runtime_cache_path,
)
from app.runtime.engine.shapes import DTYPES, Shape, plan_buffers, select_profile, validate_inputs
from app.runtime.engine.trt import LABELS, _logger, import_trt, installed_versions, short_version

VERIFIED_ON_HARDWARE = False  # deserialise/execute/runtime-cache paths have never run on a GPU


@dataclass
class _Loaded:
    record: Mapping[str, Any]
    trt: Any
    runtime: Any
    engine: Any
    context: Any
    io: dict[str, dict[str, dict]]
    profiles: list[dict[str, tuple[Shape, Shape, Shape]]]
    stream: Any
    runtime_config: Any = None
    runtime_cache: Any = None
    cache_path: Path | None = None
    cache_saved: bool = False
    keep: list = field(default_factory=list)


class TensorRTBackend:
    """Runs each component's engine. Components load on first use and can be unloaded for low-VRAM staging.

    `engines` maps component -> candidate engine records from the manifest (one per target SM); the one built
    for this GPU is chosen and checked before anything is deserialised. Not thread-safe: one caller at a time.
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

        self.bundle_dir = Path(bundle_dir)
        self.source_model = source_model
        self.device = device
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
    def load(self, component: str) -> _Loaded:
        if component in self._loaded:
            return self._loaded[component]
        if component not in self.records:
            raise ValueError(f"no engine for component {component}; have {sorted(self.records)}")
        import torch

        rec = self.records[component]
        path = engine_file(self.bundle_dir, rec)
        blob = path.read_bytes()
        # Hash the very bytes we deserialise: a plan is executable code, and a check on another read is racy.
        if hashlib.sha256(blob).hexdigest() != rec.get("sha256"):
            raise BundleError(
                f"{path} does not match its checksum in the manifest; the bundle was modified or "
                f"damaged; rebuild it with: {self._rebuild()}"
            )
        torch.cuda.set_device(self.device)
        torch.zeros(1, device=f"cuda:{self.device}")  # make the primary CUDA context current for TensorRT
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
        # One profile: allocate once. Several: only the active profile's memory (matters in low-VRAM stages).
        strategy = (
            trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
            if engine.num_optimization_profiles > 1
            else trt.ExecutionContextAllocationStrategy.STATIC
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
        loaded = _Loaded(
            rec,
            trt,
            runtime,
            engine,
            context,
            io,
            profiles,
            torch.cuda.Stream(self.device),
            rc,
            cache,
            cache_path,
        )
        self._loaded[component] = loaded
        return loaded

    def _save_cache(self, L: _Loaded) -> None:
        if L.runtime_cache is None or L.cache_path is None:
            return
        try:
            atomic_write_bytes(L.cache_path, L.runtime_cache.serialize())
            L.cache_saved = True
        except OSError:
            pass  # a cache is an optimisation; a read-only home must not break generation

    def unload(self, component: str) -> None:
        L = self._loaded.pop(component, None)
        if L is None:
            return
        self._save_cache(L)
        del L
        import torch

        torch.cuda.empty_cache()

    def close(self) -> None:
        for c in list(self._loaded):
            self.unload(c)

    def __enter__(self) -> TensorRTBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- running
    def run(self, component: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run one component; inputs are torch tensors (any device/dtype; cast to what the engine takes)."""
        import torch

        L = self.load(component)
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        validate_inputs(L.io, shapes)
        idx = select_profile(L.profiles, shapes, component=component)
        dev = torch.device("cuda", self.device)
        ctx = L.context
        with torch.cuda.device(dev):
            caller = torch.cuda.current_stream(dev)
            if ctx.active_optimization_profile != idx:
                ctx.set_optimization_profile_async(idx, L.stream.cuda_stream)
            feeds = {}
            for name, spec in L.io["inputs"].items():
                t = inputs[name].to(device=dev, dtype=getattr(torch, DTYPES[spec["dtype"]][0])).contiguous()
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise BundleError(
                        f"The {component} engine refused shape {list(t.shape)} for {name}; "
                        "choose a size inside the bundle's range."
                    )
                feeds[name] = t
            out_shapes = {n: tuple(ctx.get_tensor_shape(n)) for n in L.io["outputs"]}
            buffers = plan_buffers(L.io, shapes, out_shapes)
            outs = {
                b.name: torch.empty(b.shape, dtype=getattr(torch, b.dtype), device=dev)
                for b in buffers
                if b.mode == "output"
            }
            for name, t in {**feeds, **outs}.items():
                ctx.set_tensor_address(name, t.data_ptr())
            L.stream.wait_stream(caller)  # inputs may still be being written on the caller's stream
            if not ctx.execute_async_v3(L.stream.cuda_stream):
                raise EdgegenError(f"{LABELS[L.record['flavour']]} failed to run the {component} engine.")
            for t in feeds.values():
                t.record_stream(L.stream)  # keep input memory alive until the engine has read it
            caller.wait_stream(L.stream)
        if not L.cache_saved:
            L.stream.synchronize()
            self._save_cache(
                L
            )  # kernels are JIT-compiled on first run; keep them even if the process dies later
        return outs

