"""Which device a run uses: the one place that turns `--device` into a torch device and its NVML record.

CUDA numbers GPUs in `CUDA_VISIBLE_DEVICES` order (fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID); NVML
numbers them by PCI bus. Every caller gets the pair joined by UUID here, so the engine chosen for a GPU,
the VRAM shown for it and the tensors placed on it all name the same card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from app.errors import UsageError
from app.planning.devices import GpuInfo, GpuReader, current_cuda_gpu

CPU = torch.device("cpu")


@dataclass(frozen=True)
class RunDevice:
    """A torch device that always carries its index (cuda:N), and the GPU behind it (None on the CPU)."""

    torch: torch.device
    gpu: GpuInfo | None = None

    @property
    def is_cuda(self) -> bool:
        return self.torch.type == "cuda"

    def __str__(self) -> str:
        return "CPU" if not self.is_cuda else f"{self.gpu.name if self.gpu else 'GPU'} ({self.torch})"


def parse_device(text: str | None) -> torch.device | None:
    """'cpu' -> cpu, 'cuda' -> cuda:0, 'cuda:1' / '1' -> cuda:1; None or 'auto' -> None (let the backend pick)."""
    v = (text or "auto").strip().lower()
    if v == "auto":
        return None
    if v == "cpu":
        return CPU
    m = re.fullmatch(r"(?:cuda:?)?(\d*)", v)
    if not m:
        raise UsageError(f"--device {text} is not a device; use auto, cpu, cuda or cuda:N")
    # Always with an index: torch resolves a bare "cuda" lazily, which also breaks fake-CUDA tests.
    return torch.device("cuda", int(m.group(1) or 0))


def cuda_device(index: int = 0, reader: GpuReader | None = None) -> RunDevice | None:
    """CUDA device `index` and its NVML record, or None when torch has no usable CUDA device there."""
    gpu = current_cuda_gpu(index, reader)
    return RunDevice(torch.device("cuda", index), gpu) if gpu is not None else None


def resolve(requested: torch.device | None, reader: GpuReader | None = None) -> RunDevice:
    """The device to run on: the requested one (refused with the fix when absent), else CUDA 0, else the CPU."""
    if requested is not None and requested.type == "cpu":
        return RunDevice(CPU)
    index = 0 if requested is None else (requested.index or 0)
    dev = cuda_device(index, reader)
    if dev is None and requested is not None:
        raise UsageError(f"--device {requested} is not usable here (no CUDA device {index} with a CUDA build of "
                         "PyTorch); use --device cpu or another index")
    return dev or RunDevice(CPU)
