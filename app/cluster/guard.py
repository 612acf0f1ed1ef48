"""The offline guard in a Ray process: edgegen's guard, listening allowed on the node's own address, and every
refused attempt written to the node's network log (JSON lines) so a site can audit each node."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ENV_ON = "EDGEGEN_CLUSTER_GUARD"  # "1": sitecustomize installs the guard in every Python process of the node
ENV_LOG = "EDGEGEN_CLUSTER_NETWORK_LOG"  # where refusals go (default: the per-user log folder)
ENV_LISTEN = "EDGEGEN_CLUSTER_NODE_IP"  # the node's configured address; listening there is allowed
BOOT_DIR = Path(__file__).resolve().parent / "boot"


def network_log_path() -> Path:
    env = os.environ.get(ENV_LOG)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_log_dir("edgegen", appauthor=False)) / "cluster-network.jsonl"


def _sink(message: str) -> None:
    rec = {"time": time.time(), "pid": os.getpid(), "process": " ".join(sys.argv)[:300], "refused": message}
    path = network_log_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:  # one short line per append: no interleaving in practice
        f.write(json.dumps(rec) + "\n")


def install() -> None:
    from app import offline
    from app.server.config import is_loopback

    offline.enforce_offline(log=_sink)
    ip = os.environ.get(ENV_LISTEN)
    if ip and not is_loopback(ip):
        offline.allow_listening_on(ip)


def read_network_log(path: Path | None = None) -> list[dict]:
    path = path or network_log_path()
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
