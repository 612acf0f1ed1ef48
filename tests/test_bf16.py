"""BF16 export: modules loaded in BF16, FP32 islands, the FP32-twin check, gates, engines, CPU refusal, --gpu."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from app.cli import main
from app.errors import UsageError
from export.bf16 import TWIN_NAME, fp32_compute, fp32_twin, keep_fp32_islands, twin_session
from export.bf16_policy import component_precisions, fp32_ops
from export.fidelity import LowFidelityError, gate, image_gate
from tests.conftest import _dev_copy, export_via_cli
from tests.test_bad_input import assert_one_line


@pytest.fixture(scope="module")
def klein_bf16(klein_model, tmp_path_factory) -> Path:
    return _dev_copy("klein-bf16") or export_via_cli(klein_model, tmp_path_factory.mktemp("bf16") / "klein",
                                                     "--precision", "bf16")


@pytest.fixture(scope="module")
def sd3_bf16(sd3_model, tmp_path_factory) -> Path:
    return _dev_copy("sd3-bf16") or export_via_cli(sd3_model, tmp_path_factory.mktemp("bf16") / "sd3",
                                                   "--precision", "bf16")


def _initializer_types(path: Path) -> set[str]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {TensorProto.DataType.Name(t.data_type) for t in g.initializer}


def _check_bundle(root: Path, components: set[str]) -> dict:
    m = json.loads((root / "manifest.json").read_text())
    assert m["precision"] == "bf16" and m["text_encoder_precision"] == "bf16"
    assert set(m["components"]) == components
    for name, c in m["components"].items():
        assert c["precision"] == "bf16", name
        assert not (root / name / TWIN_NAME).exists()  # the export-time twin never ships
        assert "BFLOAT16" in _initializer_types(root / c["onnx"]), name
        # the graph's function on its rounded weights, and BF16 arithmetic, both gated and recorded
        assert c["fidelity_gate"]["passed"] and c["fidelity"]["cosine"] > 0.9999, name
        assert c["bf16_fidelity_gate"]["passed"] and c["fidelity_bf16"]["cosine"] > 0.999, name
        assert c["bytes"] == sum(f.stat().st_size for f in (root / name).iterdir())
        # the bundle's tensors stay FP32 at the boundary: the runtime feeds every bundle alike
        assert {t["dtype"] for t in c["inputs"] + c["outputs"]} <= {"float32", "int64"}
    f = m["fidelity"]
    assert f["image_gate"]["passed"] and f["image_psnr_vs_fp32_db"] >= 30
    assert min(f["image_psnr_rounded_weights_db"]) >= 40
    return m


def test_klein_bf16_bundle(klein_bf16):
    m = _check_bundle(klein_bf16, {"text_encoder", "transformer", "vae_decoder", "vae_encoder"})
    g = onnx.load(str(klein_bf16 / "transformer" / "model.onnx"), load_external_data=False).graph
    producers = {o: n for n in g.node for o in n.output}
    softmax = [n for n in g.node if n.op_type == "Softmax"]
    assert softmax
    for n in softmax:  # attention probabilities accumulate in FP32 (export/bf16_policy.py)
        cast = producers[n.input[0]]
        assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
    assert m["components"]["transformer"]["fp32_ops"] == sorted(fp32_ops("flux2-klein"))


def test_sd3_bf16_bundle(sd3_bf16):
    m = _check_bundle(sd3_bf16, {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder",
                                 "vae_encoder"})
    # transformers keeps T5's FFN output projection (`wo`) in FP32 when loading BF16: the graph keeps it too
    assert "FLOAT" in _initializer_types(sd3_bf16 / m["components"]["text_encoder_3"]["onnx"])


def test_bf16_bundle_is_refused_on_cpu_in_one_line(klein_bf16, tmp_path, capsys):
    rc = main(["generate", "--bundle", str(klein_bf16), "--prompt", "a red circle", "--width", "32",
               "--height", "32", "--steps", "1", "--out", str(tmp_path / "x.png"), "--backend", "onnxruntime"])
    assert_one_line(rc, capsys.readouterr().err.strip(), "BF16 bundles are for NVIDIA GPUs", "--precision fp32")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("sm", ["80", "89"])
def test_tensorrt_rtx_builds_bf16_engines(klein_bf16, tmp_path, sm):
    pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the [rtx] extra) is not installed")
    from app.bundle.manifest import load_bundle
    from export.engines import build_engine
    from export.profiles import profiles_for

    b = load_bundle(klein_bf16, verify=False)
    m = b.manifest
    for name in ("transformer", "vae_decoder"):
        e = m["components"][name]
        profiles = profiles_for(b.family, name, e, m["size_range"], m["defaults"], m["pipeline"])
        out = tmp_path / f"{name}.engine"
        rec = build_engine(klein_bf16 / e["onnx"], out, flavour="tensorrt-rtx", sm=sm, profiles=profiles)
        assert rec["precision"] == "bf16" and f"-sm{sm}-bf16-" in rec["key"] and out.stat().st_size > 0


def test_fp16_only_where_safe():
    both = ["text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae_decoder"]
    assert component_precisions("sd3.5", both, "fp16", "fp32") == {
        "text_encoder": "fp32", "text_encoder_2": "fp32", "text_encoder_3": "fp32", "transformer": "fp16",
        "vae_decoder": "fp32"}  # the VAE never follows FP16
    with pytest.raises(UsageError, match="text_encoder_3.*T5 overflows FP16"):
        component_precisions("sd3.5", both, "fp32", "fp16")
    with pytest.raises(UsageError, match="transformer of a flux2-klein.*--precision bf16"):
        component_precisions("flux2-klein", ["transformer"], "fp16", "fp32")
    with pytest.raises(UsageError, match="Qwen3"):
        component_precisions("flux2-klein", ["text_encoder"], "fp32", "fp16")
    assert component_precisions("flux2-klein", ["transformer", "vae_decoder"], "bf16", "bf16") == {
        "transformer": "bf16", "vae_decoder": "bf16"}
    assert component_precisions("flux2-klein", ["transformer", "vae_decoder"], "fp8", "bf16")["vae_decoder"] == "fp32"
    with pytest.raises(UsageError, match="No BF16 policy"):
        component_precisions("other", ["transformer"], "bf16", "fp32")


def test_fp32_compute_is_the_widened_module_and_restores_bf16():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    m = m.to(torch.bfloat16)
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.randn(3, 8)
    with torch.no_grad():
        want = copy.deepcopy(m).float()(x)
        with fp32_compute(m):
            got = m(x)
        half = m(x.bfloat16())
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6, rtol=0)
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, b) for p, b in zip(m.parameters(), before))
    assert not torch.equal(half.float(), want)  # BF16 arithmetic does differ: the twin is not a tautology


def _half_graph(path: Path) -> tuple[Path, np.ndarray]:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    w16 = helper.make_tensor("w", TensorProto.BFLOAT16, (8, 8), numpy_helper.to_array(w).astype("float32").ravel(), False)
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["xh", "w"], ["h"]),
             helper.make_node("Softmax", ["h"], ["p"], axis=-1),
             helper.make_node("Cast", ["p"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w16])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])
    model = onnx.shape_inference.infer_shapes(model)
    import onnx_ir as ir

    irm = ir.serde.deserialize_model(model)
    assert keep_fp32_islands(irm, fp32_ops("sd3.5")) == 1
    ir.save(irm, str(path))
    rounded = numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]).astype(np.float32)
    return path, rounded


def test_twin_computes_the_graph_in_fp32_on_rounded_weights(tmp_path):
    path, w = _half_graph(tmp_path / "model.onnx")
    kinds = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert kinds == ["Cast", "MatMul", "Cast", "Softmax", "Cast", "Cast"]  # Softmax wrapped in FP32
    import onnxruntime as ort

    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):  # why the twin exists: no BF16 MatMul on CPU
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    twin = fp32_twin(path)
    assert twin.name == TWIN_NAME and twin.parent == path.parent
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    got = twin_session(twin).run(None, {"x": x})[0]
    h = x @ w
    want = np.exp(h - h.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_gates_for_half_precision():
    assert gate("transformer", "bf16", 0.9999, 0.02, False)["passed"]
    with pytest.raises(LowFidelityError, match="BF16 transformer.*FP32 arithmetic"):
        gate("transformer", "bf16", 0.95, 0.02, False)
    assert gate("transformer", "bf16", 0.95, 0.02, True)["accepted_low_fidelity"]
    assert image_gate("bf16", 45.0, False)["passed"]
    with pytest.raises(LowFidelityError, match="PSNR 20.0 dB < 30.0 dB.*--accept-low-fidelity"):
        image_gate("bf16", 20.0, False)
    assert image_gate("bf16", 20.0, True)["accepted_low_fidelity"]


def test_low_bf16_fidelity_refuses_export(sd3_model, tmp_path, capsys, monkeypatch):
    from export import fidelity

    monkeypatch.setitem(fidelity.THRESHOLDS, "bf16", fidelity.Threshold(cosine_min=1.0, max_rel_err=0.0))
    rc = main(["export", "--model", str(sd3_model), "--out", str(tmp_path / "b"), "--precision", "bf16",
               "--min-size", "32", "--max-size", "256"])
    assert_one_line(rc, capsys.readouterr().err.strip(), "BF16 text_encoder", "--accept-low-fidelity")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("gpu, want", [
    ("RTX 4090", ("fp8", "bf16", "bf16", "tensorrt-rtx", ("89",))),
    ("RTX 3090", ("bf16", "bf16", "bf16", "tensorrt-rtx", ("86",))),
    ("sm120:32", ("fp8", "bf16", "bf16", "tensorrt-rtx", ("120",))),
    ("sm75:8", ("fp32", "fp32", "fp32", "tensorrt-rtx", ("75",))),  # no BF16 before Ampere; Klein never FP16
])
def test_export_options_for_a_gpu(klein_model, gpu, want):
    from app.planning.gpus import parse_gpu_option
    from export.exporter import ExportOptions, options_for_gpu

    o = options_for_gpu(ExportOptions(model=klein_model, out=Path("x")), parse_gpu_option(gpu))
    assert (o.precision, o.text_encoder_precision, o.vae_precision, o.target, o.sms) == want
    with pytest.raises(UsageError, match="found no NVIDIA GPU"):
        options_for_gpu(ExportOptions(model=klein_model, out=Path("x")), None)


def test_memory_estimate_counts_bf16_components_at_two_bytes(klein_model):
    from app.bundle.modelfolder import inspect_folder
    from export import preflight

    folder = inspect_folder(klein_model, "auto")
    names = ["text_encoder", "transformer", "vae_decoder"]
    fp32 = preflight.memory_estimate(folder, "fp32", (), {n: "fp32" for n in names}) - preflight.PROCESS_BASE
    bf16 = preflight.memory_estimate(folder, "bf16", (), {n: "bf16" for n in names}) - preflight.PROCESS_BASE
    # half the bytes, at the ratio measured for BF16 at real size (docs/PERFORMANCE.md)
    assert abs(bf16 - fp32 / 2 * preflight.HALF_EXPORT_PEAK_RATIO / preflight.EXPORT_PEAK_RATIO) <= 2
