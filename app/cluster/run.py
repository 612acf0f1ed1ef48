"""`edgegen serve --cluster ADDRESS`: the server's API and queue, jobs run by one replica per GPU on Ray."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.errors import UsageError

DEFAULT_RETRIES = 2  # a job whose replica dies runs again at most this often, then fails


@dataclass(frozen=True)
class ClusterSettings:
    address: str  # a Ray cluster's GCS address host:port, or "local" (a one-node cluster on loopback)
    node_ip: str | None = None  # this machine's address in the cluster; default: the address's host
    replicas: int | None = None  # default: one per GPU in the cluster; on a cluster with no GPU, one per node
    cpus_per_replica: int = 1  # CPU replicas only (tests, GPU-less sites)
    retries: int = DEFAULT_RETRIES
    token_file: Path | None = None  # Ray token authentication; required beyond loopback
    network_log: Path | None = None

    def resolved(self) -> ClusterSettings:
        from app.server.config import is_loopback

        if self.address == "local":
            return dataclasses.replace(self, node_ip=self.node_ip or "127.0.0.1")
        host, sep, port = self.address.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise UsageError(f"--cluster {self.address}: give the Ray head's address as IP:PORT "
                             "(e.g. 192.168.1.10:6379), or 'local' for this machine's GPUs")
        host = host.strip("[]")
        if host.lower() == "localhost":
            host = "127.0.0.1"
        node_ip = self.node_ip or host
        if not (is_loopback(host) and is_loopback(node_ip)) and self.token_file is None:
            raise UsageError(f"--cluster {self.address} spans machines and needs --cluster-token-file FILE (Ray's "
                             "token authentication; the same file on every node, see docs/CLUSTER.md)")
        if self.retries < 0:
            raise UsageError("--cluster-retries must be 0 or more")
        return dataclasses.replace(self, address=f"{host}:{port}" if ":" not in host else f"[{host}]:{port}",
                                   node_ip=node_ip)


def _check_ray_installed() -> None:
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise UsageError("--cluster needs Ray; install it with: pip install 'edgegen[cluster]'")


def _ray():
    _check_ray_installed()
    import ray

    return ray


def replica_count(settings: ClusterSettings) -> tuple[int, bool]:
    """(replicas, on GPUs?) from the cluster's resources: one per GPU, else one per node (CPU replicas)."""
    ray = _ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        return (min(gpus, settings.replicas) if settings.replicas else gpus), True
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return (settings.replicas or nodes), False


def make_replicas(settings: ClusterSettings, config) -> list:
    """The Ray actors: one per GPU (num_gpus=1), else CPU replicas; restarted by Ray whenever one dies."""
    ray = _ray()
    from app.cluster.replica import Replica

    n, on_gpu = replica_count(settings)
    resources = {"num_gpus": 1} if on_gpu else {"num_cpus": settings.cpus_per_replica}
    cls = ray.remote(Replica).options(**resources, max_restarts=-1, max_task_retries=0, max_concurrency=2,
                                      scheduling_strategy="SPREAD")
    bundles = tuple(str(Path(b).absolute()) for b in config.bundles)
    from app.bundle.loras import library_dir

    library = str(library_dir().absolute())  # the same LoRA library on every replica (a shared folder)
    return [cls.remote(bundles, config.redact_prompts, None, library) for _ in range(n)]


def pool_factory(settings: ClusterSettings, replicas: list | None = None) -> Callable:
    """What the server calls instead of making its one Worker: (queue, config, publish) -> WorkerPool."""
    from app.cluster.dispatch import WorkerPool

    def make(queue, config, publish):
        return WorkerPool(queue, config, publish, replicas if replicas is not None else make_replicas(settings, config))

    return make


def server_config(config, settings: ClusterSettings):
    """The server's config with the cluster's retry bound (a job runs at most retries + 1 times)."""
    return dataclasses.replace(config, max_attempts=settings.retries + 1)


def serve(config, address: str, say: Callable[[str], None] = print, **kw) -> int:
    from app.cluster.closed import apply_node_env, connect
    from app.cluster.local import LocalCluster
    from app.server.run import serve as run_server

    settings = ClusterSettings(address, **kw).resolved()
    _check_ray_installed()  # without importing it: Ray reads its switches at import, after apply_node_env
    local = None
    try:
        if settings.address == "local":
            from app.planning.devices import read_gpus

            gpus = len(read_gpus())
            local = LocalCluster(nodes=1, cpus=max(1, settings.replicas or 1) * settings.cpus_per_replica,
                                 gpus=gpus, network_log=settings.network_log).start()
            address = local.address
        else:
            apply_node_env(settings.node_ip, settings.network_log, settings.token_file)
            address = settings.address
        connect(address, settings.node_ip)
        n, on_gpu = replica_count(settings)
        say(f"cluster {address}: {n} {'GPU' if on_gpu else 'CPU'} replica(s); a job is retried at most "
            f"{settings.retries} time(s) if its replica dies")
        return run_server(server_config(config, settings), say, make_workers=pool_factory(settings))
    except ConnectionError as e:
        raise UsageError(f"--cluster {settings.address}: no Ray cluster answers there ({e}); start it with "
                         "`python -m app.cluster up` (docs/CLUSTER.md)") from None
    finally:
        import ray

        ray.shutdown()
        if local is not None:
            local.shutdown()
