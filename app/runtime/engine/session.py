"""One engine's execution, in the shape NVIDIA's TensorRT diffusion demo proved: buffers per shape, one stream.

`EngineSession` drives anything with TensorRT's IExecutionContext surface (set_input_shape, get_tensor_shape,
set_tensor_address, execute_async_v3, ...). The real context comes from runner.py; the tests drive the very
same session with a stand-in context on fake CUDA tensors, so every line here runs in CI.

- Inputs must already be on the session's device: a tensor on the wrong device is a pipeline bug and is
  refused, never silently copied (that copy would hide a per-step host round trip).
- Output buffers are allocated once per shape and reused; a returned tensor is valid until the next run of
  the same component (the pipelines copy what they keep).
- Activation memory: where the context supports user-managed memory, a scratch buffer sized for the
  request's shapes (not the profile's maximum) is allocated, reused while shapes repeat.
- No synchronisation: the engine is enqueued on the caller's current stream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from app.errors import EdgegenError
from app.runtime.engine.shapes import DTYPES, Shape, plan_buffers, select_profile, validate_inputs


def dense(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor for an engine's flat buffer (same as .contiguous(); this form also runs on fake CUDA
    tensors in a CPU-only build, where .contiguous() asks for a CUDA device guard)."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


class DeviceMismatch(EdgegenError):
    """A tensor reached an engine on another device: a bug in the caller, reported as one line."""


class EngineSession:
    def __init__(
        self,
        component: str,
        io: Mapping[str, Any],
        profiles: Sequence[Mapping[str, Any]],
        context: Any,
        device: torch.device,
        stream: Callable[[], int],
        label: str = "TensorRT",
        user_memory: bool = False,
    ):
        self.component, self.io, self.profiles, self.context = component, io, profiles, context
        self.device, self.stream, self.label, self.user_memory = device, stream, label, user_memory
        self._outputs: dict[tuple, dict[str, torch.Tensor]] = {}  # (profile, input shapes) -> output buffers
        self._scratch: torch.Tensor | None = None  # user-managed activation memory
        self.runs = 0

    def __call__(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shapes = {n: tuple(t.shape) for n, t in inputs.items()}
        validate_inputs(self.io, shapes)
        for name, t in inputs.items():
            if t.device != self.device:
                raise DeviceMismatch(f"the {self.component} engine runs on {self.device} but its input {name} is "
                                     f"on {t.device}; this is a bug in edgegen, please report it")
        idx = select_profile(self.profiles, shapes, component=self.component)
        ctx = self.context
        if ctx.active_optimization_profile != idx:
            ctx.set_optimization_profile_async(idx, self.stream())
            self._outputs.clear()  # buffers and addresses belong to one profile
        feeds = {}
        for name, spec in self.io["inputs"].items():
            feeds[name] = dense(inputs[name].to(dtype=getattr(torch, DTYPES[spec["dtype"]][0])))
            if not ctx.set_input_shape(name, tuple(feeds[name].shape)):
                raise EdgegenError(f"The {self.component} engine refused shape {list(feeds[name].shape)} for "
                                   f"{name}; choose a size inside the bundle's range.")
        key = (idx, tuple(sorted(shapes.items())))
        outs = self._outputs.get(key)
        if outs is None:
            outs = self._allocate(shapes)
            self._outputs[key] = outs
        self._size_scratch()
        for name, t in {**feeds, **outs}.items():
            ctx.set_tensor_address(name, t.data_ptr())
        if not ctx.execute_async_v3(self.stream()):
            raise EdgegenError(f"{self.label} failed to run the {self.component} engine; run `edgegen selftest` "
                               "and re-export the bundle if it fails too.")
        self.runs += 1
        return dict(outs)

    def _allocate(self, shapes: Mapping[str, Shape]) -> dict[str, torch.Tensor]:
        ctx = self.context
        out_shapes = {n: tuple(ctx.get_tensor_shape(n)) for n in self.io["outputs"]}
        buffers = plan_buffers(self.io, shapes, out_shapes)
        return {b.name: torch.empty(b.shape, dtype=getattr(torch, b.dtype), device=self.device)
                for b in buffers if b.mode == "output"}

    def _size_scratch(self) -> None:
        """Activation memory for these shapes only (TensorRT's USER_MANAGED allocation strategy)."""
        if not self.user_memory:
            return
        need = int(self.context.update_device_memory_size_for_shapes())
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = None  # free the old block before asking for the new one
            self._scratch = torch.empty(max(need, 1), dtype=torch.uint8, device=self.device)
            self.context.set_device_memory(self._scratch.data_ptr(), need)

    @property
    def activation_bytes(self) -> int:
        return 0 if self._scratch is None else int(self._scratch.numel())

    def release(self) -> None:
        self._outputs.clear()
        self._scratch = None
