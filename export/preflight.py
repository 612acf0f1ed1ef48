"""Checks that run before an export loads its first component: tools, targets, sizes, disk and memory.

Everything here reads configs, safetensors headers and the machine, never weights, so a doomed export is
refused in seconds, one line each, instead of after an hour of export and calibration.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from app.errors import EnvironmentProblem, UsageError

GiB = 2**30
# Peak RSS growth of a one-component FP32 export over that component's FP32 weight bytes: measured 1.03 for
# the full-size Klein 4B transformer (docs/PERFORMANCE.md; small components add a fixed ~0.6-0.8 GiB instead).
EXPORT_PEAK_RATIO = 1.1
# The same for a component exported in BF16/FP16 over its BF16 bytes, above PROCESS_BASE: measured at real size
# (docs/PERFORMANCE.md 1b) 1.14 (Qwen3-4B), 1.14 (Klein 4B transformer), 1.12 (Qwen3-8B), 1.08 (T5-XXL),
# 1.09 (SD3.5 Large transformer), 1.07 (Klein 9B transformer): the FP32 reference hooks, the trace and ONNX
# Runtime's run of the FP32 twin each add transients next to the one BF16 copy. 1.17 covers the largest.
HALF_EXPORT_PEAK_RATIO = 1.17
# ModelOpt's PyTorch calibration (export/fp8_torch.py): TORCH_CALIBRATION_RATIO x (the BF16 transformer + the one
# VAE it runs) + TORCH_CALIBRATION_FIXED above PROCESS_BASE: the modules, activations, ModelOpt's per-step
# fake-quantized weights and what the text encoders' phase left in the heap. Fitted to the real-size peaks of
# docs/PERFORMANCE.md 1c (measured / estimated GiB): Klein 4B 10.36 / 10.4, Klein 9B 20.65 / 20.9, SD3.5 Large
# 17.39 / 18.9. The FP8 check that follows (one FP32 twin at a time) measured below it: 10.25, 15.44, 17.50 GiB.
TORCH_CALIBRATION_RATIO = 1.08
TORCH_CALIBRATION_FIXED = 1.3 * GiB
PROCESS_BASE = 1 * GiB  # torch, diffusers, transformers and ONNX Runtime imported, before any weights
DISK_MARGIN = 64 * 2**20  # tokenizers, scheduler, manifest, file-system slack
ENGINE_RATIO = 1.25  # engine bytes over ONNX bytes (TensorRT-RTX FP32: 32 MB engine from a 26.5 MB graph)
PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")

Say = Callable[[str], None]


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- tools


def _version(module: str) -> str:
    return str(getattr(sys.modules[module], "__version__", "?"))


def check_tools(precision: str, text_precision: str, target: str, say: Say) -> dict[str, str]:
    """Import what the requested export will use, in the order it will use it; returns {tool: version}."""
    found = {}
    for module, why in (("onnx", "the ONNX export"), ("onnxscript", "the ONNX export"),
                        ("onnxruntime", "checking every exported graph against PyTorch")):
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a wheel whose native library is missing
            raise UsageError(f"{module} is not usable here ({type(e).__name__}: {e}); it is needed for {why}: "
                             f"pip install 'edgegen[cpu]' (or [gpu])") from None
        found[module] = _version(module)
    if "fp8" in (precision, text_precision):
        from export.fp8 import require_modelopt

        require_modelopt()
        found["modelopt"] = _version("modelopt")
    if target != "onnx":
        from app.runtime.engine.trt import flavour_info, import_trt

        found[flavour_info(target).label] = str(import_trt(target).__version__)
    say("[preflight] tools: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    return found


def check_targets(target: str, sms: tuple[str, ...], precision: str, say: Say) -> tuple[str, ...]:
    """The compute capabilities engines will be built for, each checked against the graph's precision."""
    if target == "onnx":
        if sms:
            say(f"[preflight] --sm {','.join(sms)} ignored: --target onnx builds no engines")
        return ()
    from export.engines import _resolve_sm, flavour_info

    fl = flavour_info(target)
    if not sms and fl.aot_targets is not None:
        raise UsageError(f"--target {target} needs --sm, e.g. --sm 89,120 ({fl.label} targets "
                         f"sm{', sm'.join(fl.aot_targets)}; see: edgegen plan)")
    resolved = tuple(_resolve_sm(fl, sm, precision) for sm in (sms or (None,)))
    say(f"[preflight] {fl.label} engines for sm{', sm'.join(resolved)} ({precision.upper()})")
    return resolved


# ---------------------------------------------------------------- sizes


def check_calibration_size(size: int | None, size_range: dict, dims: dict) -> None:
    if size is None:
        return
    lo, hi, m = size_range["min"], size_range["max"], size_range["multiple"]
    limit = dims.get("max_size_px")
    if limit and size > limit:
        raise UsageError(f"--calibration-size {size} exceeds this model's position table ({limit} px per side: "
                         f"pos_embed_max_size {dims.get('pos_embed_max_size')}); use at most {limit}")
    if size % m or not lo <= size <= hi:
        raise UsageError(f"--calibration-size {size} must be a multiple of {m} within the bundle's size range "
                         f"{lo}-{hi} px")


# ---------------------------------------------------------------- stale partial exports


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine; True when that cannot be told (never delete then)."""
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.pid_exists(pid)
    except ImportError:
        pass
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def clean_stale_partials(parent: Path, say: Say) -> int:
    """Remove `.NAME.partial-PID` folders (and `.NAME.old-PID` leftovers of an interrupted replace) whose
    process is gone; an `.old` one whose bundle NAME is missing is the only copy left, so it is put back.
    Returns the bytes freed."""
    freed = 0
    if not parent.is_dir():
        return 0
    for p in sorted(parent.iterdir()):
        m = PARTIAL.match(p.name)
        if not m or not p.is_dir() or p.is_symlink() or pid_alive(int(m["pid"])):
            continue
        final = parent / m["name"]
        if m["kind"] == "old" and not final.exists():
            os.rename(p, final)
            say(f"[preflight] restored {final} from {p.name}, left by an interrupted --overwrite")
            continue
        size = tree_bytes(p)
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            freed += size
            say(f"[preflight] removed {p.name}, left by an export that no longer runs (pid {m['pid']}): "
                f"{fmt_gib(size)} freed")
    return freed


# ---------------------------------------------------------------- disk and memory


def _fp32_bytes(folder, precisions: dict[str, str] | None = None) -> dict[str, int]:
    """Bytes of every present component's graph as exported: 4 a parameter, 2 for a BF16/FP16 graph (FP8
    starts from an FP32 graph). Without `precisions`, every component counts in FP32."""
    p = precisions or {}
    return {spec.name: folder.weights[spec.source][0] * (2 if p.get(spec.name) in ("bf16", "fp16") else 4)
            for spec in folder.family.components
            if spec.source in folder.weights and (precisions is None or spec.name in precisions)}


def bundle_bytes_estimate(folder, precision: str, fp8_encoders: tuple[str, ...], n_engines: int,
                          precisions: dict[str, str] | None = None) -> int:
    """Peak bytes the export writes: every graph, plus the FP8 copies while both exist, plus engines."""
    fp32 = _fp32_bytes(folder, precisions)
    quantized = {n for n in fp32 if n in fp8_encoders or (precision == "fp8" and n == "transformer")}
    fp8 = sum(fp32[n] // 2 for n in quantized)  # FP8 weights + FP16 high-precision parts, and ModelOpt's temp
    final = sum(b for n, b in fp32.items() if n not in quantized) + sum(fp32[n] // 4 for n in quantized)
    return sum(fp32.values()) + fp8 + int(final * ENGINE_RATIO) * n_engines + DISK_MARGIN


def free_bytes(path: Path) -> int:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk(out: Path, need: int, say: Say) -> None:
    free = free_bytes(out.parent)
    if need > free:
        raise EnvironmentProblem(f"not enough disk space for the bundle at {out.parent}: the export needs about "
                                 f"{fmt_gib(need)}, {fmt_gib(free)} is free; free space or choose another --out")
    say(f"[preflight] disk: about {fmt_gib(need)} needed, {fmt_gib(free)} free at {out.parent}")


def available_memory() -> int | None:
    """RAM a new allocation can get now (available + free swap), or None when the OS does not say."""
    try:
        import psutil

        return int(psutil.virtual_memory().available + psutil.swap_memory().free)
    except ImportError:
        pass
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        return info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def memory_estimate(folder, precision: str, fp8_encoders: tuple[str, ...],
                    precisions: dict[str, str] | None = None, fp8_path: str = "onnx") -> int:
    """Peak RSS: one component's export at a time (EXPORT_PEAK_RATIO of its bytes in the precision it is
    loaded and written in: a BF16 component is never widened as a whole, export/bf16.py). FP8 through ONNX
    (export/fp8.py): calibration opens the whole FP32 bundle in ONNX Runtime and ModelOpt holds about two
    copies of the graph it quantizes. FP8 through PyTorch (export/fp8_torch.py, `precisions` then says bf16 for
    the transformer's graph): the text encoders in BF16 while they encode, then the BF16 transformer and the
    VAE while ModelOpt calibrates; the graph check runs one FP32 twin at a time (one BF16 copy)."""
    fp32 = _fp32_bytes(folder, precisions)
    half = {n for n, p in (precisions or {}).items() if p in ("bf16", "fp16")}
    peak = max((b * (HALF_EXPORT_PEAK_RATIO if n in half else EXPORT_PEAK_RATIO) for n, b in fp32.items()),
               default=0)
    onnx_quantized = [n for n in fp32 if n in fp8_encoders or (precision == "fp8" and n == "transformer"
                                                                and fp8_path == "onnx")]
    if onnx_quantized:
        peak = max(peak, sum(fp32.values()) + 2 * max(fp32[n] for n in onnx_quantized))
    if precision == "fp8" and fp8_path == "torch" and "transformer" in fp32:
        half_bytes = {n: folder.weights[s.source][0] * 2 for s in folder.family.components
                      for n in [s.name] if n in fp32}
        encoders = sum(b for n, b in half_bytes.items() if n.startswith("text_encoder"))
        vae = max((b for n, b in fp32.items() if n.startswith("vae")), default=0)  # one VAE: the decoder
        peak = max(peak, TORCH_CALIBRATION_RATIO * max(encoders, half_bytes["transformer"] + vae)
                   + TORCH_CALIBRATION_FIXED)
    return int(peak + PROCESS_BASE)


def fp8_path(folder, fp8_encoders: tuple[str, ...], precisions: dict[str, str], asked: str = "auto"
             ) -> tuple[str, str]:
    """("onnx" | "torch", why) for the transformer's FP8 quantization. auto: ModelOpt's ONNX PTQ on the FP32
    graph (export/fp8.py) when it fits in the memory available now, else ModelOpt's PyTorch path on the BF16
    module (export/fp8_torch.py), which never holds an FP32 copy of the model."""
    onnx_need = memory_estimate(folder, "fp8", fp8_encoders, precisions, "onnx")
    have = available_memory()
    if asked == "onnx":
        return "onnx", "asked for (--fp8-path onnx)"
    if asked == "torch":
        return "torch", "asked for (--fp8-path torch)"
    if have is not None and onnx_need > have:
        return "torch", (f"the ONNX path would need about {fmt_gib(onnx_need)} of RAM (FP32 graphs), "
                         f"{fmt_gib(have)} is available")
    return "onnx", f"the ONNX path fits: about {fmt_gib(onnx_need)} of RAM needed" + (
        f", {fmt_gib(have)} available" if have is not None else "")


def check_memory(need: int, say: Say, skip: bool = False) -> None:
    have = available_memory()
    if have is None:
        say(f"[preflight] memory: about {fmt_gib(need)} needed; this OS does not report what is available")
        return
    if need > have and not skip:
        raise EnvironmentProblem(f"not enough memory: the export needs about {fmt_gib(need)} of RAM, "
                                 f"{fmt_gib(have)} is available; close other programs, export on a machine with "
                                 "more RAM (or without fp8), or pass --skip-memory-check to try anyway")
    say(f"[preflight] memory: about {fmt_gib(need)} needed, {fmt_gib(have)} available"
        + (" (check skipped)" if need > have else ""))
