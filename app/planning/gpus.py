"""The table of GPUs edgegen knows, and `--gpu auto|"NAME"|smXY:GiB` parsed into the GPU a plan is for."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from app.errors import UsageError
from app.planning.policy import GIB, normalise_sm

if TYPE_CHECKING:
    from app.planning.devices import GpuInfo, GpuReader

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
        from app.planning.devices import current_cuda_gpu, read_gpus

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

