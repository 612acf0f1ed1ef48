"""Build TensorRT-RTX or TensorRT 11 engines from an ONNX file: one code path, atomic writes, a keyed record.

Hardware status (keep honest when this changes):
- TensorRT-RTX ahead-of-time builds (no GPU, any of sm75/80/86/89/120/121, FP32/FP16/BF16/FP8 Q/DQ) run in the
  test suite on the CPU build machine. None of their engines has been deserialised or run on a GPU from here.
- The full TensorRT 11 path (`flavour="tensorrt"`, optimisation level, per-GPU timing cache) is written
  against the documented TensorRT 11 Python API and has NEVER run: TensorRT 11 cannot be installed in CI.
- TensorRT-RTX with `refit=True` needs a GPU even ahead of time (seen: Myelin CUDA_SUCCESS check fails).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from app.bundle.files import atomic_write_bytes
from app.errors import EdgegenError, UsageError
from app.planning.policy import normalise_sm, precision_supported
from app.runtime.engine.trt import (  # noqa: F401  (FLAVOURS, FlavourInfo: re-exported for callers)
    FLAVOURS,
    FlavourInfo,
    _logger,
    _LogSink,
    flavour_info,
    import_trt,
    short_version,
)

VERIFIED_ON_HARDWARE = False  # no engine built here has been run on a GPU
VERIFIED_BUILD = {"tensorrt-rtx": True, "tensorrt": False}  # AOT build exercised in tests on CPU

Flavour = Literal["tensorrt-rtx", "tensorrt"]
Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
Progress = Callable[[str], None]


class EngineBuildError(EdgegenError):
    """TensorRT could not parse or build the graph (not the user's doing; exit code 1)."""


def engine_key(flavour: str, version: str, sm: str, precision: str, profile_desc: str) -> str:
    """`trtrtx-1.7.1-sm89-fp8-b1-128to1024`: everything an engine is tied to, safe as a file name."""
    desc = re.sub(r"[^a-z0-9]+", "-", profile_desc.lower()).strip("-") or "p"
    return (
        f"{flavour_info(flavour).key_prefix}-{short_version(version)}-sm{normalise_sm(sm)}-{precision}-{desc}"
    )


def describe_profiles(profiles: list[Profile]) -> str:
    """Default profile part of a key: batch range of the first input plus a short hash of all shapes."""
    batches = sorted({d for p in profiles for shapes in list(p.values())[:1] for s in shapes for d in s[:1]})
    b = f"b{batches[0]}" if len(batches) == 1 else f"b{batches[0]}to{batches[-1]}" if batches else "b0"
    digest = hashlib.sha256(repr(profiles_to_json(profiles)).encode()).hexdigest()[:6]
    return f"{b}-p{len(profiles)}-{digest}"


def profiles_to_json(profiles: list[Profile]) -> list[dict[str, dict[str, list[int]]]]:
    return [
        {name: {"min": list(mn), "opt": list(op), "max": list(mx)} for name, (mn, op, mx) in p.items()}
        for p in profiles
    ]


# ---------------------------------------------------------------- precision from the graph

_FP8_TYPES = {"FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"}


def graph_precision(onnx_path: Path) -> str:
    """fp8 if the graph has FLOAT8 Q/DQ (or FP8 weights), else the float type of most initializer elements.

    Strongly typed networks take precision from the graph itself, so the record must say what the graph says.
    """
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)  # types and dims only; weights stay on disk
    g = m.graph
    fp8 = {getattr(onnx.TensorProto, t) for t in _FP8_TYPES if hasattr(onnx.TensorProto, t)}
    dtypes = {t.name: t.data_type for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    dtypes[n.output[0]] = a.t.data_type
    if any(t in fp8 for t in dtypes.values()):
        return "fp8"
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            if len(n.input) > 2 and dtypes.get(n.input[2]) in fp8:
                return "fp8"
            if any(a.name == "output_dtype" and a.i in fp8 for a in n.attribute):
                return "fp8"
    counts: dict[int, int] = {}
    for t in g.initializer:
        n_el = 1
        for d in t.dims:
            n_el *= d
        counts[t.data_type] = counts.get(t.data_type, 0) + n_el
    names = {
        onnx.TensorProto.FLOAT: "fp32",
        onnx.TensorProto.FLOAT16: "fp16",
        onnx.TensorProto.BFLOAT16: "bf16",
    }
    floats = {names[k]: v for k, v in counts.items() if k in names}
    return max(floats, key=floats.get) if floats else "fp32"


# ---------------------------------------------------------------- logging and progress


_LOGGERS: dict[str, object] = {}


def _progress_monitor(trt, emit: Callable[[str], None]):
    """An IProgressMonitor that forwards phases and (throttled) steps, so long builds never look hung."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}
            self.last = 0.0

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = int(num_steps)
            if parent_phase is None or time.monotonic() - self.last > 0.5:
                self.last = time.monotonic()
                emit(f"{phase_name} (0/{num_steps})")

        def step_complete(self, phase_name, step):
            if time.monotonic() - self.last > 0.5:
                self.last = time.monotonic()
                emit(f"{phase_name} ({int(step) + 1}/{self.steps.get(phase_name, '?')})")
            return True

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()


@contextlib.contextmanager
def rich_progress(console=None) -> Iterator[Progress]:
    """A progress callback that shows the latest message (with elapsed time) in a rich spinner."""
    from rich.console import Console

    console = console or Console(stderr=True)
    with console.status("Building engine") as status:
        yield lambda msg: status.update(msg)


# ---------------------------------------------------------------- build


def _resolve_sm(fl: FlavourInfo, sm: str | None, precision: str) -> str:
    local = None
    if sm is None or fl.aot_targets is None:
        from app.planning.devices import current_cuda_gpu, read_gpus

        g = current_cuda_gpu() or next(iter(read_gpus()), None)
        local = g.sm if g else None
    if fl.aot_targets is None:  # full TensorRT: builds for the GPU it runs on, nothing else
        if local is None:
            raise UsageError(
                f"{fl.label} needs an NVIDIA GPU to build engines; use --target tensorrt-rtx "
                "(builds without one) or --target onnx."
            )
        if sm is not None and normalise_sm(sm) != local:
            raise UsageError(
                f"{fl.label} builds only for the GPU in this machine (sm{local}), not sm{normalise_sm(sm)};"
                f" run the export on an sm{normalise_sm(sm)} machine or drop --sm."
            )
        target = local
    else:
        if sm is None and local is None:
            raise UsageError(
                f"No NVIDIA GPU here to target; pass --sm with one of "
                f"{', '.join(fl.aot_targets)} (e.g. --sm 89)."
            )
        target = normalise_sm(sm) if sm is not None else local
        if target not in fl.aot_targets:
            raise UsageError(
                f"{fl.label} cannot target sm{target} (it targets sm{', sm'.join(fl.aot_targets)}); "
                f"use --target tensorrt on an sm{target} machine."
            )
    if not precision_supported(precision, target):
        alt = "bf16" if precision_supported("bf16", target) else "fp16"
        raise UsageError(
            f"The graph is {precision.upper()}, which sm{target} cannot run "
            f"({precision.upper()} needs {'sm89' if precision == 'fp8' else 'sm80'} or newer); "
            f"export with --precision {alt} for sm{target}, or drop sm{target} from --sm."
        )
    return target


def _has_gpu() -> bool:
    from app.planning.devices import read_gpus

    return bool(read_gpus())


def _check_profiles(network, profiles: list[Profile]) -> None:
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    dynamic = {n for n, s in inputs.items() if any(d < 0 for d in s)}
    if dynamic and not profiles:
        raise UsageError(
            f"The graph has dynamic inputs ({', '.join(sorted(dynamic))}) but no shape profile was given."
        )
    for i, p in enumerate(profiles):
        missing, unknown = dynamic - set(p), set(p) - set(inputs)
        if missing or unknown:
            raise UsageError(
                f"Shape profile {i} "
                + (
                    f"lacks dynamic inputs {sorted(missing)}"
                    if missing
                    else f"names inputs the graph does not have: {sorted(unknown)}"
                )
                + "."
            )
        for name, (mn, op, mx) in p.items():
            ok = len(mn) == len(op) == len(mx) == len(inputs[name]) and all(
                a <= b <= c and (d < 0 or a == c == d)
                for a, b, c, d in zip(mn, op, mx, inputs[name], strict=True)
            )
            if not ok:
                raise UsageError(
                    f"Shape profile {i} for {name} is inconsistent (min {mn}, opt {op}, max {mx}, "
                    f"graph {inputs[name]}); min <= opt <= max and fixed dims must match."
                )


def _io_of(network) -> dict[str, dict]:
    def one(t):
        return {"dtype": t.dtype.name, "shape": list(t.shape)}

    return {
        "inputs": {network.get_input(i).name: one(network.get_input(i)) for i in range(network.num_inputs)},
        "outputs": {
            network.get_output(i).name: one(network.get_output(i)) for i in range(network.num_outputs)
        },
    }


def timing_cache_path(version: str, gpu_uuid: str) -> Path:
    """Per-GPU TensorRT timing cache: timings from one GPU are wrong for another (TensorRT demo README)."""
    from platformdirs import user_cache_path

    from app.planning.devices import normalise_uuid

    return (
        user_cache_path("edgegen")
        / "tensorrt-timing"
        / f"trt-{short_version(version)}-{normalise_uuid(gpu_uuid)}.cache"
    )


def _apply_timing_cache(trt, config, timing_cache: Path | None):
    if timing_cache is None:
        from app.planning.devices import current_cuda_gpu

        g = current_cuda_gpu()
        if g is None:
            return None, None
        timing_cache = timing_cache_path(trt.__version__, g.uuid)
    blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    config.set_timing_cache(cache, ignore_mismatch=False)  # a cache from another GPU is refused, not used
    return cache, timing_cache


def build_engine(
    onnx_path: Path,
    out_path: Path,
    *,
    flavour: Flavour,
    sm: str | None,
    profiles: list[Profile],
    opt_level: int = 3,
    refit: bool = False,
    weight_streaming: bool = False,
    timing_cache: Path | None = None,
    progress: Progress | None = None,
    profile_desc: str | None = None,
) -> dict:
    """Build one engine for one compute capability and return its manifest record.

    `sm=None` targets this machine's GPU. For `tensorrt`, `timing_cache=None` uses the per-GPU cache under the
    user cache dir; TensorRT-RTX ignores timing caches (they force a GPU query and change nothing there).
    `profile_desc` names the profiles in the key (e.g. "b1-512to1024"); default: batch range + shape hash.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    fl = flavour_info(flavour)
    if not onnx_path.is_file():
        raise UsageError(f"ONNX file {onnx_path} does not exist; export the model to ONNX first.")
    if not 0 <= opt_level <= 5:
        raise UsageError(f"Builder optimisation level {opt_level} is out of range; use 0 to 5 (default 3).")
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if progress is not None:
            with contextlib.suppress(Exception):  # a broken progress display must not kill a 10-minute build
                progress(f"[{time.monotonic() - t0:6.1f} s] {msg}")

    precision = graph_precision(onnx_path)
    target = _resolve_sm(fl, sm, precision)
    if refit and fl.aot_targets is not None and not _has_gpu():
        # Seen with TensorRT-RTX 1.7.1: REFIT makes the ahead-of-time compile query CUDA, failing with no GPU.
        raise UsageError(
            "TensorRT-RTX needs a GPU to build refittable engines; build without refit on this machine."
        )
    trt = import_trt(flavour)
    version = str(trt.__version__)
    logger = _logger(trt)
    sink = _LogSink()
    logger.sink = sink
    try:
        say(f"Parsing {onnx_path.name}")
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):  # from file, so external weight files resolve
            errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise EngineBuildError(
                f"{fl.label} could not parse {onnx_path.name}: {'; '.join(errs) or sink.errors}"
            )
        _check_profiles(network, profiles)
        config = builder.create_builder_config()
        for p in profiles:
            prof = builder.create_optimization_profile()
            for name, (mn, op, mx) in p.items():
                prof.set_shape(name, tuple(mn), tuple(op), tuple(mx))
            config.add_optimization_profile(prof)
        if fl.aot_targets is not None:  # TensorRT-RTX: ahead of time for exactly one compute capability
            config.num_compute_capabilities = 1
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{target}"), 0)
        config.builder_optimization_level = opt_level
        if refit:
            config.set_flag(trt.BuilderFlag.REFIT)
        if weight_streaming:
            config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
        tcache, tcache_path = (None, None)
        if fl.aot_targets is None:
            tcache, tcache_path = _apply_timing_cache(trt, config, timing_cache)
        config.progress_monitor = _progress_monitor(trt, say)
        say(
            f"Building {fl.label} {short_version(version)} engine for sm{target} ({precision}, "
            f"{len(profiles)} profile{'s' * (len(profiles) != 1)})"
        )
        serialized = builder.build_serialized_network(network, config)
        if serialized is None or serialized.nbytes == 0:
            hint = (
                " TensorRT-RTX needs a GPU to build refittable engines; build without refit here."
                if refit and fl.aot_targets is not None and any("CUDA" in e for e in sink.errors)
                else ""
            )
            raise EngineBuildError(
                f"{fl.label} failed to build {onnx_path.name} for sm{target}: "
                f"{sink.errors[-1] if sink.errors else 'no error message'}.{hint}"
            )
        build_seconds = time.monotonic() - t0
        sha, size = atomic_write_bytes(out_path, serialized)
        if tcache is not None and tcache_path is not None:
            atomic_write_bytes(tcache_path, tcache.serialize())
        io = _io_of(network)
    finally:
        logger.sink = None
    say(f"Wrote {out_path.name} ({size / 1e6:.1f} MB) in {build_seconds:.1f} s")
    return {
        "key": engine_key(flavour, version, target, precision, profile_desc or describe_profiles(profiles)),
        "flavour": flavour,
        "version": version,
        "sm": target,
        "precision": precision,
        "profiles": profiles_to_json(profiles),
        "io": io,
        "file": out_path.name,
        "sha256": sha,
        "bytes": size,
        "build_seconds": round(build_seconds, 3),
        "opt_level": opt_level,
        "refit": refit,
        "weight_streaming": weight_streaming,
        "host_code_allowed": False,  # never VERSION_COMPATIBLE / plugins: no host code inside the plan
        "plugins": [],
    }
