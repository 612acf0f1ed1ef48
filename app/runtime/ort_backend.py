"""ONNX Runtime backend: the bundle's ONNX graphs on the CPU provider or the CUDA provider."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from app.bundle.manifest import Bundle
from app.errors import UsageError


def ort_session_options():
    """Session options for every bundle ONNX, FP8 included.

    onnxruntime 1.32 runs FP8 Q/DQ graphs at every optimisation level; 1.24-1.31 fail at the default level
    (MatMulIntegerToFloat fusion), so with those the level drops to BASIC rather than failing."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if (major, minor) >= (1, 32)
        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    )
    so.log_severity_level = 3
    return so


class OrtBackend:
    """ONNX Runtime: CUDA EP when present and asked for, otherwise CPU. Sessions open on first use."""

    def __init__(self, bundle: Bundle, device: Literal["cpu", "cuda"] = "cpu"):
        import onnxruntime as ort

        self.bundle, self.device = bundle, device
        available = ort.get_available_providers()
        if device == "cuda" and "CUDAExecutionProvider" not in available:
            raise UsageError("ONNX Runtime here has no CUDA provider; install onnxruntime-gpu or use --backend onnxruntime")
        self.providers = (["CUDAExecutionProvider"] if device == "cuda" else []) + ["CPUExecutionProvider"]
        self.name = f"onnxruntime-{device}"
        self._sessions: dict[str, object] = {}
        self._dtypes: dict[str, dict[str, np.dtype]] = {}

    def session(self, component: str):
        if component not in self._sessions:
            import onnxruntime as ort

            spec = self.bundle.components()[component]
            self._sessions[component] = ort.InferenceSession(
                str(self.bundle.onnx_path(component)), sess_options=ort_session_options(), providers=self.providers
            )
            self._dtypes[component] = {i["name"]: np.dtype(i["dtype"]) for i in spec["inputs"]}
        return self._sessions[component]

    def run(self, component, inputs):
        sess = self.session(component)
        dtypes = self._dtypes[component]
        feeds = {k: np.ascontiguousarray(v.detach().cpu().numpy(), dtype=dtypes[k]) for k, v in inputs.items()}
        names = [o.name for o in sess.get_outputs()]
        return {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, sess.run(names, feeds))}

    def describe(self) -> str:
        return f"ONNX Runtime {self.device.upper()} ({self.bundle.precision})"

