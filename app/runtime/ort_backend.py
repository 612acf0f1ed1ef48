"""ONNX Runtime backend: the bundle's ONNX graphs on the CPU provider or the CUDA provider."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from app.bundle.manifest import Bundle
from app.errors import UsageError
from app.runtime.engine.session import DeviceMismatch, dense


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
    """ONNX Runtime on the backend's device. Sessions open on first use.

    CPU: tensors go in and out as numpy arrays (zero-copy where the dtype matches).
    CUDA: IO binding on torch CUDA tensors, on torch's current stream; outputs come back as torch CUDA
    tensors, so nothing crosses to the host between steps. The CUDA path has NEVER run on a GPU
    (VERIFIED_CUDA_ON_HARDWARE); tests/test_device_pipeline.py checks its device handling on the CPU.
    """

    VERIFIED_CUDA_ON_HARDWARE = False

    def __init__(self, bundle: Bundle, device: torch.device | Literal["cpu", "cuda"] = "cpu"):
        import onnxruntime as ort

        if isinstance(device, str):
            device = torch.device("cuda", 0) if device == "cuda" else torch.device(device)
        self.bundle, self.device = bundle, device
        self.on_cuda = device.type == "cuda"
        if self.on_cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UsageError("ONNX Runtime here has no CUDA provider; install onnxruntime-gpu (and not onnxruntime "
                             "next to it), or run on the CPU with --backend onnxruntime --device cpu")
        half = sorted(n for n, c in bundle.components().items()
                      if c.get("precision") == "bf16" or (c.get("fp8") or {}).get("high_precision") == "bf16")
        if half and not self.on_cuda:  # ORT 1.32's CPU provider has no BF16 MatMul/Add/Mul/Softmax (checked)
            src = bundle.manifest.get("source", {}).get("path", "MODEL_DIR")
            raise UsageError(f"this bundle's {', '.join(half)} compute in BF16, and BF16 bundles are for NVIDIA GPUs "
                             "(TensorRT engines or ONNX Runtime CUDA): ONNX Runtime's CPU provider has no BF16 "
                             f"kernels; for the CPU: edgegen export --model {src} --out DIR --precision fp32")
        self.name = f"onnxruntime-{device.type}"
        self._sessions: dict[str, object] = {}
        self._dtypes: dict[str, dict[str, np.dtype]] = {}

    def providers(self) -> list:
        if not self.on_cuda:
            return ["CPUExecutionProvider"]
        # The CUDA provider enqueues on torch's current stream: no cross-stream waits, no extra syncs.
        stream = torch.cuda.current_stream(self.device).cuda_stream
        return [("CUDAExecutionProvider", {"device_id": self.device.index or 0,
                                           "user_compute_stream": str(stream)}), "CPUExecutionProvider"]

    def session(self, component: str):
        if component not in self._sessions:
            import onnxruntime as ort

            spec = self.bundle.components()[component]
            self._sessions[component] = ort.InferenceSession(
                str(self.bundle.onnx_path(component)), sess_options=ort_session_options(),
                providers=self.providers(),
            )
            self._dtypes[component] = {i["name"]: np.dtype(i["dtype"]) for i in spec["inputs"]}
        return self._sessions[component]

    def run(self, component, inputs):
        sess = self.session(component)
        dtypes = self._dtypes[component]
        for name, t in inputs.items():
            if t.device != self.device:
                raise DeviceMismatch(f"ONNX Runtime runs {component} on {self.device} but its input {name} is on "
                                     f"{t.device}; this is a bug in edgegen, please report it")
        if self.on_cuda:
            return self._run_bound(sess, component, inputs)
        feeds = {k: np.ascontiguousarray(v.detach().numpy(), dtype=dtypes[k]) for k, v in inputs.items()}
        names = [o.name for o in sess.get_outputs()]
        return {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, sess.run(names, feeds))}

    def _run_bound(self, sess, component, inputs):
        """IO binding: ONNX Runtime reads the torch tensors in place and allocates its outputs on the GPU."""
        dtypes, index = self._dtypes[component], self.device.index or 0
        binding = sess.io_binding()
        keep = []
        for name, t in inputs.items():
            t = dense(t.to(dtype=_TORCH_DTYPES[dtypes[name]]))
            keep.append(t)
            binding.bind_input(name, "cuda", index, dtypes[name], tuple(t.shape), t.data_ptr())
        names = [o.name for o in sess.get_outputs()]
        for n in names:
            binding.bind_output(n, "cuda", index)
        sess.run_with_iobinding(binding)
        # Own the results: ONNX Runtime frees its output memory with the binding.
        return {n: _as_torch(v, self.device).clone() for n, v in zip(names, binding.get_outputs())}

    def release(self, component: str) -> None:
        self._sessions.pop(component, None)

    def describe(self) -> str:
        return f"ONNX Runtime {self.device.type.upper()} ({self.bundle.precision})"


_TORCH_DTYPES = {np.dtype(k): getattr(torch, k) for k in ("float32", "float16", "int64", "int32", "bool")}


class _CudaArray:
    """An ONNX Runtime CUDA OrtValue seen through __cuda_array_interface__, so torch wraps it without a copy."""

    def __init__(self, value):
        self.__cuda_array_interface__ = {
            "shape": tuple(value.shape()), "typestr": _ORT_TYPESTR[value.data_type()],
            "data": (value.data_ptr(), False), "version": 2, "strides": None,
        }


_ORT_TYPESTR = {"tensor(float)": "<f4", "tensor(float16)": "<f2", "tensor(int64)": "<i8", "tensor(int32)": "<i4"}


def _as_torch(value, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(_CudaArray(value), device=device)
