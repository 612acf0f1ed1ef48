"""Per-GPU plan rules, --gpu parsing, and the NVML reader (with fakes: no GPU needed)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from app.errors import UsageError
from app.planning import devices as gpu_mod
from app.planning.devices import FakeGpuReader, NvmlReader, fake_gpu, read_gpus
from app.planning.gpus import gpu_spec_from_info, lookup_gpu, parse_gpu_option
from app.planning.plan import ComponentInfo, make_plan
from app.planning.policy import GIB, engine_flavour_for_sm, normalise_sm, parse_sm_list
from app.planning.render import render_plan

# Roughly FLUX.2 Klein 4B: Qwen3-4B text encoder, 4B transformer, small VAE decoder.
KLEIN = [
    ComponentInfo(name="vae_decoder", kind="vae_decoder", param_count=50_000_000),
    ComponentInfo(name="text_encoder", kind="text_encoder", param_count=4_000_000_000, hidden_size=2560),
    ComponentInfo(name="transformer", kind="transformer", fp32_bytes=16_000_000_000, hidden_size=3072),
]


def plan_for(gpu: str, **kw):
    kw = {"width": 1024, "height": 1024, "batch": 1, "cfg": False, **kw}
    return make_plan(parse_gpu_option(gpu), KLEIN, **kw)


def by_name(plan):
    return {c.name: c for c in plan.components}


# ---------------------------------------------------------------- --gpu parsing


@pytest.mark.parametrize(
    "spec, sm, gib",
    [
        ("RTX 4090", "89", 24),
        ("NVIDIA GeForce RTX 3090", "86", 24),
        ("rtx a6000", "86", 48),
        ("RTX 6000 Ada Generation", "89", 48),
        ("L40S", "89", 48),
        ("L4", "89", 24),
        ("RTX 5090", "120", 32),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "120", 96),
        ("NVIDIA H100 80GB HBM3", "90", 80),
        ("A100", "80", 40),
        ("NVIDIA A100-SXM4-80GB", "80", 80),
        ("RTX 4080", "89", 16),
        ("RTX 4070", "89", 12),
        ("GeForce RTX 4070 Ti SUPER", "89", 16),
        ("sm89:24", "89", 24),
        ("SM120:32GiB", "120", 32),
        ("sm_8.6:10.5", "86", 10.5),
        ("sm100:180gb", "100", 180),
    ],
)
def test_gpu_option_names_and_manual_specs(spec, sm, gib):
    g = parse_gpu_option(spec)
    assert (g.sm, g.vram_bytes) == (sm, int(gib * GIB))


@pytest.mark.parametrize(
    "bad", ["", "  ", "banana", "RTX 9999", "sm89", "sm89:0", "sm89:-4", "sm1:24", "sm89:lots"]
)
def test_bad_gpu_option_is_a_usage_error(bad):
    with pytest.raises(UsageError) as e:
        parse_gpu_option(bad)
    assert "--gpu" in str(e.value) or "compute capability" in str(e.value)


def test_gpu_auto_uses_the_reader():
    g = parse_gpu_option("auto", FakeGpuReader([fake_gpu("NVIDIA GeForce RTX 4090", "89", 24, free_gib=20)]))
    assert (g.name, g.sm, g.source, g.free_bytes) == ("NVIDIA GeForce RTX 4090", "89", "detected", 20 * GIB)
    assert parse_gpu_option("auto", FakeGpuReader([])) is None


def test_lookup_prefers_the_longest_alias_and_whole_words():
    assert lookup_gpu("RTX 4070 Ti").vram_gib == 12 and lookup_gpu("RTX 4070 Ti SUPER").vram_gib == 16
    assert lookup_gpu("NVIDIA L40S").name == "L40S" and lookup_gpu("NVIDIA L4").name == "L4"
    assert lookup_gpu("NVIDIA RTX A1000") is None  # "a100" must not match inside "a1000"


def test_sm_normalisation():
    assert [normalise_sm(x) for x in ("89", "sm89", "SM_120", "8.9", 86)] == ["89", "89", "120", "89", "86"]
    assert parse_sm_list("89, sm120,89") == ["89", "120"]
    for bad in ("x", "8", "sm", "1.2.3"):
        with pytest.raises(UsageError):
            normalise_sm(bad)
    with pytest.raises(UsageError):
        parse_sm_list(" , ")


def test_engine_flavour_by_sm():
    assert {sm: engine_flavour_for_sm(sm) for sm in ("75", "80", "86", "89", "90", "100", "120", "121")} == {
        "75": "tensorrt-rtx",
        "80": "tensorrt-rtx",
        "86": "tensorrt-rtx",
        "89": "tensorrt-rtx",
        "90": "tensorrt",
        "100": "tensorrt",
        "120": "tensorrt-rtx",
        "121": "tensorrt-rtx",
    }


# ---------------------------------------------------------------- plans for known GPUs


def test_rtx_4090_gets_fp8_transformer_on_tensorrt_rtx():
    p = plan_for("RTX 4090")
    c = by_name(p)
    assert c["transformer"].precision == "fp8" and c["transformer"].engine == "tensorrt-rtx"
    assert c["text_encoder"].precision == "bf16"
    assert c["vae_decoder"].precision == "bf16"
    assert [x.kind for x in p.components] == ["text_encoder", "transformer", "vae_decoder"]  # pipeline order
    assert p.strategy == "all-resident" and p.peak_bytes <= p.usable_bytes


def test_rtx_3090_gets_bf16_and_never_fp8():
    p = plan_for("RTX 3090")
    assert {c.precision for c in p.components} == {"bf16"}
    assert {c.engine for c in p.components} == {"tensorrt-rtx"}


def test_h100_gets_fp8_on_full_tensorrt():
    c = by_name(plan_for("H100"))
    assert c["transformer"].precision == "fp8" and {x.engine for x in c.values()} == {"tensorrt"}


@pytest.mark.parametrize("gpu", ["L40S", "RTX 5090", "RTX PRO 6000 Blackwell", "RTX 6000 Ada"])
def test_ada_and_blackwell_workstations(gpu):
    p = plan_for(gpu)
    assert by_name(p)["transformer"].precision == "fp8" and p.strategy == "all-resident"
    assert {c.engine for c in p.components} == {"tensorrt-rtx"}


def test_turing_has_no_bf16_and_vae_never_fp16():
    c = by_name(plan_for("sm75:16"))
    assert c["transformer"].precision == "fp16"
    assert c["vae_decoder"].precision == "fp32" and c["text_encoder"].precision == "fp32"


@pytest.mark.parametrize("gpu", ["RTX 4090", "RTX 3090", "H100", "sm75:16", "RTX 5090"])
def test_vae_is_never_fp8_or_fp16(gpu):
    assert by_name(plan_for(gpu))["vae_decoder"].precision in ("bf16", "fp32")


def test_cfg_doubles_the_batch_except_for_the_vae():
    c = by_name(plan_for("RTX 4090", batch=2, cfg=True))
    assert c["transformer"].profile["batch"] == [4, 4, 4] and c["text_encoder"].profile["batch"] == [4, 4, 4]
    assert c["vae_decoder"].profile["batch"] == [2, 2, 2]
    assert c["transformer"].profile["height"] == [1024, 1024, 1024]
    off = by_name(plan_for("RTX 4090", batch=2))["transformer"]
    assert off.activation_bytes < c["transformer"].activation_bytes


def test_small_vram_stages_components():
    p = plan_for("sm89:12")
    assert p.strategy == "staged" and len(p.stages) >= 2
    c = by_name(p)
    assert c["text_encoder"].stage < c["transformer"].stage <= c["vae_decoder"].stage
    assert p.peak_bytes <= p.usable_bytes
    assert "stages" in " ".join(p.notes)


def test_too_small_for_one_stage_is_refused_not_streamed():
    """No exported engine streams weights, so a plan never promises it: a stage that cannot fit is refused."""
    big = [ComponentInfo(name="transformer", kind="transformer", param_count=12_000_000_000)]
    p = make_plan(parse_gpu_option("sm89:10"), big, 1024, 1024)
    assert p.strategy == "does-not-fit" and not p.components[0].weight_streaming
    assert "Lower" in p.notes[-1] and "needs" in p.components[0].notes[-1]
    assert make_plan(parse_gpu_option("sm89:24"), big, 1024, 1024).strategy == "all-resident"


def test_detected_free_memory_limits_the_plan():
    roomy = make_plan(gpu_spec_from_info(fake_gpu(total_gib=24, free_gib=23)), KLEIN, 1024, 1024)
    busy = make_plan(gpu_spec_from_info(fake_gpu(total_gib=24, free_gib=6)), KLEIN, 1024, 1024)
    assert roomy.strategy == "all-resident" and busy.strategy != "all-resident"


def test_cpu_plan_without_gpu():
    p = make_plan(None, KLEIN, 512, 512)
    assert p.strategy == "cpu" and {c.precision for c in p.components} == {"fp32"}
    assert {c.engine for c in p.components} == {"onnxruntime-cpu"}


@pytest.mark.parametrize("w, h, b", [(1000, 1024, 1), (0, 512, 1), (512, 512, 0)])
def test_bad_sizes_are_usage_errors(w, h, b):
    with pytest.raises(UsageError):
        make_plan(parse_gpu_option("RTX 4090"), KLEIN, w, h, b)


def test_plan_renders_as_json_and_rich_table():
    from rich.console import Console

    p = plan_for("sm89:12", cfg=True)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["gpu"]["sm"] == "89" and d["strategy"] == "staged" and len(d["components"]) == 3
    assert (
        d["components"][1]["peak_bytes"]
        == d["components"][1]["weights_bytes"] + d["components"][1]["activation_bytes"]
    )
    console = Console(record=True, width=160)
    console.print(render_plan(p))
    text = console.export_text()
    assert "transformer" in text and "fp8" in text and "sm89" in text and "Strategy: staged" in text
    assert json.dumps(make_plan(None, KLEIN, 512, 512).to_dict())


def test_component_needs_a_size():
    with pytest.raises(ValueError):
        ComponentInfo(name="x", kind="transformer").params  # noqa: B018


# ---------------------------------------------------------------- NVML reader


def test_nvml_reader_never_raises_here():
    assert isinstance(read_gpus(), list)
    assert read_gpus(FakeGpuReader([fake_gpu()]))[0].sm_int == 89


def test_nvml_library_missing_gives_no_gpus(monkeypatch):
    import pynvml

    def boom():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", boom)
    assert NvmlReader().read() == []


def test_nvml_reader_parses_devices(monkeypatch):
    import pynvml

    calls = []
    fake = {
        "nvmlInit": lambda: None,
        "nvmlShutdown": lambda: calls.append("shutdown"),
        "nvmlSystemGetDriverVersion": lambda: b"580.82.07",
        "nvmlDeviceGetCount": lambda: 2,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetName": lambda h: ["NVIDIA GeForce RTX 4090", "NVIDIA GB10"][h],
        "nvmlDeviceGetUUID": lambda h: f"GPU-{h}",
        "nvmlDeviceGetCudaComputeCapability": lambda h: [(8, 9), (12, 1)][h],
    }

    def mem(h):
        if h == 1:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)  # unified memory reports no framebuffer
        return SimpleNamespace(total=24 * GIB, used=GIB, free=23 * GIB)

    for k, v in {**fake, "nvmlDeviceGetMemoryInfo": mem}.items():
        monkeypatch.setattr(pynvml, k, v)
    a, b = NvmlReader().read()
    assert (a.name, a.uuid, a.sm, a.total_bytes, a.free_bytes, a.driver) == (
        "NVIDIA GeForce RTX 4090",
        "GPU-0",
        "89",
        24 * GIB,
        23 * GIB,
        "580.82.07",
    )
    assert b.sm == "121" and b.total_bytes is None
    assert gpu_spec_from_info(b).vram_bytes == 128 * GIB  # table fills in what NVML cannot say
    assert calls == ["shutdown"]


def test_current_cuda_gpu_is_none_without_cuda():
    assert gpu_mod.current_cuda_gpu() is None or gpu_mod.current_cuda_gpu().sm


def test_bundle_sized_components_stage_and_say_so():
    """A Klein-4B-sized FP8 bundle on a 16 GB card: the text encoder leaves before denoising, and the plan says it."""
    from app.planning.plan import ComponentInfo, make_plan

    gib = 1024**3
    comps = [ComponentInfo(name="text_encoder", kind="text_encoder", param_count=4_000_000_000, precision="bf16",
                           weights_bytes=8 * gib),
             ComponentInfo(name="transformer", kind="transformer", param_count=3_900_000_000, precision="fp8",
                           weights_bytes=int(4.3 * gib)),
             ComponentInfo(name="vae_decoder", kind="vae_decoder", param_count=50_000_000, precision="fp32",
                           weights_bytes=int(0.2 * gib))]
    small = make_plan(parse_gpu_option("sm89:16"), comps, 1024, 1024)
    assert small.low_vram and small.stages[0] == ["text_encoder"]
    assert small.staging_text().startswith("low-VRAM: text_encoder unloaded before denoise")
    big = make_plan(parse_gpu_option("sm89:32"), comps, 1024, 1024)
    assert not big.low_vram and big.staging_text() == "all components stay loaded"
    assert big.components[1].weights_bytes == int(4.3 * gib)  # the bundle's bytes, not parameters x precision
