"""SD3.5 ControlNet (export --controlnet, generate --control) against diffusers' own StableDiffusion3ControlNetPipeline
in FP32: the same folders, seed and image. A held-out-style SD3 (tests/conftest.py CONTROLNET_SD3) with two SD3.5
Large-style nets and one InstantX-style net; single and multi-net, CFG on and off, several scales and windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from app.runtime.images import psnr, read_metadata
from app.runtime.pipelines import GenerationRequest
from tests.test_references import _bad, _generate, make_image

PROMPT, NEGATIVE = "a red circle on a blue background", "green"


def diffusers_controlnet(root, nets, images, scales, starts, ends, seed, steps, guidance, width, height,
                         zero_negative=False) -> np.ndarray:
    """StableDiffusion3ControlNetPipeline as a user calls it. Its control-image VAE sample draws from torch's global
    RNG, so the caller seeds it (torch.manual_seed), as edgegen's request seed does."""
    from diffusers import SD3ControlNetModel, SD3MultiControlNetModel, StableDiffusion3ControlNetPipeline

    cns = [SD3ControlNetModel.from_pretrained(root / n, local_files_only=True) for n in nets]
    one = len(cns) == 1
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(root / "model", local_files_only=True,
                                                              controlnet=cns[0] if one else SD3MultiControlNetModel(cns))
    pick = (lambda v: v[0]) if one else (lambda v: list(v))
    extra = {}
    if zero_negative:  # ComfyUI's ConditioningZeroOut negative, in diffusers' terms
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False)
        extra = {"negative_prompt_embeds": torch.zeros_like(embeds),
                 "negative_pooled_prompt_embeds": torch.zeros_like(pooled)}
    else:
        extra = {"negative_prompt": NEGATIVE}
    torch.manual_seed(seed)
    out = pipe(PROMPT, control_image=pick([Image.open(p).convert("RGB") for p in images]),
               controlnet_conditioning_scale=pick(scales), control_guidance_start=pick(starts),
               control_guidance_end=pick(ends), guidance_scale=guidance, num_inference_steps=steps, width=width,
               height=height, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **extra)
    return (out.images[0] * 255).round().astype(np.uint8)


# (case, nets, scales, starts, ends, guidance, output size)
CASES = [
    ("large-cfg", ["canny"], [0.7], [0.0], [1.0], 5.0, (64, 48)),
    ("instantx-window", ["instantx"], [1.3], [0.0], [0.5], 5.0, (48, 64)),
    ("large-no-cfg-late-start", ["canny"], [1.0], [0.25], [1.0], 1.0, (64, 48)),
    ("two-nets", ["canny", "depth"], [0.6, 1.2], [0.0, 0.0], [1.0, 0.75], 4.0, (56, 40)),
]


@pytest.mark.parametrize("case,nets,scales,starts,ends,guidance,size", CASES, ids=[c[0] for c in CASES])
def test_controlnet_reproduces_diffusers(case, nets, scales, starts, ends, guidance, size, controlnet_bundle,
                                         tmp_path):
    root, bundle = controlnet_bundle
    images = [make_image(tmp_path / f"control-{i}.png", 72 + 20 * i, 50 + 30 * i, seed=40 + i) for i in range(len(nets))]
    w, h = size
    base = ["--steps", "4", "--guidance", str(guidance), "--width", str(w), "--height", str(h),
            "--negative-prompt", NEGATIVE]
    args = [*base, "--control-as-is"]
    for n, img, s, a, e in zip(nets, images, scales, starts, ends):
        args += ["--control", f"{n}:{img}:{s}:{a}:{e}"]
    ours = _generate(bundle, tmp_path / "ours.png", PROMPT, 3, *args)
    ref = diffusers_controlnet(root, nets, images, scales, starts, ends, 3, 4, guidance, w, h)
    assert psnr(ours, ref) >= 60, psnr(ours, ref)
    plain = _generate(bundle, tmp_path / "plain.png", PROMPT, 3, *base)
    assert psnr(ours, plain) < 35  # the nets changed the image: the comparison above can fail
    meta = read_metadata(tmp_path / "ours.png")
    assert [c["controlnet"] for c in meta["controls"]] == nets
    assert [c["scale"] for c in meta["controls"]] == scales and meta["controls"][0]["preprocessed"] is True


def test_no_control_on_a_controlnet_bundle_is_the_plain_pipeline(controlnet_bundle, tmp_path):
    """The transformer's residual input at zeros adds nothing: the image is StableDiffusion3Pipeline's."""
    from diffusers import StableDiffusion3Pipeline

    root, bundle = controlnet_bundle
    ours = _generate(bundle, tmp_path / "plain.png", PROMPT, 5, "--steps", "3", "--guidance", "4", "--width", "48",
                     "--height", "48", "--negative-prompt", NEGATIVE)
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "model", local_files_only=True)
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=4, width=48, height=48,
               generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert psnr(ours, (ref * 255).round().astype(np.uint8)) >= 60


def test_zero_negative_and_preprocessing_reproduce_diffusers(controlnet_bundle, tmp_path):
    """--zero-negative is diffusers with zero negative embeddings; the canny net's own preprocessing is
    kornia.filters.canny (ComfyUI's Canny node) on the image stretched to the output size."""
    from kornia.filters import canny

    from app.runtime.controls import CANNY_HIGH, CANNY_LOW

    root, bundle = controlnet_bundle
    src = make_image(tmp_path / "photo.png", 90, 70, seed=44)
    ours = _generate(bundle, tmp_path / "ours.png", PROMPT, 6, "--steps", "3", "--guidance", "4.5", "--width", "64",
                     "--height", "48", "--zero-negative", "--control", f"canny:{src}:0.9")
    x = torch.from_numpy(np.asarray(Image.open(src).convert("RGB").resize((64, 48), Image.LANCZOS),
                                    dtype=np.float32) / 255).permute(2, 0, 1)[None]
    edges = (canny(x, CANNY_LOW, CANNY_HIGH)[1][0, 0] * 255).round().byte().numpy()
    assert 0.005 < (edges > 0).mean() < 0.6  # an edge map, not a blank or the photo
    Image.fromarray(edges).convert("RGB").save(tmp_path / "edges.png")
    ref = diffusers_controlnet(root, ["canny"], [tmp_path / "edges.png"], [0.9], [0.0], [1.0], 6, 3, 4.5, 64, 48,
                               zero_negative=True)
    assert psnr(ours, ref) >= 60, psnr(ours, ref)
    assert read_metadata(tmp_path / "ours.png")["zero_negative"] is True


def test_torch_reference_backend_runs_the_nets(controlnet_bundle, tmp_path):
    """The PyTorch reference loads the nets from their recorded folders (hash-checked) and agrees with ONNX."""
    root, bundle = controlnet_bundle
    img = make_image(tmp_path / "c.png", 64, 48, seed=45)
    args = ["--steps", "2", "--guidance", "3", "--control", f"instantx:{img}:1.1", "--control", f"depth:{img}:0.5",
            "--control-as-is"]
    ours = _generate(bundle, tmp_path / "ort.png", PROMPT, 1, *args)
    assert main(["generate", "--bundle", str(bundle), "--prompt", PROMPT, "--seed", "1", "--out",
                 str(tmp_path / "torch.png"), "--backend", "torch", *args]) == 0
    assert psnr(ours, np.asarray(Image.open(tmp_path / "torch.png").convert("RGB"))) >= 60


def test_manifest_records_the_nets_and_engine_profiles_build(controlnet_bundle, tmp_path):
    """Each net is a component; the transformer takes the stack; TensorRT-RTX builds both for sm89 with CFG's
    batch of 2 in the net's profile."""
    trt = pytest.importorskip("tensorrt_rtx")  # noqa: F841
    from app.bundle.manifest import load_bundle
    from export.engines import build_engine
    from export.profiles import profiles_for

    b = load_bundle(controlnet_bundle[1])
    nets = b.manifest["controlnets"]
    assert set(nets) == {"canny", "depth", "instantx"}
    assert nets["canny"]["shares_transformer_pos_embed"] and not nets["canny"]["uses_text"]
    assert nets["instantx"]["uses_text"] and not nets["instantx"]["force_zeros_for_pooled_projection"]
    assert nets["canny"]["preprocessor"] == "canny" and nets["depth"]["preprocessor"] == "none"
    stack = next(i for i in b.components()["transformer"]["inputs"] if i["name"] == "controlnet_residuals")
    assert stack["shape"][0] == 3 and stack["shape"][3] == 24
    out = b.components()["controlnet_canny"]["outputs"][0]
    assert out["shape"][0] == 3 and out["shape"][3] == 24
    for name in ("controlnet_canny", "transformer"):
        entry = b.components()[name]
        prof = profiles_for(b.family, name, entry, b.manifest["size_range"], b.defaults, b.manifest["pipeline"])
        assert prof[0]["hidden_states"][2][0] == 2  # CFG's doubled batch
        rec = build_engine(b.onnx_path(name), tmp_path / f"{name}.engine", flavour="tensorrt-rtx", sm="89",
                           profiles=prof)
        assert rec["bytes"] > 10_000


@pytest.mark.parametrize("argv,needle", [
    (["--control", "nope:{img}"], "this bundle's ControlNets are canny, depth, instantx"),
    (["--control", "canny:{img}:11"], "between 0 and 10"),
    (["--control", "canny:{img}:1:0.6:0.4"], "0 <= start < end <= 1"),
    (["--control", "canny:{img}:1:0.5"], "give SCALE, or SCALE:START:END"),
    (["--control", "canny:{img}", "--image", "{img}"], "drop --image"),
    (["--control", "canny:missing.png"], "no such file"),
])
def test_bad_controls_are_one_line(controlnet_bundle, tmp_path, capsys, argv, needle):
    img = make_image(tmp_path / "c.png", 64, 48, seed=46)
    argv = [a.replace("{img}", str(img)) for a in argv]
    err = _bad(capsys, "--bundle", str(controlnet_bundle[1]), "--out", str(tmp_path / "o.png"), *argv)
    assert needle in err


def test_control_on_a_bundle_without_nets(sd3_bundle, klein_bundle, tmp_path, capsys):
    img = make_image(tmp_path / "c.png", 64, 48, seed=47)
    err = _bad(capsys, "--bundle", str(sd3_bundle), "--out", str(tmp_path / "o.png"), "--control", f"canny:{img}")
    assert "no ControlNets; re-export it with --controlnet NAME=DIR" in err
    err = _bad(capsys, "--bundle", str(klein_bundle), "--out", str(tmp_path / "o.png"), "--control", f"canny:{img}")
    assert "FLUX.2 Klein takes reference images" in err


def test_export_refuses_nets_that_do_not_fit(controlnet_bundle, sd3_model, klein_model, tmp_path, capsys):
    """Checked from config.json before any weight is read: another model's net, a Klein model, a bad name, a
    folder that is not a net, nets of different depth."""
    from export import synthetic

    root, _ = controlnet_bundle
    shallow = tmp_path / "shallow"
    synthetic.build_sd3_controlnet(root / "model", 2, "large", 9).save_pretrained(shallow, safe_serialization=True)
    cases = [
        ([str(sd3_model), "canny=" + str(root / "canny")], "this ControlNet is for another model"),
        ([str(klein_model), "canny=" + str(root / "canny")], "--controlnet is for SD3.5 models"),
        ([str(root / "model"), "Canny!=" + str(root / "canny")], "must be unique, lower-case"),
        ([str(root / "model"), "canny=" + str(root / "model")], "is not a diffusers ControlNet folder"),
        ([str(root / "model"), "canny=" + str(root / "canny"), "shallow=" + str(shallow)], "same num_layers"),
    ]
    for (model, *nets), needle in cases:
        argv = ["export", "--model", model, "--out", str(tmp_path / "b")]
        for n in nets:
            argv += ["--controlnet", n]
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "b").exists()


def test_controlnet_request_survives_json(controlnet_bundle):
    """Cluster replicas and the server send requests as JSON: the controls come back as Control values."""
    import dataclasses

    from app.runtime.controls import Control
    from app.runtime.pipelines import GenerationRequest

    req = GenerationRequest(prompt="x", controls=(Control("canny", "/a.png", 0.5, 0.1, 0.9, False),))
    back = GenerationRequest(**json.loads(json.dumps(dataclasses.asdict(req))))
    assert back.controls == req.controls and isinstance(back.controls[0], Control)


def test_plan_counts_the_nets_in_the_transformers_stage(controlnet_bundle, capsys):
    """plan --bundle lists each net with its weights and activations; staged, they load with the transformer."""
    from dataclasses import replace

    from app.bundle.manifest import load_bundle
    from app.planning.components import bundle_plan
    from app.planning.gpus import parse_gpu_option

    b = load_bundle(controlnet_bundle[1], verify=False)
    gpu = parse_gpu_option("sm89:24")
    plan = bundle_plan(b, gpu, 160, 160)
    kinds = {c.name: c.kind for c in plan.components}
    assert {kinds[f"controlnet_{n}"] for n in ("canny", "depth", "instantx")} == {"controlnet"}
    nets = [c for c in plan.components if c.kind == "controlnet"]
    assert all(c.weights_bytes > 0 and c.activation_bytes > 0 and c.profile["batch"][0] == 2 for c in nets)
    tiny = bundle_plan(b, replace(gpu, vram_bytes=int(1.0 * 2**30), free_bytes=None), 160, 160)
    stage = {c.name: c.stage for c in tiny.components}
    assert tiny.strategy in ("staged", "does-not-fit")
    assert stage["controlnet_canny"] == stage["transformer"] != stage["vae_decoder"]
    assert main(["plan", "--bundle", str(controlnet_bundle[1]), "--gpu", "sm89:24", "--width", "160",
                 "--height", "160"]) == 0
    assert "controlnet_instantx" in capsys.readouterr().out


# The fake-CUDA check lives here, not in tests/test_device_pipeline.py, so it runs on the worker that made the
# ControlNet bundle instead of idling on the other one until the export is done.
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("cfg", [True, False])
def test_controlnets_run_on_the_device_and_every_move_is_needed(controlnet_bundle, tmp_path, cfg, monkeypatch):
    """Two nets on fake CUDA: each control image encoded once per CFG half, every net run only inside its window
    on the device, their scaled sum fed to the transformer; with low VRAM the nets leave with the transformer;
    skipping any host-to-device move (each control image and posterior noise) fails."""
    from torch._subclasses.fake_tensor import FakeTensor

    from app.runtime.controls import Control
    from app.runtime.pipelines import make_pipeline
    from tests._standin_engine import FAKE_CUDA, StandInEngineBackend
    from tests.test_device_pipeline import _bundle, _run_fake, mutate_every_move

    bundle = _bundle(controlnet_bundle[1])
    img = str(make_image(tmp_path / "c.png", 40, 32, seed=3))
    req = GenerationRequest(prompt="a red circle", seed=5, steps=4, guidance=(4.0 if cfg else 1.0), width=40,
                            height=32, controls=(Control("canny", img, 0.7, 0.0, 1.0, False),
                                                 Control("instantx", img, 1.2, 0.0, 0.5, True)))
    backend = StandInEngineBackend(bundle)
    order = []
    run, release = backend.run, backend.release
    backend.run = lambda c, i: (order.append(("run", c)), run(c, i))[1]
    backend.release = lambda c: (order.append(("release", c)), release(c))[1]
    image, job = _run_fake(make_pipeline(bundle, backend, low_vram=True), req)
    assert isinstance(image, FakeTensor) and image.device == FAKE_CUDA and tuple(image.shape) == (1, 3, 32, 40)
    ctx, b = backend.contexts, (2 if cfg else 1)
    assert ctx["vae_encoder"].executions == 2 * b  # two controls, each CFG half on its own
    assert ctx["controlnet_canny"].executions == 4 and ctx["controlnet_instantx"].executions == 2  # its window
    assert ctx["transformer"].shapes["controlnet_residuals"] == (3, b, (32 // 4) * (40 // 4), 24)
    assert ctx["controlnet_canny"].shapes["controlnet_cond"] == (b, 8, 16, 20)
    assert order.index(("release", "controlnet_canny")) > order.index(("run", "transformer"))
    assert order.index(("release", "controlnet_canny")) < order.index(("run", "vae_decoder"))
    if cfg:
        monkeypatch.setattr(backend, "run", run)
        moved = mutate_every_move(bundle, req, monkeypatch)
        assert sum(sh == (1, 3, 32, 40) for sh in moved) == 2 * b  # each control image, per CFG half
