"""FP8 calibration from the real pipeline: capture a component's inputs while it generates or encodes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from app.bundle.manifest import Bundle
from app.errors import UsageError
from app.runtime.ort_backend import OrtBackend
from app.runtime.pipelines import GenerationRequest, make_pipeline

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "assets" / "calibration_prompts.txt"
# Fixed prompts and seeds for the FP8-vs-FP32 image PSNR recorded at export.
FIDELITY_CASES = (("a red circle on a blue background", 1), ("portrait of an engineer in a workshop", 2))


def read_prompts(path: Path | None) -> list[str]:
    path = Path(path or DEFAULT_PROMPTS)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read calibration prompts {path}: {e.__class__.__name__}; "
                         "pass --calibration-prompts a UTF-8 text file with one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"{path} has no prompts; write one prompt per line")
    return prompts


class CapturingBackend:
    """An OrtBackend that keeps a copy of every feed to the given components (their calibration sets)."""

    def __init__(self, inner: OrtBackend, components: str | tuple[str, ...]):
        self.inner, self.name = inner, inner.name
        names = (components,) if isinstance(components, str) else components
        self.captured: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in names}

    def run(self, component, inputs):
        if component in self.captured:
            self.inner.session(component)  # opens the session and learns the input dtypes
            dtypes = self.inner._dtypes[component]
            self.captured[component].append(
                {k: np.array(v.detach().cpu().numpy(), dtype=dtypes[k]) for k, v in inputs.items()})
        return self.inner.run(component, inputs)

    def describe(self) -> str:
        return self.inner.describe()


def capture(bundle: Bundle, component: str, prompts: list[str], count: int, size: int | None,
            progress: Callable[[str], None], steps: int | None = None) -> list[dict[str, np.ndarray]]:
    backend = CapturingBackend(OrtBackend(bundle, "cpu"), component)
    pipe = make_pipeline(bundle, backend)
    chosen = prompts[:count]
    for i, prompt in enumerate(chosen):
        progress(f"[calibration] {i + 1}/{len(chosen)}: {prompt[:60]}")
        pipe.generate(GenerationRequest(prompt=prompt, seed=1000 + i, width=size, height=size, steps=steps))
    return backend.captured[component]


def capture_encoders(bundle: Bundle, components: tuple[str, ...], prompts: list[str],
                     progress: Callable[[str], None]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Feeds of each text encoder while the pipeline encodes `prompts`: tokenized exactly as at generation
    time (padding, truncation, chat template), with the negative prompt too where the family uses CFG."""
    backend = CapturingBackend(OrtBackend(bundle, "cpu"), components)
    pipe = make_pipeline(bundle, backend)
    for i, prompt in enumerate(prompts):
        progress(f"[calibration] text {i + 1}/{len(prompts)}: {prompt[:60]}")
        pipe.encode(pipe.resolve(GenerationRequest(prompt=prompt)))
    return backend.captured


def images(bundle: Bundle, size: int | None, steps: int | None = None) -> list[np.ndarray]:
    pipe = make_pipeline(bundle, OrtBackend(bundle, "cpu"))
    return [pipe.generate(GenerationRequest(prompt=p, seed=s, width=size, height=size, steps=steps)).image
            for p, s in FIDELITY_CASES]


def with_component(bundle: Bundle, component: str, onnx_rel: str) -> Bundle:
    """The same provisional bundle with one component's ONNX swapped (FP32 -> FP8)."""
    manifest = dict(bundle.manifest)
    manifest["components"] = {**bundle.manifest["components"],
                              component: {**bundle.manifest["components"][component], "onnx": onnx_rel}}
    return replace(bundle, manifest=manifest)
