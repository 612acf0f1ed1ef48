"""Shared by the server tests (no tests here): the demo bundle exported once per session, servers, graphs."""

from __future__ import annotations

import json
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "assets" / "demo-model"
DOCS = ROOT / "docs" / "api"
PROMPT = "a red circle on a blue background"
def server_config(tmp: Path, bundle: Path, **kw):
    from app.server.config import ServerConfig

    return ServerConfig(port=0, bundles=(bundle,), search_default_engines=False, output_dir=tmp / "output",
                        input_dir=tmp / "input", db_path=tmp / "queue.sqlite3", audit_path=tmp / "audit.jsonl", **kw)


def start_server(tmp: Path, bundle: Path, **kw):
    from app.server.run import ServerThread

    return ServerThread(server_config(tmp, bundle, **kw)).start()


def t2i_graph(prompt: str = PROMPT, seed: int = 7, steps: int = 4, batch: int = 1, prefix: str = "ComfyUI",
              ckpt: str = "demo", width: int = 128, height: int = 128) -> dict:
    g = json.loads((DOCS / "text_to_image.json").read_text())
    g["3"]["inputs"].update(seed=seed, steps=steps)
    g["4"]["inputs"]["ckpt_name"] = ckpt
    g["5"]["inputs"].update(width=width, height=height, batch_size=batch)
    g["6"]["inputs"]["text"] = prompt
    g["9"]["inputs"]["filename_prefix"] = prefix
    return g


def wait_history(url: str, prompt_id: str, timeout: float = 120.0, headers=None) -> dict:
    import requests

    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        h = requests.get(f"{url}/history/{prompt_id}", headers=headers or {}, timeout=30).json()
        if prompt_id in h:
            return h[prompt_id]
        time.sleep(delay)
        delay = min(0.5, delay * 1.5)
    raise AssertionError(f"{prompt_id} not finished within {timeout} s")


def rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
