"""ComfyUI's native node sets on the session's tiny bundles: SD3.5 image-to-image as ComfyUI builds it (LoadImage
-> VAEEncode -> KSampler with denoise < 1) equals `edgegen generate --image --strength`, and what edgegen cannot
honour in the FLUX.2 Klein template's own graph is refused on the node that says it, with the fix."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from test_server_helpers import server_config, wait_history

pytest.importorskip("aiohttp")
templates = pytest.importorskip("comfyui_workflow_templates_json")
TEMPLATES = Path(templates.__file__).parent / "templates"
KLEIN_FILES = (("flux-2-klein-base-4b.safetensors", "klein"), ("qwen_3_4b.safetensors", "klein"),
               ("flux2-vae.safetensors", "klein"))


@pytest.fixture(scope="module")
def server(klein_bundle, sd3_bundle, tmp_path_factory):
    from app.server.run import ServerThread

    cfg = replace(server_config(tmp_path_factory.mktemp("native"), klein_bundle),
                  bundles=(klein_bundle, sd3_bundle), aliases=KLEIN_FILES)
    with ServerThread(cfg).start() as s:
        yield s


def test_sd35_ksampler_denoise_on_an_encoded_image_equals_generate_image_strength(server, sd3_bundle, tmp_path):
    from app.cli import main

    ref = tmp_path / "init.png"
    Image.radial_gradient("L").resize((64, 48)).convert("RGB").save(ref)
    with ref.open("rb") as f:
        up = requests.post(f"{server.url}/upload/image", files={"image": ("init.png", f)}, timeout=30).json()
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": up["name"]}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 4, "cfg": 3.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 0.6, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["11", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "i2i"}},
    }
    r = requests.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=30)
    assert r.status_code == 200, r.text
    entry = wait_history(server.url, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]
    img = entry["outputs"]["9"]["images"][0]
    served = np.asarray(Image.open(io.BytesIO(requests.get(f"{server.url}/view", params=img, timeout=30).content)))
    out = tmp_path / "cli.png"
    assert main(["generate", "--bundle", str(sd3_bundle), "--out", str(out), "--prompt", "a red circle",
                 "--negative-prompt", "blurry", "--seed", "5", "--steps", "4", "--guidance", "3",
                 "--image", str(ref), "--strength", "0.6"]) == 0
    cli = np.asarray(Image.open(out).convert("RGB"))
    assert served.shape == cli.shape == (48, 64, 3)
    assert np.array_equal(served, cli)


def klein_t2i(changes: dict | None = None) -> dict:
    """ComfyUI's FLUX.2 Klein text-to-image template as its frontend queues it, at 128 px, with `changes`
    ({inner node id: {input: value}}) applied to its subgraph's nodes."""
    from app.server.nodes import object_info
    from app.server.workflow import to_api

    g = to_api(json.loads((TEMPLATES / "image_flux2_klein_text_to_image.json").read_text()), object_info([], []))
    g["75:68"]["inputs"]["value"] = g["75:69"]["inputs"]["value"] = 128
    g["75:62"]["inputs"]["steps"] = 2
    for node, inputs in (changes or {}).items():
        g[f"75:{node}"]["inputs"].update(inputs)
    return g


def test_sd35_text_encoders_load_with_comfyuis_sd3_type_and_not_flux2(server):
    graph = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3"}},
        "1": {"class_type": "CLIPLoader", "inputs": {"clip_name": "sd3", "type": "sd3"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 1, "cfg": 2.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "clip"}},
    }
    r = requests.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=30)
    assert r.status_code == 200, r.text
    assert wait_history(server.url, r.json()["prompt_id"])["status"]["completed"]
    graph["1"]["inputs"]["type"] = "flux2"
    r = requests.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=30)
    assert r.status_code == 400 and "use type 'sd3'" in r.json()["node_errors"]["1"]["errors"][0]["details"]


def test_the_klein_template_graph_runs_as_its_frontend_queues_it(server):
    """The baseline for the refusals below: unchanged but for size and steps, it runs."""
    r = requests.post(f"{server.url}/prompt", json={"prompt": klein_t2i()}, timeout=30)
    assert r.status_code == 200, r.text
    assert wait_history(server.url, r.json()["prompt_id"])["status"]["completed"]


@pytest.mark.parametrize("changes, node, input_name, needle", [
    ({61: {"sampler_name": "dpmpp_2m"}}, "KSamplerSelect", "sampler_name", "use 'euler'"),
    ({70: {"unet_name": "flux-2-klein-9b.safetensors"}}, "UNETLoader", "unet_name", "klein"),
    ({71: {"type": "sd3"}}, "CLIPLoader", "type", "flux2"),
    ({62: {"width": 256}}, "Flux2Scheduler", None, "128"),
], ids=["sampler", "unknown-model", "clip-type", "scheduler-size"])
def test_what_edgegen_cannot_honour_is_refused_on_its_node(server, changes, node, input_name, needle):
    r = requests.post(f"{server.url}/prompt", json={"prompt": klein_t2i(changes)}, timeout=30)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    hits = [e for e in body["node_errors"].values() if e["class_type"] == node]
    assert hits, body["node_errors"]
    err = hits[0]["errors"][0]
    assert needle in err["message"] + err["details"], err
    if input_name:
        assert err["extra_info"]["input_name"] == input_name


def _klein_inpaint_graph(image: str, mask_node: dict | None, denoise: float, ckpt: str = "klein") -> dict:
    """LoadImage -> VAEEncode -> SetLatentNoiseMask (LoadImage's MASK, or `mask_node`) -> KSampler."""
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "10": {"class_type": "LoadImage", "inputs": {"image": image}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}},
        "12": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 9, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
                                                   "scheduler": "simple", "denoise": denoise, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["12", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "inpaint"}},
    }
    if mask_node:
        g["13"] = mask_node
        g["12"]["inputs"]["mask"] = ["13", 0]
    return g


def test_klein_set_latent_noise_mask_equals_generate_mask(server, klein_bundle, tmp_path):
    """ComfyUI's inpainting shape on a Klein bundle: the transparent hole of an RGBA upload (LoadImage's MASK is
    1 - alpha) and LoadImageMask's red channel each equal generate --mask with that mask, pixel for pixel."""
    from app.cli import main

    rgb = Image.radial_gradient("L").resize((80, 64)).convert("RGB")
    alpha = Image.new("L", (80, 64), 255)
    alpha.paste(0, (20, 16, 60, 48))  # transparent: repainted
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    src = tmp_path / "hole.png"
    rgba.save(src)
    red = tmp_path / "red.png"
    Image.merge("RGB", (Image.eval(alpha, lambda v: 255 - v), alpha, alpha)).save(red)  # red = repaint
    up = {}
    for p in (src, red):
        with p.open("rb") as f:
            up[p.name] = requests.post(f"{server.url}/upload/image", files={"image": (p.name, f)},
                                       timeout=30).json()["name"]
    mask = tmp_path / "mask.png"
    Image.eval(alpha, lambda v: 255 - v).save(mask)
    out = tmp_path / "cli.png"
    assert main(["generate", "--bundle", str(klein_bundle), "--out", str(out), "--prompt", "a red circle",
                 "--seed", "9", "--steps", "4", "--image", str(src), "--mask", str(mask), "--strength", "0.8"]) == 0
    cli = np.asarray(Image.open(out).convert("RGB"))
    for mask_node in (None, {"class_type": "LoadImageMask", "inputs": {"image": up["red.png"], "channel": "red"}}):
        r = requests.post(f"{server.url}/prompt", json={"prompt": _klein_inpaint_graph(up["hole.png"], mask_node,
                                                                                        0.8)}, timeout=30)
        assert r.status_code == 200, r.text
        entry = wait_history(server.url, r.json()["prompt_id"])
        assert entry["status"]["status_str"] == "success", entry["status"]
        img = entry["outputs"]["9"]["images"][0]
        served = np.asarray(Image.open(io.BytesIO(requests.get(f"{server.url}/view", params=img,
                                                               timeout=30).content)).convert("RGB"))
        assert served.shape == cli.shape == (64, 80, 3)
        assert np.array_equal(served, cli)
    # SD3.5 has no inpainting: refused on the mask node, with what to use
    r = requests.post(f"{server.url}/prompt", json={"prompt": _klein_inpaint_graph(up["hole.png"], None, 0.8, "sd3")},
                      timeout=30)
    assert r.status_code == 400 and "12" in r.json()["node_errors"], r.text
    assert "FLUX.2 Klein" in r.json()["node_errors"]["12"]["errors"][0]["message"]
