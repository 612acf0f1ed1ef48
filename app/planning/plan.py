"""Per-GPU plan: which precision, engine flavour, shape profile and VRAM stage each model component gets.

Everything here is a pure, table-driven function so `edgegen plan` can answer for a GPU the machine does not
have (`--gpu "RTX 4090"` or `--gpu sm89:24`) and tests can pin every rule without hardware.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from app.errors import UsageError
from app.planning.gpus import GpuSpec
from app.planning.policy import (
    BF16_MIN_SM,
    FP8_MIN_SM,
    GIB,
    PRECISION_BYTES,
    choose_precision,
    engine_flavour_for_sm,
    precision_supported,
)

Kind = Literal["text_encoder", "vae_encoder", "controlnet", "transformer", "vae_decoder"]


# Pipeline order, which is also the low-VRAM stage order (Pipeline.execute releases each before the next).
KINDS: tuple[str, ...] = ("text_encoder", "vae_encoder", "controlnet", "transformer", "vae_decoder")
# The low-VRAM stages: SD3.5 ControlNets run beside the transformer at every step, so they share its stage.
STAGES: tuple[tuple[str, ...], ...] = (("text_encoder",), ("vae_encoder",), ("controlnet", "transformer"),
                                       ("vae_decoder",))


@dataclass(frozen=True, kw_only=True)  # keywords only: param_count vs fp32_bytes must never be confused
class ComponentInfo:
    """One exportable component. Give param_count, or fp32_bytes (the weights' size at fp32)."""

    name: str
    kind: Kind
    param_count: int | None = None
    fp32_bytes: int | None = None
    hidden_size: int | None = None  # sharpens the activation estimate when known
    text_tokens: int = 512  # Klein pads prompts to 512; SD3.5 uses 77 + 256
    # An exported bundle knows better than the arithmetic: the bytes its engine (or ONNX) file holds, and the
    # precision it was exported in. Either overrides the per-GPU choice.
    weights_bytes: int | None = None
    precision: str | None = None

    @property
    def params(self) -> int:
        if self.param_count is not None:
            return int(self.param_count)
        if self.fp32_bytes is not None:
            return int(self.fp32_bytes) // 4
        raise ValueError(f"component {self.name} has neither param_count nor fp32_bytes")


@dataclass
class ComponentPlan:
    name: str
    kind: str
    precision: str
    engine: str  # tensorrt-rtx | tensorrt | onnxruntime-cpu
    profile: dict[str, list[int]]  # batch/height/width as [min, opt, max]
    weights_bytes: int
    activation_bytes: int
    stage: int = 1
    weight_streaming: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes


@dataclass
class Plan:
    gpu: GpuSpec | None
    width: int
    height: int
    batch: int
    cfg: bool
    components: list[ComponentPlan]
    strategy: Literal["all-resident", "staged", "staged+streaming", "does-not-fit", "cannot-run", "cpu"]
    usable_bytes: int | None
    peak_bytes: int
    notes: list[str] = field(default_factory=list)
    cannot_run: str = ""  # a bundle whose precisions this GPU lacks: the sentence, with the export that can

    @property
    def low_vram(self) -> bool:
        """The runtime releases each stage's components after use (text encoders before denoising)."""
        return self.strategy in ("staged", "staged+streaming")

    def staging_text(self) -> str:
        """What the runtime will do with memory, in the app's and doctor's words."""
        if self.gpu is None:
            return "CPU: every component in system memory"
        if not self.low_vram:
            return {"all-resident": "all components stay loaded", "cannot-run": "cannot run here"}.get(
                self.strategy, "does not fit")
        text = [c.name for c in self.components if c.kind == "text_encoder"]
        return (f"low-VRAM: {', '.join(text) or 'text encoders'} unloaded before denoise, transformer unloaded "
                "before decode" + (", weights streamed" if self.strategy == "staged+streaming" else ""))

    @property
    def stages(self) -> list[list[str]]:
        out: dict[int, list[str]] = {}
        for c in self.components:
            out.setdefault(c.stage, []).append(c.name)
        return [out[k] for k in sorted(out)]

    def to_dict(self) -> dict:
        d = {
            "gpu": asdict(self.gpu) if self.gpu else None,
            "width": self.width,
            "height": self.height,
            "batch": self.batch,
            "cfg": self.cfg,
            "strategy": self.strategy,
            "usable_bytes": self.usable_bytes,
            "peak_bytes": self.peak_bytes,
            "stages": self.stages,
            "notes": list(self.notes),
            "cannot_run": self.cannot_run,
            "components": [{**asdict(c), "peak_bytes": c.peak_bytes} for c in self.components],
        }
        return d


def _profile(kind: str, width: int, height: int, batch: int, cfg: bool) -> dict[str, list[int]]:
    # CFG runs the conditional and unconditional branch as one doubled batch; the VAE only decodes the result.
    b = batch * (2 if cfg and kind not in ("vae_decoder", "vae_encoder") else 1)
    prof = {"batch": [b, b, b]}
    if kind != "text_encoder":
        prof["height"] = [height, height, height]
        prof["width"] = [width, width, width]
    return prof


CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context, cuBLAS/cuDNN handles, TensorRT runtime


DEFAULT_HIDDEN = {"text_encoder": 2560, "transformer": 3072, "controlnet": 3072, "vae_decoder": 0, "vae_encoder": 0}


def estimate_activation_bytes(c: ComponentInfo, precision: str, width: int, height: int, batch: int,
                              reference_pixels: int = 0) -> int:
    """Rough peak activation/workspace memory. Deliberately generous: users report wrong VRAM accounting.

    `reference_pixels`: input images' pixels whose tokens the transformer sees too (FLUX.2 Klein references)."""
    act_bytes = 4 if precision == "fp32" else 2  # FP8 graphs keep activations in 16-bit between Q/DQ pairs
    hidden = c.hidden_size or DEFAULT_HIDDEN[c.kind]
    if c.kind == "transformer":
        tokens = (width // 16) * (height // 16) + reference_pixels // 256 + c.text_tokens  # 8x VAE, 2x2 patches
        return batch * tokens * hidden * act_bytes * 24 + int(0.5 * GIB)  # QKV, MLP 4x, attention tiles
    if c.kind == "controlnet":  # its blocks' activations, plus the residual stack it hands the transformer
        tokens = (width // 16) * (height // 16) + c.text_tokens
        return batch * tokens * hidden * act_bytes * 24 + batch * tokens * hidden * 4 * 24 + int(0.25 * GIB)
    if c.kind == "text_encoder":
        return batch * c.text_tokens * hidden * act_bytes * 16 + int(0.25 * GIB)
    # VAE decoder: full-resolution feature maps of ~128 channels dominate, several alive at once.
    return batch * width * height * 128 * act_bytes * 6 + int(0.25 * GIB)


def _usable_bytes(gpu: GpuSpec) -> int:
    # Leave room for the display/desktop and allocator fragmentation; trust live free memory when known.
    usable = int(gpu.vram_bytes * 0.92) - CONTEXT_BYTES
    if gpu.free_bytes is not None:
        usable = min(usable, gpu.free_bytes - CONTEXT_BYTES)
    return max(usable, 0)


def make_plan(
    gpu: GpuSpec | None,
    family_components: list[ComponentInfo],
    width: int,
    height: int,
    batch: int = 1,
    cfg: bool = False,
    reference_pixels: int = 0,
    source: str | None = None,
) -> Plan:
    """Decide precision, engine flavour, profile and VRAM stage for every component on `gpu` (None = CPU).

    For a bundle (components with their exported precision), a precision the GPU lacks (FP8 below SM 8.9, BF16
    below SM 8.0) makes the plan "cannot-run", with the export command (from `source`) that can."""
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise UsageError(
            f"{width}x{height} is not a valid size; width and height must be positive multiples of 16."
        )
    if batch < 1:
        raise UsageError(f"batch {batch} is not valid; use 1 or more.")
    order = {k: i for i, k in enumerate(KINDS)}
    comps = sorted(family_components, key=lambda c: order[c.kind])  # pipeline order; sort is stable
    sm = gpu.sm if gpu else None
    plans: list[ComponentPlan] = []
    for c in comps:
        best = choose_precision(c.kind, sm)
        prec = c.precision or best
        eff_batch = _profile(c.kind, width, height, batch, cfg)["batch"][0]
        plans.append(
            ComponentPlan(
                name=c.name,
                kind=c.kind,
                precision=prec,
                engine=engine_flavour_for_sm(sm) if sm else "onnxruntime-cpu",
                profile=_profile(c.kind, width, height, batch, cfg),
                weights_bytes=int(c.weights_bytes if c.weights_bytes is not None
                                  else c.params * PRECISION_BYTES[prec]),
                activation_bytes=estimate_activation_bytes(c, prec, width, height, eff_batch, reference_pixels),
                notes=[f"exported as {prec}; for this GPU the plan would export {best}"] if prec != best else [],
            )
        )
    if gpu is None:
        peak = sum(p.weights_bytes for p in plans) + max((p.activation_bytes for p in plans), default=0)
        return Plan(
            None,
            width,
            height,
            batch,
            cfg,
            plans,
            "cpu",
            None,
            peak,
            ["No NVIDIA GPU: every component runs in FP32 on ONNX Runtime CPU, from system memory."],
        )
    plan = _stage(Plan(gpu, width, height, batch, cfg, plans, "all-resident", _usable_bytes(gpu), 0))
    bad = [p for p in plans if not precision_supported(p.precision, sm)]
    if bad:
        need = {"fp8": FP8_MIN_SM, "bf16": BF16_MIN_SM}
        top = max(need.get(p.precision, 0) for p in bad)
        fix = "bf16" if int(sm) >= BF16_MIN_SM else "fp32"
        what = ", ".join(f"{p.name} is {p.precision.upper()}" for p in bad)
        plan.cannot_run = (
            f"This bundle cannot run on {gpu.name} (SM {int(sm) // 10}.{int(sm) % 10}): {what}, which needs SM "
            f"{top // 10}.{top % 10} or newer. Export one that can: edgegen export --model {source or 'MODEL'} "
            f"--out DIR --precision {fix}")
        plan.strategy = "cannot-run"
        plan.notes.insert(0, plan.cannot_run)
    return plan


def _stage(plan: Plan) -> Plan:
    """Keep everything resident if it fits; else the runtime's low-VRAM stages, each of which must fit.

    The stages are exactly what Pipeline.execute does in low-VRAM mode: the text encoders (released before
    denoising), the transformer (released before decoding), the VAE decoder. Weight streaming is not offered:
    no exported engine is built for it yet, and a plan must not promise what the runtime does not do."""
    usable = plan.usable_bytes or 0
    comps = plan.components
    total = sum(c.weights_bytes for c in comps) + max((c.activation_bytes for c in comps), default=0)
    if total <= usable:
        plan.peak_bytes = total
        return plan
    groups = [[c for c in comps if c.kind in kinds] for kinds in STAGES]
    groups = [g for g in groups if g]
    plan.strategy = "staged"
    peaks = []
    for i, g in enumerate(groups, 1):
        for c in g:
            c.stage = i
        peak = sum(c.weights_bytes for c in g) + max(c.activation_bytes for c in g)
        peaks.append(peak)
        if peak > usable:
            plan.strategy = "does-not-fit"
            g[-1].notes.append(f"stage {i} ({', '.join(c.name for c in g)}) needs {peak / GIB:.1f} GiB alone")
    plan.peak_bytes = max(peaks)
    plan.notes.append(
        f"Not everything fits in {usable / GIB:.1f} GiB of usable VRAM "
        f"(all at once needs {total / GIB:.1f} GiB): components load and unload in {len(groups)} stages."
    )
    if plan.strategy == "does-not-fit":
        plan.notes.append("Lower --width/--height, export a smaller precision (FP8 transformer, FP8 or BF16 text "
                          "encoders), or use a GPU with more memory.")
    return plan

