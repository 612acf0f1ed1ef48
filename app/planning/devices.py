"""Read the machine's NVIDIA GPUs through NVML (name, UUID, compute capability, memory, driver); [] when none.

A `GpuReader` is injected wherever GPUs are read, so tests and `--gpu` planning use `FakeGpuReader` and
never touch the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML index; equals the CUDA index only with CUDA_DEVICE_ORDER=PCI_BUS_ID
    name: str
    uuid: str  # "GPU-xxxxxxxx-..." as NVML writes it
    sm: str  # compute capability without the dot: "89"
    total_bytes: int | None  # None where NVML has no framebuffer size (unified memory, e.g. GB10)
    used_bytes: int | None
    free_bytes: int | None
    driver: str

    @property
    def sm_int(self) -> int:
        return int(self.sm)


@runtime_checkable
class GpuReader(Protocol):
    def read(self) -> list[GpuInfo]: ...


def _text(v: object) -> str:
    # pynvml returned bytes before 11.5 and str after; accept both.
    return v.decode() if isinstance(v, bytes) else str(v)


class NvmlReader:
    """The real reader. Never raises: a machine without the NVIDIA driver simply has no GPUs."""

    def read(self) -> list[GpuInfo]:
        try:
            import pynvml
        except ImportError:
            return []
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:  # includes NVMLError_LibraryNotFound / DriverNotLoaded on CPU machines
            return []
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            out = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                try:
                    mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                    total, used, free = int(mem.total), int(mem.used), int(mem.free)
                except pynvml.NVMLError:  # NOT_SUPPORTED on unified-memory parts
                    total = used = free = None
                out.append(
                    GpuInfo(
                        i,
                        _text(pynvml.nvmlDeviceGetName(h)),
                        _text(pynvml.nvmlDeviceGetUUID(h)),
                        f"{major}{minor}",
                        total,
                        used,
                        free,
                        driver,
                    )
                )
            return out
        except pynvml.NVMLError:
            return []
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


class FakeGpuReader:
    """For tests and what-if planning only: returns the GPUs it was given."""

    def __init__(self, gpus: list[GpuInfo] | None = None) -> None:
        self.gpus = list(gpus or [])

    def read(self) -> list[GpuInfo]:
        return list(self.gpus)


def fake_gpu(
    name: str = "NVIDIA GeForce RTX 4090",
    sm: str = "89",
    total_gib: float = 24.0,
    free_gib: float | None = None,
    uuid: str = "GPU-00000000-fake-0000-0000-000000000000",
    driver: str = "580.00",
    index: int = 0,
) -> GpuInfo:
    """A GpuInfo for tests (FakeGpuReader); free defaults to total minus 0.5 GiB of desktop use."""
    gib = 1024**3
    total = int(total_gib * gib)
    free = int((free_gib if free_gib is not None else total_gib - 0.5) * gib)
    return GpuInfo(index, name, uuid, sm, total, total - free, free, driver)


def read_gpus(reader: GpuReader | None = None) -> list[GpuInfo]:
    """All NVIDIA GPUs visible to NVML, or [] when there are none or no driver."""
    return (reader or NvmlReader()).read()


def normalise_uuid(uuid: str) -> str:
    """NVML writes 'GPU-<uuid>', torch writes '<uuid>'; compare them without the prefix."""
    u = str(uuid).strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def current_cuda_gpu(device: int = 0, reader: GpuReader | None = None) -> GpuInfo | None:
    """The GPU behind CUDA device `device` as torch sees it, completed from NVML by UUID; None without CUDA.

    Needed because NVML and CUDA can number GPUs differently (CUDA orders fastest first by default).
    """
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        p = torch.cuda.get_device_properties(device)
    except Exception:  # CPU torch build, driver mismatch: no usable CUDA device
        return None
    uuid = str(getattr(p, "uuid", ""))
    for g in read_gpus(reader):
        if uuid and normalise_uuid(g.uuid) == normalise_uuid(uuid):
            return g
    return GpuInfo(
        device,
        p.name,
        f"GPU-{uuid}" if uuid else f"cuda:{device}",
        f"{p.major}{p.minor}",
        int(p.total_memory),
        None,
        None,
        "",
    )
