"""The server's side of the cluster: one job thread per replica, all claiming from the server's one SQLite queue.

Each `ReplicaWorker` is the server's `Worker` (same job model, events, history, audit, atomic PNG) with the
generation step sent to its Ray replica. A replica that dies mid-job makes the job `WorkerLost`: the queue
puts it back (the attempt counted) for another replica, or fails it after `max_attempts`; images already
recorded are not drawn again. A replica on a node being drained (`ray drain-node`) finishes its job and takes
no new one. Ray restarts dead replicas (`max_restarts=-1`); their thread waits until it answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from app.errors import EdgegenError, GenerationCancelled
from app.server.worker import Worker, WorkerLost

log = logging.getLogger("edgegen.cluster")


class ReplicaError(EdgegenError):
    """A failure a replica reported as a sentence (bad bundle, bad request): the job fails, no retry."""


@dataclass
class RemoteResult:
    image: object
    meta: dict
    audit: dict
    warnings: list  # the replica's status lines (GenerationResult.notes) first, then its warnings
    request: object
    notes: tuple = ()  # already in `warnings`: the worker reports both the same way


class _RemotePipeline:
    def __init__(self, worker: ReplicaWorker, name: str, wanted: dict):
        self.worker, self.name, self.wanted = worker, name, wanted

    def generate(self, request, on_step=None, cancel=None) -> RemoteResult:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        w = self.worker
        from app.cluster.replica import input_files

        refs = input_files(request) or None
        cancelled_sent = False
        try:
            for ref in w.replica.generate.remote(self.name, self.wanted, request, refs):
                if cancel is not None and cancel.is_set() and not cancelled_sent:
                    w.replica.cancel.remote()
                    cancelled_sent = True
                item = ray.get(ref)
                kind = item[0]
                if kind == "progress" and on_step is not None:
                    on_step(item[1], item[2])
                elif kind == "done":
                    _, image, meta, audit, warnings = item
                    return RemoteResult(image, meta, audit, warnings, request)
                elif kind == "cancelled":
                    raise GenerationCancelled("interrupted")
                elif kind == "error":
                    raise ReplicaError(item[2])
        except (RayActorError, ActorUnavailableError) as e:
            w.lost(e)
            raise WorkerLost(f"replica {w.index} ({w.where()}) stopped while generating") from None
        raise WorkerLost(f"replica {w.index} ({w.where()}) ended the job without an image")


class _RemoteLoaded:
    """Stands in for worker.Loaded: the pipeline lives on the replica."""

    def __init__(self, worker: ReplicaWorker, bundle_dir: str):
        from app.bundle.manifest import read_manifest
        from app.cluster.bundles import identity

        manifest, _ = read_manifest(Path(bundle_dir))  # the server's copy: which model the client asked for
        self.pipeline = _RemotePipeline(worker, Path(bundle_dir).name, identity(manifest))


class ReplicaWorker(Worker):
    def __init__(self, queue, config, publish, replica, index: int, pool: WorkerPool):
        super().__init__(queue, config, publish, name=f"edgegen-replica-{index}")
        self.replica, self.index, self.pool = replica, index, pool
        self.info: dict | None = None  # pid, node_id, gpu, guard: refreshed after each (re)start
        self._down_since: float | None = time.monotonic()

    def where(self) -> str:
        i = self.info or {}
        return f"pid {i.get('pid', '?')} on node {str(i.get('node_id', '?'))[:8]}, {i.get('gpu', '?')}"

    def lost(self, err: Exception) -> None:
        log.warning("replica %d (%s) lost: %s", self.index, self.where(), type(err).__name__)
        self._down_since = time.monotonic()

    def ready(self) -> bool:
        """Claim jobs only while the replica answers and its node is not being drained."""
        if self._down_since is not None:
            import ray

            try:
                self.info = ray.get(self.replica.info.remote(), timeout=self.pool.ping_timeout)
            except Exception:  # noqa: BLE001 - still starting or restarting: ask again later
                return False
            if not self.info.get("guard"):
                log.error("replica %d runs without the offline guard; not using it", self.index)
                return False
            self._down_since = None
            log.info("replica %d ready: %s", self.index, self.where())
        return not self.pool.draining(self.info.get("node_id"))

    def _pipeline(self, bundle_dir: str):
        return _RemoteLoaded(self, bundle_dir)

    def _save(self, job, loaded, result: RemoteResult, path: Path) -> None:
        from app.runtime.audit import AuditLog
        from app.runtime.images import save_png

        save_png(path, result.image, result.meta)  # atomic, on the server's disk: only now is the image done
        if self._audit is None:
            self._audit = AuditLog(self.config.audit_path, redact_prompts=self.config.redact_prompts)
        r = result.request
        self._audit.record(**result.audit, output=str(path.absolute()), prompt=r.prompt,
                           negative_prompt=r.negative_prompt, source="api", prompt_id=job.id,
                           client_id=job.client_id)


class WorkerPool:
    """The object the server drives like its one Worker (start, stop, wake, interrupt, running)."""

    def __init__(self, queue, config, publish, replicas: list, ping_timeout: float = 2.0, drain_poll_s: float = 0.0):
        self.ping_timeout, self.drain_poll_s = ping_timeout, drain_poll_s
        self.workers = [ReplicaWorker(queue, config, publish, r, i, self) for i, r in enumerate(replicas)]
        self._draining: set[str] = set()
        self._drain_checked = 0.0
        self._lock = threading.Lock()

    @property
    def jobs_run(self) -> int:
        return sum(w.jobs_run for w in self.workers)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def is_alive(self) -> bool:
        return any(w.is_alive() for w in self.workers)

    def stop(self, timeout: float = 30.0) -> None:
        for w in self.workers:
            w._stopping.set()
            w.interrupt()
            w.wake()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.is_alive():
                w.join(max(0.1, deadline - time.monotonic()))

    def wake(self) -> None:
        for w in self.workers:
            w.wake()

    def interrupt(self, prompt_id: str | None = None) -> bool:
        return any([w.interrupt(prompt_id) for w in self.workers])  # noqa: C419 - every worker, not the first

    def running(self) -> str | None:
        return next((r for w in self.workers if (r := w.running())), None)

    def draining(self, node_id: str | None) -> bool:
        """Whether Ray is draining this node (asked of the GCS before each claim unless drain_poll_s caches it)."""
        now = time.monotonic()
        with self._lock:
            if now - self._drain_checked >= self.drain_poll_s:
                self._drain_checked = now
                try:
                    from ray._private.state import state

                    self._draining = set(state.get_draining_nodes())
                except Exception:  # noqa: BLE001 - an older Ray without the call: nothing is draining
                    self._draining = set()
            return node_id in self._draining
