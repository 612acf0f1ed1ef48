"""Real ComfyUI client libraries from PyPI, unchanged, against `edgegen serve` on loopback.

Each library is driven only through its own public API: it queues the graph, waits in its own way (WebSocket
messages, /queue and /history look-ups) and fetches the PNG through /view. A library that is not installed
skips its tests (they are in the `test` extra):

- comfy-api-simplified (requests + websockets): POST /prompt with a client_id, then /ws until `status` with
  queue_remaining 0 or `executing` node null for its prompt, then /history/{id} and /view; POST /upload/image;
  GET /system_stats, /object_info/{node}, /queue.
- comfyui-utils (aiohttp): POST /prompt, then /ws; on every `status` GET /queue (and /history when its prompt
  is in neither list), `executing` node ids as ints, `progress`, and the first `executed` as the result;
  /view with the image entry as the query.
- comfy-ui-client (websocket-client + urllib/requests; not in the extra, see its section): POST /prompt, then
  /ws; on `status` GET /queue (and GET /history to find a finished prompt by its graph), `executing` node null
  for its prompt as the end, then /history/{id} and /view; POST /upload/image, POST /history (delete).

"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import uuid
from urllib.parse import urlparse

import pytest
import requests
from PIL import Image
from test_server_helpers import start_server, t2i_graph, wait_history

pytest.importorskip("aiohttp")

STEPS = 2
TITLES = {"3": "KSampler", "4": "Load Checkpoint", "5": "Empty Latent Image", "6": "Positive Prompt",
          "7": "Negative Prompt", "8": "VAE Decode", "9": "Save Image"}
@pytest.fixture(scope="module")
def server(demo_bundle, tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("comfy-clients"), demo_bundle) as s:
        yield s


@pytest.fixture(scope="module")
def size(demo_bundle) -> int:
    """The demo bundle's smallest size: the cheapest image it draws."""
    return json.loads((demo_bundle / "manifest.json").read_text())["size_range"]["min"]


def api_graph(size: int, seed: int = 7, steps: int = STEPS, prefix: str = "clients") -> dict:
    """docs/api/text_to_image.json as ComfyUI's "Save (API format)" writes it, each node with a _meta title."""
    g = t2i_graph(seed=seed, steps=steps, width=size, height=size, prefix=prefix)
    for node, title in TITLES.items():
        g[node]["_meta"] = {"title": title}
    return g


def with_reference(g: dict, image: str) -> dict:
    """FLUX.2 Klein reference editing: LoadImage -> VAEEncode -> ReferenceLatent on the positive prompt."""
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": image}, "_meta": {"title": "Load Image"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]},
               "_meta": {"title": "VAE Encode"}}
    g["12"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["11", 0]},
               "_meta": {"title": "ReferenceLatent"}}
    g["3"]["inputs"]["positive"] = ["12", 0]
    return g


def bounded(fn, *args, timeout: float = 120.0):
    """fn(*args) on a daemon thread: a library that waits forever for a message fails the test instead of
    hanging the run (the server's shutdown closes its socket afterwards)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{getattr(fn, '__qualname__', fn)} did not return within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def assert_png(data: bytes, size: int) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.size == (size, size)
        im.load()


def blocker(server, size: int) -> str:
    """A longer job from another client, queued first, so the library's prompt waits behind it (its socket is
    then connected before its prompt starts, as for any client of a busy server)."""
    r = requests.post(f"{server.url}/prompt", timeout=30, json={
        "prompt": api_graph(size, seed=99, steps=40, prefix="blocker"), "client_id": str(uuid.uuid4())})
    assert r.status_code == 200, r.text
    return r.json()["prompt_id"]


def drain(server) -> None:
    """Every job finished before the next test starts (a failed library may leave its prompt queued)."""
    q = requests.get(f"{server.url}/queue", timeout=30).json()
    for item in q["queue_running"] + q["queue_pending"]:
        wait_history(server.url, item[1])


# ----- comfy-api-simplified --------------------------------------------------------------------------------
# Its wait (queue_prompt_and_wait) returns at the first `status` whose queue_remaining is 0, so it needs the
# running prompt counted, as ComfyUI counts it (PromptQueue.get_tasks_remaining = pending + running). The
# end-to-end tests queue behind another client's job, so that the start-of-job `status` is always seen.

@pytest.fixture
def simplified(server):
    lib = pytest.importorskip("comfy_api_simplified")
    yield lib, lib.ComfyApiWrapper(server.url)
    drain(server)


def test_comfy_api_simplified_endpoints(simplified, size, server, tmp_path):
    """Every call but its WebSocket wait: stats, node info, embeddings, upload and view, queue position,
    interrupt, history and the image by its history entry."""
    lib, api = simplified
    assert "system" in api.get_system_stats()
    assert "KSampler" in api.get_object_info("KSampler")
    assert api.get_embeddings() == []
    ref = tmp_path / "reference.png"
    Image.new("RGB", (size, size), (200, 30, 30)).save(ref)
    up = api.upload_image(ref)  # the library's default subfolder, "default_upload_folder"
    assert up == {"name": "reference.png", "subfolder": "default_upload_folder", "type": "input"}
    assert api.get_image(up["name"], up["subfolder"], up["type"]) == ref.read_bytes()

    first = blocker(server, size)
    wf = lib.ComfyWorkflowWrapper(with_reference(api_graph(size, seed=9), f"{up['subfolder']}/{up['name']}"))
    mine = api.queue_prompt(wf)["prompt_id"]
    assert api.get_queue_size_before(mine) in (1, 2)  # 1 once the other job is running, 2 while it waits
    assert api.get_queue_size_before(first) in (0, 1)
    wait_history(server.url, first)
    wait_history(server.url, mine)
    entry = api.get_history(mine)[mine]["outputs"][wf.get_node_id("Save Image")]["images"][0]
    assert_png(api.get_image(entry["filename"], entry["subfolder"], entry["type"]), size)
    with pytest.raises(ValueError):
        api.get_queue_size_before(mine)  # finished: in neither list

    other = blocker(server, size)
    deadline = time.monotonic() + 60
    while api.get_queue_size_before(other) != 0:  # 0: running
        assert time.monotonic() < deadline, "the other job never started"
        time.sleep(0.01)
    api.interrupt()  # stops the running job
    assert wait_history(server.url, other)["status"]["status_str"] == "error"


def test_comfy_api_simplified_text_to_image(simplified, size, server):
    lib, api = simplified
    wf = lib.ComfyWorkflowWrapper(api_graph(size))
    wf.set_node_param("Positive Prompt", "text", "a green square")
    wf.set_node_param("KSampler", "seed", 11)
    first = blocker(server, size)
    images = bounded(api.queue_and_wait_images, wf, "Save Image")
    assert wait_history(server.url, first)["status"]["completed"]
    assert len(images) == 1
    (name, data), = images.items()
    assert name.startswith("clients_") and name.endswith(".png")
    assert_png(data, size)


def test_comfy_api_simplified_upload_and_reference_edit(simplified, size, server, tmp_path):
    lib, api = simplified
    ref = tmp_path / "edit.png"
    Image.new("RGB", (size, size), (30, 30, 200)).save(ref)
    up = api.upload_image(ref, subfolder="edits")
    wf = lib.ComfyWorkflowWrapper(with_reference(api_graph(size, seed=3), f"{up['subfolder']}/{up['name']}"))
    first = blocker(server, size)
    images = bounded(api.queue_and_wait_images, wf, "Save Image")
    assert wait_history(server.url, first)["status"]["completed"]
    assert len(images) == 1
    assert_png(next(iter(images.values())), size)


# ----- comfyui-utils ---------------------------------------------------------------------------------------

@pytest.fixture
def comfyui_utils(server):
    comfy = pytest.importorskip("comfyui_utils.comfy")
    yield comfy, comfy.ComfyAPI(urlparse(server.url).netloc)  # "host:port"; it adds http:// and ws://
    drain(server)


def run_comfyui_utils(comfy, api, prompt: dict) -> dict:
    seen = {"positions": [], "progress": [], "outputs": None, "cached": None}

    class Callbacks(comfy.Callbacks):
        async def queue_position(self, position):
            seen["positions"].append(position)

        async def in_progress(self, node_id, progress, total):
            seen["progress"].append((node_id, progress, total))

        async def completed(self, outputs, cached):
            seen["outputs"], seen["cached"] = outputs, cached

    async def go():
        await asyncio.wait_for(api.submit(prompt, Callbacks()), 120)
        assert seen["outputs"] is not None, seen
        chunks = []

        async def keep(f):
            chunks.append(f.read())

        await api.fetch(seen["outputs"]["images"][0], keep)  # the image entry {filename, subfolder, type}
        seen["png"] = chunks[0]

    bounded(asyncio.run, go())
    return seen


def test_comfyui_utils_submit_and_fetch(comfyui_utils, size):
    comfy, api = comfyui_utils
    seen = run_comfyui_utils(comfy, api, api_graph(size, seed=21))
    assert_png(seen["png"], size)
    # Either it saw its prompt run (`executed`), or it had finished before the socket opened and the library
    # found it in /history by comparing the stored prompt with the one it sent.
    assert seen["cached"] in (True, False)


def test_comfyui_utils_follows_progress_behind_another_job(comfyui_utils, size, server):
    comfy, api = comfyui_utils
    first = blocker(server, size)
    seen = run_comfyui_utils(comfy, api, api_graph(size, seed=23))
    assert wait_history(server.url, first)["status"]["completed"]
    assert seen["cached"] is False  # it watched its prompt run and took the `executed` message
    assert 1 in seen["positions"] and 0 in seen["positions"]  # behind the other job, then running
    assert (3, STEPS, STEPS) in seen["progress"]  # KSampler's last step, node id as ComfyUI's int
    assert_png(seen["png"], size)


# ----- comfy-ui-client -------------------------------------------------------------------------------------
# Not in the `test` extra: its wheel also installs a top-level `tests` package into site-packages, which then
# shadows this folder for `from tests.x import ...` (tests/test_device_pipeline.py and others). To run these:
#   pip install --no-deps --target DIR comfy-ui-client==0.0.1.10 websocket-client==1.9.2
#   PYTHONPATH=DIR python -m pytest tests/test_comfy_clients.py

@pytest.fixture
def comfy_ui_client(server):
    client = pytest.importorskip("comfy_ui_client.client")
    types = pytest.importorskip("comfy_ui_client.type")
    yield client.ComfyUIClient, types.ImageRef, urlparse(server.url).netloc  # "host:port", as it expects
    drain(server)


def only_png(outputs: dict) -> bytes:
    """get_outputs' {"images": {node: {type: {subfolder: {filename: bytes}}}}} for one SaveImage image."""
    (node, by_type), = outputs["images"].items()
    assert node == "9"
    (_, by_name), = by_type["output"].items()
    (_, data), = by_name.items()
    return data


def test_comfy_ui_client_upload_and_outputs(comfy_ui_client, size, tmp_path):
    Client, ImageRef, address = comfy_ui_client
    c = Client(address)
    assert "system" in c.get_system_stats() and c.get_embeddings() == []
    assert c.get_prompt() == {"exec_info": {"queue_remaining": 0}}
    ref = tmp_path / "ref.png"
    Image.new("RGB", (size, size), (30, 200, 30)).save(ref)
    assert c.upload_image(ImageRef("ref.png", subfolder="cuc", type="input"), ref) == {
        "name": "ref.png", "subfolder": "cuc", "type": "input"}
    assert_png(only_png(bounded(c.get_outputs, api_graph(size, seed=31))), size)
    c = Client(address)  # get_outputs closes its socket
    edit = with_reference(api_graph(size, seed=32), "cuc/ref.png")
    assert_png(only_png(bounded(c.get_outputs, edit)), size)


def test_comfy_ui_client_behind_another_job_and_history(comfy_ui_client, size, server):
    Client, _, address = comfy_ui_client
    first = blocker(server, size)
    c = Client(address)
    remaining = []
    out = bounded(c.get_outputs, api_graph(size, seed=33), lambda m: remaining.append(
        m["data"]["status"]["exec_info"]["queue_remaining"]))
    assert_png(only_png(out), size)
    assert remaining[0] == 2  # its prompt and the other job; it waits for `executing` null, not for 0
    wait_history(server.url, first)
    c.delete_history([first])
    assert first not in c.get_history(None)
