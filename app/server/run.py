"""Start and stop a server: blocking for `edgegen serve`, in a background thread for tests and `edgegen batch`."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from typing import Any

from aiohttp import web

from app.errors import UsageError
from app.server.app import make_app
from app.server.bundles import BundleIndex
from app.server.config import ServerConfig, is_loopback
from app.server.events import Hub
from app.server.queue import JobQueue
from app.server.worker import Worker

# (queue, resolved config, publish) -> the object running jobs: a Worker, or anything with its start, stop, wake,
# interrupt and running methods (the cluster's pool of replica workers, passed in by the CLI).
MakeWorkers = Callable[[JobQueue, ServerConfig, Callable], Any]


class Server:
    """The queue, the worker and the HTTP site, started and stopped together inside one event loop."""

    def __init__(self, config: ServerConfig, make_workers: MakeWorkers | None = None):
        self.config = config.resolved()
        self.make_workers = make_workers or Worker
        if self.config.require_token and not self.config.token:
            raise UsageError(f"binding to {self.config.host} (not loopback) needs a token: pass --token-file FILE "
                             "holding a long random secret, or bind to 127.0.0.1")
        if not is_loopback(self.config.host):
            from app import offline

            offline.allow_listening_on(self.config.host)  # inbound only; outgoing stays refused
        self.port: int | None = None
        self.requeued: list[str] = []
        self.failed: list[str] = []

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        from app.errors import UsageError
        from app.runtime.images import check_output_folder

        for d, what in ((cfg.output_dir, "--output"), (cfg.input_dir, "uploads")):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create {d} ({e.strerror or e}) for {what}; choose a writable folder") from None
            check_output_folder(d, what)  # before the queue opens: a read-only or full disk is refused now
        self._lock_file = _lock_queue(cfg.db_path)
        self.queue = JobQueue(cfg.db_path, cfg.max_attempts, cfg.history_limit)
        self.requeued, self.failed = self.queue.recover()
        self.hub = Hub(asyncio.get_running_loop())
        self.worker = self.make_workers(self.queue, cfg, self.hub.publish)
        self.bundles = BundleIndex(cfg.bundles, cfg.search_default_engines)
        self.runner = web.AppRunner(make_app(cfg, self.queue, self.worker, self.hub, self.bundles),
                                    access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.host, cfg.port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.worker.start()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        await self.runner.cleanup()
        self.queue.close()
        self._lock_file.close()


def _lock_queue(db_path):
    """One server per queue database: a second one would re-queue jobs the first is running."""
    from pathlib import Path

    path = Path(f"{db_path}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        import fcntl
    except ImportError:  # Windows: no advisory lock; run one server per database
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise UsageError(f"another edgegen server is using the queue {db_path}; stop it, or give this one "
                         "its own --output folder") from None
    return f


def serve(config: ServerConfig, say: Callable[[str], None] = print, make_workers: MakeWorkers | None = None) -> int:
    """Run until SIGINT/SIGTERM; a running job is released back to the queue and resumes on the next start."""

    async def main() -> None:
        server = Server(config, make_workers)
        await server.start()
        cfg = server.config
        if not is_loopback(cfg.host):
            say(f"warning: listening on {cfg.host}, reachable from other machines; every request must carry "
                "the token. Prefer 127.0.0.1 behind an authenticating proxy you control")
        say(f"bundles: {', '.join(server.bundles.names()) or 'none found (pass --bundle DIR)'}")
        say(f"output: {cfg.output_dir}  queue: {cfg.db_path}")
        if server.requeued or server.failed:
            say(f"after restart: {len(server.requeued)} interrupted job(s) re-queued, "
                f"{len(server.failed)} marked failed")
        say(f"edgegen serve: listening on {server.url} (Ctrl+C stops)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
                pass
        await stop.wait()
        say("edgegen serve: stopping (a running job goes back to the queue)")
        await server.stop()

    asyncio.run(main())
    return 0


class ServerThread:
    """A real server on its own event loop in a background thread (tests, in-process `edgegen batch`)."""

    def __init__(self, config: ServerConfig, make_workers: MakeWorkers | None = None):
        self.server = Server(config, make_workers)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="edgegen-server", daemon=True)

    def __enter__(self) -> ServerThread:
        return self if self._thread.is_alive() else self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> ServerThread:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(120)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()
            raise
        return self

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)
            self.loop.close()
