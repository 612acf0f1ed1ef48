"""Export one wrapped component to ONNX with the dynamo exporter and check it against PyTorch."""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from app.bundle.families import DYNAMIC_DIMS, ComponentSpec

# Above this many parameter bytes the weights go to an external data file (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 256 * 1024 * 1024


def _dynamic_shapes(spec: ComponentSpec, sample: dict[str, torch.Tensor]):
    """One torch.export.Dim per symbolic name, shared across inputs, so equal axes stay equal."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = {}
    for t in spec.inputs:
        axes = {}
        for axis, d in enumerate(t.dims):
            if d in DYNAMIC_DIMS:
                axes[axis] = dims.setdefault(d, torch.export.Dim.DYNAMIC)
        shapes[t.name] = axes
    return shapes


def export_component(
    spec: ComponentSpec, module: torch.nn.Module, sample: dict[str, torch.Tensor], out_dir: Path
) -> Path:
    """Trace `module` on `sample` (batch >= 2 so batch stays dynamic) and write out_dir/model.onnx."""
    external = needs_external_data(module)
    path = save_component(trace_component(spec, module, sample), spec, out_dir, external)
    gc.collect()
    return path


def needs_external_data(module: torch.nn.Module) -> bool:
    return sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES


def trace_component(spec: ComponentSpec, module: torch.nn.Module, sample: dict[str, torch.Tensor]):
    """The dynamo exporter's ONNXProgram for `module`. Its initializers are the module's own tensors (no
    copy), so a caller that drops the module afterwards leaves the graph as the weights' only holder."""
    args = tuple(sample[t.name] for t in spec.inputs)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, args, input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=tuple(_dynamic_shapes(spec, sample)[t.name] for t in spec.inputs),
            dynamo=True, optimize=False, verbose=False,
        )
    _name_dims(program.model, spec)
    return program


def save_component(program, spec: ComponentSpec, out_dir: Path, external: bool,
                   fp32_ops: frozenset[str] = frozenset()) -> Path:
    """Optimise and write `program` to out_dir/model.onnx (+ model.onnx.data when `external`); in a BF16/FP16
    graph the ops in `fp32_ops` run in FP32 (export/bf16.py keep_fp32_islands).

    Peak memory stays at one copy of the weights plus one tensor: weight transposes are deferred to the
    write (see defer_weight_transposes), and the file is written tensor by tensor."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    defer_weight_transposes(program.model)
    optimize(program.model)
    if fp32_ops:
        from export.bf16 import keep_fp32_islands

        keep_fp32_islands(program.model, fp32_ops)
    program.save(str(path), external_data=external)
    return path


def defer_weight_transposes(model) -> int:
    """Replace each Transpose(weight initializer) by an initializer that is transposed only when written.

    The dynamo exporter writes every nn.Linear as MatMul(x, Transpose(W)). The optimiser always folds such
    transposes, materialising a transposed copy of every weight while the originals are still held: two
    copies of the model at once (31 GB for Klein 4B in FP32). A lazy tensor holds only a reference to W and
    produces W^T when the saver asks for its bytes, one tensor at a time. Returns how many were deferred."""
    import onnx_ir as ir

    graph, deferred = model.graph, 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src, out = node.inputs[0], node.outputs[0]
        if (src is None or not src.is_initializer() or src.const_value is None or len(src.uses()) != 1
                or out.is_graph_output() or src.is_graph_input()):
            continue
        tensor = src.const_value
        attr = node.attributes.get("perm")
        perm = tuple(attr.as_ints()) if attr is not None else tuple(reversed(range(len(tensor.shape))))
        shape = ir.Shape([tensor.shape[i] for i in perm])

        def transposed(t=tensor, perm=perm):
            return ir.tensor(np.ascontiguousarray(t.numpy().transpose(perm)))

        weight = ir.Value(name=f"{src.name}.T", shape=shape, type=ir.TensorType(tensor.dtype),
                          const_value=ir.LazyTensor(transposed, dtype=tensor.dtype, shape=shape, name=f"{src.name}.T"))
        out.replace_all_uses_with(weight)
        graph.remove(node, safe=True)
        graph.initializers.pop(src.name)
        graph.register_initializer(weight)
        deferred += 1
    return deferred


def optimize(model) -> None:
    """One pass of the exporter's own optimiser (onnxscript), in place.

    The raw dynamo graph keeps `chunk` as SplitToSequence/SequenceAt and computes some attributes (T5's
    ReduceMean axes) at run time; TensorRT's parser refuses both. One pass folds them; the default second
    pass doubles the time on deep text encoders (~90 s for a 28-layer Qwen3 here) for nothing TensorRT needs.
    (onnxslim was tried instead: its constant folding retypes the VAE's Resize scales to double, which ONNX
    Runtime rejects.)"""
    import onnxscript

    onnxscript.optimizer.optimize(model, num_iterations=1)


def _name_dims(model, spec: ComponentSpec) -> None:
    """Give the graph's symbolic dims the spec's names (batch, img_seq, ...) so the manifest reads well."""
    import onnx_ir as ir

    rename: dict[str, str] = {}
    for values, specs in ((model.graph.inputs, spec.inputs), (model.graph.outputs, spec.outputs)):
        for v, t in zip(values, specs):
            if v.shape is None:
                continue
            new = []
            for d, want in zip(v.shape, t.dims):
                if isinstance(d, ir.SymbolicDim) and isinstance(want, str):
                    rename.setdefault(str(d.value), want)
                    new.append(want)
                else:
                    new.append(d)
            v.shape = ir.Shape(new)
    del rename


def compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> dict:
    """Worst max-abs error, max error relative to the output's largest magnitude, and cosine similarity over
    all outputs. NaN anywhere makes every figure NaN, so no gate can pass it."""
    worst_err, worst_rel, worst_cos = 0.0, 0.0, 1.0
    for name, ref in reference.items():
        a = np.asarray(actual[name], dtype=np.float64).ravel()
        r = np.asarray(ref, dtype=np.float64).ravel()
        if not (np.isfinite(a).all() and np.isfinite(r).all()):
            return {"max_abs_err": float("nan"), "max_rel_err": float("nan"), "cosine": float("nan")}
        err = float(np.max(np.abs(a - r))) if r.size else 0.0
        worst_err = max(worst_err, err)
        worst_rel = max(worst_rel, err / max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-12))
        denom = np.linalg.norm(a) * np.linalg.norm(r)
        cos = float(a @ r / denom) if denom > 0 else float(np.allclose(a, r))
        worst_cos = min(worst_cos, cos)
    return {"max_abs_err": worst_err, "max_rel_err": worst_rel, "cosine": worst_cos}
