"""ComfyUI's official SD3.5 templates (the simple example, the SD3.5 Large canny and blur ControlNet templates) run
unchanged through `edgegen serve` on a tiny SD3 bundle with a ControlNet, and each image equals `edgegen generate`
pixel for pixel; ControlNet graphs edgegen cannot run are refused on their node."""

from __future__ import annotations

import numpy as np
import pytest
import requests
from PIL import Image
from test_comfy_templates import _handbag, generate, inner, psnr, run, template
from test_server_helpers import start_server

pytest.importorskip("aiohttp")
pytest.importorskip("comfyui_workflow_templates_json")

# Both templates' net names onto the bundle's one net: the API's arithmetic does not depend on which net it is.
ALIASES = (("sd3.5_large_fp8_scaled.safetensors", "sd3-tpl"), ("sd3.5_large_controlnet_canny.safetensors", "canny"),
           ("sd3.5_large_controlnet_blur.safetensors", "canny"))


@pytest.fixture(scope="module")
def server(template_sd3, tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("templates-sd3"), template_sd3.parent, aliases=ALIASES) as s:
        yield s


def test_sd35_simple_template_equals_generate(server, template_sd3, tmp_path):
    wf = template("sd3.5_simple_example")
    entry, served = run(server, wf)
    assert served.shape == (1024, 1024, 3)
    k = inner(wf, "KSampler")
    prompt = next(n for n in wf["nodes"] if n["id"] == 16)["widgets_values"][0]
    assert any("sgm_uniform" in m[1].get("message", "") for m in entry["status"]["messages"])
    cli = generate(template_sd3, tmp_path / "sd3.png", "--prompt", prompt, "--seed", str(k["seed"]),
                   "--steps", str(k["steps"]), "--guidance", str(k["cfg"]), "--width", "1024", "--height", "1024")
    assert psnr(served, cli) >= 60
    assert np.array_equal(served, cli)


def _upload(server, path):
    up = requests.post(f"{server.url}/upload/image", files={"image": (path.name, path.read_bytes(), "image/png")},
                       data={"overwrite": "true"}, timeout=30)
    assert up.status_code == 200 and up.json()["name"] == path.name


def _comfy_upscale(img: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """comfy.utils.common_upscale with crop "center", written out here from ComfyUI's arithmetic (not edgegen's)."""
    import torch

    x = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)[None].float() / 255
    ow, oh = x.shape[-1], x.shape[-2]
    old, new = ow / oh, width / height
    dx = round((ow - ow * (new / old)) / 2) if old > new else 0
    dy = round((oh - oh * (old / new)) / 2) if old < new else 0
    x = x.narrow(-2, dy, oh - 2 * dy).narrow(-1, dx, ow - 2 * dx)
    y = torch.nn.functional.interpolate(x, size=(height, width), mode=mode)
    return Image.fromarray((y[0].permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())


def _generate_as_template(bundle, wf, control, out):
    """`edgegen generate` with the template's own prompt, seed, steps, cfg and ControlNet numbers, the control image
    already prepared (--control-as-is) and the ConditioningZeroOut negative (--zero-negative)."""
    k, apply = inner(wf, "KSampler"), inner(wf, "ControlNetApplyAdvanced")
    prompt = next(n for n in wf["nodes"] if n["type"] == "CLIPTextEncode")["widgets_values"][0]
    return generate(bundle, out, "--prompt", prompt, "--seed", str(k["seed"]), "--steps", str(k["steps"]),
                    "--guidance", str(k["cfg"]), "--width", "1024", "--height", "1024", "--zero-negative",
                    "--control-as-is", "--control",
                    f"canny:{control}:{apply['strength']}:{apply['start_percent']}:{apply['end_percent']}")


def test_sd35_canny_controlnet_template_equals_generate(server, template_sd3, tmp_path):
    """ComfyUI's SD3.5 Large canny template, unchanged: LoadImage -> ImageScale (bilinear, centre crop) -> Canny
    (0.3 / 0.6) -> ControlNetApplyAdvanced (0.66) on CLIPTextEncode and its ConditioningZeroOut -> KSampler."""
    import torch
    from kornia.filters import canny

    src = tmp_path / "sd3.5_large_canny_controlnet_example_input_image.png"
    Image.open(_handbag(tmp_path)).save(src)  # 1200x900: the centre crop cuts 150 px a side
    _upload(server, src)
    wf = template("sd3.5_large_canny_controlnet_example")
    entry, served = run(server, wf)
    assert served.shape == (1024, 1024, 3)
    assert any("PreviewImage" in m[1].get("message", "") for m in entry["status"]["messages"])
    c = inner(wf, "Canny")
    scaled = _comfy_upscale(Image.open(src), 1024, 1024, "bilinear")
    x = torch.from_numpy(np.asarray(scaled, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    edges = (canny(x, c["low_threshold"], c["high_threshold"])[1][0, 0] * 255).round().byte().numpy()
    Image.fromarray(edges).convert("RGB").save(tmp_path / "edges.png")
    assert np.array_equal(served, _generate_as_template(template_sd3, wf, tmp_path / "edges.png", tmp_path / "c.png"))


def test_sd35_blur_controlnet_template_equals_generate(server, template_sd3, tmp_path):
    """ComfyUI's SD3.5 Large blur template: the uploaded (already blurred) image straight into the net, fitted to
    the latent's size as ComfyUI's ControlNet does (nearest-exact, centre crop). At 4 of its 30 steps (the canny
    test runs a template's own steps): the same graph, a sixth of the time."""
    src = tmp_path / "sd3.5_large_blur_input_image.png"
    Image.open(_handbag(tmp_path)).resize((600, 450)).save(src)
    _upload(server, src)
    wf = template("sd3.5_large_blur")
    sampler = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"][2] == 30
    sampler["widgets_values"][2] = 4
    _, served = run(server, wf)
    _comfy_upscale(Image.open(src), 1024, 1024, "nearest-exact").save(tmp_path / "fit.png")
    assert np.array_equal(served, _generate_as_template(template_sd3, wf, tmp_path / "fit.png", tmp_path / "b.png"))


def _api(name: str) -> dict:
    from app.server.nodes import object_info
    from app.server.workflow import to_api

    return to_api(template(name), object_info([], []))


def _node_of(graph: dict, kind: str) -> str:
    return next(n for n, v in graph.items() if v["class_type"] == kind)


@pytest.mark.parametrize("change, kind, needle", [
    (lambda g: g[_node_of(g, "ControlNetLoader")]["inputs"].update(control_net_name="sd3.5_large_controlnet_depth"),
     "ControlNetLoader", "its nets: canny;"),
    (lambda g: g[_node_of(g, "KSampler")]["inputs"].update(negative=g[_node_of(g, "ControlNetApplyAdvanced")]
                                                           ["inputs"]["negative"]),
     "ControlNetApplyAdvanced", "positive and the negative conditioning alike"),
    (lambda g: g[_node_of(g, "ControlNetApplyAdvanced")]["inputs"].update(start_percent=0.8, end_percent=0.2),
     "ControlNetApplyAdvanced", "start_percent 0.8 / end_percent 0.2"),
])
def test_controlnet_graphs_edgegen_cannot_run_are_refused_on_their_node(server, change, kind, needle, tmp_path):
    src = tmp_path / "sd3.5_large_blur_input_image.png"
    Image.new("RGB", (64, 48), (90, 120, 200)).save(src)
    _upload(server, src)
    g = _api("sd3.5_large_blur")
    change(g)
    r = requests.post(f"{server.url}/prompt", json={"prompt": g}, timeout=60)
    assert r.status_code == 400, r.text
    hit = [e for e in r.json()["node_errors"].values() if e["class_type"] == kind]
    text = " ".join(x["message"] + " " + x["details"] for e in hit for x in e["errors"])
    assert needle in text, r.json()["node_errors"]


def test_object_info_and_models_list_the_controlnets(server):
    info = requests.get(f"{server.url}/object_info/ControlNetLoader", timeout=30).json()["ControlNetLoader"]
    names = info["input"]["required"]["control_net_name"][0]
    assert {"canny", "sd3.5_large_controlnet_blur.safetensors"} <= set(names)
    assert requests.get(f"{server.url}/models/controlnet", timeout=30).json() == ["canny"]
