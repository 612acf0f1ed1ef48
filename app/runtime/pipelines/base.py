"""What every family pipeline shares: the request, size checks, scheduler, seeded noise, the step loop."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from app.bundle.manifest import Bundle
from app.errors import GenerationCancelled, UsageError
from app.runtime.backend import Backend

# (step index starting at 1, total steps) -> None; called after every denoising step.
StepCallback = Callable[[int, int], None]


class Cancel(threading.Event):
    """Set from any thread; the pipeline stops before its next model call."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None  # None: the bundle's default
    guidance: float | None = None
    width: int | None = None
    height: int | None = None


@dataclass
class GenerationResult:
    image: np.ndarray  # HxWx3 uint8
    request: GenerationRequest  # with defaults filled in
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Pipeline:
    """Subclasses implement encode(), initial_latents(), denoise_step() and decode() for their family."""

    def __init__(self, bundle: Bundle, backend: Backend):
        self.bundle, self.backend = bundle, backend
        self.warnings: list[str] = []
        # The last prompt's embeddings (and its warnings), reused while prompt, negative prompt and guidance stay
        # the same: --count N and repeated draws in the app encode once. Nothing downstream mutates them.
        self._last_cond: tuple[tuple, object, list[str]] | None = None

    # ----- shared -----------------------------------------------------------------------------------------
    def resolve(self, req: GenerationRequest) -> GenerationRequest:
        d = self.bundle.defaults
        req = GenerationRequest(
            prompt=req.prompt, negative_prompt=req.negative_prompt or "", seed=req.seed,
            steps=req.steps if req.steps is not None else d["steps"],
            guidance=req.guidance if req.guidance is not None else d["guidance"],
            width=req.width or d["width"], height=req.height or d["height"],
        )
        rng = self.bundle.manifest["size_range"]
        for axis, value in (("width", req.width), ("height", req.height)):
            if value % rng["multiple"]:
                raise UsageError(f"--{axis} {value} is not a multiple of {rng['multiple']}; try "
                                 f"{round(value / rng['multiple']) * rng['multiple']}")
            if not rng["min"] <= value <= rng["max"]:
                raise UsageError(f"--{axis} {value} is outside this bundle's range {rng['min']}-{rng['max']} px; "
                                 "pick a size inside it or re-export with --min-size/--max-size")
        if req.steps < 1:
            raise UsageError(f"--steps {req.steps} must be at least 1")
        if req.seed < 0 or req.seed >= 2**63:
            raise UsageError(f"--seed {req.seed} must be between 0 and 2**63-1")
        return req

    def scheduler(self):
        import json

        import diffusers

        config = json.loads(self.bundle.path(self.bundle.manifest["scheduler"]).read_text())
        return getattr(diffusers, config["_class_name"]).from_config(config)

    @staticmethod
    def noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """What diffusers' randn_tensor draws from torch.Generator("cpu").manual_seed(seed)."""
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)

    def tokenizer(self, name: str):
        from transformers import AutoTokenizer

        if not hasattr(self, "_tokenizers"):
            self._tokenizers = {}
        if name not in self._tokenizers:
            self._tokenizers[name] = AutoTokenizer.from_pretrained(str(self.bundle.path(name)), local_files_only=True)
        return self._tokenizers[name]

    def warn_truncation(self, tokenizer, text: str, limit: int, what: str) -> None:
        n = len(tokenizer(text, add_special_tokens=True)["input_ids"])
        if n > limit:
            msg = f"{what} is {n} tokens; only the first {limit} are used"
            if msg not in self.warnings:
                self.warnings.append(msg)

    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None,
                 cancel: Cancel | None = None) -> GenerationResult:
        req = self.resolve(req)
        self.warnings = []
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        cond = self.encode_cached(req)
        timings["encode"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        latents, state = self.initial_latents(req, cond)
        scheduler = self.scheduler()
        timesteps = self.set_timesteps(scheduler, req, state)
        for i, t in enumerate(timesteps):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("generation cancelled")
            pred = self.predict(latents, t, req, cond, state)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step(i + 1, len(timesteps))
        timings["denoise"] = time.perf_counter() - t1
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation cancelled")
        t2 = time.perf_counter()
        image = self.decode(latents, req, state)
        timings["decode"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(image=to_uint8(image), request=req, timings=timings, warnings=list(self.warnings))

    def forget_prompt(self) -> None:
        """Drop the reused embeddings (benchmarks that must encode every draw; freeing memory)."""
        self._last_cond = None

    def encode_cached(self, req: GenerationRequest):
        """encode(req), or the previous result when it was for the same prompt, negative prompt and guidance."""
        key = (req.prompt, req.negative_prompt, req.guidance)
        if self._last_cond is not None and self._last_cond[0] == key:
            self.warnings = list(self._last_cond[2])
            return self._last_cond[1]
        self._last_cond = None  # never keep two prompts' embeddings alive at once
        cond = self.encode(req)
        self._last_cond = (key, cond, list(self.warnings))
        return cond

    # ----- per family -------------------------------------------------------------------------------------
    def encode(self, req: GenerationRequest): raise NotImplementedError
    def initial_latents(self, req: GenerationRequest, cond): raise NotImplementedError
    def set_timesteps(self, scheduler, req: GenerationRequest, state) -> torch.Tensor: raise NotImplementedError
    def predict(self, latents, t, req: GenerationRequest, cond, state) -> torch.Tensor: raise NotImplementedError
    def decode(self, latents, req: GenerationRequest, state) -> torch.Tensor: raise NotImplementedError


def to_float01(image: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1], NCHW -> HWC float in [0, 1], as diffusers' image processor does."""
    return (image[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float().numpy()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return (to_float01(image) * 255).round().astype(np.uint8)
