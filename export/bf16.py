"""BF16 (and FP16) graphs: FP32 islands in the exported graph, and the FP32-compute twin that checks it.

The graph is traced from the module loaded in its half dtype (no FP32 copy ever exists), so it carries BF16
weights and BF16 compute, with FP32 where the module itself upcasts, plus the ops export/bf16_policy.py
lists (keep_fp32_islands). ONNX Runtime's CPU provider has no BF16 MatMul/Add/Mul/Softmax (checked, 1.32),
so the check runs the same graph with every BF16 tensor widened to FP32 (fp32_twin: a second small graph
file over the same weights file; each weight is cast when it is used, so memory stays one half-precision
copy plus one FP32 tensor) against PyTorch on the same rounded weights in FP32 (fp32_compute: each module's
own weights are widened only while it runs). Agreement proves that the BF16 graph computes the model's
function on its rounded weights: every op, its wiring and the dynamic shapes. It does not measure BF16
arithmetic; that is measured separately, PyTorch BF16 vs PyTorch FP32 on the same weights.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TWIN_NAME = "model.fp32.onnx"  # beside model.onnx, sharing its external data file; removed before commit
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def keep_fp32_islands(model, ops: frozenset[str]) -> int:
    """In an onnx_ir model, run each node whose op is in `ops` in FP32: its half-precision inputs are cast
    up and its half-precision outputs cast back. Returns how many nodes were changed."""
    import onnx_ir as ir

    half = {ir.DataType.BFLOAT16, ir.DataType.FLOAT16}
    graph, changed = model.graph, 0
    for node in list(graph):
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        if not any(v is not None and v.dtype in half for v in node.inputs):
            continue
        if any(o.is_graph_output() for o in node.outputs):
            continue
        before, inputs = [], []
        for i, v in enumerate(node.inputs):
            if v is not None and v.dtype in half:
                c = ir.Node("", "Cast", [v], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                            name=f"{node.name}/fp32_in{i}")
                c.outputs[0].dtype, c.outputs[0].shape = ir.DataType.FLOAT, v.shape
                before.append(c)
                inputs.append(c.outputs[0])
            else:
                inputs.append(v)
        wide = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                       num_outputs=len(node.outputs), name=f"{node.name}/fp32", version=node.version)
        after = []
        for old, new in zip(node.outputs, wide.outputs):
            new.shape = old.shape
            # every op listed returns its first input's type; the exporter leaves some outputs untyped
            dtype = old.dtype or node.inputs[0].dtype
            if dtype in half:
                new.dtype = ir.DataType.FLOAT
                c = ir.Node("", "Cast", [new], attributes=[ir.AttrInt64("to", dtype)],
                            name=f"{node.name}/back{len(after)}")
                c.outputs[0].dtype, c.outputs[0].shape = dtype, old.shape
                after.append(c)
                old.replace_all_uses_with(c.outputs[0])
            else:
                new.dtype = old.dtype
                old.replace_all_uses_with(new)
        graph.insert_before(node, [*before, wide, *after])
        graph.remove(node, safe=True)
        changed += 1
    return changed


def fp32_twin(onnx_path: Path) -> Path:
    """Write TWIN_NAME beside `onnx_path`: the same graph computing in FP32 on the same (rounded) weights.

    Each half-precision initializer and constant is read through a Cast to FP32, every Cast to a half type
    casts to FP32 instead, and intermediate type annotations are dropped (ONNX Runtime re-infers them). The
    weights are not read or copied: the twin's initializers point at the original's external data file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    half = {TensorProto.BFLOAT16, TensorProto.FLOAT16}
    m = onnx.load(str(onnx_path), load_external_data=False)
    g = m.graph
    widen = []
    for init in g.initializer:
        if init.data_type in half:
            name = init.name
            init.name = f"{name}__half"
            widen.append(helper.make_node("Cast", [init.name], [name], to=TensorProto.FLOAT, name=f"{name}/widen"))
    nodes = []
    for n in g.node:
        if n.op_type == "Constant":
            value = next((a for a in n.attribute if a.name == "value"), None)
            if value is not None and value.t.data_type in half:
                out = n.output[0]
                n.output[0] = f"{out}__half"
                nodes.append(n)
                nodes.append(helper.make_node("Cast", [n.output[0]], [out], to=TensorProto.FLOAT, name=f"{out}/widen"))
                continue
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i in half:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in half:  # ConstantOfShape's value
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype("float32"), a.t.name))
        nodes.append(n)
    del g.node[:]
    g.node.extend(widen + nodes)
    del g.value_info[:]
    for v in list(g.input) + list(g.output):
        if v.type.tensor_type.elem_type in half:
            v.type.tensor_type.elem_type = TensorProto.FLOAT
    twin = Path(onnx_path).with_name(TWIN_NAME)
    onnx.save(m, str(twin))
    return twin


def twin_session(twin: Path):
    """ONNX Runtime on the FP32 twin with graph optimisations off: constant folding would turn every
    Cast(weight) into a stored FP32 copy (a second, twice-as-large model in memory)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.log_severity_level = 3
    return ort.InferenceSession(str(twin), sess_options=so, providers=["CPUExecutionProvider"])


@contextlib.contextmanager
def fp32_compute(module: torch.nn.Module):
    """Run `module` (loaded in BF16/FP16) in FP32 on its rounded weights, holding one module's weights in
    FP32 at a time: before each submodule runs, its own half-precision parameters and buffers are widened
    and its floating inputs cast to FP32; afterwards the original half tensors are put back (bit-exact)."""
    half = (torch.bfloat16, torch.float16)
    handles, saved = [], {}

    def widen(m, args, kwargs):
        keep = {}
        for store in (m._parameters, m._buffers):
            for k, t in store.items():
                if t is not None and t.dtype in half:
                    keep[(id(store), k)] = (store, k, t.data)
                    t.data = t.data.float()
        saved.setdefault(id(m), []).append(keep)
        up = lambda x: x.float() if isinstance(x, torch.Tensor) and x.dtype in half else x
        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    def restore(m, args, kwargs, out):
        for store, k, data in saved[id(m)].pop().values():
            store[k].data = data

    for m in module.modules():
        own = [t for t in (*m._parameters.values(), *m._buffers.values()) if t is not None]
        if any(t.dtype in half for t in own):
            handles.append(m.register_forward_pre_hook(widen, with_kwargs=True))
            handles.append(m.register_forward_hook(restore, with_kwargs=True, always_call=True))
    try:
        yield module
    finally:
        for h in handles:
            h.remove()


def fp32_bytes_needed(folder, precisions: dict[str, str]) -> int:
    """RAM for export-time image checks: the FP32 PyTorch reference of every exported component at once."""
    from export.preflight import PROCESS_BASE

    specs = {s.name: s for s in folder.family.components}
    sources = {specs[n].source for n in precisions if n in specs}  # (ControlNets: small beside the transformer)
    return int(sum(folder.weights[s][0] * 4 for s in sources if s in folder.weights) * 1.3) + PROCESS_BASE


def HalfTorchBackend(bundle, model: Path, precisions: dict[str, str], device: torch.device | None = None,
                     fused_loras: tuple = ()):
    """app.runtime.torch_backend.TorchBackend with each half-precision component loaded in its dtype and run
    with that arithmetic (FP32 at the boundary, as the graph): PyTorch's BF16/FP16 CPU kernels stand in for
    the GPU's, which export cannot run here."""
    from app.models.wrappers import wrap, wrap_in_dtype
    from app.runtime.torch_backend import TorchBackend
    from export.bf16_policy import FP32_INPUTS

    class _Half(TorchBackend):
        def module(self, component: str) -> torch.nn.Module:
            if component not in self._modules:
                spec, slots = self.spec(component), self.slots(component)
                p = precisions.get(component, "fp32")
                dtype = TORCH_DTYPES.get(p, torch.float32)
                m = self.load(spec, dtype)
                keep = FP32_INPUTS.get(bundle.manifest["family"], frozenset())
                self._modules[component] = (wrap_in_dtype(spec, m, dtype, keep, slots) if dtype != torch.float32
                                            else wrap(spec, m, slots)).to(self.device)
            return self._modules[component]

    return _Half(bundle, model, device, fused_loras)
