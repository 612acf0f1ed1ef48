"""TensorRT backend: compatibility refusals, profiles, buffer plans, --backend auto; GPU runs marked gpu."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from app.errors import BundleError, UsageError
from app.planning.devices import fake_gpu
from app.runtime.backend import choose_backend
from app.runtime.engine.compat import (
    check_engine_compatible,
    engine_file,
    find_engine,
    incompatibility,
    rebuild_command,
    runtime_cache_path,
)
from app.runtime.engine.runner import VERIFIED_ON_HARDWARE, TensorRTBackend
from app.runtime.engine.shapes import plan_buffers, select_profile, validate_inputs

RTX = "1.7.1.116"
INSTALLED = {"tensorrt-rtx": RTX, "tensorrt": None}
G4090 = fake_gpu("NVIDIA GeForce RTX 4090", "89", 24)
G3090 = fake_gpu("NVIDIA GeForce RTX 3090", "86", 24)
H100 = fake_gpu("NVIDIA H100 80GB HBM3", "90", 80)
SRC, BUNDLE = "/models/klein", "/bundles/klein"


def rec(sm: str, precision: str = "fp8", flavour: str = "tensorrt-rtx", version: str = RTX, **kw) -> dict:
    return {
        "key": f"k-{sm}",
        "flavour": flavour,
        "version": version,
        "sm": sm,
        "precision": precision,
        "file": f"transformer.sm{sm}.engine",
        "sha256": "0" * 64,
        "host_code_allowed": False,
        "plugins": [],
        "profiles": [{"x": {"min": [1, 4], "opt": [1, 8], "max": [2, 16]}}],
        **kw,
    }


def test_runtime_paths_are_declared_unverified():
    assert VERIFIED_ON_HARDWARE is False


# ---------------------------------------------------------------- compatibility


def test_incompatibility_reasons():
    assert incompatibility(rec("89"), "89", INSTALLED) is None
    assert incompatibility(rec("120"), "89", INSTALLED) == "it was built for sm120 and this GPU is sm89"
    assert "1.6.0" in incompatibility(rec("89", version="1.6.0.1"), "89", INSTALLED)
    assert (
        incompatibility(rec("90", flavour="tensorrt", version="11.4.0"), "90", INSTALLED)
        == "TensorRT is not installed"
    )
    assert "host code" in incompatibility(rec("89", plugins=["evil.so"]), "89", INSTALLED)
    assert "host code" in incompatibility(rec("89", host_code_allowed=True), "89", INSTALLED)


def test_mismatch_refuses_with_the_exact_rebuild_command():
    with pytest.raises(BundleError) as e:
        check_engine_compatible(
            [rec("120")], component="transformer", gpu=G4090, installed=INSTALLED, source=SRC, bundle=BUNDLE
        )
    msg = str(e.value)
    assert msg.endswith(f"edgegen export --model {SRC} --out {BUNDLE} --target tensorrt-rtx --sm 89 --overwrite")
    assert "sm120" in msg and "RTX 4090" in msg and "\n" not in msg


def test_rebuild_command_for_hopper_targets_full_tensorrt():
    with pytest.raises(BundleError, match="--target tensorrt --sm 90 --overwrite$"):
        check_engine_compatible(
            [rec("89")], component="transformer", gpu=H100, installed=INSTALLED, source=SRC, bundle=BUNDLE
        )


def test_rebuild_command_drops_fp8_for_ampere_and_quotes_paths():
    with pytest.raises(BundleError, match="--sm 86 --precision bf16 --overwrite$"):
        check_engine_compatible(
            [rec("89")], component="transformer", gpu=G3090, installed=INSTALLED, source=SRC, bundle=BUNDLE
        )
    assert rebuild_command("/my models/k", "out b", "8.9") == (
        "edgegen export --model '/my models/k' --out 'out b' --target tensorrt-rtx --sm 89 --overwrite"
    )


def test_the_matching_record_is_chosen_among_several():
    chosen = check_engine_compatible(
        [rec("120"), rec("89")],
        component="transformer",
        gpu=G4090,
        installed=INSTALLED,
        source=SRC,
        bundle=BUNDLE,
    )
    assert chosen["sm"] == "89"
    assert find_engine([rec("120")], "89", INSTALLED) == (
        None,
        ["it was built for sm120 and this GPU is sm89"],
    )


def test_missing_runtime_says_how_to_install_it():
    with pytest.raises(BundleError, match=r"needs TensorRT-RTX, which is not installed; pip install"):
        check_engine_compatible(
            [rec("89")],
            component="transformer",
            gpu=G4090,
            installed={"tensorrt-rtx": None},
            source=SRC,
            bundle=BUNDLE,
        )


def test_version_mismatch_refuses():
    with pytest.raises(
        BundleError, match=r"TensorRT-RTX 1\.6\.0\.1 and TensorRT-RTX 1\.7\.1\.116 is installed"
    ):
        check_engine_compatible(
            [rec("89", version="1.6.0.1")],
            component="transformer",
            gpu=G4090,
            installed=INSTALLED,
            source=SRC,
            bundle=BUNDLE,
        )


@pytest.mark.parametrize("name", ["../escape.engine", "/etc/passwd", "", "a/../../x.engine"])
def test_engine_files_cannot_leave_the_bundle(tmp_path, name):
    with pytest.raises(BundleError, match="outside itself"):
        engine_file(tmp_path, {"file": name})


def test_engine_file_inside_the_bundle(tmp_path):
    assert (
        engine_file(tmp_path, {"file": "engines/t.engine"}) == (tmp_path / "engines" / "t.engine").resolve()
    )


def test_runtime_cache_is_per_gpu_and_release(tmp_path, monkeypatch):
    a = runtime_cache_path("GPU-aaaa", RTX, tmp_path)
    assert a == tmp_path / "trtrtx-1.7.1-aaaa.cache"
    assert runtime_cache_path("GPU-bbbb", RTX, tmp_path) != a
    assert runtime_cache_path("aaaa", "1.8.0", tmp_path) != a
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime_cache_path("GPU-aaaa", RTX).is_relative_to(tmp_path / "xdg")


# ---------------------------------------------------------------- profiles and buffers

PROFILES = [
    {"x": ((1, 4096, 64), (1, 4096, 64), (1, 4096, 64)), "t": ((1,), (1,), (1,))},  # 1024², batch 1
    {"x": ((1, 256, 64), (2, 1024, 64), (2, 4096, 64)), "t": ((1,), (2,), (2,))},
]
IO = {
    "inputs": {"x": {"dtype": "HALF", "shape": [-1, -1, 64]}, "t": {"dtype": "FLOAT", "shape": [-1]}},
    "outputs": {"y": {"dtype": "FP8", "shape": [-1, -1, 64]}, "n": {"dtype": "INT64", "shape": [1]}},
}


def test_select_profile_prefers_the_nearest_opt():
    assert select_profile(PROFILES, {"x": (1, 4096, 64), "t": (1,)}) == 0
    assert select_profile(PROFILES, {"x": (2, 1024, 64), "t": (2,)}) == 1
    assert select_profile(PROFILES, {"x": (1, 1024, 64), "t": (1,)}) == 1  # only the dynamic one admits it


def test_select_profile_accepts_the_manifest_json_form():
    assert select_profile(rec("89")["profiles"], {"x": (2, 16)}) == 0


def test_no_profile_fits_is_a_clear_bundle_error():
    with pytest.raises(BundleError) as e:
        select_profile(PROFILES, {"x": (4, 4096, 64), "t": (4,)}, component="transformer")
    assert "transformer engine accepts" in str(e.value) and "--max-size" in str(e.value)


def test_plan_buffers_sizes_and_dtypes():
    bufs = plan_buffers(IO, {"x": (2, 1024, 64), "t": (2,)}, {"y": (2, 1024, 64), "n": (1,)})
    assert [(b.name, b.mode, b.dtype, b.nbytes) for b in bufs] == [
        ("x", "input", "float16", 2 * 1024 * 64 * 2),
        ("t", "input", "float32", 8),
        ("y", "output", "float8_e4m3fn", 2 * 1024 * 64),
        ("n", "output", "int64", 8),
    ]


@pytest.mark.parametrize(
    "inputs, outputs, match",
    [
        ({"x": (1, 16, 64)}, {}, "engine inputs are"),
        ({"x": (1, 16, 64), "t": (1,), "z": (1,)}, {}, "engine inputs are"),
        ({"x": (1, 16, 32), "t": (1,)}, {}, "expects"),
        ({"x": (1, 16), "t": (1,)}, {}, "expects"),
        ({"x": (1, 16, 64), "t": (1,)}, {"y": (1, -1, 64), "n": (1,)}, "unresolved"),
        ({"x": (1, 16, 64), "t": (1,)}, {"y": (1, 16, 64)}, "no shape for output n"),
    ],
)
def test_plan_buffers_rejects_pipeline_bugs(inputs, outputs, match):
    with pytest.raises(ValueError, match=match):
        plan_buffers(IO, inputs, outputs)


def test_validate_inputs_accepts_dynamic_dims():
    validate_inputs(IO, {"x": (3, 77, 64), "t": (3,)})


# ---------------------------------------------------------------- --backend auto

ENG = {"text_encoder": [rec("89", "bf16")], "transformer": [rec("89"), rec("120")]}
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
CPU = ["CPUExecutionProvider"]


def choose(requested="auto", gpus=(G4090,), engines=ENG, installed=INSTALLED, providers=CUDA, **kw):
    return choose_backend(
        requested,
        gpus=list(gpus),
        engines=engines,
        installed=installed,
        ort_providers=providers,
        source=SRC,
        bundle=BUNDLE,
        **kw,
    )


def test_auto_without_gpu_is_ort_cpu():
    assert choose(gpus=[], providers=CUDA) == (
        "onnxruntime-cpu",
        "ONNX Runtime CPU: no NVIDIA GPU found, so no TensorRT engine can run",
    )


def test_auto_picks_a_matching_engine_first():
    choice, reason = choose()
    assert (
        choice == "tensorrt"
        and reason.startswith("TensorRT-RTX 1.7.1: the bundle's engines match")
        and "sm89" in reason
    )


def test_auto_mentions_components_without_engines():
    choice, reason = choose(engines={**ENG, "vae_decoder": []})
    assert choice == "tensorrt" and "vae_decoder without an engine run on ONNX Runtime" in reason


def test_auto_falls_back_to_ort_cuda_with_the_rebuild_command():
    choice, reason = choose(gpus=[G3090])
    assert choice == "onnxruntime-cuda"
    assert reason.startswith(
        "ONNX Runtime CUDA: the text_encoder engine cannot run because it was built for sm89"
    )
    assert "edgegen export --model /models/klein --out /bundles/klein --target tensorrt-rtx --sm 86" in reason


def test_auto_falls_back_to_ort_cpu_without_cuda_provider():
    choice, reason = choose(gpus=[H100], providers=CPU)
    assert choice == "onnxruntime-cpu" and reason.endswith(
        "and ONNX Runtime's CUDA provider is not installed"
    )
    assert "--target tensorrt --sm 90" in reason


def test_auto_when_runtime_missing_or_torch_is_cpu_build():
    assert choose(installed={"tensorrt-rtx": None}) == (
        "onnxruntime-cuda",
        "ONNX Runtime CUDA: the text_encoder engine needs TensorRT-RTX, which is not installed",
    )
    choice, reason = choose(torch_cuda=False)
    assert choice == "onnxruntime-cuda" and "CPU build" in reason
    assert choose(engines={})[1] == "ONNX Runtime CUDA: the bundle has no TensorRT engines"


def test_explicit_backends():
    assert choose("torch")[0] == "torch"
    assert choose("onnxruntime") == (
        "onnxruntime-cuda",
        "ONNX Runtime CUDA: requested with --backend onnxruntime on NVIDIA GeForce RTX 4090",
    )
    assert choose("onnxruntime", gpus=[])[0] == "onnxruntime-cpu"
    assert choose("tensorrt")[0] == "tensorrt"
    with pytest.raises(BundleError, match="--sm 86"):
        choose("tensorrt", gpus=[G3090])
    with pytest.raises(UsageError, match="needs an NVIDIA GPU"):
        choose("tensorrt", gpus=[])
    with pytest.raises(BundleError, match="no TensorRT engines"):
        choose("tensorrt", engines={})
    with pytest.raises(UsageError, match="not a backend"):
        choose("cuda")


# ---------------------------------------------------------------- the backend object (no GPU up to load)


def test_backend_refuses_before_deserialising(tmp_path):
    with pytest.raises(BundleError, match="--sm 86"):
        TensorRTBackend(
            tmp_path, {"transformer": [rec("89")]}, source_model=SRC, gpu=G3090, installed=INSTALLED
        )


def test_backend_describe_and_tamper_check(tmp_path):
    (tmp_path / "transformer.sm89.engine").write_bytes(b"not the engine that was built")
    be = TensorRTBackend(
        tmp_path, {"transformer": [rec("120"), rec("89")]}, source_model=SRC, gpu=G4090, installed=INSTALLED
    )
    assert be.describe() == "TensorRT-RTX 1.7.1 on NVIDIA GeForce RTX 4090 (sm89): transformer fp8"
    with pytest.raises(BundleError, match="does not match its checksum"):
        be.session("transformer")  # refused before TensorRT ever sees the bytes


def _cuda_gpu():
    from app.planning.devices import current_cuda_gpu

    return current_cuda_gpu()


NO_GPU = _cuda_gpu() is None


@pytest.mark.skipif(not NO_GPU, reason="checks the no-GPU refusal")
def test_backend_without_gpu_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="--backend onnxruntime"):
        TensorRTBackend(tmp_path, {}, source_model=SRC)


# ---------------------------------------------------------------- real GPU (never run in CI)


def _matmul_onnx(path: Path, fp8: bool) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    inits, nodes, a = [numpy_helper.from_array(w, "W")], [], "x"
    if fp8:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0]),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
            helper.make_node("DequantizeLinear", ["xq", "s"], ["xd"]),
        ]
        a = "xd"
    nodes.append(helper.make_node("MatMul", [a, "W"], ["y"]))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16, 64])],
        inits,
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs an NVIDIA GPU and a CUDA build of PyTorch")
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_build_run_and_runtime_cache(tmp_path, fp8):
    import numpy as np
    import torch

    from app.planning.policy import RTX_TARGET_SMS, precision_supported
    from export.engines import build_engine

    gpu = _cuda_gpu()
    if gpu.sm not in RTX_TARGET_SMS or (fp8 and not precision_supported("fp8", gpu.sm)):
        pytest.skip(f"TensorRT-RTX cannot build {'FP8 ' if fp8 else ''}for sm{gpu.sm}")
    src = _matmul_onnx(tmp_path / "mm.onnx", fp8)
    r = build_engine(
        src,
        tmp_path / "mm.engine",
        flavour="tensorrt-rtx",
        sm=gpu.sm,
        profiles=[{"x": ((1, 16, 32), (2, 16, 32), (4, 16, 32))}],
    )
    assert r["sha256"] == hashlib.sha256((tmp_path / "mm.engine").read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    x = torch.randn(3, 16, 32)
    with TensorRTBackend(tmp_path, {"mm": [r]}, source_model="m", runtime_cache_dir=cache) as be:
        assert "TensorRT-RTX" in be.describe()
        y = be.run("mm", {"x": x.to(be.device)})["y"].float().cpu()  # inputs live on the engine's device
        y2 = be.run("mm", {"x": x[:1].to(be.device)})["y"].float().cpu()  # shape change within the profile
    w = torch.from_numpy(np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32))
    ref = x @ w
    cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0)
    assert torch.isfinite(y).all() and cos > (0.98 if fp8 else 0.9999)
    assert torch.allclose(y2, y[:1], atol=1e-3, rtol=1e-3)
    assert list(cache.glob("trtrtx-*.cache"))  # JIT kernels persisted for this GPU


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs an NVIDIA GPU and a CUDA build of PyTorch")
def test_gpu_engine_for_another_sm_is_refused_by_record_not_by_crash(tmp_path):
    from export.engines import build_engine

    gpu = _cuda_gpu()
    other = "120" if gpu.sm != "120" else "89"
    src = _matmul_onnx(tmp_path / "mm.onnx", False)
    r = build_engine(
        src, tmp_path / "mm.engine", flavour="tensorrt-rtx", sm=other, profiles=[{"x": ((1, 16, 32),) * 3}]
    )
    with pytest.raises(BundleError, match=f"--sm {gpu.sm}"):
        TensorRTBackend(tmp_path, {"mm": [r]}, source_model="m")
