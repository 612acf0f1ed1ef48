"""Failures on a GPU as sentences: what needed how much, what is free, and the fix. Never a traceback."""

from __future__ import annotations

from app.errors import EnvironmentProblem

GIB = 1024**3


class GpuOutOfMemory(EnvironmentProblem):
    """CUDA (torch, ONNX Runtime or TensorRT) ran out of device memory. Exit code 1."""


class GpuRunFailed(EnvironmentProblem):
    """An engine or provider failed on the GPU, or the GPU went away. Exit code 1."""


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation",
                                   "cuda_error_out_of_memory"))


def translate(exc: BaseException, *, stage: str, device, need_bytes: int | None, free_bytes: int | None,
              width: int, height: int, low_vram: bool, precision: str) -> EnvironmentProblem:
    """One sentence for a failure raised while `stage` ran on `device`."""
    if is_out_of_memory(exc):
        need = f"about {need_bytes / GIB:.1f} GiB" if need_bytes else "more memory"
        free = f"{free_bytes / GIB:.1f} GiB is free" if free_bytes is not None else "free memory is unknown"
        fixes = [f"a smaller size than {width}x{height}"]
        if not low_vram:
            fixes.append("low-VRAM mode (--low-vram: text encoders unloaded before denoising)")
        if precision in ("fp32", "bf16", "fp16"):
            fixes.append("a bundle re-exported with --precision fp8 (sm89 and newer) or bf16")
        fixes.append("closing other programs that use the GPU")
        return GpuOutOfMemory(f"the GPU ({device}) ran out of memory in {stage}: {width}x{height} needs {need} and "
                              f"{free}; try {', or '.join(fixes)}")
    return GpuRunFailed(f"{stage} failed on {device}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                        "run `edgegen doctor` and `edgegen selftest` to check the GPU, driver and bundle")
