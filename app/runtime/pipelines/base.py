"""What every family pipeline shares: the request, size checks, the schedule, seeded noise, the step loop.

One pipeline for every backend and device. `prepare` does the host-side work (resolve the request, tokenize,
draw the seeded noise on the CPU exactly as diffusers does, compute the schedule as plain numbers);
`execute` runs on the backend's device: the noise moves there once, and latents, timesteps, the Euler step,
CFG and decode stay there. `generate` adds the one host copy, of the final uint8 image.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from app.bundle.manifest import Bundle
from app.errors import BundleError, EdgegenError, GenerationCancelled, UsageError
from app.runtime.backend import Backend

# (step index starting at 1, total steps) -> None; called after every denoising step.
StepCallback = Callable[[int, int], None]
# (step index starting at 1, total steps, HxWx3 uint8 picture of the denoised estimate) -> None
PreviewCallback = Callable[[int, int, np.ndarray], None]


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
    # Images as input (bundles with the VAE encoder): FLUX.2 Klein references, or SD3.5's one init image. File
    # paths, read on the host in prepare; with images, the size defaults to the (first) image's.
    images: tuple[str, ...] = ()
    strength: float | None = None  # SD3.5 image-to-image (default 0.6), FLUX.2 Klein inpainting (default 0.8)
    # FLUX.2 Klein inpainting (Flux2KleinInpaintPipeline): a mask file, white = repaint; the first image is the one
    # inpainted, the rest are references
    mask: str | None = None
    # Run-time LoRAs from the site library, (name, strength) each (bundles exported with --runtime-lora)
    loras: tuple[tuple[str, float], ...] = ()
    # SD3.5 ControlNet (bundles exported with --controlnet): app.runtime.controls.Control each
    controls: tuple = ()
    # SD3.5 CFG against zeroed negative embeddings (ComfyUI's ConditioningZeroOut; diffusers' negative_prompt_embeds
    # and negative_pooled_prompt_embeds of zeros) instead of the encoded negative prompt
    zero_negative: bool = False

    def __post_init__(self):  # JSON gives lists ([[name, strength], ...]); the request holds tuples
        from app.runtime.controls import Control

        object.__setattr__(self, "loras", tuple((str(n), float(s)) for n, s in self.loras))
        object.__setattr__(self, "controls", tuple(Control.of(c) for c in self.controls))


@dataclass
class GenerationResult:
    image: np.ndarray  # HxWx3 uint8
    request: GenerationRequest  # with defaults filled in
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)  # name, sha256, path, size of each input image
    loras: list[dict] = field(default_factory=list)  # name, strength, sha256, rank, signature of each LoRA
    notes: list[str] = field(default_factory=list)  # status lines: what preprocessing did (a reference scaled)
    mask: dict | None = None  # name, sha256, path, size of the inpainting mask
    controls: list[dict] = field(default_factory=list)  # each control image's record, net, scale, start, end


@dataclass
class Job:
    """Everything host-side about one image, ready to run on any device."""

    req: GenerationRequest
    tokens: dict  # per text-encoder call, CPU tensors (family-specific keys)
    noise: torch.Tensor  # CPU, as diffusers draws it (already packed for Klein)
    timesteps: list[float]  # the model's timestep per step
    sigmas: list[float]  # len(timesteps) + 1; the Euler step is x += (sigmas[i+1] - sigmas[i]) * v
    state: dict = field(default_factory=dict)  # family-specific host values (grid size, ids)
    warnings: list[str] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)  # CPU, NCHW in [-1, 1], ready for the VAE encoder
    references: list[dict] = field(default_factory=list)  # what the metadata records about each input image
    lora: dict = field(default_factory=dict)  # CPU side-branch inputs of a run-time LoRA bundle (app/runtime/loras)
    loras: list[dict] = field(default_factory=list)  # what the metadata records about each LoRA
    notes: list[str] = field(default_factory=list)  # status lines for the result (GenerationResult.notes)
    mask: object | None = None  # the inpainting mask as read (references.InputImage), prepared by the family
    controls: list[dict] = field(default_factory=list)  # what the metadata records about each control image


class Pipeline:
    """Subclasses implement tokenize, encode, initial_noise, schedule, predict and decode for their family."""

    #: components released before denoising / before decoding when the plan stages memory (low VRAM)
    text_encoders: tuple[str, ...] = ()

    def __init__(self, bundle: Bundle, backend: Backend, low_vram: bool = False, lora_library=None):
        self.bundle, self.backend = bundle, backend
        self.lora_library = lora_library  # the LoRA library folder; None: app/bundle/loras.library_dir()
        # The last LoRA choice's inputs on the device: a request with the same LoRAs uploads nothing.
        self._lora_device: tuple[tuple, dict] | None = None
        self.device: torch.device = getattr(backend, "device", torch.device("cpu"))
        self.low_vram = low_vram
        self.warnings: list[str] = []
        self._scheduler = self._make_scheduler()
        # The last prompt's embeddings (and its warnings), reused while prompt, negative prompt and guidance stay
        # the same: --count N and repeated draws in the app encode once. Nothing downstream mutates them.
        self._last_cond: tuple[tuple, object, list[str]] | None = None
        self._previews = None  # the step-preview map, fitted on the first request that asks for previews

    # ----- host side ---------------------------------------------------------------------------------------
    def resolve(self, req: GenerationRequest, size: tuple[int, int] | None = None) -> GenerationRequest:
        """Defaults filled in and checked; `size` (width, height) replaces the bundle's default size (images)."""
        d = self.bundle.defaults
        w, h = size or (d["width"], d["height"])
        req = replace(
            req, negative_prompt=req.negative_prompt or "", images=tuple(str(p) for p in req.images),
            steps=req.steps if req.steps is not None else d["steps"],
            guidance=req.guidance if req.guidance is not None else d["guidance"],
            width=req.width or w, height=req.height or h,
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
        if req.zero_negative and self.bundle.manifest["family"] != "sd3.5":
            raise UsageError("--zero-negative is SD3.5's (ComfyUI's ConditioningZeroOut as the negative); FLUX.2 "
                             "Klein's CFG uses the empty prompt")
        if req.seed < 0 or req.seed >= 2**63:
            raise UsageError(f"--seed {req.seed} must be between 0 and 2**63-1")
        return req

    def _make_scheduler(self):
        """The bundle's scheduler, used on the host for the schedule only; the step itself is ours, on device."""
        import diffusers

        config = json.loads(self.bundle.path(self.bundle.manifest["scheduler"]).read_text())
        cls = config.get("_class_name")
        if cls != "FlowMatchEulerDiscreteScheduler" or config.get("stochastic_sampling"):
            raise BundleError(f"the bundle's scheduler is {cls}"
                              f"{' with stochastic_sampling' if config.get('stochastic_sampling') else ''}; "
                              "edgegen runs FlowMatchEulerDiscreteScheduler (deterministic), as FLUX.2 Klein and "
                              "SD3.5 ship; re-export from a folder with that scheduler")
        return getattr(diffusers, cls).from_config(config)

    def host_schedule(self, steps: int, **kwargs) -> tuple[list[float], list[float]]:
        """diffusers' own set_timesteps on the CPU, read back as numbers: the schedule is data, not device work."""
        s = self._scheduler
        s.set_timesteps(steps, **kwargs)
        return [float(t) for t in s.timesteps.tolist()], [float(x) for x in s.sigmas.tolist()]

    @staticmethod
    def noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """What diffusers' randn_tensor draws from torch.Generator("cpu").manual_seed(seed) (on the CPU)."""
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)

    def text_length(self, component: str) -> int:
        """Tokens a text encoder is fed (the pipelines pad to it), as the bundle records it from the model's
        configs; bundles from before that record fall back to the family's table (app/bundle/families.py)."""
        lengths = self.bundle.manifest["pipeline"].get("text_lengths") or {}
        if component in lengths:
            return int(lengths[component])
        if component == "text_encoder" and "max_sequence_length" in self.bundle.manifest["pipeline"]:
            return int(self.bundle.manifest["pipeline"]["max_sequence_length"])
        return int(self.bundle.family.text_lengths[component])

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

    def prepare(self, req: GenerationRequest) -> Job:
        """Host-side work for one image: nothing here touches the backend or the device."""
        from app.runtime.loras import lora_inputs
        from app.runtime.references import check_count_and_strength, read_image

        from app.runtime.controls import check_controls, read_controls

        check_count_and_strength(self.bundle, tuple(req.images), req.strength, req.mask)
        controls = check_controls(self.bundle, req.controls, req.images)
        lora, loras = lora_inputs(self.bundle.manifest, req.loras, self.lora_library, f"bundle {self.bundle.root}")
        inputs = [read_image(p) for p in req.images]
        mask = read_image(req.mask, "--mask") if req.mask else None
        control_inputs = read_controls(controls)
        sizing = inputs or control_inputs  # the output takes the (first) input image's size by default
        req = self.resolve(req, self.image_size(req, sizing) if sizing else None)
        self.warnings = []
        tokens = self.tokenize(req)
        noise, state = self.initial_noise(req)
        timesteps, sigmas = self.schedule(req, state)
        job = Job(req, tokens, noise, timesteps, sigmas, state, list(self.warnings),
                  references=[i.record() for i in inputs], lora=lora, loras=loras, mask=mask)
        if inputs:
            self.prepare_images(job, inputs)
        if controls:
            self.prepare_controls(job, controls, control_inputs)
        return job

    # ----- device side -------------------------------------------------------------------------------------
    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def execute(self, job: Job, on_step: StepCallback | None = None, cancel: Cancel | None = None,
                timings: dict | None = None, cond=None, on_preview: PreviewCallback | None = None) -> torch.Tensor:
        """The device part: encode, denoise, decode. Returns the decoded image (NCHW, [-1, 1]) on the device.
        `cond`: the prompt's embeddings, encoded earlier (FP8 calibration encodes every prompt first, then
        releases the text encoders). `on_preview`: a small picture of the denoised estimate after every step
        (app/runtime/previews.py)."""
        timings = {} if timings is None else timings
        req = job.req
        t0 = time.perf_counter()
        cond = self.encode_cached(job) if cond is None else cond
        if self.low_vram:  # the plan says the components do not fit together: text encoders leave first
            self.release(self.text_encoders)
        state = {**self.device_state(job), "lora": self.lora_on_device(job)}
        if job.images or "controls" in job.state:  # the VAE encoder, once per job, before the denoising loop
            state = self.encode_images(job, state)
            if self.low_vram:
                self.release(("vae_encoder",))
        previews = self.previews() if on_preview is not None else None  # fitted once, before the loop
        timings["encode"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        latents = self.initial_latents(job, state)
        n = len(job.timesteps)
        for i, t in enumerate(job.timesteps):
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("generation cancelled")
            state["step"] = (i, n)  # which step of how many (SD3.5 ControlNet's start/end window)
            pred = self.predict(latents, t, req, cond, state)
            # FlowMatchEulerDiscreteScheduler.step, in float32 as diffusers computes dt.
            dt = float(np.float32(job.sigmas[i + 1]) - np.float32(job.sigmas[i]))
            if previews is not None:  # flow matching's denoised estimate at this step, x0 = x_t - sigma_t * v
                x0 = latents - float(np.float32(job.sigmas[i])) * pred
            latents = latents + dt * pred
            if "mask" in state:  # inpainting: what the mask keeps is the init image at the next noise level
                latents = self.keep_unmasked(latents, i, job, state)
            if on_step is not None:
                on_step(i + 1, n)
            if previews is not None:
                on_preview(i + 1, n, previews.rgb(self.latent_grid(x0, state)))
        timings["denoise"] = time.perf_counter() - t1
        if cancel is not None and cancel.is_set():
            raise GenerationCancelled("generation cancelled")
        if self.low_vram:  # the transformer's stage: with it the ControlNets (app/planning/plan.py STAGES)
            self.release(("transformer", *(c for c in self.bundle.components() if c.startswith("controlnet_"))))
        t2 = time.perf_counter()
        image = self.decode(latents, req, state)
        if self.low_vram:
            self.release(("vae_decoder",))
        timings["decode"] = time.perf_counter() - t2
        return image

    def keep_unmasked(self, latents: torch.Tensor, i: int, job: Job, state: dict) -> torch.Tensor:
        """Flux2KleinInpaintPipeline's blend after step i: the init latents noised to the next step's sigma
        (FlowMatchEulerDiscreteScheduler.scale_noise with the request's one noise; clean after the last step)
        where the mask keeps, the denoised latents where it repaints (mask 1)."""
        init = state["init_latents"]
        if i + 1 < len(job.timesteps):
            sigma = np.float32(job.sigmas[i + 1])
            init = float(sigma) * state["noise"] + float(np.float32(1.0) - sigma) * init
        mask = state["mask"]
        return (1 - mask) * init + mask * latents

    def previews(self):
        """This bundle's latent -> RGB preview map (app/runtime/previews.py), fitted from its decoder on first use."""
        if self._previews is None:
            from app.runtime.previews import LatentPreview

            self._previews = LatentPreview.fit(self)
            if self.low_vram:
                self.release(("vae_decoder",))
        return self._previews

    def lora_on_device(self, job: Job) -> dict:
        """The job's LoRA inputs on the device, moved once per LoRA choice (the transformer's extra feeds)."""
        key = tuple((r["sha256"], r["strength"]) for r in job.loras)
        if self._lora_device is None or self._lora_device[0] != key:
            self._lora_device = None  # never two choices' tensors on the device at once
            self._lora_device = (key, {k: self.to_device(v) for k, v in job.lora.items()})
        return self._lora_device[1]

    def release(self, components) -> None:
        release = getattr(self.backend, "release", None)
        if release is not None:
            for c in components:
                if c in self.bundle.components():
                    release(c)

    def generate(self, req: GenerationRequest, on_step: StepCallback | None = None,
                 cancel: Cancel | None = None, on_preview: PreviewCallback | None = None) -> GenerationResult:
        t0 = time.perf_counter()
        job = self.prepare(req)
        timings: dict[str, float] = {}
        try:
            image = to_uint8(self.execute(job, on_step, cancel, timings, on_preview=on_preview))  # the one host copy
        except (GenerationCancelled, EdgegenError):
            raise
        except (RuntimeError, MemoryError, OSError) as e:  # torch/ORT/TensorRT failures on the device
            if self.device.type != "cuda":
                raise
            raise self._gpu_failure(e, job.req, timings) from None
        timings["total"] = time.perf_counter() - t0
        return GenerationResult(image=image, request=job.req, timings=timings, warnings=list(self.warnings),
                                references=list(job.references), loras=list(job.loras), notes=list(job.notes),
                                mask=job.mask.record() if job.mask is not None else None,
                                controls=list(job.controls))

    def _gpu_failure(self, exc: BaseException, req: GenerationRequest, timings: dict):
        """A GPU failure as one sentence with the numbers: the plan's peak for this size and NVML's free bytes."""
        from app.planning.components import bundle_plan
        from app.planning.devices import current_cuda_gpu
        from app.planning.gpus import gpu_spec_from_info
        from app.runtime.gpu_errors import translate

        stage = next((s for s in ("decode", "denoise", "encode") if s in timings), None)
        stage = {"encode": "denoising", "denoise": "decoding", None: "encoding the prompt"}.get(stage, "decoding")
        gpu = current_cuda_gpu(self.device.index or 0)
        need = None
        try:
            if gpu is not None:
                refs = len(req.images) if self.bundle.manifest["family"] == "flux2-klein" else 0
                need = bundle_plan(self.bundle, gpu_spec_from_info(gpu), req.width, req.height,
                                   references=refs).peak_bytes
        except Exception:  # the estimate is a courtesy; the sentence must come out regardless
            need = None
        return translate(exc, stage=stage, device=self.device, need_bytes=need,
                         free_bytes=gpu.free_bytes if gpu else None, width=req.width, height=req.height,
                         low_vram=self.low_vram, precision=self.bundle.precision)

    def forget_prompt(self) -> None:
        """Drop the reused embeddings (benchmarks that must encode every draw; freeing memory)."""
        self._last_cond = None

    def encode_cached(self, job: Job):
        """encode(), or the previous result when it was for the same prompt, negative prompt and guidance."""
        req = job.req
        key = (req.prompt, req.negative_prompt, req.guidance, req.zero_negative)
        if self._last_cond is not None and self._last_cond[0] == key:
            self.warnings = list(self._last_cond[2])
            return self._last_cond[1]
        self._last_cond = None  # never keep two prompts' embeddings alive at once
        self.warnings = list(job.warnings)
        cond = self.encode_tokens(job.tokens, req)
        self._last_cond = (key, cond, list(self.warnings))
        return cond

    def encode(self, req: GenerationRequest):
        """Prompt embeddings for a request on the device (calibration and benchmarks call this directly)."""
        return self.encode_tokens(self.tokenize(req), req)

    def run_vae_encoder(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The VAE encoder's latents for host tensors, owned by the caller (the next run reuses the buffer)."""
        return self.run_encoder("vae_encoder", inputs, "latents")

    def run_encoder(self, component: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        """One text-encoder output as float32, owned by the caller (backends reuse their output buffers)."""
        out = self.backend.run(component, {k: self.to_device(v) for k, v in inputs.items()})[output]
        return out.to(torch.float32, copy=True)

    # ----- per family -------------------------------------------------------------------------------------
    def tokenize(self, req: GenerationRequest) -> dict: raise NotImplementedError
    def encode_tokens(self, tokens: dict, req: GenerationRequest): raise NotImplementedError
    def initial_noise(self, req: GenerationRequest) -> tuple[torch.Tensor, dict]: raise NotImplementedError
    def schedule(self, req: GenerationRequest, state: dict) -> tuple[list[float], list[float]]:
        raise NotImplementedError
    def device_state(self, job: Job) -> dict: return dict(job.state)
    def image_size(self, req: GenerationRequest, inputs: list) -> tuple[int, int] | None: return None
    def prepare_images(self, job: Job, inputs: list) -> None: raise NotImplementedError
    def prepare_controls(self, job: Job, controls: list, inputs: list) -> None:
        raise UsageError("--control is SD3.5 ControlNet; this bundle's family has none")
    def encode_images(self, job: Job, state: dict) -> dict: raise NotImplementedError
    def initial_latents(self, job: Job, state: dict) -> torch.Tensor: return self.to_device(job.noise)
    def predict(self, latents, t: float, req: GenerationRequest, cond, state) -> torch.Tensor:
        raise NotImplementedError
    def decode(self, latents, req: GenerationRequest, state) -> torch.Tensor: raise NotImplementedError
    def encode_pixels(self, image: torch.Tensor, noise: torch.Tensor, state: dict) -> torch.Tensor:
        """An NCHW [-1, 1] image on the device through the VAE encoder, in the sampler's latent layout (previews)."""
        raise NotImplementedError
    def latent_grid(self, latents, state) -> torch.Tensor:
        """The sampler's latents as a (C, h, w) grid, one position per decoder input cell (previews)."""
        raise NotImplementedError


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1], NCHW -> HWC uint8, as diffusers' image processor does; computed where the
    image is and copied to the host once, as uint8."""
    pixels = (image[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 0) * 255
    return pixels.round().to(torch.uint8).cpu().numpy()
