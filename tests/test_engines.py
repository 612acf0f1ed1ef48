"""Engine builder: real TensorRT-RTX ahead-of-time builds on a GPU-less machine, keys, records, refusals."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.bundle.files import atomic_write_bytes
from app.errors import UsageError
from app.planning.devices import read_gpus
from export.engines import (
    VERIFIED_BUILD,
    VERIFIED_ON_HARDWARE,
    build_engine,
    describe_profiles,
    engine_key,
    graph_precision,
)

ROOT = Path(__file__).resolve().parents[1]
trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX (the [rtx] extra) is not installed")
V = trt.__version__
V3 = ".".join(V.split(".")[:3])
PROFILE = [{"x": ((1, 16, 32), (2, 16, 32), (4, 16, 32))}]


@pytest.fixture(scope="module")
def dynamo_onnx(tmp_path_factory) -> Path:
    """A small MLP + attention exported by the dynamo exporter with a dynamic batch and external weights."""
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = torch.nn.Linear(32, 64)
            self.att = torch.nn.MultiheadAttention(64, 4, batch_first=True)
            self.out = torch.nn.Linear(64, 16)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.inp(x))
            h = h + self.att(h, h, h, need_weights=False)[0]
            return self.out(h)

    path = tmp_path_factory.mktemp("dyn") / "tiny.onnx"
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.onnx.export(
        Tiny().eval(),
        (torch.randn(2, 16, 32),),
        str(path),
        dynamo=True,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes={"x": {0: batch}},
        external_data=True,
    )
    assert path.with_name(
        "tiny.onnx.data"
    ).exists()  # weights live outside: parse_from_file must resolve them
    return path


def _matmul_graph(
    path: Path, *, weight_type=TensorProto.FLOAT, qdq: bool = False, fp8_weights: bool = False
) -> Path:
    """x[batch,16,32] @ W[32,64] with optional FP8 Q/DQ on activation and weight (opset 19, no custom ops)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 64)).astype(np.float32)
    inits, nodes, x, wname = [], [], "x", "W"
    if fp8_weights:  # weights stored as FP8 and dequantised, as ModelOpt's qdq_utils leaves them
        inits += [
            helper.make_tensor("Wq", TensorProto.FLOAT8E4M3FN, [32, 64], (w / 0.02).flatten().tolist()),
            numpy_helper.from_array(np.array(0.02, np.float32), "ws"),
        ]
        nodes.append(helper.make_node("DequantizeLinear", ["Wq", "ws"], ["W"]))
    elif weight_type == TensorProto.FLOAT:
        inits.append(numpy_helper.from_array(w, "W"))
    else:
        inits.append(helper.make_tensor("W", weight_type, [32, 64], w.flatten().tolist()))
        nodes.append(helper.make_node("Cast", ["x"], ["xc"], to=weight_type))
        x = "xc"
    if qdq:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
            numpy_helper.from_array(np.array(0.02, np.float32), "wsq"),
            helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [x, "xs", "zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "xs"], ["xd"]),
            helper.make_node("QuantizeLinear", [wname, "wsq", "zp"], ["wq"]),
            helper.make_node("DequantizeLinear", ["wq", "wsq"], ["wd"]),
        ]
        x, wname = "xd", "wd"
    out = "y" if weight_type == TensorProto.FLOAT else "y16"
    nodes.append(helper.make_node("MatMul", [x, wname], [out]))
    if out != "y":
        nodes.append(helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 64])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


@pytest.fixture(scope="module")
def fp8_onnx(tmp_path_factory) -> Path:
    return _matmul_graph(tmp_path_factory.mktemp("fp8") / "fp8.onnx", qdq=True)


def _check_record(rec: dict, out: Path, *, sm: str, precision: str) -> None:
    assert out.is_file() and out.stat().st_size > 1000
    assert rec["file"] == out.name and rec["bytes"] == out.stat().st_size
    assert rec["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert rec["flavour"] == "tensorrt-rtx" and rec["version"] == V and rec["sm"] == sm
    assert rec["precision"] == precision
    assert rec["key"].startswith(f"trtrtx-{V3}-sm{sm}-{precision}-")
    assert rec["host_code_allowed"] is False and rec["plugins"] == []
    assert rec["build_seconds"] > 0
    assert not [
        p for p in out.parent.iterdir() if p.name.endswith(".tmp")
    ]  # atomic write left nothing behind


def test_hardware_status_is_declared():
    assert VERIFIED_ON_HARDWARE is False and VERIFIED_BUILD == {"tensorrt-rtx": True, "tensorrt": False}


def test_fp32_dynamo_export_builds_for_sm89(dynamo_onnx, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # external data must resolve from the model's folder, not the cwd
    out = tmp_path / "engines" / "tiny.engine"
    msgs: list[str] = []
    rec = build_engine(
        dynamo_onnx, out, flavour="tensorrt-rtx", sm="89", profiles=PROFILE, progress=msgs.append
    )
    _check_record(rec, out, sm="89", precision="fp32")
    assert rec["profiles"] == [{"x": {"min": [1, 16, 32], "opt": [2, 16, 32], "max": [4, 16, 32]}}]
    assert rec["io"]["inputs"]["x"] == {"dtype": "FLOAT", "shape": [-1, 16, 32]}
    assert list(rec["io"]["outputs"]) == ["y"]
    assert msgs[0].endswith("Parsing tiny.onnx") and "s]" in msgs[0]
    assert any("sm89" in m for m in msgs) and "Wrote tiny.engine" in msgs[-1]


@pytest.mark.parametrize("sm", ["89", "sm120"])
def test_fp8_qdq_builds_for_ada_and_blackwell(fp8_onnx, tmp_path, sm):
    out = tmp_path / f"fp8-{sm}.engine"
    rec = build_engine(
        fp8_onnx, out, flavour="tensorrt-rtx", sm=sm, profiles=PROFILE, profile_desc="b1-128to1024"
    )
    target = sm.removeprefix("sm")
    _check_record(rec, out, sm=target, precision="fp8")
    assert rec["key"] == f"trtrtx-{V3}-sm{target}-fp8-b1-128to1024"


def test_fp8_for_sm80_is_refused_before_building(fp8_onnx, tmp_path):
    out = tmp_path / "fp8-80.engine"
    with pytest.raises(UsageError, match=r"sm80.*--precision bf16"):
        build_engine(fp8_onnx, out, flavour="tensorrt-rtx", sm="80", profiles=PROFILE)
    assert not out.exists()


def test_fp16_graph_builds_for_sm86_and_two_profiles(tmp_path):
    src = _matmul_graph(tmp_path / "fp16.onnx", weight_type=TensorProto.FLOAT16)
    profiles = [
        {"x": ((1, 16, 32), (1, 16, 32), (1, 16, 32))},
        {"x": ((2, 16, 32), (4, 16, 32), (4, 16, 32))},
    ]
    rec = build_engine(src, tmp_path / "fp16.engine", flavour="tensorrt-rtx", sm="8.6", profiles=profiles)
    _check_record(rec, tmp_path / "fp16.engine", sm="86", precision="fp16")
    assert len(rec["profiles"]) == 2 and rec["key"].endswith(describe_profiles(profiles))


def test_graph_precision_reads_the_graph(dynamo_onnx, fp8_onnx, tmp_path):
    assert graph_precision(dynamo_onnx) == "fp32"
    assert graph_precision(fp8_onnx) == "fp8"
    assert graph_precision(_matmul_graph(tmp_path / "h.onnx", weight_type=TensorProto.FLOAT16)) == "fp16"
    assert graph_precision(_matmul_graph(tmp_path / "b.onnx", weight_type=TensorProto.BFLOAT16)) == "bf16"
    assert graph_precision(_matmul_graph(tmp_path / "w8.onnx", fp8_weights=True)) == "fp8"


def test_engine_key_format():
    assert (
        engine_key("tensorrt-rtx", "1.7.1.116", "sm89", "fp8", "b1-128to1024")
        == "trtrtx-1.7.1-sm89-fp8-b1-128to1024"
    )
    assert (
        engine_key("tensorrt", "11.4.0.7", "90", "bf16", "B1 / 512..1024")
        == "trt-11.4.0-sm90-bf16-b1-512-1024"
    )
    assert describe_profiles(PROFILE).startswith("b1to4-p1-")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(flavour="tensorrt-rtx", sm="90"), r"cannot target sm90.*--target tensorrt"),
        (dict(flavour="onnx", sm="89"), r"not an engine target"),
        (dict(flavour="tensorrt-rtx", sm="89", profiles=[]), r"dynamic inputs \(x\)"),
        (
            dict(flavour="tensorrt-rtx", sm="89", profiles=[{"x": ((4, 16, 32), (2, 16, 32), (1, 16, 32))}]),
            r"inconsistent",
        ),
        (
            dict(flavour="tensorrt-rtx", sm="89", profiles=[{"x": ((1, 16, 32),) * 3, "z": ((1,),) * 3}]),
            r"does not have",
        ),
        (dict(flavour="tensorrt-rtx", sm="89", opt_level=9), r"0 to 5"),
        (dict(flavour="tensorrt-rtx", sm="banana"), r"not a compute capability"),
    ],
)
def test_user_mistakes_are_one_line_usage_errors(fp8_onnx, tmp_path, kwargs, match):
    kwargs.setdefault("profiles", PROFILE)
    with pytest.raises(UsageError, match=match) as e:
        build_engine(fp8_onnx, tmp_path / "x.engine", **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x.engine").exists()


@pytest.mark.skipif(bool(read_gpus()), reason="checks the no-GPU refusals")
def test_no_gpu_refusals(fp8_onnx, tmp_path):
    with pytest.raises(UsageError, match="needs an NVIDIA GPU to build"):
        build_engine(fp8_onnx, tmp_path / "x.engine", flavour="tensorrt", sm=None, profiles=PROFILE)
    with pytest.raises(UsageError, match="pass --sm"):
        build_engine(fp8_onnx, tmp_path / "x.engine", flavour="tensorrt-rtx", sm=None, profiles=PROFILE)
    with pytest.raises(UsageError, match="refittable"):
        build_engine(
            fp8_onnx, tmp_path / "x.engine", flavour="tensorrt-rtx", sm="89", profiles=PROFILE, refit=True
        )


def test_missing_onnx_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        build_engine(
            tmp_path / "nope.onnx", tmp_path / "x.engine", flavour="tensorrt-rtx", sm="89", profiles=PROFILE
        )


def test_atomic_write_bytes_replaces_and_hashes(tmp_path):
    p = tmp_path / "a" / "f.bin"
    atomic_write_bytes(p, b"old")
    sha, n = atomic_write_bytes(p, b"new!")
    assert p.read_bytes() == b"new!" and n == 4 and sha == hashlib.sha256(b"new!").hexdigest()
    assert sorted(x.name for x in p.parent.iterdir()) == ["f.bin"]


def test_tensorrt_is_imported_lazily():
    code = (
        "import sys, export.engines, app.runtime.engine.compat, app.runtime.engine.shapes, app.planning.plan, "
        "app.planning.devices; bad = [m for m in ('tensorrt_rtx', 'tensorrt', 'torch') if m in sys.modules]; "
        "assert not bad, bad; import app.runtime.engine.runner; "  # the runner needs torch, never TensorRT
        "bad = [m for m in ('tensorrt_rtx', 'tensorrt') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
