"""ComfyUI's official templates (pip package comfyui-workflow-templates-json, in the test extra) run unchanged
through `edgegen serve` and `edgegen batch`, their model names aliased onto tiny bundles (`serve --alias`), and
each image equals `edgegen generate` with the same parameters. Templates that need what edgegen lacks are
refused by node name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from test_server_helpers import start_server, wait_history

pytest.importorskip("aiohttp")
templates = pytest.importorskip("comfyui_workflow_templates_json")
TEMPLATES = Path(templates.__file__).parent / "templates"

KLEIN_NAMES = ("flux-2-klein-base-4b.safetensors", "flux-2-klein-4b.safetensors", "flux-2-klein-4b-fp8.safetensors",
               "qwen_3_4b.safetensors", "flux2-vae.safetensors")
ALIASES = tuple((n, "klein-tpl") for n in KLEIN_NAMES) + (("sd3.5_large_fp8_scaled.safetensors", "sd3-tpl"),
                                                          ("sd3.5_large_controlnet_canny.safetensors", "canny"),
                                                          ("sd3.5_large_controlnet_blur.safetensors", "blur"))


def template(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def server(template_bundles, tmp_path_factory):
    root = template_bundles["klein"].parent
    with start_server(tmp_path_factory.mktemp("templates"), root, aliases=ALIASES) as s:
        yield s


def run(server, workflow: dict) -> tuple[dict, np.ndarray]:
    r = requests.post(f"{server.url}/prompt", json={"prompt": workflow, "client_id": "templates"}, timeout=60)
    assert r.status_code == 200, r.text
    entry = wait_history(server.url, r.json()["prompt_id"], timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    (images,) = [o["images"] for o in entry["outputs"].values()]
    img = images[0]
    data = requests.get(f"{server.url}/view", params={"filename": img["filename"], "subfolder": img["subfolder"],
                                                      "type": "output"}, timeout=30).content
    return entry, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def generate(bundle: Path, out: Path, *args: str) -> np.ndarray:
    from app.cli import main

    assert main(["generate", "--bundle", str(bundle), "--out", str(out), *args]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def inner(workflow: dict, kind: str) -> dict:
    """The first active node of `kind` in the workflow or its subgraphs (the templates' own values)."""
    from app.server.nodes import object_info
    from app.server.workflow import to_api

    return next(v["inputs"] for v in to_api(workflow, object_info([], [])).values() if v["class_type"] == kind)


def test_klein_text_to_image_template_equals_generate(server, template_bundles, tmp_path):
    wf = template("image_flux2_klein_text_to_image")
    entry, served = run(server, wf)
    assert served.shape == (1024, 1024, 3)
    prompt = next(n for n in wf["nodes"] if n["type"] == "PrimitiveStringMultiline")["widgets_values"][0]
    assert inner(wf, "CFGGuider")["cfg"] == 5 and inner(wf, "Flux2Scheduler")["steps"] == 20
    cli = generate(template_bundles["klein"], tmp_path / "t2i.png", "--prompt", prompt, "--seed", "0",
                   "--steps", "20", "--guidance", "5", "--width", "1024", "--height", "1024")
    assert psnr(served, cli) >= 60
    assert np.array_equal(served, cli)  # one code path: the same pixels


def _handbag(folder: Path) -> Path:
    """A 1200x900 photo-like image: ImageScaleToTotalPixels takes it to 1182x887 (1 MP), the latent to 1168x880."""
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:900, 0:1200]
    img = np.stack([(x / 5) % 256, (y / 4) % 256, ((x + y) / 9) % 256], -1) + rng.normal(0, 12, (900, 1200, 3))
    path = folder / "handbag_white.png"
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
    return path


def test_klein_image_edit_template_equals_generate_with_comfyuis_scaling(server, template_bundles, tmp_path):
    import torch

    src = _handbag(tmp_path)
    up = requests.post(f"{server.url}/upload/image", files={"image": (src.name, src.read_bytes(), "image/png")},
                       timeout=30)
    assert up.status_code == 200 and up.json()["name"] == src.name
    wf = template("image_flux2_klein_image_edit_4b_distilled")
    entry, served = run(server, wf)
    assert served.shape == (880, 1168, 3)
    assert any("1182x887" in m[1].get("message", "") for m in entry["status"]["messages"] if m[0] == "edgegen_note")
    # ComfyUI's ImageScaleToTotalPixels: round(side * sqrt(1 MP / area)), nearest-exact through torch
    x = torch.from_numpy(np.asarray(Image.open(src)).copy()).permute(2, 0, 1)[None].float() / 255
    scaled = torch.nn.functional.interpolate(x, size=(887, 1182), mode="nearest-exact")
    ref = tmp_path / "scaled.png"
    Image.fromarray((scaled[0].permute(1, 2, 0) * 255).round().byte().numpy()).save(ref)
    sub = next(n for n in wf["nodes"] if n["id"] == 75)["widgets_values"]  # promoted: models, prompt, seed
    cli = generate(template_bundles["klein"], tmp_path / "edit.png", "--prompt", sub[3], "--seed", str(sub[4]),
                   "--steps", "4", "--guidance", "1", "--width", "1168", "--height", "880", "--image", str(ref))
    assert psnr(served, cli) >= 60
    assert np.array_equal(served, cli)


def test_sd35_simple_template_equals_generate(server, template_bundles, tmp_path):
    wf = template("sd3.5_simple_example")
    entry, served = run(server, wf)
    assert served.shape == (1024, 1024, 3)
    k = inner(wf, "KSampler")
    prompt = next(n for n in wf["nodes"] if n["id"] == 16)["widgets_values"][0]
    assert any("sgm_uniform" in m[1].get("message", "") for m in entry["status"]["messages"])
    cli = generate(template_bundles["sd3"], tmp_path / "sd3.png", "--prompt", prompt, "--seed", str(k["seed"]),
                   "--steps", str(k["steps"]), "--guidance", str(k["cfg"]), "--width", "1024", "--height", "1024")
    assert psnr(served, cli) >= 60
    assert np.array_equal(served, cli)


def test_batch_runs_the_ui_format_template(server, template_bundles, tmp_path):
    """edgegen batch --workflow takes the template file as saved (UI format): the edit template, two rows with
    their own prompt, against the running server."""
    from app.cli import main

    wf = tmp_path / "edit.json"
    wf.write_text((TEMPLATES / "image_flux2_klein_image_edit_4b_distilled.json").read_text())
    rows = tmp_path / "rows.csv"
    rows.write_text('75:74.text,75:73.noise_seed\n"Change the bag color to red.",5\n"Make it green.",6\n')
    assert main(["batch", str(rows), "--workflow", str(wf), "--server", server.url]) == 0
    import csv

    with open(tmp_path / "rows.results.csv", newline="") as f:
        results = list(csv.DictReader(f))
    assert [r["status"] for r in results] == ["success", "success"], results


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


def test_sd35_canny_controlnet_template_equals_generate(server, template_bundles, tmp_path):
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
    k, apply = inner(wf, "KSampler"), inner(wf, "ControlNetApplyAdvanced")
    c = inner(wf, "Canny")
    scaled = _comfy_upscale(Image.open(src), 1024, 1024, "bilinear")
    x = torch.from_numpy(np.asarray(scaled, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    edges = (canny(x, c["low_threshold"], c["high_threshold"])[1][0, 0] * 255).round().byte().numpy()
    Image.fromarray(edges).convert("RGB").save(tmp_path / "edges.png")
    prompt = next(n for n in wf["nodes"] if n["type"] == "CLIPTextEncode")["widgets_values"][0]
    cli = generate(template_bundles["sd3"], tmp_path / "canny.png", "--prompt", prompt, "--seed", str(k["seed"]),
                   "--steps", str(k["steps"]), "--guidance", str(k["cfg"]), "--width", "1024", "--height", "1024",
                   "--zero-negative", "--control-as-is", "--control",
                   f"canny:{tmp_path / 'edges.png'}:{apply['strength']}:{apply['start_percent']}:{apply['end_percent']}")
    assert np.array_equal(served, cli)
    plain = generate(template_bundles["sd3"], tmp_path / "plain.png", "--prompt", prompt, "--seed", str(k["seed"]),
                     "--steps", "4", "--guidance", str(k["cfg"]), "--width", "1024", "--height", "1024",
                     "--zero-negative")
    assert psnr(served, plain) < 40  # the net took effect


def test_sd35_blur_controlnet_template_equals_generate(server, template_bundles, tmp_path):
    """ComfyUI's SD3.5 Large blur template: the uploaded (already blurred) image straight into the net, fitted to
    the latent's size as ComfyUI's ControlNet does (nearest-exact, centre crop)."""
    src = tmp_path / "sd3.5_large_blur_input_image.png"
    Image.open(_handbag(tmp_path)).resize((600, 450)).save(src)
    _upload(server, src)
    wf = template("sd3.5_large_blur")
    _, served = run(server, wf)
    k, apply = inner(wf, "KSampler"), inner(wf, "ControlNetApplyAdvanced")
    _comfy_upscale(Image.open(src), 1024, 1024, "nearest-exact").save(tmp_path / "fit.png")
    prompt = next(n for n in wf["nodes"] if n["type"] == "CLIPTextEncode")["widgets_values"][0]
    cli = generate(template_bundles["sd3"], tmp_path / "blur.png", "--prompt", prompt, "--seed", str(k["seed"]),
                   "--steps", str(k["steps"]), "--guidance", str(k["cfg"]), "--width", "1024", "--height", "1024",
                   "--zero-negative", "--control-as-is", "--control",
                   f"blur:{tmp_path / 'fit.png'}:{apply['strength']}:{apply['start_percent']}:{apply['end_percent']}")
    assert np.array_equal(served, cli)


@pytest.mark.parametrize("name, node", [
    ("image_flux2_klein_9b_kv_image_edit", "FluxKVCache"),
    ("image_flux3_klein_t2i", "Flux3LayoutPrompt"),
])
def test_templates_edgegen_lacks_are_refused_by_node_name(server, name, node):
    r = requests.post(f"{server.url}/prompt", json={"prompt": template(name)}, timeout=60)
    assert r.status_code == 400
    errors = r.json()["node_errors"]
    hit = [e for e in errors.values() if e["class_type"] == node]
    assert hit and "not supported" in hit[0]["errors"][0]["message"]
    assert hit[0]["errors"][0]["details"]  # what to use instead, or why not yet


def _api(name: str) -> dict:
    from app.server.nodes import object_info
    from app.server.workflow import to_api

    return to_api(template(name), object_info([], []))


def _node_of(graph: dict, kind: str) -> str:
    return next(n for n, v in graph.items() if v["class_type"] == kind)


@pytest.mark.parametrize("change, kind, needle", [
    (lambda g: g[_node_of(g, "ControlNetLoader")]["inputs"].update(control_net_name="sd3.5_large_controlnet_depth"),
     "ControlNetLoader", "its nets: canny, blur"),
    (lambda g: g[_node_of(g, "KSampler")]["inputs"].update(negative=g[_node_of(g, "ControlNetApplyAdvanced")]
                                                           ["inputs"]["negative"]),
     "ControlNetApplyAdvanced", "positive and the negative conditioning alike"),
    (lambda g: g[_node_of(g, "ControlNetApplyAdvanced")]["inputs"].update(start_percent=0.8, end_percent=0.2),
     "ControlNetApplyAdvanced", "start_percent 0.8 / end_percent 0.2"),
    (lambda g: (g[_node_of(g, "CheckpointLoaderSimple")]["inputs"].update(ckpt_name="klein-tpl"),
                g[_node_of(g, "KSampler")]["inputs"].update(cfg=1.0)),
     "ControlNetApplyAdvanced", "ControlNet is SD3.5's"),
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
    assert {"canny", "blur", "sd3.5_large_controlnet_canny.safetensors"} <= set(names)
    assert set(requests.get(f"{server.url}/models/controlnet", timeout=30).json()) == {"canny", "blur"}
