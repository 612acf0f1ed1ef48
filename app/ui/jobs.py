"""One generation job, and the queue that feeds them one at a time to the worker thread."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import QObject, QThread, Signal, Slot
from PySide6.QtGui import QImage

from app.runtime.pipelines import Cancel, GenerationRequest

_ids = itertools.count(1)
_LOG = logging.getLogger("edgegen.ui")


@dataclass
class Job:
    """What to draw, with which model, and where to save it. `cancel` may be set from any thread."""

    bundle_dir: Path
    request: GenerationRequest
    output_dir: Path
    backend: str = "auto"
    id: int = field(default_factory=lambda: next(_ids))
    cancel: Cancel = field(default_factory=Cancel, repr=False)
    state: str = "queued"  # queued | loading | running | done | failed | cancelled
    step: int = 0
    total: int = 0

    def label(self) -> str:
        prompt = self.request.prompt.replace("\n", " ")
        short = prompt if len(prompt) <= 48 else prompt[:47] + "…"
        where = f"step {self.step}/{self.total}" if self.state == "running" and self.total else self.state
        return f"#{self.id} seed {self.request.seed} — {where} — {short}"


@dataclass(frozen=True)
class JobResult:
    """What the worker made: the saved file, its metadata (plus bundle_dir), a gallery thumbnail."""

    path: Path
    meta: dict
    thumbnail: bytes
    timings: dict
    warnings: list[str]
    notes: tuple[str, ...] = ()  # status lines (a reference scaled to the bundle's size)


class JobQueue(QObject):
    """Owns the worker thread. One job runs at a time (one GPU); the rest wait, visible via `jobs()`."""

    changed = Signal()
    started = Signal(object)  # Job
    progress = Signal(object, int, int, float)  # Job, step, total, eta seconds (-1: not known yet)
    preview = Signal(object, int, int, QImage)  # Job, step, total, step preview
    finished = Signal(object, QImage, object)  # Job, image, JobResult
    failed = Signal(object, str)  # Job, message with the fix
    cancelled = Signal(object)  # Job
    model_ready = Signal(str, str, str, str)  # bundle dir, backend description, why this backend, signature
    model_failed = Signal(str, str)  # bundle dir, message
    idle = Signal()

    _run = Signal(object)
    _prepare = Signal(str, str, bool)

    def __init__(self, parent: QObject | None = None, audit=None):
        super().__init__(parent)
        from app.ui.worker import GenerationWorker

        self.current: Job | None = None
        self.pending: list[Job] = []
        self.worker_thread = QThread()
        self.worker_thread.setObjectName("edgegen-generation")
        self.worker = GenerationWorker(audit=audit)
        self.worker.moveToThread(self.worker_thread)
        self.worker_thread.started.connect(self.worker.lower_priority)
        self.worker_thread.finished.connect(self.worker.deleteLater)  # freed in its own thread, not at exit
        self._run.connect(self.worker.run)
        self._prepare.connect(self.worker.prepare)
        self.worker.status.connect(self._on_status)
        self.worker.progress.connect(self._on_progress)
        self.worker.preview.connect(self._on_preview)
        self.worker.finished.connect(self._on_finished)
        self.worker.failed.connect(self._on_failed)
        self.worker.cancelled.connect(self._on_cancelled)
        self.worker.model_ready.connect(self.model_ready)
        self.worker.model_failed.connect(self.model_failed)
        self.worker_thread.start()

    # ----- commands (GUI thread) ----------------------------------------------------------------------
    def enqueue(self, jobs: list[Job]) -> None:
        self.pending.extend(jobs)
        self.changed.emit()
        self._pump()

    def prepare(self, bundle_dir: Path, backend: str, warm: bool = True) -> None:
        """Load a model ahead of the first job (after any running one), so the status bar can say which backend
        and, with `warm`, the first image does not pay for imports, tokenizers and sessions."""
        self.worker.wanted = (str(bundle_dir), backend)
        self._prepare.emit(str(bundle_dir), backend, warm)

    def cancel_current(self) -> bool:
        if self.current is None:
            return False
        self.current.cancel.set()  # the pipeline checks it before each step
        return True

    def remove(self, job_id: int) -> None:
        self.pending = [j for j in self.pending if j.id != job_id]
        self.changed.emit()

    def clear_pending(self) -> None:
        self.pending.clear()
        self.changed.emit()

    def jobs(self) -> list[Job]:
        return ([self.current] if self.current else []) + list(self.pending)

    def busy(self) -> bool:
        return self.current is not None

    def shutdown(self, wait_ms: int = 60_000) -> None:
        self.pending.clear()
        self.worker.stopping.set()
        self.cancel_current()
        self.worker_thread.quit()
        if not self.worker_thread.wait(wait_ms):
            _LOG.warning("generation thread did not stop within %d ms", wait_ms)

    # ----- worker events ------------------------------------------------------------------------------
    def _pump(self) -> None:
        if self.current is not None or not self.pending:
            return
        self.current = self.pending.pop(0)
        self.current.state = "loading"
        self.changed.emit()
        self.started.emit(self.current)
        self._run.emit(self.current)

    def _mine(self, job_id: int) -> Job | None:
        return self.current if self.current is not None and self.current.id == job_id else None

    @Slot(int, str)
    def _on_status(self, job_id: int, state: str) -> None:
        if job := self._mine(job_id):
            job.state = state
            self.changed.emit()

    @Slot(int, int, int, float)
    def _on_progress(self, job_id: int, step: int, total: int, eta: float) -> None:
        if job := self._mine(job_id):
            job.state, job.step, job.total = "running", step, total
            self.changed.emit()
            self.progress.emit(job, step, total, eta)

    @Slot(int, int, int, QImage)
    def _on_preview(self, job_id: int, step: int, total: int, image: QImage) -> None:
        if (job := self._mine(job_id)) and not job.cancel.is_set():
            self.preview.emit(job, step, total, image)

    @Slot(int, QImage, object)
    def _on_finished(self, job_id: int, image: QImage, result: JobResult) -> None:
        if job := self._done(job_id, "done"):
            self.finished.emit(job, image, result)
            self._next()

    @Slot(int, str)
    def _on_failed(self, job_id: int, message: str) -> None:
        if job := self._done(job_id, "failed"):
            self.failed.emit(job, message)
            self._next()

    @Slot(int)
    def _on_cancelled(self, job_id: int) -> None:
        if job := self._done(job_id, "cancelled"):
            self.cancelled.emit(job)
            self._next()

    def _done(self, job_id: int, state: str) -> Job | None:
        job = self._mine(job_id)
        if job is not None:
            job.state = state
            self.current = None
        return job

    def _next(self) -> None:
        self.changed.emit()
        self._pump()
        if self.current is None:
            self.idle.emit()
