"""`python -m app.cluster up|down`: start or stop this workstation's Ray node with edgegen's closed settings.

    up --head --node-ip 192.168.1.10 --token-file /etc/edgegen/ray-token          (the head, once)
    up --join 192.168.1.10:6379 --node-ip 192.168.1.11 --token-file /etc/edgegen/ray-token   (each other)
    down                                                                        (stops this node's Ray)

Fixed ports (open them between the cluster's machines only; docs/CLUSTER.md has the table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

PORTS = {"gcs": 6379, "node_manager": 6380, "object_manager": 6381, "runtime_env_agent": 6382,
         "dashboard_agent_grpc": 6383, "dashboard_agent_http": 6384, "metrics_export": 6385,
         "min_worker": 11000, "max_worker": 11999}


def ray_start_command(head: bool, join: str | None, node_ip: str, ports: dict = PORTS) -> list[str]:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    cmd = [ray, "start", f"--node-ip-address={node_ip}", "--disable-usage-stats", "--include-dashboard=false",
           f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
           f"--runtime-env-agent-port={ports['runtime_env_agent']}",
           f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
           f"--dashboard-agent-listen-port={ports['dashboard_agent_http']}",
           f"--metrics-export-port={ports['metrics_export']}",
           f"--min-worker-port={ports['min_worker']}", f"--max-worker-port={ports['max_worker']}"]
    if head:
        cmd += ["--head", f"--port={ports['gcs']}", f"--dashboard-host={node_ip}"]
    else:
        cmd += [f"--address={join}"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.cluster", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    role = up.add_mutually_exclusive_group(required=True)
    role.add_argument("--head", action="store_true")
    role.add_argument("--join", metavar="HEAD_IP:PORT")
    up.add_argument("--node-ip", required=True, help="this machine's address on the cluster's network")
    up.add_argument("--token-file", type=Path, help="Ray token authentication (required beyond loopback)")
    up.add_argument("--network-log", type=Path, help="where this node logs refused network attempts")
    sub.add_parser("down")
    args = ap.parse_args(argv)

    from app.cluster.closed import node_env
    from app.server.config import is_loopback

    if args.cmd == "down":
        ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
        os.execvp(ray, [ray, "stop"])
    if not is_loopback(args.node_ip) and args.token_file is None:
        print("python -m app.cluster: error: a node beyond loopback needs --token-file FILE (the same file on "
              "every node; see docs/CLUSTER.md)", file=sys.stderr)
        return 2
    env = {**os.environ, **node_env(args.node_ip, args.network_log, args.token_file)}
    cmd = ray_start_command(args.head, args.join, args.node_ip)
    os.execvpe(cmd[0], cmd, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
