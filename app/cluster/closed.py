"""Ray kept closed: what every node's environment carries and how this process joins a cluster.

- Usage statistics off (`RAY_USAGE_STATS_ENABLED=0`). Ray 2.60's API server still sends a "usage disabled"
  report for clusters started with `ray start`, and asks cloud metadata addresses (169.254.169.254,
  metadata.google.internal) whatever the setting; the report URL is pointed at a closed loopback port, and
  the offline guard, installed by `boot/sitecustomize.py` in every Ray Python process, refuses the rest.
- No dashboard (`include_dashboard=False`); every Ray process binds to the node's configured address only
  (`node_ip_address`; loopback in tests), never 0.0.0.0, and the node IP is given, so Ray never probes
  8.8.8.8 to find it.
- Token authentication (`RAY_AUTH_MODE=token`) whenever the cluster spans machines (see docs/CLUSTER.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from app.cluster.guard import BOOT_DIR, ENV_LISTEN, ENV_LOG, ENV_ON

REPO_ROOT = Path(__file__).resolve().parents[2]
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "RAY_USAGE_STATS_REPORT_URL": "http://127.0.0.1:9/",  # discard port: refused on the machine itself
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
    # ONNX Runtime 1.32's native 1DS telemetry looks up mobile.events.data.microsoft.com from C++ (seen with
    # strace in tests/test_cluster.py), out of the Python guard's sight; disable_telemetry_events() does not
    # stop it, this switch does.
    "ORT_DISABLE_TELEMETRY": "1",
}
NAMESPACE = "edgegen"
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps 127.0.0.1 as the node address


def node_env(node_ip: str, network_log: Path | None = None, token_file: Path | None = None) -> dict[str, str]:
    """The environment variables a Ray node (and so every process it starts) runs with."""
    from app import offline
    from app.server.config import is_loopback

    env = {**RAY_ENV, **offline.OFFLINE_ENV, ENV_ON: "1", ENV_LISTEN: node_ip}
    if is_loopback(node_ip):
        # Ray turns 127.0.0.1 into "the machine's address" (found by probing 8.8.8.8, then the host name) unless
        # it believes clusters are off; a loopback cluster must stay on loopback.
        env[LOOPBACK_SWITCH] = "0"
    if network_log is not None:
        env[ENV_LOG] = str(network_log)
    if token_file is not None:
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(Path(token_file).absolute()))
    path = [str(BOOT_DIR), str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(path))  # boot first: its sitecustomize wins
    return env


def apply_node_env(node_ip: str, network_log: Path | None = None, token_file: Path | None = None) -> None:
    """Set the node environment in this process, so the Ray processes it starts inherit it."""
    import sys

    env = node_env(node_ip, network_log, token_file)
    os.environ.update(env)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and LOOPBACK_SWITCH in env:  # Ray read the switch at import: set what it read
        constants.ENABLE_RAY_CLUSTER = False


def connect(address: str, node_ip: str) -> None:
    """Join the cluster at `address` as a driver on this node (whose address in the cluster is `node_ip`)."""
    import ray

    ray.init(address=address, _node_ip_address=node_ip, namespace=NAMESPACE, log_to_driver=False,
             configure_logging=False)
