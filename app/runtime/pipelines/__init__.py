"""Per-family pipelines (prepare on the host -> encode -> denoise -> decode on the device) over any Backend."""

from __future__ import annotations

from app.bundle.manifest import Bundle
from app.runtime.backend import Backend
from app.runtime.pipelines.base import Cancel, GenerationRequest, Pipeline, StepCallback  # noqa: F401


def make_pipeline(bundle: Bundle, backend: Backend, low_vram: bool = False) -> Pipeline:
    """The family's pipeline on the backend's device; `low_vram` releases each stage's components after use."""
    from app.runtime.pipelines.klein import KleinPipeline
    from app.runtime.pipelines.sd3 import SD3Pipeline

    by_family = {"flux2-klein": KleinPipeline, "sd3.5": SD3Pipeline}
    return by_family[bundle.manifest["family"]](bundle, backend, low_vram=low_vram)
