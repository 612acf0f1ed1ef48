"""FP8 through ModelOpt's PyTorch path (export/fp8_torch.py): calibration of the BF16 module, Q/DQ written into the
BF16 graph tensor by tensor, the checks, TensorRT-RTX engines, the path choice and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from app.cli import main
from app.errors import UsageError
from export.fp8 import _scopes
from export.fp8_torch import compare, excluded_modules, twin_outputs, write_qdq
from tests.conftest import export_via_cli
from tests.test_bad_input import assert_one_line

TORCH_FP8 = ("--precision", "fp8", "--fp8-path", "torch", "--text-encoder-precision", "bf16",
             "--calibration-size", "64")


@pytest.fixture(scope="module")
def klein_fp8_torch(klein_model, tmp_path_factory) -> Path:
    """Klein (no CFG) through the PyTorch path, with TensorRT-RTX engines when the [rtx] extra is here."""
    engines = ("--target", "tensorrt-rtx", "--sm", "89")
    try:
        import tensorrt_rtx  # noqa: F401
    except ImportError:
        engines = ()
    return export_via_cli(klein_model, tmp_path_factory.mktemp("fp8t") / "klein", *TORCH_FP8, "--calibration-count", "2",
                          *engines)


@pytest.fixture(scope="module")
def bf16_transformer(klein_model, tmp_path_factory) -> Path:
    """The tiny Klein transformer's BF16 graph alone, as export writes it before quantizing."""
    from app.bundle.modelfolder import inspect_folder
    from export.exporter import export_one

    folder = inspect_folder(klein_model, "auto")
    out = tmp_path_factory.mktemp("bf16t") / "transformer"
    export_one(folder, folder.family.component("transformer"), out, (), lambda _m: None, precision="bf16")
    return out / "model.onnx"


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _linear_modules(path: Path) -> dict[str, str]:
    """{MatMul node: module path} for every MatMul with a weight initializer."""
    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}
    return {n.name: _scopes(n)[-1] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits}


def _feed(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"hidden_states": rng.standard_normal((1, 16, 128)).astype(np.float32),
            "encoder_hidden_states": (3 * rng.standard_normal((1, 8, 96))).astype(np.float32),
            "timestep": np.array([0.6], np.float32),
            "img_ids": np.zeros((1, 16, 4), np.int64), "txt_ids": np.zeros((1, 8, 4), np.int64)}


def test_klein_bundle_through_the_pytorch_path(klein_fp8_torch):
    m = _manifest(klein_fp8_torch)
    t = m["components"]["transformer"]
    assert m["component_precisions"]["transformer"] == "fp8" and t["precision"] == "fp8"
    assert t["fp8"]["path"] == "torch" and t["fp8"]["high_precision"] == "bf16"
    assert t["fp8"]["quantized"] > 0 and t["fp8"]["calibration_prompts"] == 2
    steps = m["defaults"]["steps"]  # no --calibration-steps: the bundle's default, 2 prompts of it
    assert t["fp8"]["calibration_steps_per_image"] == steps and t["fp8"]["calibration_samples"] == 2 * steps
    # the policy's layers stay BF16: the embedders, the shared modulations, the final norm and projection
    kept = " ".join(t["fp8"]["excluded_modules"])
    for part in ("x_embedder", "context_embedder", "single_stream_modulation", "norm_out", "proj_out"):
        assert part in kept
    assert t["fp8_fidelity_gate"]["passed"] and t["fidelity_fp8"]["output_cosine_min"] > 0.99
    assert t["fidelity_fp8"]["graph_vs_modelopt_cosine_min"] > 0.99  # the graph computes ModelOpt's function
    assert m["fidelity"]["fp8_path"] == "torch" and m["fidelity"]["image_psnr_vs_bf16_db"] > 30
    assert m["text_encoder_precision"] == "bf16"
    # on disk: FP8 weights behind DequantizeLinear, no twin, the file smaller than BF16
    g = onnx.load(str(klein_fp8_torch / t["onnx"]), load_external_data=False).graph
    assert sum(i.data_type == TensorProto.FLOAT8E4M3FN and len(i.dims) == 2 for i in g.initializer) == t["fp8"]["quantized"]
    assert sum(n.op_type == "QuantizeLinear" for n in g.node) >= 1
    assert not (klein_fp8_torch / "transformer" / "model.fp32.onnx").exists()
    assert t["fp8"]["bytes_fp8"] < t["fp8"]["bytes_bf16"]
    if m["engines"]:  # TensorRT-RTX builds the FP8 + BF16 graph for an FP8 GPU here, with no GPU
        eng = [e for e in m["engines"] if e["component"] == "transformer"]
        assert eng and eng[0]["precision"] == "fp8" and "-sm89-fp8-" in eng[0]["key"]


def test_pytorch_path_bundle_is_refused_on_cpu_in_one_line(klein_fp8_torch, tmp_path, capsys):
    rc = main(["generate", "--bundle", str(klein_fp8_torch), "--prompt", "a red circle", "--width", "32",
               "--height", "32", "--steps", "1", "--out", str(tmp_path / "x.png"), "--backend", "onnxruntime"])
    assert_one_line(rc, capsys.readouterr().err.strip(), "transformer", "BF16 bundles are for NVIDIA GPUs")
    assert not (tmp_path / "x.png").exists()


def test_sd3_with_cfg_through_the_pytorch_path(sd3_model, tmp_path):
    """SD3.5 runs CFG (a batch of two through the transformer) and keeps other layers high precision."""
    root = export_via_cli(sd3_model, tmp_path / "sd3", *TORCH_FP8, "--calibration-count", "1",
                          "--calibration-steps", "3")
    m = _manifest(root)
    t = m["components"]["transformer"]
    assert t["precision"] == "fp8" and t["fp8"]["path"] == "torch" and t["fp8_fidelity_gate"]["passed"]
    assert any("norm1.linear" in n for n in t["fp8"]["excluded_modules"])  # adaLN modulation stays BF16
    assert m["fidelity"]["image_psnr_vs_bf16_db"] > 30
    assert m["defaults"]["guidance"] > 1  # CFG on: the calibration and check inputs had batch 2
    assert m["defaults"]["steps"] != 3 and t["fp8"]["calibration_steps_per_image"] == t["fp8"]["calibration_samples"] == 3


def test_qdq_graph_quantizes_what_it_is_told_and_can_fail(bf16_transformer, tmp_path):
    modules = _linear_modules(bf16_transformer)
    feed = _feed()
    ref = twin_outputs(bf16_transformer, [feed])
    amax = {m: 4.0 for m in modules.values()}
    good = write_qdq(bf16_transformer, tmp_path / "good" / "model.onnx", amax)
    assert len(good["quantized_nodes"]) == len(modules)
    assert all(n.startswith("node_linear") for n in good["unquantized_linear_nodes"])  # the Gemm layers
    out = twin_outputs(tmp_path / "good" / "model.onnx", [feed])
    assert compare(ref, out)["cosine_min"] > 0.99
    # ranges far too small saturate every activation: the check must see it
    bad = write_qdq(bf16_transformer, tmp_path / "bad" / "model.onnx", {m: 0.1 for m in modules.values()})
    assert len(bad["quantized_nodes"]) == len(modules)
    assert compare(ref, twin_outputs(tmp_path / "bad" / "model.onnx", [feed]))["cosine_min"] < 0.95
    # a layer with no calibrated range (never reached) stays BF16; a range for a module the graph lacks fails
    some = dict(list(amax.items())[:3])
    part = write_qdq(bf16_transformer, tmp_path / "part" / "model.onnx", some)
    assert len(part["quantized_nodes"]) == 3
    with pytest.raises(UsageError, match="no MatMul"):
        write_qdq(bf16_transformer, tmp_path / "x" / "model.onnx", {**amax, "inner.transformer.nowhere": 1.0})


def test_qdq_streams_external_weights_identically(bf16_transformer, tmp_path):
    """A real-size graph keeps its weights in model.onnx.data: the rewrite reads and writes them tensor by tensor,
    and the result computes exactly what the in-file version does."""
    ext = tmp_path / "ext" / "model.onnx"
    ext.parent.mkdir()
    onnx.save(onnx.load(str(bf16_transformer)), str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    amax = {m: 3.0 for m in _linear_modules(bf16_transformer).values()}
    write_qdq(bf16_transformer, tmp_path / "a" / "model.onnx", amax)
    write_qdq(ext, tmp_path / "b" / "model.onnx", amax)
    assert (tmp_path / "b" / "model.onnx.data").stat().st_size > 0
    assert not (tmp_path / "a" / "model.onnx.data").exists()
    feed = _feed(1)
    a = twin_outputs(tmp_path / "a" / "model.onnx", [feed])
    b = twin_outputs(tmp_path / "b" / "model.onnx", [feed])
    np.testing.assert_array_equal(a[0][0], b[0][0])


def test_policy_patterns_name_layers_or_their_parents():
    net = torch.nn.Module()
    net.embed = torch.nn.Linear(4, 4)
    net.block = torch.nn.Module()
    net.block.modulation = torch.nn.Module()
    net.block.modulation.linear = torch.nn.Linear(4, 4)
    net.block.ff = torch.nn.Linear(4, 4)
    assert excluded_modules(net, [r"(^|\.)modulation$", r"(^|\.)embed$"]) == ["embed", "block.modulation.linear"]
    net.block.conv = torch.nn.Conv2d(1, 1, 1)  # a pattern may name a module with no linear layer in it
    assert excluded_modules(net, [r"(^|\.)conv$"]) == []
    with pytest.raises(UsageError, match="match no module"):
        excluded_modules(net, [r"(^|\.)norm_out$"])


def test_auto_path_follows_the_memory_estimate(klein_model, monkeypatch):
    from app.bundle.modelfolder import inspect_folder
    from export import preflight
    from export.bf16_policy import component_precisions

    folder = inspect_folder(klein_model, "auto")
    precisions = component_precisions("flux2-klein", ["text_encoder", "transformer", "vae_decoder"], "fp8", "bf16")
    need = preflight.memory_estimate(folder, "fp8", (), precisions, "onnx")
    monkeypatch.setattr(preflight, "available_memory", lambda: need + 1)  # a fake reading: the RAM this machine reports
    assert preflight.fp8_path(folder, (), precisions)[0] == "onnx"
    monkeypatch.setattr(preflight, "available_memory", lambda: need - 1)
    route, why = preflight.fp8_path(folder, (), precisions)
    assert route == "torch" and "ONNX path would need" in why
    assert preflight.fp8_path(folder, (), precisions, "onnx")[0] == "onnx"
    # the PyTorch path never holds FP32 weights: the part of its estimate that scales with the weights is below the
    # ONNX path's (on this tiny model the calibration's fixed GiB would dominate the totals)
    torch_need = preflight.memory_estimate(folder, "fp8", (), {**precisions, "transformer": "bf16"}, "torch")
    assert torch_need - preflight.TORCH_CALIBRATION_FIXED < need


def test_fp8_text_encoders_with_the_pytorch_path_are_refused_up_front(klein_model, tmp_path, capsys):
    rc = main(["export", "--model", str(klein_model), "--out", str(tmp_path / "b"), "--precision", "fp8",
               "--fp8-path", "torch", "--text-encoder-precision", "fp8"])
    assert_one_line(rc, capsys.readouterr().err.strip(), "--text-encoder-precision bf16")
    assert not (tmp_path / "b").exists()


WRITE_CHILD = r"""
import json, sys
from pathlib import Path
import export.fp8_torch as f  # every library in before the baseline

from benchmarks.export_memory import proc_status as status, reset_peak

src, dst, amax = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
reset_peak()  # VmHWM := the current RSS
before = status()["VmRSS"]
report = f.write_qdq(src, dst, amax)
print(json.dumps({"before": before, "peak": status()["VmHWM"], "quantized": len(report["quantized_nodes"])}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_qdq_rewrite_holds_one_tensor_not_the_model(tmp_path):
    """At real size the BF16 graph is 7-17 GiB: the rewrite must stream it. A 256 MiB graph of 128 BF16 weights in
    model.onnx.data is rewritten in a child process whose peak RSS above its baseline must stay far below the
    weights' bytes (measured ~0.1x; reading all of them at once would be >= 1.0x)."""
    import subprocess
    import sys

    import ml_dtypes
    from onnx import helper, numpy_helper

    n, d_in, d_out = 128, 1024, 1024
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(n):
        w = (rng.standard_normal((d_in, d_out), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
        inits.append(numpy_helper.from_array(w, f"blocks.{i}.lin.weight.T"))
        nodes.append(helper.make_node("MatMul", [x, inits[-1].name], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Slice", [f"h{i}", "s0", "s1", "ax"], [f"y{i}"], name=f"sl{i}"))
        x = f"y{i}"
    inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"),
              numpy_helper.from_array(np.array([d_in], np.int64), "s1"),
              numpy_helper.from_array(np.array([-1], np.int64), "ax")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [1, d_in])],
                              [helper.make_tensor_value_info(x, TensorProto.BFLOAT16, [1, d_in])], inits)
    src = tmp_path / "src" / "model.onnx"
    src.parent.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(src),
              save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    del graph, inits, nodes
    weight_bytes = n * d_in * d_out * 2
    amax = json.dumps({f"blocks.{i}.lin": 2.0 for i in range(n)})
    proc = subprocess.run([sys.executable, "-c", WRITE_CHILD, str(src), str(tmp_path / "dst" / "model.onnx"), amax],
                          capture_output=True, text=True, timeout=300, check=False, env={"PYTHONWARNINGS": "ignore",
                          **{k: v for k, v in __import__("os").environ.items()}},
                          cwd=Path(__file__).resolve().parents[1])  # the child imports benchmarks/
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["quantized"] == n
    ratio = (r["peak"] - r["before"]) / weight_bytes
    print(f"rewrite of {weight_bytes / 2**20:.0f} MiB BF16: (peak - baseline) / bytes = {ratio:.2f}")
    assert ratio < 0.3, f"the rewrite held {ratio:.2f} of the weights at once"
    assert (tmp_path / "dst" / "model.onnx.data").stat().st_size < 0.6 * weight_bytes  # FP8: half of BF16


FREED_CHILD = r"""
import gc, weakref, torch
from export.fp8_torch import calibrate

def run():
    m = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    x = torch.randn(4, 32)
    amax = calibrate(m, lambda mod: mod(x), [])
    return weakref.ref(m), len(amax)

ref, n = run()
gc.collect()
print("ALIVE" if ref() is not None else "FREED", n)
"""


def test_calibrated_module_is_freed_once_calibration_returns():
    """The first import of modelopt.torch.quantization pins the importing frame and its callers (and so their
    locals) for the life of the process: imported inside calibrate() it kept Klein 4B's BF16 transformer and the
    calibration pipeline alive through the FP8 check (~9 GiB of its 17.3 GiB peak). A fresh interpreter, so that
    this is ModelOpt's first import; fails if calibrate() imports it on the caller's stack again."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FREED_CHILD], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["FREED", "2"], proc.stdout[-500:]
