"""Run a bundle's TensorRT / TensorRT-RTX engines on this GPU, after proving they were built for it.

The checks (engine vs GPU/version, checksum, profile choice, buffer plan, backend choice) are pure functions
tested on the CPU build machine. Everything from deserialisation on — `TensorRTBackend.load/run`, the
TensorRT-RTX runtime cache, weight-streaming budgets — is written against the documented TensorRT 11 /
TensorRT-RTX 1.7 Python API and has NEVER run on a GPU (VERIFIED_ON_HARDWARE below); the tests marked
`gpu` cover it.
"""

from __future__ import annotations

import hashlib
import importlib
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import BundleError, EdgegenError, UsageError
from app.runtime.gpu import GpuInfo, normalise_uuid
from app.runtime.plan import choose_precision, engine_flavour_for_sm, normalise_sm, precision_supported

VERIFIED_ON_HARDWARE = False  # deserialise/execute/runtime-cache paths have never run on a GPU

LABELS = {"tensorrt-rtx": "TensorRT-RTX", "tensorrt": "TensorRT"}
MODULES = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}
# TensorRT DataType names -> (torch dtype attribute, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "FLOAT": ("float32", 4),
    "HALF": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "INT32": ("int32", 4),
    "INT64": ("int64", 8),
    "INT8": ("int8", 1),
    "UINT8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "FP8": ("float8_e4m3fn", 1),
}

Shape = tuple[int, ...]


def _short(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


def installed_versions() -> dict[str, str | None]:
    """Installed TensorRT-RTX / TensorRT versions (None when missing or unusable)."""
    out: dict[str, str | None] = {}
    for flavour, module in MODULES.items():
        try:
            out[flavour] = str(importlib.import_module(module).__version__)
        except Exception:  # a bindings wheel without its native libraries raises OSError, not ImportError
            out[flavour] = None
    return out


# ---------------------------------------------------------------- compatibility


EXPORTABLE_PRECISIONS = ("fp32", "fp8")  # what `edgegen export --precision` accepts (export/exporter.py)


def rebuild_command(source: str, bundle: str | Path, sm: str, precision: str | None = None) -> str:
    """The exact export command that rebuilds a bundle (in place, hence --overwrite) for a GPU of SM `sm`."""
    sm = normalise_sm(sm)
    cmd = (
        f"edgegen export --model {shlex.quote(str(source))} --out {shlex.quote(str(bundle))} "
        f"--target {engine_flavour_for_sm(sm)} --sm {sm}"
    )
    if precision and not precision_supported(precision, sm):
        # e.g. an FP8 bundle moved to an sm86 GPU. The exporter writes fp32 or fp8 today (bf16 is refused), so
        # the command that works is fp32 even where choose_precision() would prefer bf16 engines.
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
    return Path(base) / f"trtrtx-{_short(version)}-{normalise_uuid(gpu_uuid)}.cache"


# ---------------------------------------------------------------- shapes and buffers


def normalise_profiles(profiles: Sequence[Mapping[str, Any]]) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Accept the record's JSON form ({"min","opt","max"}) or build_engine's (min, opt, max) tuples."""
    out = []
    for p in profiles:
        q = {}
        for name, v in p.items():
            mn, op, mx = (v["min"], v["opt"], v["max"]) if isinstance(v, Mapping) else v
            q[name] = (tuple(mn), tuple(op), tuple(mx))
        out.append(q)
    return out


def select_profile(
    profiles: Sequence[Mapping[str, Any]], shapes: Mapping[str, Shape], *, component: str = "engine"
) -> int:
    """Index of the profile that admits every given shape, preferring the one whose opt shapes are nearest."""
    best: tuple[int, int] | None = None
    for i, p in enumerate(normalise_profiles(profiles)):
        fits, dist = True, 0
        for name, (mn, op, mx) in p.items():
            s = tuple(shapes.get(name, op))
            if len(s) != len(mn) or not all(a <= d <= b for a, d, b in zip(mn, s, mx, strict=True)):
                fits = False
                break
            dist += sum(abs(d - o) for d, o in zip(s, op, strict=True))
        if fits and (best is None or dist < best[0]):
            best = (dist, i)
    if best is None:
        ranges = "; ".join(
            ", ".join(f"{n} {list(mn)}..{list(mx)}" for n, (mn, _, mx) in p.items())
            for p in normalise_profiles(profiles)
        )
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise BundleError(
            f"The {component} engine accepts {ranges}, not {got}; choose a size inside that range or "
            "re-export with --min-size/--max-size covering it."
        )
    return best[1]


@dataclass(frozen=True)
class TensorBuffer:
    name: str
    mode: str  # "input" | "output"
    shape: Shape
    dtype: str  # torch dtype attribute name
    nbytes: int


def validate_inputs(io: Mapping[str, Any], shapes: Mapping[str, Shape]) -> None:
    """Check names, ranks and fixed dims of inputs against the engine's I/O (ValueError: a pipeline bug)."""
    want = io["inputs"]
    if set(shapes) != set(want):
        raise ValueError(f"engine inputs are {sorted(want)}, got {sorted(shapes)}")
    for name, spec in want.items():
        s, w = tuple(shapes[name]), tuple(spec["shape"])
        if len(s) != len(w) or any(d >= 0 and d != x for d, x in zip(w, s, strict=True)):
            raise ValueError(f"input {name} has shape {list(s)}; the engine expects {list(w)} (-1 = any)")


def plan_buffers(
    io: Mapping[str, Any], input_shapes: Mapping[str, Shape], output_shapes: Mapping[str, Shape]
) -> list[TensorBuffer]:
    """Every I/O tensor with its concrete shape, torch dtype and size, inputs first in engine order."""
    validate_inputs(io, input_shapes)
    out = []
    for mode, shapes in (("input", input_shapes), ("output", output_shapes)):
        for name, spec in io[mode + "s"].items():
            if name not in shapes:
                raise ValueError(f"no shape for {mode} {name}")
            s = tuple(int(d) for d in shapes[name])
            if any(d < 0 for d in s):  # data-dependent output sizes would need an IOutputAllocator
                raise ValueError(f"{mode} {name} has unresolved shape {list(s)}")
            if spec["dtype"] not in DTYPES:
                raise ValueError(f"{mode} {name} has unsupported dtype {spec['dtype']}")
            torch_name, size = DTYPES[spec["dtype"]]
            n = 1
            for d in s:
                n *= d
            out.append(TensorBuffer(name, mode, s, torch_name, n * size))
    return out


# ---------------------------------------------------------------- backend choice


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
        elif not bad:
            rec0 = find_engine(next(iter(with_engines.values())), gpu.sm, installed)[0]
            rest = sorted(set(engines) - set(with_engines))
            tail = f"; {', '.join(rest)} without an engine run on ONNX Runtime" if rest else ""
            return "tensorrt", (
                f"{LABELS[rec0['flavour']]} {_short(rec0['version'])}: the bundle's engines match "
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


# ---------------------------------------------------------------- the backend (never run on hardware)


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
        from app.runtime.gpu import current_cuda_gpu

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
        flav = {LABELS[r["flavour"]] + " " + _short(r["version"]) for r in self.records.values()}
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

        from export.engines import _logger, import_trt

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
        from export.engines import write_atomic

        try:
            write_atomic(L.cache_path, L.runtime_cache.serialize())
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
