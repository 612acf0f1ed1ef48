"""ComfyUI's official templates (pip package comfyui-workflow-templates-json, in the test extra) run unchanged
through `edgegen serve` and `edgegen batch`, their model names aliased onto tiny bundles (`serve --alias`), and
each image equals `edgegen generate` with the same parameters. Templates that need what edgegen lacks are
refused by node name. The SD3.5 templates (and ControlNet) are in tests/test_comfy_templates_sd3.py."""

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
ALIASES = tuple((n, "klein-tpl") for n in KLEIN_NAMES)


def template(name: str) -> dict:
    return json.loads((TEMPLATES / f"{name}.json").read_text())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def server(template_klein, tmp_path_factory):
    root = template_klein.parent
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


def test_klein_text_to_image_template_equals_generate(server, template_klein, tmp_path):
    wf = template("image_flux2_klein_text_to_image")
    entry, served = run(server, wf)
    assert served.shape == (1024, 1024, 3)
    prompt = next(n for n in wf["nodes"] if n["type"] == "PrimitiveStringMultiline")["widgets_values"][0]
    assert inner(wf, "CFGGuider")["cfg"] == 5 and inner(wf, "Flux2Scheduler")["steps"] == 20
    cli = generate(template_klein, tmp_path / "t2i.png", "--prompt", prompt, "--seed", "0",
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


def test_klein_image_edit_template_equals_generate_with_comfyuis_scaling(server, template_klein, tmp_path):
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
    cli = generate(template_klein, tmp_path / "edit.png", "--prompt", sub[3], "--seed", str(sub[4]),
                   "--steps", "4", "--guidance", "1", "--width", "1168", "--height", "880", "--image", str(ref))
    assert psnr(served, cli) >= 60
    assert np.array_equal(served, cli)


def test_batch_runs_the_ui_format_template(server, template_klein, tmp_path):
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
