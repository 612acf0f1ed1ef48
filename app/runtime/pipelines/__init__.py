"""Per-family pipelines (prepare on the host -> encode -> denoise -> decode on the device) over any Backend."""

from __future__ import annotations

from app.bundle.manifest import Bundle
from app.runtime.backend import Backend
from app.runtime.pipelines.base import Cancel, GenerationRequest, Pipeline, StepCallback  # noqa: F401


def make_pipeline(bundle: Bundle, backend: Backend, low_vram: bool | None = None, lora_library=None) -> Pipeline:
    """The family's pipeline on the backend's device.

    `low_vram` releases each stage's components after use (text encoders before denoising, the transformer
    before decoding). None: on a GPU, the plan decides from the bundle's real bytes and the free VRAM at the
    bundle's default size; on the CPU, never."""
    from app.runtime.pipelines.klein import KleinPipeline
    from app.runtime.pipelines.sd3 import SD3Pipeline

    plan = staging_plan(bundle, backend) if _on_cuda(backend) else None
    if plan is not None and plan.strategy == "cannot-run":  # e.g. an FP8 transformer on an SM 8.6 GPU
        from app.errors import BundleError

        raise BundleError(plan.cannot_run)
    if low_vram is None:
        low_vram = plan.low_vram if plan is not None else False
    by_family = {"flux2-klein": KleinPipeline, "sd3.5": SD3Pipeline}
    return by_family[bundle.manifest["family"]](bundle, backend, low_vram=low_vram, lora_library=lora_library)


def _on_cuda(backend: Backend) -> bool:
    device = getattr(backend, "device", None)
    return device is not None and device.type == "cuda"


def staging_plan(bundle: Bundle, backend: Backend, width: int | None = None, height: int | None = None):
    """The plan for this bundle on the backend's GPU (None GPU on the CPU): what fits, what is staged."""
    from app.planning.components import bundle_plan
    from app.planning.devices import current_cuda_gpu
    from app.planning.gpus import gpu_spec_from_info

    gpu = current_cuda_gpu(backend.device.index or 0) if _on_cuda(backend) else None
    d = bundle.defaults
    return bundle_plan(bundle, gpu_spec_from_info(gpu) if gpu else None, width or d["width"], height or d["height"])
