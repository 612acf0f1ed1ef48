"""NVML figures the VRAM monitor shows beyond GpuInfo: utilisation, temperature, this process's VRAM."""

from __future__ import annotations

import os
from dataclasses import dataclass

from app.planning.devices import GpuInfo, GpuReader, NvmlReader


@dataclass(frozen=True)
class GpuExtras:
    utilisation: int | None = None  # percent
    temperature: int | None = None  # degrees C
    process_bytes: int | None = None  # VRAM held by this process


@dataclass(frozen=True)
class GpuSample:
    """One reading: the GPU (None when there is none) and its extras."""

    time: float
    gpu: GpuInfo | None
    extras: GpuExtras = GpuExtras()


class NvmlStatsReader(NvmlReader):
    """The real reader plus `extras(index)`; like NvmlReader it never raises."""

    def extras(self, index: int) -> GpuExtras:
        try:
            import pynvml
        except ImportError:
            return GpuExtras()
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return GpuExtras()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            return GpuExtras(_try(lambda: int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)),
                             _try(lambda: int(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))),
                             _try(lambda: _process_bytes(pynvml, h)))
        except pynvml.NVMLError:
            return GpuExtras()
        finally:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


def _process_bytes(pynvml, handle) -> int:
    pid, total = os.getpid(), 0
    for getter in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
        for p in getter(handle):
            if p.pid == pid and p.usedGpuMemory is not None:
                total += int(p.usedGpuMemory)
    return total


def _try(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - a figure NVML cannot give on this GPU is shown as unknown
        return None


def read_sample(reader: GpuReader, now: float) -> GpuSample:
    gpus = reader.read()
    if not gpus:
        return GpuSample(now, None)
    extras = reader.extras(gpus[0].index) if hasattr(reader, "extras") else GpuExtras()
    return GpuSample(now, gpus[0], extras)
