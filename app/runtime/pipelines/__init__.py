"""Per-family pipelines (encode -> prepare latents -> denoise -> decode) over any Backend."""

from __future__ import annotations

from app.bundle.manifest import Bundle
from app.runtime.backend import Backend
from app.runtime.pipelines.base import Cancel, GenerationRequest, Pipeline, StepCallback  # noqa: F401


def make_pipeline(bundle: Bundle, backend: Backend) -> Pipeline:
    from app.runtime.pipelines.klein import KleinPipeline
    from app.runtime.pipelines.sd3 import SD3Pipeline

    by_family = {"flux2-klein": KleinPipeline, "sd3.5": SD3Pipeline}
    return by_family[bundle.manifest["family"]](bundle, backend)
