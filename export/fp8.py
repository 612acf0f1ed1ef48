"""FP8 (E4M3) post-training quantization of an exported ONNX transformer through NVIDIA ModelOpt's ONNX PTQ."""

from __future__ import annotations

import ast
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx

from app.errors import UsageError

FP8 = onnx.TensorProto.FLOAT8E4M3FN
_PROTO_LIMIT = 1_800_000_000  # below protobuf's 2 GiB cap, leaving room for the graph itself
_POSITION_OPS = {"Cos", "Sin"}
_SHAPE_OPS = {"Shape", "Size"}  # integer results: nothing to keep in FP32
_ROPE_APPLY_OPS = {"Mul", "Add", "Sub"}


def quantize_fp8(
    onnx_in: Path,
    onnx_out: Path,
    calibration: list[dict[str, np.ndarray]],
    exclude_patterns: Sequence[str],
    progress: Callable[[str], None] | None = None,
    *,
    high_precision: str = "fp16",
    quantize_attention: bool = False,
) -> dict:
    """Quantize the linear layers of `onnx_in` to FP8 with calibration feeds; write `onnx_out`; return a report.

    Weights are stored as FLOAT8E4M3FN initializers feeding DequantizeLinear; activations get per-tensor
    QuantizeLinear/DequantizeLinear pairs with "max" calibrated scales. Everything else runs in
    `high_precision` ("fp16", "bf16" or "fp32"), except RoPE which stays FP32. Graph inputs/outputs keep their
    dtypes and dynamic axes.
    """
    say = progress or (lambda _msg: None)
    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if high_precision not in ("fp16", "bf16", "fp32"):
        raise UsageError(f"high_precision must be fp16, bf16 or fp32, not {high_precision!r}.")
    if not onnx_in.is_file():
        raise UsageError(f"{onnx_in} does not exist; export the transformer to ONNX first.")
    patterns = _compile_patterns(exclude_patterns)

    say("fp8: loading the FP32 model")
    model = onnx.load(str(onnx_in))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise UsageError(f"{onnx_in} is already quantized; FP8 quantization needs the FP32 export.")
    _check_calibration(model, calibration)

    original = [n.name for n in model.graph.node]
    excluded = [n.name for n in model.graph.node if _matches(n, patterns)]
    weights = _constant_names(model)
    linears = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    attention = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in weights]
    targets = [n for n in linears + (attention if quantize_attention else []) if n not in set(excluded)]
    rope = _rope_nodes(model)
    if not targets:
        raise UsageError("No linear layer is left to quantize after the exclusions; check exclude_patterns.")

    # ModelOpt treats every node name it is given, and every name it derives itself (GEMV and MHA checks), as
    # a regex with re.match: an exporter name like "node_linear" then also excludes "node_linear_7". Opaque,
    # prefix-free names ("n7_") make each match exact; the original names are restored at the end.
    alias = {name: f"n{i}_" for i, name in enumerate(original)}
    for node in model.graph.node:
        node.name = alias[node.name]

    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    # ModelOpt rewrites its input file in place (shape inference) and drops intermediates next to it, so it
    # only ever sees a private copy.
    with tempfile.TemporaryDirectory(dir=onnx_out.parent, prefix=".fp8-") as tmp:
        src, q = Path(tmp) / "fp32.onnx", Path(tmp) / "fp8.onnx"
        large = _save(model, src)
        del model
        say(f"fp8: calibrating {len(targets)} layers on {len(calibration)} samples (ModelOpt, max)")
        _modelopt_quantize(src, q, calibration, [alias[n] for n in targets], [alias[n] for n in excluded], large)

        qmodel = onnx.load(str(q))
        if high_precision != "fp32":
            say(f"fp8: casting the rest to {high_precision}, RoPE kept in FP32")
            _save(qmodel, q)
            qmodel = _to_low_precision(q, high_precision, [alias[n] for n in rope])
        from modelopt.onnx.quantization.qdq_utils import qdq_to_dq

        say("fp8: storing weights as FP8")
        qmodel = qdq_to_dq(qmodel)
        back = {v: k for k, v in alias.items()}
        for node in qmodel.graph.node:
            node.name = back.get(node.name, node.name)
        _drop_unused_initializers(qmodel)
        _save(qmodel, onnx_out, force_external=large)

    report = _inspect(qmodel)
    from modelopt import __version__ as modelopt_version

    quantized = set(report.pop("dq_consumers"))
    report.update(
        quantized_nodes=[n for n in targets if n in quantized],
        excluded_nodes=[n for n in linears + attention if n in set(excluded)],
        skipped_nodes=[n for n in targets if n not in quantized],  # ModelOpt's own GEMV / small-GEMM rules
        rope_fp32_nodes=len(rope),
        bytes_fp32=_file_bytes(onnx_in),
        bytes_fp8=_file_bytes(onnx_out),
        calibration_samples=len(calibration),
        algorithm="max",
        granularity="per-tensor",
        high_precision=high_precision,
        modelopt_version=modelopt_version,
    )
    say(f"fp8: {len(report['quantized_nodes'])} layers in FP8, {report['bytes_fp8'] / 2**20:.1f} MiB")
    return report


def fidelity(onnx_ref: Path, onnx_q: Path, feeds: list[dict[str, np.ndarray]]) -> dict:
    """Compare the first output of two models on `feeds` in ONNX Runtime (CPU): cosine and max abs error."""
    import onnxruntime as ort

    def session(path):
        opts = ort_session_options_for(path)
        opts.log_severity_level = 3
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    ref, q = session(onnx_ref), session(onnx_q)
    cosines, max_abs, finite = [], 0.0, True
    for feed in feeds:
        a = ref.run(None, feed)[0].astype(np.float64).ravel()
        b = q.run(None, feed)[0].astype(np.float64).ravel()
        finite = finite and bool(np.isfinite(b).all())
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
        max_abs = max(max_abs, float(np.abs(a - b).max()))
    return {"cosine_min": min(cosines), "cosine_mean": float(np.mean(cosines)), "max_abs_error": max_abs,
            "finite": finite, "samples": len(feeds)}


def ort_session_options_for(onnx_path: Path):
    """Session options that run an FP8 Q/DQ graph in the installed ONNX Runtime.

    ORT 1.32 runs FP8 Q/DQ at every optimisation level. Older ones (1.24-1.31) fuse FP8 Q/DQ into
    MatMulIntegerToFloat at the default level and then reject float8e4m3fn, so they need ORT_ENABLE_BASIC
    (FACTS.md). Other graphs keep ORT's default.
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


def _compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    if isinstance(patterns, str):
        raise UsageError("exclude_patterns must be a list of regexes, not one string.")
    try:
        return [re.compile(p) for p in patterns]
    except re.error as err:
        raise UsageError(f"Bad FP8 exclude pattern {err.pattern!r}: {err}.") from None


def _scopes(node: onnx.NodeProto) -> list[str]:
    # The dynamo exporter names nodes "node_linear_7"; the torch module path lives in the metadata.
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        return [s for s in ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]")) if s]
    except (ValueError, SyntaxError):
        return []


def _matches(node: onnx.NodeProto, patterns: list[re.Pattern]) -> bool:
    names = [node.name, *_scopes(node)]
    return any(p.search(s) for p in patterns for s in names)


def _constant_names(model: onnx.ModelProto) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    return names


def _check_calibration(model: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> None:
    """Reject feeds that do not fit the graph, naming the fix, before ModelOpt fails deep inside ORT."""
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
            raise UsageError(
                f"{where} does not match the model inputs {sorted(inputs)}: "
                f"missing {sorted(missing)}, unknown {sorted(extra)}."
            )
        symbols: dict[str, int] = {}
        for name, ttype in inputs.items():
            arr = feed[name]
            want = onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)
            if not isinstance(arr, np.ndarray) or arr.dtype != want:
                got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
                raise UsageError(f"{where}: input {name!r} must be a numpy {want} array, got {got}.")
            dims = ttype.shape.dim
            if arr.ndim != len(dims):
                raise UsageError(f"{where}: input {name!r} has rank {arr.ndim}, the model expects {len(dims)}.")
            for axis, (dim, size) in enumerate(zip(dims, arr.shape)):
                if dim.HasField("dim_value") and dim.dim_value != size:
                    raise UsageError(
                        f"{where}: input {name!r} axis {axis} is {size}, the model expects {dim.dim_value}."
                    )
                if dim.HasField("dim_param") and symbols.setdefault(dim.dim_param, size) != size:
                    raise UsageError(
                        f"{where}: input {name!r} axis {axis} is {size} but {dim.dim_param!r} is "
                        f"{symbols[dim.dim_param]} in another input."
                    )
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise UsageError(f"{where}: input {name!r} holds NaN or Inf; max calibration would be poisoned.")


def _rope_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that compute rotary/sinusoidal position tables and apply them: FP16 angles lose whole cycles.

    The set is every float op upstream of a Cos/Sin, every op computed only from those tables, and the
    elementwise ops that combine the tables with activations (x*cos + rot(x)*sin).
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    trig = [n for n in model.graph.node if n.op_type in _POSITION_OPS]
    keep: dict[str, onnx.NodeProto] = {}
    stack = list(trig)
    while stack:  # upstream closure
        node = stack.pop()
        if node.name in keep or node.op_type in _SHAPE_OPS:
            continue
        keep[node.name] = node
        stack.extend(producer[i] for i in node.input if i in producer)
    tables = {o for n in keep.values() for o in n.output}
    consts = _constant_names(model)
    linear = {"MatMul", "Gemm", "Conv"}
    apply_outputs: set[str] = set()
    for node in model.graph.node:  # topological order: grow the tables, then take their first consumers
        if node.name in keep:
            continue
        variable = [i for i in node.input if i and i not in consts]
        from_tables = [i for i in variable if i in tables]
        if not from_tables or node.op_type in linear:
            continue
        if len(from_tables) == len(variable):
            keep[node.name] = node
            tables.update(node.output)
        elif node.op_type in _ROPE_APPLY_OPS:
            keep[node.name] = node
            apply_outputs.update(node.output)
    for node in model.graph.node:  # the Add joining x*cos and rot(x)*sin
        if node.op_type in ("Add", "Sub") and node.input and all(i in apply_outputs for i in node.input):
            keep[node.name] = node
    return [n.name for n in model.graph.node if n.name in keep]


def _save(model: onnx.ModelProto, path: Path, force_external: bool = False) -> bool:
    """Write `model`, with its weights in `<name>.data` when they would not fit one protobuf."""
    external = force_external or sum(len(i.raw_data) for i in model.graph.initializer) > _PROTO_LIMIT
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return external


def _modelopt_quantize(src: Path, dst: Path, calibration, targets, excluded, large: bool) -> None:
    try:
        import modelopt.onnx.quantization as moq
        from onnxruntime.quantization.calibrate import CalibrationDataReader
    except ImportError as err:
        raise UsageError(f"FP8 export needs the fp8 extra (pip install 'edgegen[fp8]'): {err}.") from None

    class Feeds(CalibrationDataReader):
        # ModelOpt sizes its GEMV / MHA checks from get_first(), so dynamic axes need no invented shapes.
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def get_first(self):
            return calibration[0]

        def rewind(self):
            self._it = iter(calibration)

    moq.quantize(
        onnx_path=str(src),
        quantize_mode="fp8",
        calibration_data_reader=Feeds(),
        calibration_method="max",
        calibration_eps=["cpu"],
        op_types_to_quantize=["MatMul"],  # Gemm would get per-channel weights; ours are 2-D GEMVs anyway
        nodes_to_quantize=list(targets),
        nodes_to_exclude=list(excluded),
        high_precision_dtype="fp32",  # cast later ourselves, so RoPE can stay FP32
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
        nodes_to_exclude=list(keep_fp32),  # prefix-free aliases, so ModelOpt's re.match is exact
        keep_io_types=True,
        data_max=np.inf,  # no reference run: the excluded set is ours, not measured
        init_max=np.finfo(np.float16).max,
    )


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    # qdq_to_dq and the FP16 pass leave the Q side's duplicated scales behind; ORT warns about each one.
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)


def _inspect(model: onnx.ModelProto) -> dict:
    """Count Q/DQ pairs and FP8 weights, and list the nodes fed by a DequantizeLinear."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    dq_out = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    consumers = [n.name for n in model.graph.node if n.op_type != "DequantizeLinear"
                 and any(i in dq_out for i in n.input)]
    weight_dq = [d for d in dq_out.values() if d.input[0] in inits]
    act_dq = [d for d in dq_out.values() if d.input[0] in producer
              and producer[d.input[0]].op_type == "QuantizeLinear"]
    return {
        "qdq_pairs": len(act_dq),
        "fp8_weights": sum(1 for d in weight_dq if inits[d.input[0]].data_type == FP8),
        "dq_consumers": consumers,
        "domains": sorted({n.domain or "ai.onnx" for n in model.graph.node}),
    }


def _file_bytes(path: Path) -> int:
    model = onnx.load(str(path), load_external_data=False)
    files = {path}
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files if f.is_file())
