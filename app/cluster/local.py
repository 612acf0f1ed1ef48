"""A Ray cluster on this machine, on loopback only: a head and worker nodes (tests, benchmark, `--cluster local`)."""

from __future__ import annotations

from pathlib import Path

from app.cluster.closed import apply_node_env

LOOPBACK = "127.0.0.1"


class LocalCluster:
    """`nodes` Ray nodes (the first is the head) with `cpus` and `gpus` each, every process on 127.0.0.1.

    Starting it sets the node environment (closed.node_env) in this process, which its Ray processes inherit;
    `shutdown()` stops exactly the processes it started."""

    def __init__(self, nodes: int = 1, cpus: int = 1, gpus: int = 0, network_log: Path | None = None):
        self.nodes, self.cpus, self.gpus, self.network_log = nodes, cpus, gpus, network_log
        self._cluster = None

    @property
    def address(self) -> str:
        return self._cluster.address

    def start(self) -> LocalCluster:
        from ray.cluster_utils import Cluster

        apply_node_env(LOOPBACK, self.network_log)
        args = {"num_cpus": self.cpus, "num_gpus": self.gpus, "node_ip_address": LOOPBACK}
        self._cluster = Cluster(initialize_head=True, head_node_args={
            **args, "include_dashboard": False, "dashboard_host": LOOPBACK})
        for _ in range(self.nodes - 1):
            self._cluster.add_node(**args)
        self._cluster.wait_for_nodes()
        return self

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None
