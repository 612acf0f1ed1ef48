"""FP8 (E4M3) post-training quantization of an exported ONNX transformer with NVIDIA ModelOpt's ONNX PTQ."""

from __future__ import annotations

import ast
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from app.errors import UsageError

FP8 = onnx.TensorProto.FLOAT8E4M3FN
FP8_MAX = 448.0
_PROTO_LIMIT = 1_800_000_000  # below protobuf's 2 GiB cap, leaving room for the graph itself
_LINEAR_OPS = ("MatMul", "Gemm", "Conv")


def quantize_fp8(
    onnx_in: Path,
    onnx_out: Path,
    calibration: list[dict[str, np.ndarray]],
    exclude_patterns: Sequence[str],
    progress: Callable[[str], None] | None = None,
    *,
    high_precision: str = "fp16",
    quantize_attention: bool = False,
    calibration_eps: Sequence[str] = ("cpu",),
) -> dict:
    """Quantize the linear layers of `onnx_in` to FP8; write `onnx_out`; return a report.

    Weights are stored as FLOAT8E4M3FN initializers feeding DequantizeLinear; each quantized layer's input
    gets a QuantizeLinear/DequantizeLinear pair. Scales are per-tensor, activations "max"-calibrated on
    `calibration` (feed dicts captured from the real sampler). Layers whose node name or torch module path
    matches a regex in `exclude_patterns` (re.search) stay high precision, as does everything that is not a
    linear layer: `high_precision` ("fp16", "bf16" or "fp32"), with RoPE and timestep tables kept in FP32.
    Graph inputs and outputs keep their dtypes and dynamic axes. `calibration_eps` is ModelOpt's EP list:
    ("cuda:0", "cpu") calibrates a full-size model on the GPU where onnxruntime-gpu is installed.
    """
    say = progress or (lambda _msg: None)
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if high_precision not in ("fp16", "bf16", "fp32"):
        raise UsageError(f"high_precision must be fp16, bf16 or fp32, not {high_precision!r}.")
    if not onnx_in.is_file():
        raise UsageError(f"{onnx_in} does not exist; export the transformer to ONNX first.")
    if onnx_out.resolve() == onnx_in.resolve():
        raise UsageError("Write the FP8 model next to the FP32 one, not over it.")
    patterns = _compile_patterns(exclude_patterns)

    say("fp8: loading the FP32 model")
    model = onnx.load(str(onnx_in))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise UsageError(f"{onnx_in} is already quantized; FP8 quantization needs the FP32 export.")
    _check_calibration(model, calibration)
    say("fp8: folding constants")
    _fold_constant_transposes(model)
    _select(model, patterns, quantize_attention)  # bad exclusions fail here, before the slow steps
    model = _optimize(model)
    _name_nodes(model)
    linear, excluded, targets = _select(model, patterns, quantize_attention)
    keep_fp32 = _position_nodes(model)

    # ModelOpt treats every node name it is given, and every name it derives itself (GEMV and MHA checks), as
    # a regex with re.match: an exporter name like "node_linear" then also excludes "node_linear_7". Opaque,
    # prefix-free aliases ("n7_") make every match exact; the original names are restored at the end.
    names = [n.name for n in model.graph.node]
    alias = [f"n{i}_" for i in range(len(names))]
    for node, new in zip(model.graph.node, alias):
        node.name = new

    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt rewrites its input file in place (shape inference) and leaves intermediates next to it, so it
    # only ever sees a private copy.
    with tempfile.TemporaryDirectory(dir=onnx_out.parent, prefix=".fp8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "fp8.onnx"
        large = _save(model, src)
        del model
        say(f"fp8: calibrating {len(targets)} layers on {len(calibration)} samples (ModelOpt, max)")
        _modelopt_quantize(src, dst, calibration, [alias[i] for i in targets], [alias[i] for i in excluded],
                           large, list(calibration_eps))
        qmodel = onnx.load(str(dst))
        _weights_per_tensor(qmodel)
        if high_precision != "fp32":
            say(f"fp8: casting the rest to {high_precision}, RoPE and timestep tables kept in FP32")
            _save(qmodel, dst)
            qmodel = _to_low_precision(dst, high_precision, [alias[i] for i in keep_fp32])
        say("fp8: storing weights as FP8")
        _store_weights_fp8(qmodel)
        back = dict(zip(alias, names))
        for node in qmodel.graph.node:
            node.name = back.get(node.name, node.name)
        _drop_unused_initializers(qmodel)
        _save(qmodel, onnx_out, force_external=large)

    from modelopt import __version__ as modelopt_version

    report = _inspect(qmodel)
    fed = set(report.pop("dq_consumers"))
    quantized = [i for i in targets if names[i] in fed]
    report.update(
        quantized_nodes=[names[i] for i in quantized],
        excluded_nodes=[names[i] for i in sorted(excluded)],
        # Linear layers left high precision by rule: Gemm/Conv, or ModelOpt's GEMV and K,N < 16 checks.
        unquantized_linear_nodes=[names[i] for i in linear if i not in excluded and i not in quantized],
        fp32_position_nodes=len(keep_fp32),
        bytes_fp32=_file_bytes(onnx_in),
        bytes_fp8=_file_bytes(onnx_out),
        calibration_samples=len(calibration),
        algorithm="max",
        granularity="per-tensor",
        high_precision=high_precision,
        modelopt_version=modelopt_version,
    )
    say(f"fp8: {len(quantized)} layers in FP8, {report['bytes_fp8'] / 2**20:.1f} MiB "
        f"({report['bytes_fp8'] / max(report['bytes_fp32'], 1):.0%} of the FP32 file)")
    return report


def fidelity(onnx_ref: Path, onnx_q: Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Run both models in ONNX Runtime (CPU) on `feeds`: cosine similarity and max abs error of each output.

    The top-level figures are the worst over all outputs (CLIP has two: pooled and hidden states)."""
    import onnxruntime as ort

    def session(path):
        opts = ort_session_options_for(path)
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    ref, q = session(onnx_ref), session(onnx_q)
    names = [o.name for o in ref.get_outputs()]
    cosines: dict[str, list[float]] = {n: [] for n in names}
    max_abs, finite = {n: 0.0 for n in names}, True
    ref_max = {n: 0.0 for n in names}
    for feed in feeds:
        for name, a, b in zip(names, ref.run(names, feed), q.run(names, feed)):
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            finite = finite and bool(np.isfinite(b).all())
            cosines[name].append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
            max_abs[name] = max(max_abs[name], float(np.abs(a - b).max()))
            ref_max[name] = max(ref_max[name], float(np.abs(a).max()))
    per_output = {n: {"cosine_min": min(cosines[n]), "cosine_mean": float(np.mean(cosines[n])),
                      "max_abs_error": max_abs[n], "max_rel_error": max_abs[n] / max(ref_max[n], 1e-12)}
                  for n in names}
    return {"cosine_min": min(o["cosine_min"] for o in per_output.values()),
            "cosine_mean": min(o["cosine_mean"] for o in per_output.values()),
            "max_abs_error": max(o["max_abs_error"] for o in per_output.values()),
            "max_rel_error": max(o["max_rel_error"] for o in per_output.values()),
            "finite": finite, "samples": len(feeds), "outputs": per_output}


def require_modelopt() -> None:
    """Fail at once, before any export work, when FP8 is asked for and ModelOpt's ONNX PTQ is missing."""
    try:
        import modelopt.onnx.quantization  # noqa: F401
        from onnxruntime.quantization.calibrate import CalibrationDataReader  # noqa: F401
    except ImportError as err:
        raise UsageError(f"FP8 export needs NVIDIA ModelOpt (pip install 'edgegen[fp8]'), which is not "
                         f"installed here ({err}); or export without fp8.") from None


def ort_session_options_for(onnx_path: Path):
    """onnxruntime.SessionOptions that run `onnx_path` in the installed ONNX Runtime.

    ORT 1.32 runs FP8 Q/DQ graphs at every optimisation level (checked in tests/test_fp8.py). 1.24-1.31 fuse
    FP8 Q/DQ into MatMulIntegerToFloat at the default level and then reject float8e4m3fn, so FP8 graphs get
    ORT_ENABLE_BASIC there (FACTS.md). Other graphs keep ORT's default.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if _ort_version() < (1, 32) and _has_fp8(Path(onnx_path)):
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return opts


def _ort_version() -> tuple[int, int]:
    import onnxruntime as ort

    major, minor = ort.__version__.split(".")[:2]
    return int(major), int(minor)


def _has_fp8(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(i.data_type == FP8 for i in model.graph.initializer)


# --- choosing what to quantize ---------------------------------------------------------------------------


def _compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise UsageError("exclude_patterns must be a list of regexes, not one string.")
    try:
        return [re.compile(p) for p in patterns]
    except re.error as err:
        raise UsageError(f"Bad FP8 exclude pattern {err.pattern!r}: {err}.") from None


def _scopes(node: onnx.NodeProto, weights: set[str] = frozenset()) -> list[str]:
    """Torch module paths of `node`: those the dynamo exporter recorded in its metadata (its names are just
    "node_linear_7"), plus the module of any weight named like "transformer.norm_out.linear.weight"."""
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = [s for s in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]")) if s]
    except (ValueError, SyntaxError):
        scopes = []
    for w in (w for w in node.input if w in weights and "." in w):
        parts = w.split(".")[:-1]  # like name_scopes: every enclosing module, outermost first
        scopes += [".".join(parts[: k + 1]) for k in range(len(parts))]
    return scopes


def _matches(node: onnx.NodeProto, patterns: list[re.Pattern], weights: set[str] = frozenset()) -> bool:
    names = [node.name, *_scopes(node, weights)]
    return any(p.search(s) for p in patterns for s in names)


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def _select(model: onnx.ModelProto, patterns: list[re.Pattern], attention: bool):
    """Node indices: (linear layers, excluded linear/attention MatMuls, MatMuls to quantize)."""
    nodes = model.graph.node
    weights = _constant_names(model)
    unmatched = [p.pattern for p in patterns if not any(_matches(n, [p], weights) for n in nodes)]
    if unmatched:
        # Most likely the module paths are gone (onnxslim and other rewriters drop node metadata): going on
        # would quantize the very layers the policy keeps high precision.
        raise UsageError(f"FP8 exclude patterns {unmatched} match no node of the model; export it with the "
                         "torch module paths kept in node metadata (pkg.torch.onnx.name_scopes).")
    linear = [i for i, n in enumerate(nodes) if n.op_type in _LINEAR_OPS and n.input[1] in weights]
    bmm = [i for i, n in enumerate(nodes) if n.op_type == "MatMul" and n.input[1] not in weights]
    excluded = {i for i in linear + bmm if _matches(nodes[i], patterns, weights)}
    # MatMul weights only: ORT's quantizer would give Gemm per-channel scales, and every Gemm/Conv in these
    # transformers is an embedder or a modulation that stays high precision anyway.
    targets = [i for i in linear if nodes[i].op_type == "MatMul" and i not in excluded]
    lora = set(_lora_branch_nodes(model))  # never targets; their shared input x may carry its layer's Q/DQ
    targets += [i for i in bmm if i not in excluded and i not in lora] if attention else []
    if not targets:
        raise UsageError("No linear layer is left to quantize after the exclusions; check exclude_patterns.")
    return linear, excluded, targets


def _lora_branch_nodes(model: onnx.ModelProto) -> list[int]:
    """MatMuls of a run-time LoRA's side branch (inputs lora_a_<i> / lora_b_<i>, through Transpose or Cast): never
    quantized. Their factors change per request, so no calibrated FP8 scale could fit them (a bundle calibrates
    with the no-LoRA zeros), and at rank <= max_rank they are a few percent of the layer's work. The branch's x is
    the layer's own input: where that layer is FP8, x arrives through the layer's Q/DQ, as a fused LoRA's would."""
    nodes = model.graph.node
    producer = {o: n for n in nodes for o in n.output}
    lora = {i.name for i in model.graph.input if i.name.startswith("lora_")}

    def from_lora(t: str, depth: int = 0) -> bool:
        if t in lora:
            return True
        n = producer.get(t)
        return n is not None and depth < 4 and n.op_type in ("Transpose", "Cast", "Mul") and any(
            from_lora(x, depth + 1) for x in n.input)

    return [i for i, n in enumerate(nodes) if n.op_type == "MatMul" and any(from_lora(t) for t in n.input)] \
        if lora else []


def _name_nodes(model: onnx.ModelProto) -> None:
    # Everything here keys nodes by name; other exporters may leave names empty or repeated.
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _position_nodes(model: onnx.ModelProto) -> list[int]:
    """Indices of the nodes that build and apply RoPE / sinusoidal tables: kept FP32, where FP16 angles
    (position x frequency, up to thousands of radians) would lose whole fractions of a turn.

    That is every op upstream of a Cos/Sin, every op computed only from their outputs, and the elementwise
    ops that combine those tables with activations (x*cos + rot(x)*sin). Linear layers end the region.
    """
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = [i for i, n in enumerate(nodes) if n.op_type in ("Cos", "Sin")]
    while stack:  # upstream closure; Shape/Size give integers, so there is nothing to keep above them
        i = stack.pop()
        if i not in keep and nodes[i].op_type not in ("Shape", "Size"):
            keep.add(i)
            stack.extend(producer[t] for t in nodes[i].input if t in producer)
    tables = {o for i in keep for o in nodes[i].output}
    consts = _constant_names(model)
    applied: set[str] = set()
    for i, node in enumerate(nodes):  # graph order is topological: tables grow before their consumers
        variable = [t for t in node.input if t and t not in consts]
        from_tables = [t for t in variable if t in tables]
        if i in keep or not from_tables or node.op_type in _LINEAR_OPS:
            continue
        if len(from_tables) == len(variable):
            keep.add(i)
            tables.update(node.output)
        elif node.op_type in ("Mul", "Add", "Sub"):
            keep.add(i)
            applied.update(node.output)
    keep.update(i for i, n in enumerate(nodes) if n.op_type in ("Add", "Sub") and n.input
                and all(t in applied for t in n.input))
    return sorted(keep)


# --- graph rewrites around ModelOpt -----------------------------------------------------------------------


def _optimize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant-fold as torch.onnx.export(optimize=True) would, when the export skipped it.

    An unoptimised dynamo export keeps torch.split as SplitToSequence/SequenceAt, which breaks ModelOpt's
    shape and type inference (ORT "Shape mismatch attempting to re-use buffer" while calibrating; autocast
    "type case mismatch"). onnxscript's optimiser turns them into Split and keeps names and module metadata.
    """
    if not any("Sequence" in n.op_type for n in model.graph.node):
        return model  # already optimised at export; the optimiser is slow to import
    import onnxscript

    return onnxscript.optimizer.optimize(model)


def _fold_constant_transposes(model: onnx.ModelProto) -> int:
    """Replace Transpose(constant) by the transposed constant; returns how many were folded.

    An unoptimised dynamo export writes each Linear as MatMul(x, Transpose(W)). ModelOpt only quantizes a
    MatMul weight that is an initializer, so the Transpose must go, also when _optimize has nothing to do.
    """
    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node
                 if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    uses: dict[str, int] = {o.name: 1 for o in model.graph.output}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    folded = [n for n in model.graph.node
              if n.op_type == "Transpose" and (n.input[0] in inits or n.input[0] in constants)]
    for node in folded:
        src = node.input[0]
        array = numpy_helper.to_array(inits[src] if src in inits else constants[src].attribute[0].t)
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        model.graph.initializer.append(
            numpy_helper.from_array(np.ascontiguousarray(array.transpose(perm)), node.output[0]))
        model.graph.node.remove(node)
        uses[src] -= 1
    for init in [i for i in model.graph.initializer if i.name in inits and uses.get(i.name, 0) == 0]:
        model.graph.initializer.remove(init)
    for name in [c for c in constants if uses.get(c, 0) == 0]:
        model.graph.node.remove(constants[name])
    return len(folded)


def _weights_per_tensor(model: onnx.ModelProto) -> int:
    """Give every quantized weight one scale, amax(W) / 448; returns how many were per-channel.

    ModelOpt 0.47 runs ORT's quantizer with per_channel=True, which scales MatMul weights per output
    channel. The recipe here is per-tensor (TensorRT's plain FP8 GEMM); its scale is the largest of the
    per-channel ones.
    """
    inits = {i.name: i for i in model.graph.initializer}
    consumers = _consumers(model)
    changed = 0
    for q in [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]:
        scale = numpy_helper.to_array(inits[q.input[1]])
        if scale.size == 1:
            continue
        name = f"{q.input[0]}_per_tensor"
        model.graph.initializer.extend([
            numpy_helper.from_array(np.array(scale.max(), dtype=scale.dtype), f"{name}_scale"),
            onnx.helper.make_tensor(f"{name}_zero_point", inits[q.input[2]].data_type, [], [0]),
        ])
        for node in [q, *consumers.get(q.output[0], [])]:
            node.input[1], node.input[2] = f"{name}_scale", f"{name}_zero_point"
            kept = [a for a in node.attribute if a.name != "axis"]
            del node.attribute[:]
            node.attribute.extend(kept)
        changed += 1
    _drop_unused_initializers(model)
    return changed


def _store_weights_fp8(model: onnx.ModelProto) -> int:
    """QuantizeLinear(W) -> DQ becomes FP8 W -> DQ, so the file holds FP8 weights; returns how many.

    ModelOpt's own qdq_to_dq only handles per-channel scales (it indexes scale.shape[0]). Quantizing with
    the DQ's own (FP16 after the cast) scale stores exactly what the DQ decodes; ml_dtypes rounds to nearest
    even, as QuantizeLinear does, after saturating to +-448 as QuantizeLinear's default saturate=1 does.
    """
    import ml_dtypes

    inits = {i.name: i for i in model.graph.initializer}
    consumers = _consumers(model)
    done = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits]
    for q in done:
        weight = numpy_helper.to_array(inits[q.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[q.input[1]]).astype(np.float32)
        fp8 = np.clip(weight / scale, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)
        name = q.input[0] if len(consumers[q.input[0]]) == 1 else f"{q.input[0]}_fp8"
        tensor = onnx.helper.make_tensor(name, FP8, fp8.shape, fp8.view(np.uint8).tobytes(), raw=True)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            model.graph.initializer.append(tensor)
        for dq in consumers.get(q.output[0], []):
            dq.input[0] = name
        model.graph.node.remove(q)
    _drop_unused_initializers(model)
    return len(done)


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    # The rewrites above and ModelOpt's FP16 pass leave replaced scales behind; ORT warns about each one.
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


# --- ModelOpt -----------------------------------------------------------------------------------------------


def _quiet_cpu_calibration(record: logging.LogRecord) -> bool:
    # ModelOpt logs an ERROR when NVML is missing, though calibrating on the CPU needs no GPU.
    return "Failed to get GPU count" not in record.getMessage()


def _modelopt_quantize(src: Path, dst: Path, calibration, targets: list[str], excluded: list[str],
                       large: bool, eps: list[str]) -> None:
    try:
        import modelopt.onnx.quantization as moq
        from onnxruntime.quantization.calibrate import CalibrationDataReader
    except ImportError as err:
        raise UsageError(f"FP8 export needs the fp8 extra (pip install 'edgegen[fp8]'): {err}.") from None

    class Feeds(CalibrationDataReader):
        # ModelOpt sizes its GEMV and MHA checks from get_first(): real feeds, so symbolic dims need no
        # invented shapes (its own data providers fill unknown dims with 1 and fail on these graphs).
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def get_first(self):
            return calibration[0]

        def rewind(self):
            self._it = iter(calibration)

    logging.getLogger("modelopt.onnx").addFilter(_quiet_cpu_calibration)
    moq.quantize(
        onnx_path=str(src),
        quantize_mode="fp8",
        calibration_data_reader=Feeds(),
        calibration_method="max",
        calibration_eps=eps,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=targets,  # explicit: its default placement also quantizes residual Adds
        nodes_to_exclude=excluded,
        high_precision_dtype="fp32",  # cast afterwards by us, so RoPE can stay FP32
        use_external_data_format=large,
        output_path=str(dst),
        log_level="WARNING",
    )
    if not dst.is_file():
        raise RuntimeError("ModelOpt wrote no quantized model; see its log above.")


def _to_low_precision(path: Path, dtype: str, keep_fp32: list[str]) -> onnx.ModelProto:
    from modelopt.onnx.autocast import convert_to_mixed_precision

    return convert_to_mixed_precision(
        onnx_path=str(path),
        low_precision_type=dtype,
        nodes_to_exclude=keep_fp32,  # prefix-free aliases, so ModelOpt's re.match is exact
        keep_io_types=True,
        data_max=np.inf,  # no reference run: what stays FP32 is decided above, not measured
        init_max=np.finfo(np.float16).max,
    )


# --- files and checks ---------------------------------------------------------------------------------------


def _check_calibration(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> None:
    """Reject feeds that do not fit the graph, naming the problem, before ModelOpt fails deep inside ORT."""
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise UsageError("FP8 calibration needs at least one feed dict captured from the sampler.")
    weights = {i.name for i in model.graph.initializer}
    inputs = {i.name: i.type.tensor_type for i in model.graph.input if i.name not in weights}
    for k, feed in enumerate(calibration):
        where = f"calibration sample {k}"
        if not isinstance(feed, dict):
            raise UsageError(f"{where} is a {type(feed).__name__}, not a dict of input name to array.")
        missing, extra = set(inputs) - set(feed), set(feed) - set(inputs)
        if missing or extra:
            raise UsageError(f"{where} does not match the model inputs {sorted(inputs)}: "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}.")
        symbols: dict[str, int] = {}
        for name, ttype in inputs.items():
            arr, want = feed[name], onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
            if not isinstance(arr, np.ndarray) or arr.dtype != want:
                got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise UsageError(f"{where}: input {name!r} must be a numpy {want} array, got {got}.")
            dims = ttype.shape.dim
            if arr.ndim != len(dims):
                raise UsageError(f"{where}: input {name!r} has rank {arr.ndim}; "
                                 f"the model expects {len(dims)}.")
            for axis, (dim, size) in enumerate(zip(dims, arr.shape)):
                if dim.HasField("dim_value") and dim.dim_value != size:
                    raise UsageError(f"{where}: input {name!r} axis {axis} is {size}; "
                                     f"the model expects {dim.dim_value}.")
                if dim.HasField("dim_param") and symbols.setdefault(dim.dim_param, size) != size:
                    raise UsageError(f"{where}: input {name!r} axis {axis} is {size}, but {dim.dim_param!r} "
                                     f"is {symbols[dim.dim_param]} in another input.")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise UsageError(f"{where}: input {name!r} holds NaN or Inf, which would poison "
                                 "max calibration.")


def _save(model: onnx.ModelProto, path: Path, force_external: bool = False) -> bool:
    """Write `model`, its weights in `<name>.data` if they would not fit one protobuf; True if so."""
    external = force_external or sum(len(i.raw_data) for i in model.graph.initializer) > _PROTO_LIMIT
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()  # onnx.save appends to an existing data file
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return external


def _inspect(model: onnx.ModelProto) -> dict:
    """Count activation Q/DQ pairs and FP8 weights, and list the nodes a DequantizeLinear feeds."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    dq_out = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {
        "qdq_pairs": sum(1 for d in dq_out.values()
                         if d.input[0] in producer and producer[d.input[0]].op_type == "QuantizeLinear"),
        "fp8_weights": sum(1 for d in dq_out.values()
                           if d.input[0] in inits and inits[d.input[0]].data_type == FP8),
        "dq_consumers": [n.name for n in model.graph.node
                         if n.op_type != "DequantizeLinear" and any(i in dq_out for i in n.input)],
        "domains": sorted({n.domain or "ai.onnx" for n in model.graph.node}),
    }


def _file_bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    files = {path} | {path.parent / e.value for i in model.graph.initializer for e in i.external_data
                      if e.key == "location"}
    return sum(f.stat().st_size for f in files if f.is_file())
