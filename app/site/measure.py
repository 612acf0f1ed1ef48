"""What a run costs on its device: time per denoising step and peak VRAM (torch's allocator and NVML).

Shared by `edgegen selftest` and benchmarks/gpu_acceptance.py, so a site's self-test and the acceptance run
report the same figures. On the CPU the VRAM figures are None.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Cost:
    ms_per_step: float | None = None
    peak_torch_bytes: int | None = None  # torch's caching allocator (our buffers, ORT/TRT outputs we own)
    peak_nvml_bytes: int | None = None  # whole-device use as NVML reports it (all processes, all allocators)


class DeviceMeter:
    """Context manager: resets torch's peak counter and samples NVML's used bytes in a thread until exit."""

    def __init__(self, device, interval_s: float = 0.05):
        self.device, self.interval_s = device, interval_s
        self.cost = Cost()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._uuid: str | None = None

    def __enter__(self) -> DeviceMeter:
        if getattr(self.device, "type", "cpu") != "cuda":
            return self
        import torch

        from app.planning.devices import current_cuda_gpu

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        gpu = current_cuda_gpu(self.device.index or 0)
        self._uuid = gpu.uuid if gpu else None
        self._thread = threading.Thread(target=self._sample, name="edgegen-vram-meter", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        from app.planning.devices import normalise_uuid, read_gpus

        while not self._stop.is_set():
            for g in read_gpus():
                if self._uuid and normalise_uuid(g.uuid) == normalise_uuid(self._uuid) and g.used_bytes is not None:
                    self.cost.peak_nvml_bytes = max(self.cost.peak_nvml_bytes or 0, g.used_bytes)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        import torch

        torch.cuda.synchronize(self.device)
        self._stop.set()
        self._thread.join()
        self.cost.peak_torch_bytes = int(torch.cuda.max_memory_allocated(self.device))


class StepClock:
    """An on_step callback timing denoising steps 2..n of each image (step 1 carries warm-up and JIT work).

    On a GPU the device is synchronised once per image, after its last step; never inside a step."""

    def __init__(self, device):
        self.device = device
        self.per_image: list[float] = []
        self._first = 0.0

    def __call__(self, step: int, total: int) -> None:
        import time

        if step == 1:
            self._first = time.perf_counter()
        if step == total and total > 1:
            if getattr(self.device, "type", "cpu") == "cuda":
                import torch

                torch.cuda.synchronize(self.device)
            self.per_image.append((time.perf_counter() - self._first) / (total - 1))

    @property
    def ms_per_step(self) -> float | None:
        return None if not self.per_image else 1000 * sorted(self.per_image)[len(self.per_image) // 2]
