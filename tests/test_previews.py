"""Step previews (app/runtime/previews.py): one picture per step, sized from the bundle's config, the same final
image with and without them, a map that follows the decoder, and ComfyUI's binary frames over /ws."""

from __future__ import annotations

import asyncio
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

STEPS = 3


def _pipeline(bundle_dir):
    from app.bundle.manifest import load_bundle
    from app.runtime.backend import make_backend
    from app.runtime.pipelines import make_pipeline

    bundle = load_bundle(bundle_dir)
    return make_pipeline(bundle, make_backend(bundle, "onnxruntime")[0])


@pytest.mark.parametrize("which", ["demo_bundle", "sd3_bundle", "sd3_no_encoder_bundle", "variant-lat16-base-cfg"])
def test_one_preview_per_step_sized_by_the_bundle_and_the_image_unchanged(which, request, tmp_path_factory):
    """Klein (packed 2x2 tokens), SD3.5 (one latent per cell), a bundle without the VAE encoder (the decoder-only
    fit) and a held-out Klein base variant with CFG and 16 latent channels."""
    from app.runtime.pipelines import GenerationRequest

    if which.startswith("variant-"):
        from tests.conftest import variant_bundle

        bundle_dir = variant_bundle(tmp_path_factory, which.removeprefix("variant-"))[1]
    else:
        bundle_dir = request.getfixturevalue(which)
    pipe = _pipeline(bundle_dir)
    m = pipe.bundle.manifest
    side = m["size_range"]["min"]
    w, h = side, min(side + m["size_range"]["multiple"], m["size_range"]["max"])  # not square where it can be
    req = GenerationRequest(prompt="a red circle on a blue background", seed=5, steps=STEPS, width=w, height=h,
                            guidance=2.0)
    got = []
    with_previews = pipe.generate(req, on_preview=lambda step, total, rgb: got.append((step, total, rgb)))
    without = pipe.generate(req)
    np.testing.assert_array_equal(with_previews.image, without.image)  # previews only read the latents
    cell = m["pipeline"]["vae_scale_factor"]
    assert [(s, t) for s, t, _ in got] == [(i, STEPS) for i in range(1, STEPS + 1)]
    for _, _, rgb in got:
        assert rgb.dtype == np.uint8 and rgb.shape == (h // cell, w // cell, 3)
    assert not np.array_equal(got[0][2], got[-1][2])  # the estimate moves as the sampler denoises


def test_preview_map_follows_the_decoder_on_held_out_latents(demo_bundle):
    """The shipped demo model (a trained VAE): on colour fields the fit never saw, the preview of their latents
    explains the decoder's picture better than a flat colour, and better than the same map with rows and
    columns swapped (a layout bug)."""
    import torch.nn.functional as F

    from app.runtime.pipelines import GenerationRequest
    from app.runtime.previews import _colour_field

    pipe = _pipeline(demo_bundle)
    side = pipe.bundle.manifest["size_range"]["min"]
    cell = pipe.bundle.manifest["pipeline"]["vae_scale_factor"]
    req = pipe.resolve(GenerationRequest(prompt="", width=side, height=side, steps=1))
    noise, state = pipe.initial_noise(req)

    def r2(pred, target):
        return 1 - ((pred - target) ** 2).sum() / ((target - target.mean((0, 1))) ** 2).sum()

    scores, swapped = [], []
    for seed in range(100, 104):
        latents = pipe.encode_pixels(_colour_field(side, seed), noise, state)
        preview = pipe.previews().rgb(pipe.latent_grid(latents, state)).astype(float)
        drawn = F.avg_pool2d(pipe.decode(latents, req, state), cell)[0].permute(1, 2, 0)
        drawn = ((drawn / 2 + 0.5).clamp(0, 1) * 255).numpy()
        scores.append(r2(preview, drawn))
        swapped.append(r2(preview.transpose(1, 0, 2), drawn))
    assert np.mean(scores) > 0.15, scores  # measured 0.21-0.47 per field
    assert np.mean(scores) > np.mean(swapped) + 0.2, (scores, swapped)


def test_ws_sends_comfyuis_binary_preview_frames_only_when_asked(demo_bundle, tmp_path):
    import aiohttp
    import requests
    from test_server_helpers import start_server, t2i_graph, wait_history

    size = json.loads((demo_bundle / "manifest.json").read_text())["size_range"]["min"]
    cell = json.loads((demo_bundle / "manifest.json").read_text())["pipeline"]["vae_scale_factor"]

    async def run(url: str, sid: str) -> tuple[list, list[bytes]]:
        texts, frames = [], []
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/ws?clientId={sid}") as ws:
            body = {"prompt": t2i_graph(steps=STEPS, width=size, height=size), "client_id": sid}
            async with http.post(f"{url}/prompt", json=body) as r:
                prompt_id = (await r.json())["prompt_id"]
            while True:
                msg = await asyncio.wait_for(ws.receive(), 120)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    frames.append(msg.data)
                    continue
                m = json.loads(msg.data)
                texts.append(m["type"])
                if m["type"] == "executing" and m["data"]["node"] is None and m["data"]["prompt_id"] == prompt_id:
                    wait_history(url, prompt_id)
                    return texts, frames

    with start_server(tmp_path / "on", demo_bundle, preview_method="latent2rgb") as server:
        texts, frames = asyncio.run(run(server.url, "previews"))
    assert len(frames) == STEPS
    for frame in frames:
        assert struct.unpack(">II", frame[:8]) == (1, 1)  # PREVIEW_IMAGE, JPEG: as ComfyUI frames them
        with Image.open(io.BytesIO(frame[8:])) as im:
            assert im.format == "JPEG" and im.size == (size // cell, size // cell)
    assert texts.count("progress") == STEPS and "executed" in texts

    with start_server(tmp_path / "off", demo_bundle) as server:  # ComfyUI's default: no previews
        assert server.server.config.preview_method == "none"
        texts_off, frames_off = asyncio.run(run(server.url, "plain"))
        assert requests.get(f"{server.url}/queue", timeout=30).ok
    assert frames_off == [] and [t for t in texts_off if t != "status"] == [t for t in texts if t != "status"]
