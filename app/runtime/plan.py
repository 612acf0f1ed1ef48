"""Per-GPU plan: which precision, engine flavour, shape profile and VRAM stage each model component gets.

Everything here is a pure, table-driven function so `edgegen plan` can answer for a GPU the machine does not
have (`--gpu "RTX 4090"` or `--gpu sm89:24`) and tests can pin every rule without hardware.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from app.errors import UsageError

if TYPE_CHECKING:  # rich and gpu readers are only needed by callers that render or detect
    from rich.table import Table

    from app.runtime.gpu import GpuInfo, GpuReader

GIB = 1024**3

# Compute capabilities TensorRT-RTX 1.7 can build for (its ComputeCapability enum); no Hopper/datacentre
# Blackwell, which need full TensorRT 11 built on the GPU itself (FACTS.md, TensorRT section).
RTX_TARGET_SMS: tuple[str, ...] = ("75", "80", "86", "89", "120", "121")
FP8_MIN_SM = 89  # FP8 tensor cores arrive with Ada (8.9); TensorRT-RTX refuses FP8 for sm80/86.
BF16_MIN_SM = 80  # Ampere and newer.

Kind = Literal["text_encoder", "transformer", "vae_decoder"]
KINDS: tuple[str, ...] = ("text_encoder", "transformer", "vae_decoder")
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.1}  # fp8: ~10% of layers stay in bf16


@dataclass(frozen=True)
class KnownGpu:
    name: str  # the marketing name NVML reports, minus "NVIDIA"
    sm: str
    vram_gib: float
    aliases: tuple[str, ...] = ()


# Smallest memory variant where a name has several, so a plan from the table never over-promises.
KNOWN_GPUS: tuple[KnownGpu, ...] = (
    KnownGpu("Tesla T4", "75", 16, ("t4",)),
    KnownGpu("GeForce RTX 2080 Ti", "75", 11),
    KnownGpu("Quadro RTX 6000", "75", 24),
    KnownGpu("A100", "80", 40, ("a100 40gb", "a100 sxm4 40gb", "a100 pcie 40gb")),
    KnownGpu("A100 80GB", "80", 80, ("a100 sxm4 80gb", "a100 pcie 80gb")),
    KnownGpu("A10", "86", 24),
    KnownGpu("A40", "86", 48),
    KnownGpu("GeForce RTX 3060", "86", 12),
    KnownGpu("GeForce RTX 3070", "86", 8),
    KnownGpu("GeForce RTX 3080", "86", 10),
    KnownGpu("GeForce RTX 3080 Ti", "86", 12),
    KnownGpu("GeForce RTX 3090", "86", 24),
    KnownGpu("GeForce RTX 3090 Ti", "86", 24),
    KnownGpu("RTX A4000", "86", 16),
    KnownGpu("RTX A5000", "86", 24),
    KnownGpu("RTX A6000", "86", 48),
    KnownGpu("GeForce RTX 4060", "89", 8),
    KnownGpu("GeForce RTX 4060 Ti", "89", 8),
    KnownGpu("GeForce RTX 4070", "89", 12),
    KnownGpu("GeForce RTX 4070 Ti", "89", 12),
    KnownGpu("GeForce RTX 4070 Ti SUPER", "89", 16),
    KnownGpu("GeForce RTX 4080", "89", 16),
    KnownGpu("GeForce RTX 4080 SUPER", "89", 16),
    KnownGpu("GeForce RTX 4090", "89", 24),
    KnownGpu("RTX 4000 Ada Generation", "89", 20, ("rtx 4000 ada",)),
    KnownGpu("RTX 5000 Ada Generation", "89", 32, ("rtx 5000 ada",)),
    KnownGpu("RTX 6000 Ada Generation", "89", 48, ("rtx 6000 ada",)),
    KnownGpu("L4", "89", 24),
    KnownGpu("L40", "89", 48),
    KnownGpu("L40S", "89", 48),
    KnownGpu("H100", "90", 80, ("h100 80gb hbm3", "h100 pcie", "h100 sxm")),
    KnownGpu("H100 NVL", "90", 94),
    KnownGpu("H200", "90", 141),
    KnownGpu("B200", "100", 180),
    KnownGpu("GeForce RTX 5070", "120", 12),
    KnownGpu("GeForce RTX 5070 Ti", "120", 16),
    KnownGpu("GeForce RTX 5080", "120", 16),
    KnownGpu("GeForce RTX 5090", "120", 32),
    KnownGpu("RTX PRO 4000 Blackwell", "120", 24),
    KnownGpu("RTX PRO 5000 Blackwell", "120", 48),
    KnownGpu(
        "RTX PRO 6000 Blackwell",
        "120",
        96,
        (
            "rtx pro 6000",
            "rtx pro 6000 blackwell workstation edition",
            "rtx pro 6000 blackwell server edition",
        ),
    ),
    KnownGpu("GB10", "121", 128, ("dgx spark",)),  # unified memory; NVML reports no framebuffer size
)


@dataclass(frozen=True)
class GpuSpec:
    """The GPU a plan is for: detected, looked up by name, or given as smXY:GiB."""

    name: str
    sm: str
    vram_bytes: int
    free_bytes: int | None = None  # only known for a detected GPU
    source: Literal["detected", "table", "manual"] = "table"

    @property
    def sm_int(self) -> int:
        return int(self.sm)


@dataclass(frozen=True, kw_only=True)  # keywords only: param_count vs fp32_bytes must never be confused
class ComponentInfo:
    """One exportable component. Give param_count, or fp32_bytes (the weights' size at fp32)."""

    name: str
    kind: Kind
    param_count: int | None = None
    fp32_bytes: int | None = None
    hidden_size: int | None = None  # sharpens the activation estimate when known
    text_tokens: int = 512  # Klein pads prompts to 512; SD3.5 uses 77 + 256

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
    strategy: Literal["all-resident", "staged", "staged+streaming", "does-not-fit", "cpu"]
    usable_bytes: int | None
    peak_bytes: int
    notes: list[str] = field(default_factory=list)

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
            "components": [{**asdict(c), "peak_bytes": c.peak_bytes} for c in self.components],
        }
        return d


# ---------------------------------------------------------------- parsing


def normalise_sm(value: str | int) -> str:
    """'89', 'sm89', 'SM_89', '8.9', 89 -> '89'. Raises UsageError on anything else."""
    s = str(value).strip().lower().removeprefix("sm").lstrip("_")
    if re.fullmatch(r"\d+\.\d", s):
        s = s.replace(".", "")
    if not re.fullmatch(r"\d{2,3}", s) or int(s) < 50:
        raise UsageError(f"'{value}' is not a compute capability; write it like sm89 or 8.9.")
    return s


def parse_sm_list(value: str) -> list[str]:
    """`--sm 89,120` -> ['89', '120'] (order kept, duplicates dropped)."""
    out: list[str] = []
    for part in value.split(","):
        if part.strip():
            sm = normalise_sm(part)
            if sm not in out:
                out.append(sm)
    if not out:
        raise UsageError("--sm is empty; give compute capabilities like --sm 89,120.")
    return out


def _tokens(name: str) -> list[str]:
    s = name.lower().replace("nvidia", " ").replace("geforce", " ").replace("tesla", " ")
    return re.findall(r"[a-z0-9]+", s)


def lookup_gpu(name: str) -> KnownGpu | None:
    """Find a table entry for an NVML or user-typed name: the longest alias whose words appear in order."""
    q = _tokens(name)
    best: tuple[int, KnownGpu] | None = None
    for gpu in KNOWN_GPUS:
        for alias in (gpu.name, *gpu.aliases):
            a = _tokens(alias)
            hit = any(q[i : i + len(a)] == a for i in range(len(q) - len(a) + 1))
            if hit and (best is None or len(a) > best[0]):
                best = (len(a), gpu)
    return best[1] if best else None


def gpu_spec_from_info(info: GpuInfo) -> GpuSpec:
    """A detected GPU; falls back to the table's VRAM where NVML reports none (unified-memory GB10)."""
    total = info.total_bytes
    if not total:
        known = lookup_gpu(info.name)
        total = int(known.vram_gib * GIB) if known else 0
    return GpuSpec(info.name, info.sm, int(total), info.free_bytes, "detected")


def parse_gpu_option(value: str, reader: GpuReader | None = None) -> GpuSpec | None:
    """Parse `--gpu auto|"NAME"|smXY:GiB`. `auto` returns None when this machine has no NVIDIA GPU."""
    v = (value or "").strip()
    if not v:
        raise UsageError(
            '--gpu is empty; use --gpu auto, a name such as "RTX 4090", or smXY:GiB such as sm89:24.'
        )
    if v.lower() == "auto":
        from app.runtime.gpu import current_cuda_gpu, read_gpus

        # CUDA device 0 is what the runtime uses; NVML may number GPUs differently, so ask CUDA first.
        g = (current_cuda_gpu(0) if reader is None else None) or next(iter(read_gpus(reader)), None)
        return gpu_spec_from_info(g) if g else None
    m = re.fullmatch(r"(?i)sm_?(\d+(?:\.\d)?)\s*:\s*(\d+(?:\.\d+)?)\s*(?:gib|gb|g)?", v)
    if m:
        sm = normalise_sm(m.group(1))
        gib = float(m.group(2))
        if not 0 < gib <= 4096:
            raise UsageError(f"--gpu {v}: memory must be between 1 and 4096 GiB, e.g. sm89:24.")
        return GpuSpec(f"sm{sm} GPU", sm, int(gib * GIB), None, "manual")
    if re.match(r"(?i)^sm\d", v):
        raise UsageError(f"--gpu {v}: write a compute capability with its memory in GiB, e.g. sm89:24.")
    known = lookup_gpu(v)
    if known is None:
        raise UsageError(
            f'--gpu "{v}" is not a GPU edgegen knows; use --gpu auto, a name such as "RTX 4090", '
            "or smXY:GiB such as sm89:24."
        )
    return GpuSpec(known.name, known.sm, int(known.vram_gib * GIB), None, "table")


# ---------------------------------------------------------------- rules


def engine_flavour_for_sm(sm: str | int) -> str:
    """TensorRT-RTX where it can target the SM (portable, builds with no GPU); full TensorRT 11 elsewhere."""
    return "tensorrt-rtx" if normalise_sm(sm) in RTX_TARGET_SMS else "tensorrt"


def precision_supported(precision: str, sm: str | int) -> bool:
    s = int(normalise_sm(sm))
    if precision == "fp8":
        return s >= FP8_MIN_SM
    if precision == "bf16":
        return s >= BF16_MIN_SM
    return precision in ("fp16", "fp32")


def choose_precision(kind: str, sm: str | int | None) -> str:
    """Per-component precision for a GPU (None = CPU).

    FP8 only for the transformer and only on sm89+ (calibrated Q/DQ; text encoders are not calibrated);
    text encoders never FP16 (T5/Qwen overflow), VAE never FP8/FP16 (FACTS.md upstream practice).
    """
    if sm is None:
        return "fp32"
    s = int(normalise_sm(sm))
    if kind == "transformer":
        if s >= FP8_MIN_SM:
            return "fp8"
        return "bf16" if s >= BF16_MIN_SM else "fp16"
    return "bf16" if s >= BF16_MIN_SM else "fp32"


def _profile(kind: str, width: int, height: int, batch: int, cfg: bool) -> dict[str, list[int]]:
    # CFG runs the conditional and unconditional branch as one doubled batch; the VAE only decodes the result.
    b = batch * (2 if cfg and kind != "vae_decoder" else 1)
    prof = {"batch": [b, b, b]}
    if kind != "text_encoder":
        prof["height"] = [height, height, height]
        prof["width"] = [width, width, width]
    return prof


CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context, cuBLAS/cuDNN handles, TensorRT runtime
DEFAULT_HIDDEN = {"text_encoder": 2560, "transformer": 3072, "vae_decoder": 0}


def estimate_activation_bytes(c: ComponentInfo, precision: str, width: int, height: int, batch: int) -> int:
    """Rough peak activation/workspace memory. Deliberately generous: users report wrong VRAM accounting."""
    act_bytes = 4 if precision == "fp32" else 2  # FP8 graphs keep activations in 16-bit between Q/DQ pairs
    hidden = c.hidden_size or DEFAULT_HIDDEN[c.kind]
    if c.kind == "transformer":
        tokens = (width // 16) * (height // 16) + c.text_tokens  # 8x VAE, 2x2 patches
        return batch * tokens * hidden * act_bytes * 24 + int(0.5 * GIB)  # QKV, MLP 4x, attention tiles
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
) -> Plan:
    """Decide precision, engine flavour, profile and VRAM stage for every component on `gpu` (None = CPU)."""
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
        prec = choose_precision(c.kind, sm)
        eff_batch = _profile(c.kind, width, height, batch, cfg)["batch"][0]
        plans.append(
            ComponentPlan(
                name=c.name,
                kind=c.kind,
                precision=prec,
                engine=engine_flavour_for_sm(sm) if sm else "onnxruntime-cpu",
                profile=_profile(c.kind, width, height, batch, cfg),
                weights_bytes=int(c.params * PRECISION_BYTES[prec]),
                activation_bytes=estimate_activation_bytes(c, prec, width, height, eff_batch),
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
    return _stage(Plan(gpu, width, height, batch, cfg, plans, "all-resident", _usable_bytes(gpu), 0))


def _stage(plan: Plan) -> Plan:
    """Keep everything resident if it fits; else group components greedily in pipeline order into stages."""
    usable = plan.usable_bytes or 0
    comps = plan.components
    total = sum(c.weights_bytes for c in comps) + max((c.activation_bytes for c in comps), default=0)
    if total <= usable:
        plan.peak_bytes = total
        return plan
    groups: list[list[ComponentPlan]] = []
    for c in comps:
        g = groups[-1] if groups else None
        if (
            g
            and (
                sum(x.weights_bytes for x in g)
                + c.weights_bytes
                + max(c.activation_bytes, *(x.activation_bytes for x in g))
            )
            <= usable
        ):
            g.append(c)
        else:
            groups.append([c])
    for i, g in enumerate(groups, 1):
        for c in g:
            c.stage = i
    plan.strategy = "staged"
    for c in comps:
        if c.peak_bytes <= usable:
            continue
        room = usable - c.activation_bytes
        # Weight streaming keeps the rest of the weights in host memory; it needs room for a useful slice.
        if room > 0.1 * c.weights_bytes:
            c.weight_streaming = True
            c.notes.append(
                f"weight streaming: ~{room / GIB:.1f} of {c.weights_bytes / GIB:.1f} GiB on the GPU"
            )
            if plan.strategy == "staged":
                plan.strategy = "staged+streaming"
        else:
            c.notes.append("does not fit even with weight streaming")
            plan.strategy = "does-not-fit"

    def resident(c: ComponentPlan) -> int:
        return (
            min(c.weights_bytes, max(usable - c.activation_bytes, 0))
            if c.weight_streaming
            else c.weights_bytes
        )

    plan.peak_bytes = max(sum(resident(c) for c in g) + max(c.activation_bytes for c in g) for g in groups)
    plan.notes.append(
        f"Not everything fits in {usable / GIB:.1f} GiB of usable VRAM "
        f"(all at once needs {total / GIB:.1f} GiB): "
        f"components load and unload in {len(groups)} stages."
    )
    if plan.strategy == "does-not-fit":
        plan.notes.append("Lower --width/--height or the batch, or use a GPU with more memory.")
    return plan


# ---------------------------------------------------------------- rendering


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:.1f} GiB"


def render_plan(plan: Plan) -> Table:
    """A rich table of the plan; its caption carries the strategy and notes."""
    from rich.table import Table

    g = plan.gpu
    head = f"{g.name} (sm{g.sm}, {_gib(g.vram_bytes)})" if g else "CPU (no NVIDIA GPU)"
    title = (
        f"Plan for {head}: {plan.width}x{plan.height}, batch {plan.batch}, CFG {'on' if plan.cfg else 'off'}"
    )
    t = Table(
        title=title,
        caption=" ".join(
            [
                f"Strategy: {plan.strategy}, peak {_gib(plan.peak_bytes)} "
                f"of {_gib(plan.usable_bytes)} usable.",
                *plan.notes,
            ]
        ),
    )
    for col in (
        "Component",
        "Kind",
        "Precision",
        "Engine",
        "Batch",
        "Weights",
        "Activations",
        "Peak",
        "Stage",
    ):
        t.add_column(
            col, justify="right" if col in ("Batch", "Weights", "Activations", "Peak", "Stage") else "left"
        )
    for c in plan.components:
        t.add_row(
            c.name,
            c.kind,
            c.precision,
            c.engine + (" (streaming)" if c.weight_streaming else ""),
            str(c.profile["batch"][1]),
            _gib(c.weights_bytes),
            _gib(c.activation_bytes),
            _gib(c.peak_bytes),
            str(c.stage),
        )
    return t
