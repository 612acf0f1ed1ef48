"""The GPU path without a GPU: both family pipelines on fake CUDA tensors through the engine backend's code.

torch's FakeTensorMode makes CUDA tensors on this CPU-only build and raises on any mix of devices; the engine
session refuses inputs on the wrong device. The TensorRT context is a stand-in (tests/_standin_engine.py);
EngineBackend, EngineSession, the pipelines and the scheduler arithmetic are the production code.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from app.bundle.manifest import load_bundle
from app.runtime.pipelines import GenerationRequest, make_pipeline
from app.runtime.pipelines.base import Pipeline
from tests._standin_engine import FAKE_CUDA, StandInEngineBackend

# Fake tensors report address 0; the session passes it to the stand-in context, which never dereferences it.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")


def _bundle(path, distilled: bool | None = None):
    b = load_bundle(path)
    if distilled is None:
        return b
    m = b.manifest
    return replace(b, manifest={**m, "pipeline": {**m["pipeline"], "is_distilled": distilled}})


CASES = [  # family, CFG on?, width, height (odd token grids: 3x5 and 5x3 packed cells)
    ("klein", False, 48, 80),
    ("klein", True, 80, 48),
    ("sd3", True, 40, 72),
    ("sd3", False, 72, 40),
]


@pytest.fixture
def bundles(klein_bundle, sd3_bundle):
    return {"klein": klein_bundle, "sd3": sd3_bundle}


def _request(family: str, cfg: bool, w: int, h: int) -> GenerationRequest:
    return GenerationRequest(prompt="a red circle on a blue background", seed=5, steps=3, width=w, height=h,
                             guidance=(4.0 if cfg else 1.0))


def _run_fake(pipe: Pipeline, req: GenerationRequest):
    job = pipe.prepare(req)  # host side: tokens, seeded noise, schedule (real CPU tensors)
    with FakeTensorMode(allow_non_fake_inputs=True):
        return pipe.execute(job), job

def mutate_every_move(bundle, req, monkeypatch) -> list[tuple]:
    """Skip each `Pipeline.to_device` call in turn; every skipped move must end in a device error.
    Returns the shapes moved in the unmutated run."""
    calls = []
    original = Pipeline.to_device

    def counting(self, t):
        calls.append(tuple(t.shape))
        return original(self, t)

    monkeypatch.setattr(Pipeline, "to_device", counting)
    _run_fake(make_pipeline(bundle, StandInEngineBackend(bundle)), req)
    moved = list(calls)
    for skip in range(len(moved)):
        seen = []

        def skipping(self, t, skip=skip):
            seen.append(t)
            return t if len(seen) - 1 == skip else original(self, t)

        monkeypatch.setattr(Pipeline, "to_device", skipping)
        with pytest.raises(Exception) as err:
            _run_fake(make_pipeline(bundle, StandInEngineBackend(bundle)), req)
        assert "cuda" in str(err.value).lower() or "device" in str(err.value).lower(), (skip, err.value)
    return moved



@pytest.mark.parametrize("family,cfg,w,h", CASES)
def test_pipeline_stays_on_the_device_end_to_end(bundles, family, cfg, w, h):
    bundle = _bundle(bundles[family], distilled=(not cfg) if family == "klein" else None)
    backend = StandInEngineBackend(bundle)
    pipe = make_pipeline(bundle, backend)
    image, job = _run_fake(pipe, _request(family, cfg, w, h))
    assert isinstance(image, FakeTensor) and image.device == FAKE_CUDA
    assert tuple(image.shape) == (1, 3, h, w)
    ctx = backend.contexts
    assert ctx["transformer"].executions == len(job.timesteps)  # CFG is batched: one engine run per step
    batch = ctx["transformer"].shapes["hidden_states"][0]
    assert batch == (2 if cfg else 1)
    assert ctx["vae_decoder"].executions == 1
    # activation memory was sized for these shapes, not a profile maximum
    assert ctx["transformer"].memory_sizes and max(ctx["transformer"].memory_sizes) < 1024 * 10**7


@pytest.mark.parametrize("family,cfg,w,h", CASES[1:3])
def test_step_previews_are_fitted_and_drawn_on_the_device(bundles, family, cfg, w, h, monkeypatch):
    """The preview map is fitted from the VAE on the device and each step's picture is made there; only the
    final bytes cross to the host (skipped here: a fake tensor has no bytes to copy)."""
    from app.runtime.previews import LatentPreview

    monkeypatch.setattr(LatentPreview, "rgb", LatentPreview.picture)
    bundle = _bundle(bundles[family], distilled=(not cfg) if family == "klein" else None)
    pipe = make_pipeline(bundle, StandInEngineBackend(bundle))
    req = _request(family, cfg, w, h)
    job = pipe.prepare(req)
    got = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        pipe.execute(job, on_preview=lambda step, total, picture: got.append(picture))
    cell = bundle.manifest["pipeline"]["vae_scale_factor"]
    assert len(got) == len(job.timesteps)
    for picture in got:
        assert isinstance(picture, FakeTensor) and picture.device == FAKE_CUDA and picture.dtype == torch.uint8
        assert tuple(picture.shape) == (h // cell, w // cell, 3)
    assert pipe.previews().weight.device == FAKE_CUDA


def test_output_buffers_are_reused_across_steps(bundles):
    bundle = _bundle(bundles["sd3"])
    backend = StandInEngineBackend(bundle)
    pipe = make_pipeline(bundle, backend)
    _run_fake(pipe, _request("sd3", True, 40, 40))
    session = backend.session("transformer")
    assert session.runs == 3 and len(session._outputs) == 1  # one set of buffers for three steps


@pytest.mark.parametrize("family,cfg,w,h", CASES[:3])
def test_removing_any_host_to_device_move_fails(bundles, family, cfg, w, h, monkeypatch):
    """Mutation check: skip each `.to(device)` of the pipeline in turn; every one of them must be needed."""
    bundle = _bundle(bundles[family], distilled=(not cfg) if family == "klein" else None)
    req = _request(family, cfg, w, h)
    moves = mutate_every_move(bundle, req, monkeypatch)
    assert len(moves) >= 4  # tokens, noise, position ids at least


def test_low_vram_staging_releases_text_encoders_before_denoise(bundles):
    bundle = _bundle(bundles["sd3"])
    backend = StandInEngineBackend(bundle)
    pipe = make_pipeline(bundle, backend, low_vram=True)
    order = []
    run = backend.run
    backend.run = lambda c, i: (order.append(("run", c)), run(c, i))[1]
    release = backend.release
    backend.release = lambda c: (order.append(("release", c)), release(c))[1]
    _run_fake(pipe, _request("sd3", True, 40, 40))
    first_transformer = order.index(("run", "transformer"))
    for enc in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if enc in bundle.components():
            assert order.index(("release", enc)) < first_transformer
    assert order.index(("release", "transformer")) < order.index(("run", "vae_decoder"))
    assert not backend._sessions.get("text_encoder")


def test_engine_session_refuses_an_input_on_another_device(bundles):
    from app.runtime.engine.session import DeviceMismatch

    bundle = _bundle(bundles["sd3"])
    backend = StandInEngineBackend(bundle)
    with FakeTensorMode(allow_non_fake_inputs=True):
        ids = torch.zeros(1, 77, dtype=torch.int64)  # on the CPU
        with pytest.raises(DeviceMismatch, match="input_ids is on cpu"):
            backend.run("text_encoder", {"input_ids": ids})


def test_out_of_memory_on_the_gpu_is_one_sentence_with_the_fixes(bundles):
    from app.runtime.gpu_errors import GpuOutOfMemory

    bundle = _bundle(bundles["sd3"])
    backend = StandInEngineBackend(bundle)
    run = backend.run

    def oom(component, inputs):
        if component == "transformer":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run(component, inputs)

    backend.run = oom
    pipe = make_pipeline(bundle, backend)
    job = pipe.prepare(_request("sd3", True, 40, 40))
    pipe.prepare = lambda req: job
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(GpuOutOfMemory) as err:
        pipe.generate(job.req)
    msg = str(err.value)
    assert "\n" not in msg and "ran out of memory in denoising" in msg and "40x40" in msg
    assert "--low-vram" in msg and "--precision fp8" in msg and err.value.exit_code == 1


def test_a_failed_engine_run_is_one_sentence(bundles):
    from app.runtime.gpu_errors import GpuRunFailed

    bundle = _bundle(bundles["sd3"])
    backend = StandInEngineBackend(bundle)
    pipe = make_pipeline(bundle, backend)
    job = pipe.prepare(_request("sd3", False, 40, 40))
    pipe.prepare = lambda req: job
    backend.run = lambda c, i: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access\nmore"))
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(GpuRunFailed, match="edgegen doctor") as err:
        pipe.generate(job.req)
    assert "\n" not in str(err.value) and "encoding the prompt failed on cuda:0" in str(err.value)


# ---------------------------------------------------------------- images as input (VAE encoder) on the device

IMAGE_CASES = [  # family, CFG on?, reference sizes (Klein) / init image size (SD3), output size or None
    ("klein", False, [(96, 64), (64, 80)], None),
    ("klein", True, [(64, 64), (80, 68), (72, 72)], (48, 80)),
    ("sd3", True, [(90, 70)], (40, 72)),
]


@pytest.fixture
def image_bundles(klein_encoder_bundle, sd3_encoder_bundle):
    return {"klein": klein_encoder_bundle, "sd3": sd3_encoder_bundle}


def _image_request(tmp_path, family, cfg, sizes, out) -> GenerationRequest:
    from tests.test_references import make_image

    paths = tuple(str(make_image(tmp_path / f"in{i}.png", w, h, seed=i)) for i, (w, h) in enumerate(sizes))
    size = {"width": out[0], "height": out[1]} if out else {}
    return GenerationRequest(prompt="a red circle", seed=5, steps=3, guidance=(4.0 if cfg else 1.0), images=paths,
                             strength=0.5 if family == "sd3" else None, **size)


@pytest.mark.parametrize("family,cfg,sizes,out", IMAGE_CASES)
def test_images_are_encoded_on_the_device(image_bundles, tmp_path, family, cfg, sizes, out):
    bundle = _bundle(image_bundles[family], distilled=(not cfg) if family == "klein" else None)
    backend = StandInEngineBackend(bundle)
    pipe = make_pipeline(bundle, backend)
    image, job = _run_fake(pipe, _image_request(tmp_path, family, cfg, sizes, out))
    assert isinstance(image, FakeTensor) and image.device == FAKE_CUDA
    w, h = out or (sizes[0][0] // 4 * 4, sizes[0][1] // 4 * 4)  # Klein: the first reference's size
    assert tuple(image.shape) == (1, 3, h, w)
    ctx = backend.contexts
    assert ctx["vae_encoder"].executions == len(sizes)  # once per image, not per step
    assert ctx["transformer"].executions == len(job.timesteps)
    seq = ctx["transformer"].shapes["hidden_states"]
    if family == "klein":  # the noisy tokens, then every reference's tokens, in one batch (CFG doubles it)
        refs = sum((rw // 4 * 4 // 4) * (rh // 4 * 4 // 4) for rw, rh in sizes)
        assert seq[:2] == ((2 if cfg else 1), (h // 4) * (w // 4) + refs)
        assert ctx["transformer"].shapes["img_ids"][1] == seq[1]
    else:  # strength 0.5 of 3 steps keeps the last 2 (diffusers: t_start = int(3 - 1.5))
        assert len(job.timesteps) == 2 and ctx["vae_encoder"].shapes["noise"] == (1, 16, h // 2, w // 2)


@pytest.mark.parametrize("family,cfg,sizes,out", IMAGE_CASES[::2])
def test_removing_any_host_to_device_move_fails_with_images(image_bundles, tmp_path, family, cfg, sizes, out,
                                                            monkeypatch):
    """The mutation check with images: each reference / init image and the posterior noise must be moved."""
    bundle = _bundle(image_bundles[family], distilled=(not cfg) if family == "klein" else None)
    req = _image_request(tmp_path, family, cfg, sizes, out)
    moved = mutate_every_move(bundle, req, monkeypatch)
    assert sum(len(sh) == 4 and sh[1] == 3 for sh in moved) == len(sizes)  # every image moved once


def test_low_vram_releases_the_encoder_before_denoise(image_bundles, tmp_path):
    bundle = _bundle(image_bundles["sd3"])
    backend = StandInEngineBackend(bundle)
    pipe = make_pipeline(bundle, backend, low_vram=True)
    order = []
    run, release = backend.run, backend.release
    backend.run = lambda c, i: (order.append(("run", c)), run(c, i))[1]
    backend.release = lambda c: (order.append(("release", c)), release(c))[1]
    _run_fake(pipe, _image_request(tmp_path, "sd3", True, [(90, 70)], (40, 40)))
    assert order.index(("run", "vae_encoder")) < order.index(("release", "vae_encoder")) \
        < order.index(("run", "transformer"))


# ---------------------------------------------------------------- FLUX.2 Klein inpainting on the device

@pytest.mark.parametrize("cfg", [False, True])
def test_inpainting_stays_on_the_device_and_every_move_is_needed(image_bundles, tmp_path, cfg, monkeypatch):
    """--mask on fake CUDA: the image inpainted (and a reference) encoded once, the mask, the noise and the init
    latents on the device for every step's blend; skipping any host-to-device move (the mask's included) fails."""
    from tests.test_inpaint import make_mask
    from tests.test_references import make_image

    bundle = _bundle(image_bundles["klein"], distilled=not cfg)
    init = make_image(tmp_path / "init.png", 80, 48, seed=1)
    ref = make_image(tmp_path / "ref.png", 64, 64, seed=2)
    mask = make_mask(tmp_path / "mask.png", 40, 24, (0.2, 0.2, 0.8, 0.8))
    req = GenerationRequest(prompt="a red circle", seed=5, steps=4, guidance=(4.0 if cfg else 1.0),
                            images=(str(init), str(ref)), mask=str(mask), strength=0.6)
    backend = StandInEngineBackend(bundle)
    image, job = _run_fake(make_pipeline(bundle, backend), req)
    assert isinstance(image, FakeTensor) and image.device == FAKE_CUDA and tuple(image.shape) == (1, 3, 48, 80)
    ctx = backend.contexts
    assert ctx["vae_encoder"].executions == 2  # the image and the reference, once each
    assert len(job.timesteps) == 3 and ctx["transformer"].executions == 3  # strength 0.6 of 4: t_start 1
    tokens = (48 // 4) * (80 // 4)
    assert ctx["transformer"].shapes["hidden_states"][:2] == ((2 if cfg else 1), 2 * tokens + 16 * 16)
    if not cfg:  # the mutation check once (one run per move)
        moved = mutate_every_move(bundle, req, monkeypatch)
        assert (1, tokens, 1) in moved  # the packed mask
