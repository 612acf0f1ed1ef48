"""Export one wrapped component to ONNX with the dynamo exporter and check it against PyTorch."""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from app.runtime.families import DYNAMIC_DIMS, ComponentSpec

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
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    args = tuple(sample[t.name] for t in spec.inputs)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            module, args, input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=tuple(_dynamic_shapes(spec, sample)[t.name] for t in spec.inputs),
            dynamo=True, optimize=False, verbose=False, external_data=param_bytes > EXTERNAL_DATA_BYTES,
        )
    _name_dims(program.model, spec)
    optimize(program.model)
    program.save(str(path), external_data=param_bytes > EXTERNAL_DATA_BYTES)
    del program
    gc.collect()
    return path


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
    """Worst max-abs error and cosine similarity over all outputs."""
    worst_err, worst_cos = 0.0, 1.0
    for name, ref in reference.items():
        a = np.asarray(actual[name], dtype=np.float64).ravel()
        r = np.asarray(ref, dtype=np.float64).ravel()
        worst_err = max(worst_err, float(np.max(np.abs(a - r))) if r.size else 0.0)
        denom = np.linalg.norm(a) * np.linalg.norm(r)
        cos = float(a @ r / denom) if denom > 0 else float(np.allclose(a, r))
        worst_cos = min(worst_cos, cos)
    return {"max_abs_err": worst_err, "cosine": worst_cos}
