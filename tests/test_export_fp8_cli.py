"""FP8 through the CLI for FLUX.2 Klein: Q/DQ on the transformer's linears and none on the policy's layers,
text encoders left FP32 unless asked, ONNX Runtime end to end close to FP32; and --text-encoder-precision's
bad input. (SD3's FP8 text encoders are checked in test_export_fp8_lora_engines.py.)"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from app.bundle.manifest import load_bundle
from app.cli import main
from tests.conftest import export_via_cli
from tests.test_bad_input import assert_one_line
from tests.test_spine import psnr

# Measured on the tiny random Klein (64 px, 4 steps, three prompts/seeds): FP8 vs FP32 image PSNR 65.0-65.2.
KLEIN_FP8_MIN_PSNR = 50.0


def dq_fed(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes a DequantizeLinear feeds."""
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if n.op_type != "DequantizeLinear" and dq & set(n.input)}


def assert_policy_kept(fp32_onnx: Path, fp8_onnx: Path, patterns, excluded_nodes: list[str]) -> None:
    """Every linear layer the policy names (found by torch module path in the FP32 export, whose node metadata
    ModelOpt has not rewritten) is in the manifest's excluded list and has no DequantizeLinear input."""
    from export import fp8

    ref = onnx.load(str(fp32_onnx), load_external_data=False)
    weights = fp8._constant_names(ref)
    compiled = [re.compile(p) for p in patterns]
    linear = [n for n in ref.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in weights]
    policy = {n.name for n in linear if fp8._matches(n, compiled, weights)}
    assert policy and policy <= set(excluded_nodes)
    q = onnx.load(str(fp8_onnx))
    assert policy <= {n.name for n in q.graph.node}  # same names as the FP32 graph
    assert not policy & dq_fed(q)


class FiniteBackend:
    """Wraps a backend and fails on the first NaN or Inf any component returns."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def run(self, component, inputs):
        out = self.inner.run(component, inputs)
        for k, v in out.items():
            assert torch.isfinite(v).all(), f"{component}.{k} is not finite"
        return out

    def describe(self):
        return self.inner.describe()


@pytest.fixture(scope="session")
def klein_fp8_bundle(klein_model, tmp_path_factory):
    pytest.importorskip("modelopt", reason="needs the fp8 extra")
    return export_via_cli(klein_model, tmp_path_factory.mktemp("bundles") / "klein-fp8", "--precision", "fp8",
                          "--calibration-count", "2", "--calibration-size", "64", "--calibration-steps", "2")


def test_klein_fp8_transformer_qdq_on_linears_not_on_excluded(klein_fp8_bundle, klein_bundle):
    from export.fp8_policy import fp8_exclude_patterns

    b = load_bundle(klein_fp8_bundle)
    comps = b.components()
    tr = comps["transformer"]
    assert b.precision == "fp8" and tr["precision"] == "fp8"
    # text encoders are FP8 only on request, the VAE never
    assert b.manifest["text_encoder_precision"] == "fp32"
    assert comps["text_encoder"]["precision"] == comps["vae_decoder"]["precision"] == "fp32"
    model = onnx.load(str(b.onnx_path("transformer")))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard Q/DQ, no custom ops
    fed = {n.name for n in model.graph.node if n.op_type == "MatMul"} & dq_fed(model)
    assert len(fed) == tr["fp8"]["quantized"] > 0 and tr["fp8"]["qdq_pairs"] > 0
    fp8_weights = [i for i in model.graph.initializer
                   if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) >= 2]
    assert len(fp8_weights) == tr["fp8"]["quantized"]
    patterns = fp8_exclude_patterns("flux2-klein")
    assert tr["fp8"]["exclude_patterns"] == list(patterns)
    fp32 = load_bundle(klein_bundle).onnx_path("transformer")
    assert_policy_kept(fp32, b.onnx_path("transformer"), patterns, tr["fp8"]["excluded_nodes"])
    f = tr["fidelity_fp8"]
    assert f["output_cosine_min"] > 0.99 and f["held_out_samples"] >= 1
    # --calibration-steps 2 (not the bundle's default): 2 prompts x 2 sampler steps, the last held out
    assert b.manifest["defaults"]["steps"] != 2 and tr["fp8"]["calibration_samples"] + f["held_out_samples"] == 4
    assert b.manifest["fidelity"]["fp8_components"] == ["transformer"]


def test_klein_fp8_runs_in_onnxruntime_close_to_fp32(klein_fp8_bundle, klein_bundle, tmp_path):
    from app.runtime.ort_backend import OrtBackend
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    args = ["--prompt", "a lighthouse at dusk", "--width", "64", "--height", "64", "--seed", "3",
            "--backend", "onnxruntime"]
    for name, bundle in (("fp8", klein_fp8_bundle), ("fp32", klein_bundle)):
        assert main(["generate", "--bundle", str(bundle), "--out", str(tmp_path / f"{name}.png"), *args]) == 0
    ours, ref = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("fp8", "fp32"))
    assert ours.shape == (64, 64, 3) and ours.std() > 1  # not a flat (NaN -> black) image
    assert psnr(ours, ref) >= KLEIN_FP8_MIN_PSNR
    b = load_bundle(klein_fp8_bundle)
    pipe = make_pipeline(b, FiniteBackend(OrtBackend(b, "cpu")))
    again = pipe.generate(GenerationRequest(prompt="a lighthouse at dusk", seed=3, width=64, height=64)).image
    assert np.array_equal(again, ours)  # the CLI ran exactly this


def test_text_encoder_fp16_is_refused(sd3_model, tmp_path, capsys):
    rc = main(["export", "--model", str(sd3_model), "--out", str(tmp_path / "b"), "--text-encoder-precision", "fp16"])
    assert_one_line(rc, capsys.readouterr().err.strip(), "text_encoder_3", "T5 overflows FP16",
                    "--text-encoder-precision bf16")
    rc = main(["export", "--model", str(sd3_model), "--out", str(tmp_path / "b"),
               "--text-encoder-precision", "int4"])
    assert_one_line(rc, capsys.readouterr().err.strip(), "--text-encoder-precision")
    assert not (tmp_path / "b").exists()


def test_fp8_without_modelopt_is_refused_before_export(sd3_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)  # as if the fp8 extra were missing
    for flag in ("--text-encoder-precision", "--precision"):
        rc = main(["export", "--model", str(sd3_model), "--out", str(tmp_path / "b"), flag, "fp8"])
        assert_one_line(rc, capsys.readouterr().err.strip(), "ModelOpt", "edgegen[fp8]")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))
