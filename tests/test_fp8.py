"""FP8 export: ModelOpt ONNX PTQ turns tiny Klein and SD3 transformers into standard FP8 Q/DQ graphs that
keep the policy's layers high precision, store weights in FP8, stay dynamic and run faithfully in ORT."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import onnx
import pytest

pytest.importorskip("modelopt", reason="needs the fp8 extra")

import _fp8_models as models  # noqa: E402

from app.errors import UsageError  # noqa: E402
from export import fp8  # noqa: E402
from export.fp8_policy import FP8_EXCLUDE, check_precision, fp8_exclude_patterns  # noqa: E402

STANDARD_DOMAINS = {"", "ai.onnx"}
# Calibration and held-out shapes differ in batch, grid and text length, so the dynamic axes are exercised.
CALIBRATION = {"klein": [dict(batch=1, rows=4, cols=6, text=16), dict(batch=2, rows=6, cols=6, text=12)] * 2,
               "sd3": [dict(batch=2, rows=8, cols=12, text=16), dict(batch=1, rows=16, cols=16, text=20)] * 2}
HELD_OUT = {"klein": [dict(batch=1, rows=5, cols=3, text=24), dict(batch=3, rows=8, cols=8, text=7)],
            "sd3": [dict(batch=1, rows=10, cols=6, text=24), dict(batch=3, rows=12, cols=12, text=9)]}


def feeds(name: str, shapes: list[dict], seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [models.FEEDS[name](rng, **shape) for shape in shapes]


@pytest.fixture(scope="module")
def fp32(request, tmp_path_factory):
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    folder = cache.mkdir("edgegen-fp8-models") if cache else tmp_path_factory.mktemp("fp8-models")
    return models.exported(folder, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def quantized(fp32, tmp_path_factory):
    """Quantize both models once: {name: (report, fp8 path, fp32 sha256 before, messages)}."""
    out = {}
    for name, src in fp32.items():
        before = hashlib.sha256(src.read_bytes()).hexdigest()
        messages: list[str] = []
        dst = tmp_path_factory.mktemp(name) / "transformer.fp8.onnx"
        report = fp8.quantize_fp8(src, dst, feeds(name, CALIBRATION[name], 1),
                                  fp8_exclude_patterns(models.FAMILY[name]), messages.append)
        out[name] = (report, dst, before, messages)
    return out


def dq_fed(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Node name -> the DequantizeLinear nodes feeding it."""
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: [dq[i] for i in n.input if i in dq] for n in model.graph.node}


def module_path(node: onnx.NodeProto) -> str:
    scopes = fp8._scopes(node)
    return scopes[-2] if len(scopes) > 1 else ""


@pytest.mark.parametrize("name", ["klein", "sd3"])
def test_linear_layers_get_fp8_qdq_and_policy_layers_do_not(name, fp32, quantized):
    report, path, _, _ = quantized[name]
    q = onnx.load(str(path))
    fed = dq_fed(q)
    matmuls = [n for n in q.graph.node if n.op_type == "MatMul" and len(fed[n.name]) == 2]
    print(f"\n{name}: {len(matmuls)} FP8 MatMuls, {report['qdq_pairs']} activation Q/DQ pairs, "
          f"{len(report['excluded_nodes'])} excluded")
    assert len(matmuls) == len(report["quantized_nodes"]) > 0
    assert {n.name for n in matmuls} == set(report["quantized_nodes"])
    assert report["qdq_pairs"] > 0 and report["unquantized_linear_nodes"] == []

    # Every linear layer under a policy module keeps its FP32 export's precision: no DQ feeds it.
    ref = onnx.load(str(fp32[name]), load_external_data=False)
    patterns = [re.compile(p) for p in fp8_exclude_patterns(models.FAMILY[name])]
    weights = fp8._constant_names(ref)
    policy = {n.name for n in ref.graph.node
              if n.op_type in ("MatMul", "Gemm", "Conv") and fp8._matches(n, patterns, weights)}
    assert policy and policy <= set(report["excluded_nodes"])
    assert all(not fed.get(n) for n in report["excluded_nodes"])
    modules = {module_path(n) for n in ref.graph.node if n.name in policy}
    wanted = {
        "klein": ("x_embedder", "context_embedder", "proj_out", "double_stream_modulation_img", "norm_out"),
        "sd3": ("pos_embed", "context_embedder", "proj_out", "norm1.linear", "norm1_context.linear"),
    }[name]
    assert all(any(re.search(rf"(^|\.){re.escape(w)}(\.|$)", m) for m in modules) for w in wanted), modules


@pytest.mark.parametrize("name", ["klein", "sd3"])
def test_standard_fp8_qdq_with_weights_stored_in_fp8(name, fp32, quantized):
    report, path, _, _ = quantized[name]
    q = onnx.load(str(path))
    inits = {i.name: i for i in q.graph.initializer}
    assert {n.domain for n in q.graph.node} <= STANDARD_DOMAINS and report["domains"] == ["ai.onnx"]
    assert {o.domain for o in q.opset_import} <= STANDARD_DOMAINS
    assert max(o.version for o in q.opset_import if o.domain in STANDARD_DOMAINS) >= 19  # FP8 Q/DQ

    qdq = [n for n in q.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zero_points = [inits[n.input[2]] for n in qdq if len(n.input) > 2]
    assert zero_points and all(z.data_type == onnx.TensorProto.FLOAT8E4M3FN for z in zero_points)
    assert all(onnx.numpy_helper.to_array(inits[n.input[1]]).size == 1 for n in qdq)  # per-tensor scales

    # DQ-only weights: each quantized MatMul's weight is an FP8 initializer with no QuantizeLinear in front,
    # one byte per weight (a quarter of FP32, half of FP16).
    fed = dq_fed(q)
    for node in report["quantized_nodes"]:
        weights = [inits[d.input[0]] for d in fed[node] if d.input[0] in inits]
        assert len(weights) == 1 and weights[0].data_type == onnx.TensorProto.FLOAT8E4M3FN
        assert len(weights[0].raw_data) == np.prod(weights[0].dims)
    assert report["fp8_weights"] == len(report["quantized_nodes"])
    ratio = report["bytes_fp8"] / report["bytes_fp32"]
    print(f"\n{name}: {report['bytes_fp32']} B FP32 -> {report['bytes_fp8']} B FP8 ({ratio:.2f})")
    # Whole files: the tiny models' FP16 remainder (SD3's 64x64 position table alone is half of it) weighs
    # far more than in a real one, so this bound is loose; the per-weight check above is the exact one.
    assert ratio < 0.6


@pytest.mark.parametrize("name", ["klein", "sd3"])
def test_runs_in_onnxruntime_close_to_fp32_on_held_out_shapes(name, fp32, quantized):
    report, path, _, _ = quantized[name]
    result = fp8.fidelity(fp32[name], path, feeds(name, HELD_OUT[name], 2))
    print(f"\n{name}: {result}")
    assert result["finite"]
    assert result["cosine_min"] > 0.99
    assert result["max_abs_error"] > 0  # FP8 really is in the path


@pytest.mark.parametrize("name", ["klein", "sd3"])
def test_dynamic_axes_and_io_dtypes_kept(name, fp32, quantized):
    _, path, _, _ = quantized[name]

    def io(path):
        model = onnx.load(str(path), load_external_data=False)
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in [*model.graph.input, *model.graph.output]]

    assert io(path) == io(fp32[name])
    assert any(d == "batch" for _, _, dims in io(path) for d in dims)


def test_rope_and_timestep_tables_stay_fp32(quantized):
    _, path, _, _ = quantized["klein"]
    q = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in [*q.graph.value_info, *q.graph.input]}
    trig = [n for n in q.graph.node if n.op_type in ("Cos", "Sin")]
    assert trig and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in trig)
    matmuls = [n for n in q.graph.node if n.op_type == "MatMul"]
    assert any(types.get(n.output[0]) == onnx.TensorProto.FLOAT16 for n in matmuls)


def test_every_ort_optimisation_level_runs_the_fp8_graph(quantized):
    import onnxruntime as ort

    _, path, _, _ = quantized["klein"]
    feed = feeds("klein", HELD_OUT["klein"][:1], 3)[0]
    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs.append(session.run(None, feed)[0])
    assert all(np.isfinite(o).all() and np.allclose(o, outs[0], atol=1e-2) for o in outs)
    # 1.32 needs no workaround; older ORT gets ORT_ENABLE_BASIC from ort_session_options_for.
    expected = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if fp8._ort_version() >= (1, 32)
                else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    assert fp8.ort_session_options_for(path).graph_optimization_level == expected


def test_input_model_is_left_untouched_and_report_is_complete(fp32, quantized):
    for name, (report, _, before, messages) in quantized.items():
        # ModelOpt edits the file it is given in place; quantize_fp8 must hand it a copy.
        assert hashlib.sha256(fp32[name].read_bytes()).hexdigest() == before
        assert report["algorithm"] == "max" and report["granularity"] == "per-tensor"
        assert report["calibration_samples"] == len(CALIBRATION[name])
        assert report["modelopt_version"] and report["fp32_position_nodes"] > 0
        assert messages and all(m.startswith("fp8: ") for m in messages)


def _bad_feeds(case: str) -> list:
    good = feeds("klein", CALIBRATION["klein"][:1], 4)
    f = dict(good[0])
    if case == "empty":
        return []
    if case == "not a dict":
        return [list(f.values())]
    if case == "missing input":
        f.pop("txt_ids")
    elif case == "unknown input":
        f["guidance"] = np.ones(1, np.float32)
    elif case == "wrong dtype":
        f["hidden_states"] = f["hidden_states"].astype(np.float64)
    elif case == "ids as float":
        f["img_ids"] = f["img_ids"].astype(np.float32)
    elif case == "wrong rank":
        f["timestep"] = f["timestep"][None]
    elif case == "wrong fixed dim":
        f["hidden_states"] = f["hidden_states"][..., :64]
    elif case == "inconsistent dynamic dim":
        f["img_ids"] = f["img_ids"][:, :-1]
    elif case == "nan":
        f["encoder_hidden_states"] = f["encoder_hidden_states"].copy()
        f["encoder_hidden_states"][0, 0, 0] = np.nan
    return [*good, f]


@pytest.mark.parametrize("case", ["empty", "not a dict", "missing input", "unknown input", "wrong dtype",
                                  "ids as float", "wrong rank", "wrong fixed dim", "inconsistent dynamic dim",
                                  "nan"])
def test_bad_calibration_is_a_usage_error(case, fp32, tmp_path):
    with pytest.raises(UsageError):
        fp8.quantize_fp8(fp32["klein"], tmp_path / "out.onnx", _bad_feeds(case), FP8_EXCLUDE["flux2-klein"])
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("patterns", [
    ["(unclosed"],  # not a regex
    [".*"],  # nothing left to quantize
    "x_embedder",  # one string, not a list
    [*FP8_EXCLUDE["flux2-klein"], r"(^|\.)no_such_module$"],  # matches nothing: module paths lost?
])
def test_bad_exclusions_are_usage_errors(patterns, fp32, tmp_path):
    cal = feeds("klein", CALIBRATION["klein"][:1], 5)
    with pytest.raises(UsageError):
        fp8.quantize_fp8(fp32["klein"], tmp_path / "out.onnx", cal, patterns)


def test_policy_rules():
    assert set(FP8_EXCLUDE) == {"flux2-klein", "sd3.5"}
    with pytest.raises(UsageError):
        fp8_exclude_patterns("sdxl")
    for component, precision in [("vae", "fp16"), ("vae", "fp8"), ("t5", "fp16")]:
        with pytest.raises(UsageError):
            check_precision(component, precision)
    for component, precision in [("vae", "bf16"), ("vae", "fp32"), ("t5", "bf16"), ("transformer", "fp8")]:
        check_precision(component, precision)
    pattern = re.compile(next(p for p in FP8_EXCLUDE["sd3.5"] if "norm1" in p))
    assert pattern.search("transformer.transformer_blocks.12.norm1_context.linear")
    assert not pattern.search("transformer.transformer_blocks.12.norm1_context.linear.extra")
    assert not pattern.search("transformer.transformer_blocks.12.attn.to_q")
