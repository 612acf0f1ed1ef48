"""STAND-IN engine for a machine without a GPU: the real EngineBackend / EngineSession code on fake CUDA tensors.

Only TensorRT's execution context is replaced (it cannot exist without a GPU). Its I/O names, dtypes and shape
ranges come from the bundle's manifest; output shapes come from the bundle's real ONNX graph, run by ONNX
Runtime on zeros of the requested shapes. Data is never computed: under torch's FakeTensorMode every tensor is a
fake CUDA tensor, and any mix of devices raises.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from app.runtime.engine.runner import EngineBackend
from app.runtime.engine.session import EngineSession

FAKE_CUDA = torch.device("cuda", 0)
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}
MAX_DIM = 1 << 16


def io_from_manifest(entry: dict) -> dict:
    """The engine I/O table (TensorRT's form: dtype names, -1 for dynamic dims) from a manifest component."""
    def one(t):
        return {"dtype": TRT_DTYPES[t["dtype"]], "shape": [d if isinstance(d, int) else -1 for d in t["shape"]]}

    return {"inputs": {t["name"]: one(t) for t in entry["inputs"]},
            "outputs": {t["name"]: one(t) for t in entry["outputs"]}}


def wide_profile(io: dict) -> list[dict]:
    """One profile admitting any size of every dynamic dim (the real bundle's profiles are narrower)."""
    return [{n: (tuple(d if d >= 0 else 1 for d in s["shape"]), tuple(d if d >= 0 else 1 for d in s["shape"]),
                 tuple(d if d >= 0 else MAX_DIM for d in s["shape"])) for n, s in io["inputs"].items()}]


class StandInContext:
    """Records what the session asks of an IExecutionContext; answers shapes from the real ONNX graph."""

    def __init__(self, onnx_path: str, io: dict):
        self.io = io
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.active_optimization_profile = -1
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0
        self.memory_sizes: list[int] = []
        self._known: dict[tuple, dict[str, tuple]] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.active_optimization_profile = index
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def _output_shapes(self) -> dict[str, tuple]:
        key = tuple(sorted(self.shapes.items()))
        if key not in self._known:
            feeds = {i.name: np.zeros(self.shapes[i.name], dtype=np.float32 if "float" in i.type else np.int64)
                     for i in self.session.get_inputs()}
            names = [o.name for o in self.session.get_outputs()]
            self._known[key] = {n: a.shape for n, a in zip(names, self.session.run(names, feeds))}
        return self._known[key]

    def get_tensor_shape(self, name: str):
        return self._output_shapes()[name] if name in self.io["outputs"] else self.shapes[name]

    def update_device_memory_size_for_shapes(self) -> int:
        # Some size that grows with the request, so the session's per-shape sizing is exercised.
        return 1024 * sum(int(np.prod(s)) for s in self.shapes.values())

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory_sizes.append(size)

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.executions += 1
        return True


class StandInEngineBackend(EngineBackend):
    """EngineBackend with stand-in contexts on fake CUDA device 0 (named `stand-in`, never a real backend)."""

    name = "stand-in-engine"

    def __init__(self, bundle, device: torch.device = FAKE_CUDA):
        super().__init__(device)
        self.bundle = bundle
        self.contexts: dict[str, StandInContext] = {}
        self.released: list[str] = []

    def open_session(self, component: str) -> EngineSession:
        io = io_from_manifest(self.bundle.components()[component])
        ctx = StandInContext(str(self.bundle.onnx_path(component)), io)
        self.contexts[component] = ctx
        return EngineSession(component, io, wide_profile(io), ctx, self.device, stream=lambda: 0,
                             label="stand-in engine", user_memory=True)

    def on_release(self, component: str) -> None:
        self.released.append(component)

    def describe(self) -> str:
        return "stand-in engine (fake CUDA, no GPU)"
