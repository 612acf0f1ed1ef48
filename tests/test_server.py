"""`edgegen serve` on loopback with real clients: ComfyUI's request shapes, WebSocket progress, errors, security."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from test_server_helpers import DOCS, PROMPT, start_server, t2i_graph, wait_history

pytest.importorskip("aiohttp")


@pytest.fixture(scope="module")
def server(demo_bundle, tmp_path_factory):
    s = start_server(tmp_path_factory.mktemp("server"), demo_bundle)
    yield s
    s.close()


@pytest.fixture(scope="module")
def cli_png(demo_bundle, tmp_path_factory) -> Path:
    """`edgegen generate` with the parameters of docs/api/text_to_image.json."""
    from app.cli import main

    out = tmp_path_factory.mktemp("cli") / "cli.png"
    assert main(["generate", "--bundle", str(demo_bundle), "--prompt", PROMPT, "--seed", "7", "--steps", "4",
                 "--guidance", "1.0", "--width", "128", "--height", "128", "--out", str(out)]) == 0
    return out


def pixels(data) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))


def load_doc_module(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_comfyui_client_script_gets_the_cli_image(server, cli_png, tmp_path):
    """docs/api/comfy_client.py (requests: POST /prompt, poll /history, GET /view) and the saved API-format
    workflow, unchanged, give the pixels `edgegen generate` gives for the same parameters."""
    out = tmp_path / "client"
    run = subprocess.run([sys.executable, str(DOCS / "comfy_client.py"), "--server", server.url,
                          "--workflow", str(DOCS / "text_to_image.json"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    paths = [Path(p) for p in run.stdout.split()]
    assert len(paths) == 1 and paths[0].is_file()
    assert np.array_equal(pixels(paths[0]), pixels(cli_png))
    from app.runtime.images import read_metadata

    meta, cli_meta = read_metadata(paths[0]), read_metadata(cli_png)
    for key in ("prompt", "seed", "steps", "guidance", "width", "height", "bundle_sha256", "backend", "precision"):
        assert meta[key] == cli_meta[key], key
    records = [json.loads(line) for line in server.server.config.audit_path.read_text().splitlines()]
    assert any(r.get("source") == "api" and r["output"].endswith(paths[0].name) and r["seed"] == 7 for r in records)


def test_websocket_client_sees_progress_in_comfyui_order(server, tmp_path):
    ws_client = load_doc_module("ws_client")
    seen: list[dict] = []
    graph = t2i_graph(seed=11, steps=3, batch=2)
    prompt_id, paths = asyncio.run(ws_client.run(server.url, graph, str(tmp_path), on_message=seen.append))
    mine = [m for m in seen if m["data"].get("prompt_id") == prompt_id]
    kinds = [m["type"] for m in mine]
    assert seen[0]["type"] == "status" and "queue_remaining" in seen[0]["data"]["status"]["exec_info"]
    assert kinds[0] == "execution_start" and kinds[-1] == "executing" and mine[-1]["data"]["node"] is None
    assert kinds.index("executed") < kinds.index("execution_success")
    progress = [m["data"] for m in mine if m["type"] == "progress"]
    assert [p["value"] for p in progress] == list(range(1, 7)) and {p["max"] for p in progress} == {6}
    assert {p["node"] for p in progress} == {"3"}
    executed = next(m["data"] for m in mine if m["type"] == "executed")
    assert executed["node"] == "9" and len(executed["output"]["images"]) == 2 == len(paths)
    a, b = (pixels(Path(p)) for p in paths)
    assert not np.array_equal(a, b)  # seeds 11 and 12


def test_compact_node_draws_count_seeds_into_a_subfolder(server, cli_png):
    graph = json.loads((DOCS / "edgegen_generate.json").read_text())
    r = requests.post(f"{server.url}/prompt", json={"prompt": graph}, timeout=30)
    assert r.status_code == 200, r.text
    entry = wait_history(server.url, r.json()["prompt_id"])
    assert entry["status"] == {**entry["status"], "status_str": "success", "completed": True}
    images = entry["outputs"]["1"]["images"]
    assert [i["subfolder"] for i in images] == ["compact", "compact"]
    first = requests.get(f"{server.url}/view", params=images[0], timeout=30)
    assert first.headers["Content-Type"] == "image/png"
    assert np.array_equal(pixels(first.content), pixels(cli_png))  # seed 7 as the CLI; the second is seed 8


def test_queue_delete_and_interrupt(server):
    """A long job runs; the queue shows it and two pending; one pending is deleted; /interrupt stops the
    running one (history says so), and the remaining pending job still completes."""
    import aiohttp

    async def scenario():
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{server.url}/ws?clientId=q1") as ws:
            ids = []
            for graph in (t2i_graph(seed=1, steps=400), t2i_graph(seed=2, steps=1), t2i_graph(seed=3, steps=1)):
                async with http.post(f"{server.url}/prompt", json={"prompt": graph, "client_id": "q1"}) as r:
                    ids.append((await r.json())["prompt_id"])
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] == "progress" and m["data"]["prompt_id"] == ids[0]:
                    break
            async with http.get(f"{server.url}/queue") as r:
                q = await r.json()
            async with http.post(f"{server.url}/queue", json={"delete": [ids[1]]}) as r:
                assert (await r.json())["deleted"] == 1
            async with http.post(f"{server.url}/interrupt", json={}) as r:
                assert (await r.json())["interrupted"] is True
            async for msg in ws:
                m = json.loads(msg.data)
                if m["type"] == "execution_interrupted":
                    assert m["data"]["prompt_id"] == ids[0]
                    break
            return ids, q

    ids, q = asyncio.run(scenario())
    assert [item[1] for item in q["queue_running"]] == [ids[0]]
    assert [item[1] for item in q["queue_pending"]] == ids[1:]
    assert q["queue_running"][0][4] == ["9"]  # outputs_to_execute, as ComfyUI lists it
    stopped = wait_history(server.url, ids[0])
    assert stopped["status"]["status_str"] == "error" and not stopped["status"]["completed"]
    assert stopped["status"]["messages"][-1][0] == "execution_interrupted"
    assert wait_history(server.url, ids[2])["status"]["completed"]
    assert requests.get(f"{server.url}/history/{ids[1]}", timeout=30).json() == {}  # deleted before it ran
    assert ids[1] not in requests.get(f"{server.url}/history", timeout=30).json()


def _post(server, body, **kw):
    return requests.post(f"{server.url}/prompt", timeout=30, **({"json": body} if body is not None else {}), **kw)


def test_invalid_graphs_get_comfyui_error_shapes(server):
    r = _post(server, None, data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_prompt"

    r = _post(server, {"prompt": {"1": {"class_type": "CLIPTextEncode", "inputs": {"text": "x"}}}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "prompt_no_outputs"

    g = t2i_graph()
    g["20"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x.pth"}}
    body = _post(server, {"prompt": g}).json()
    assert body["error"]["type"] == "invalid_prompt"  # as ComfyUI answers a node type it lacks
    assert "UpscaleModelLoader" in body["error"]["message"] and body["error"]["details"].startswith("Node ID '#20'")
    err = body["node_errors"]["20"]  # and which node, with what to use instead (ComfyUI sends none)
    assert err["class_type"] == "UpscaleModelLoader" and "not supported" in err["errors"][0]["message"]
    assert set(err["errors"][0]) == {"type", "message", "details", "extra_info"}

    body = _post(server, {"prompt": t2i_graph(ckpt="no-such-bundle")}).json()
    assert "not served here" in body["node_errors"]["4"]["errors"][0]["message"]
    assert "demo" in body["node_errors"]["4"]["errors"][0]["details"]
    assert body["node_errors"]["4"]["dependent_outputs"] == ["9"]

    body = _post(server, {"prompt": t2i_graph(width=100)}).json()
    assert "multiple of 16" in body["node_errors"]["5"]["errors"][0]["message"]

    g = t2i_graph()
    g["10"] = {"class_type": "LoraLoader", "inputs": {"lora_name": "brand.safetensors", "strength_model": 0.8,
                                                       "strength_clip": 0.8, "model": ["4", 0], "clip": ["4", 1]}}
    g["3"]["inputs"]["model"] = ["10", 0]
    body = _post(server, {"prompt": g}).json()
    msg = body["node_errors"]["10"]["errors"][0]
    assert "not fused" in msg["message"] and "--lora brand.safetensors:0.8" in msg["details"]

    g = t2i_graph()
    g["3"]["inputs"]["positive"] = ["99", 0]
    assert "not in the graph" in _post(server, {"prompt": g}).json()["node_errors"]["3"]["errors"][0]["message"]

    g = t2i_graph()
    g["9"]["inputs"]["filename_prefix"] = "../outside"
    assert _post(server, {"prompt": g}).json()["node_errors"]["9"]["errors"][0]["message"].startswith("filename_prefix")


def test_reference_images_are_uploaded_and_checked(server):
    png = io.BytesIO()
    Image.new("RGB", (128, 128), (200, 30, 30)).save(png, format="PNG")
    up = requests.post(f"{server.url}/upload/image", files={"image": ("style.png", png.getvalue(), "image/png")},
                       data={"subfolder": "refs"}, timeout=30)
    assert up.status_code == 200 and up.json() == {"name": "style.png", "subfolder": "refs", "type": "input"}
    again = requests.post(f"{server.url}/upload/image", files={"image": ("style.png", png.getvalue())},
                          data={"subfolder": "refs"}, timeout=30)
    assert again.json()["name"] == "style (1).png"  # no silent overwrite, as ComfyUI
    view = requests.get(f"{server.url}/view", params={"filename": "style.png", "subfolder": "refs", "type": "input"},
                        timeout=30)
    assert view.status_code == 200 and view.content == png.getvalue()

    graph = json.loads((DOCS / "edgegen_generate.json").read_text())
    graph["1"]["inputs"].update(images=["refs/style.png"], count=1)
    r = _post(server, {"prompt": graph})
    from app.server.graph import request_fields

    if "images" in request_fields():  # accepted, or refused up front by the runtime's own check (no encoder)
        assert r.status_code == 200 or "cannot be used" in r.json()["node_errors"]["1"]["errors"][0]["message"]
        if r.status_code == 200:
            wait_history(server.url, r.json()["prompt_id"])
    else:
        assert r.status_code == 400
        assert "newer bundle/runtime" in r.json()["node_errors"]["1"]["errors"][0]["message"]
    graph["1"]["inputs"]["images"] = ["never-uploaded.png"]
    assert "was not uploaded" in _post(server, {"prompt": graph}).json()["node_errors"]["1"]["errors"][0]["message"]


def test_view_and_upload_refuse_paths_outside_their_folder(server, tmp_path):
    cfg = server.server.config
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(secret)
    (cfg.output_dir / "escape").symlink_to(tmp_path, target_is_directory=True)

    def view(**params):
        return requests.get(f"{server.url}/view", params={"type": "output", **params}, timeout=30)

    for params in ({"filename": "../queue.sqlite3"}, {"filename": str(secret)}, {"filename": "queue.sqlite3"},
                   {"filename": "x.png", "type": "elsewhere"}):
        r = view(**params)
        assert r.status_code == 400, (params, r.status_code)  # a malformed name: 400, as ComfyUI answers
        assert r.json()["error"]["message"]
    for params in ({"filename": "x.png", "subfolder": ".."}, {"filename": "x.png", "subfolder": "a/../../.."},
                   {"filename": "secret.png", "subfolder": str(tmp_path)},
                   {"filename": "passwd", "subfolder": "../../etc"}):
        r = view(**params)
        assert r.status_code == 403, (params, r.status_code)  # a subfolder outside the folder: 403, as ComfyUI
        assert r.json()["error"]["message"]
    assert view(filename="secret.png", subfolder="escape").status_code == 403
    assert view(filename="missing.png").status_code == 404

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    for name, sub in (("../evil.png", ""), ("ok.png", "../.."), ("ok.png", "/tmp"), ("a/b.png", "")):
        r = requests.post(f"{server.url}/upload/image", files={"image": (name, png.getvalue())},
                          data={"subfolder": sub}, timeout=30)
        assert r.status_code == 400, (name, sub, r.status_code)
    assert not (cfg.input_dir.parent / "evil.png").exists()
    r = requests.post(f"{server.url}/upload/image", files={"image": ("x.png", b"not an image")}, timeout=30)
    assert r.status_code == 400 and "not an image" in r.json()["error"]["message"]


def test_oversized_bodies_get_413(demo_bundle, tmp_path):
    with start_server(tmp_path, demo_bundle, max_body_bytes=4096, max_upload_bytes=64 * 1024) as s:
        big = {"prompt": t2i_graph(prompt="x" * 8000)}
        r = requests.post(f"{s.url}/prompt", json=big, timeout=30)
        assert r.status_code == 413 and r.json()["error"]["type"] == "body_too_large"
        chunked = requests.post(f"{s.url}/prompt", data=iter([json.dumps(big).encode()]), timeout=30,
                                headers={"Content-Type": "application/json"})  # no Content-Length
        assert chunked.status_code == 413
        r = requests.post(f"{s.url}/upload/image", files={"image": ("big.png", os.urandom(100 * 1024))}, timeout=30)
        assert r.status_code == 413
        assert requests.post(f"{s.url}/prompt", json={"prompt": t2i_graph()}, timeout=30).status_code == 200


def test_token_required_beyond_loopback(demo_bundle, tmp_path):
    """A server configured as for a non-loopback address (require_token) refuses requests without the token."""
    import aiohttp
    from test_server_helpers import server_config

    from app.errors import UsageError
    from app.server.run import Server

    with pytest.raises(UsageError, match="needs a token"):
        Server(server_config(tmp_path / "a", demo_bundle, require_token=True))
    with pytest.raises(UsageError, match="needs a token"):
        Server(server_config(tmp_path / "b", demo_bundle, host="0.0.0.0"))
    token = "t" * 32
    with start_server(tmp_path / "c", demo_bundle, require_token=True, token=token) as s:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": token}):
            r = requests.get(f"{s.url}/queue", headers=headers, timeout=30)
            assert r.status_code == 401 and "token" in r.json()["error"]["details"]
        assert requests.post(f"{s.url}/prompt", json={"prompt": t2i_graph()}, timeout=30).status_code == 401
        assert requests.get(f"{s.url}/queue", headers={"Authorization": f"Bearer {token}"}, timeout=30).ok

        async def ws(url):
            async with aiohttp.ClientSession() as http, http.ws_connect(url) as w:
                return json.loads((await w.receive()).data)["type"]

        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            asyncio.run(ws(f"{s.url}/ws?clientId=x"))
        assert e.value.status == 401
        assert asyncio.run(ws(f"{s.url}/ws?clientId=x&token={token}")) == "status"


def test_foreign_web_origin_refused(server):
    r = requests.get(f"{server.url}/queue", headers={"Origin": "https://evil.example"}, timeout=30)
    assert r.status_code == 403 and "origin" in r.json()["error"]["message"].lower()
    host = server.url.removeprefix("http://")
    assert requests.get(f"{server.url}/queue", headers={"Origin": f"http://{host}"}, timeout=30).ok
    assert "Access-Control-Allow-Origin" not in requests.get(f"{server.url}/queue", timeout=30).headers


def test_system_stats_and_api_prefix(server):
    stats = requests.get(f"{server.url}/system_stats", timeout=30).json()
    assert {"os", "python_version", "ram_total", "ram_free"} <= set(stats["system"])
    from app.planning.devices import read_gpus

    gpus = read_gpus()
    assert len(stats["devices"]) == max(1, len(gpus))  # no GPU: the CPU, as ComfyUI lists a CPU-only machine
    if not gpus:
        assert stats["devices"][0]["type"] == "cpu" and stats["devices"][0]["vram_total"] == stats["system"]["ram_total"]
    for d in stats["devices"]:
        assert {"name", "type", "index", "vram_total", "vram_free", "torch_vram_total", "torch_vram_free"} <= set(d)
    assert requests.get(f"{server.url}/api/queue", timeout=30).json().keys() == {"queue_running", "queue_pending"}
    assert requests.get(f"{server.url}/prompt", timeout=30).json()["exec_info"]["queue_remaining"] >= 0
