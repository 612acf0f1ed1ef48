"""The generation worker: lives in its own QThread, runs the Qt-free runtime, emits data and never touches widgets."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PySide6.QtCore import QObject, Signal, Slot
from PySide6.QtGui import QImage

from app.errors import EdgegenError, GenerationCancelled

_LOG = logging.getLogger("edgegen.ui")


@dataclass
class Loaded:
    """A verified bundle with its backend and pipeline, kept between jobs so the model loads once."""

    key: tuple[str, str]
    bundle: object
    backend: object
    reason: str
    pipeline: object

    def summary(self) -> tuple[str, str, str, str]:
        """What model_ready carries: bundle dir, backend description, why this backend, signature state."""
        sig = getattr(self.bundle, "signature", None)
        return (str(self.bundle.root), self.backend.describe(), self.reason,
                sig.describe() if sig is not None else "")


def to_qimage(image) -> QImage:
    """HxWx3 uint8 array -> a QImage that owns its pixels (safe to hand to another thread)."""
    import numpy as np

    image = np.ascontiguousarray(image)
    h, w, _ = image.shape
    return QImage(image.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()


def output_path(folder: Path, seed: int) -> Path:
    """<folder>/edgegen-YYYYMMDD-HHMMSS-<seed>.png, with -2, -3… if taken."""
    stem = f"edgegen-{datetime.now():%Y%m%d-%H%M%S}-{seed}"
    path = folder / f"{stem}.png"
    n = 2
    while path.exists():
        path = folder / f"{stem}-{n}.png"
        n += 1
    return path


class GenerationWorker(QObject):
    """Runs one job at a time in the thread it was moved to; the JobQueue wires its signals."""

    status = Signal(int, str)  # job id, "loading" | "running"
    progress = Signal(int, int, int, float)  # job id, step, total, eta seconds (-1: not known yet)
    preview = Signal(int, int, int, QImage)  # job id, step, total, the denoised estimate (app/runtime/previews.py)
    finished = Signal(int, QImage, object)  # job id, image, JobResult
    failed = Signal(int, str)  # job id, message with the fix
    cancelled = Signal(int)
    model_ready = Signal(str, str, str, str)  # bundle dir, backend description, reason, signature state
    model_failed = Signal(str, str)

    def __init__(self, audit=None):
        super().__init__()
        self.audit = audit  # an AuditLog, or None for the default one
        self.loaded: Loaded | None = None
        # Set from the GUI thread: the model the user wants now (older prepare requests are skipped), and
        # whether the app is closing (warm-up stops between components instead of finishing).
        self.wanted: tuple[str, str] | None = None
        self.stopping = threading.Event()

    @Slot()
    def lower_priority(self) -> None:
        """Run generation a little below the GUI, so on a busy CPU the window still answers at once.

        Linux applies nice per thread, and the thread pools ONNX Runtime and torch start from this thread
        inherit it; elsewhere this is a no-op."""
        nice = int(os.environ.get("EDGEGEN_WORKER_NICE", "5"))
        if nice and hasattr(os, "setpriority") and sys.platform.startswith("linux"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError:
                pass

    # ----- model ------------------------------------------------------------------------------------
    def _is_loaded(self, bundle_dir: str, backend: str) -> bool:
        return self.loaded is not None and self.loaded.key == (str(Path(bundle_dir).resolve()), backend)

    def _load(self, bundle_dir: str, backend: str) -> Loaded:
        key = (str(Path(bundle_dir).resolve()), backend)
        if self._is_loaded(bundle_dir, backend):
            return self.loaded
        from app.bundle.manifest import load_bundle
        from app.runtime.backend import make_backend
        from app.runtime.pipelines import make_pipeline

        self.loaded = None  # drop the previous model first: one model in memory at a time
        bundle = load_bundle(Path(bundle_dir))
        be, reason = make_backend(bundle, backend)
        self.loaded = Loaded(key, bundle, be, reason, make_pipeline(bundle, be))
        return self.loaded

    def _warm(self, loaded: Loaded) -> None:
        """One throw-away step at the smallest size: every import, tokenizer, template and session the first
        real job would pay for, done while the window says "loading" (some of it holds the GIL for hundreds
        of ms, which would freeze the window mid-generation); it also proves the model runs."""
        from app.runtime.pipelines import Cancel, GenerationRequest

        smallest = loaded.bundle.manifest["size_range"]["min"]
        cancel = Cancel()
        # ONNX Runtime opens sessions lazily; opening them one by one here lets closing the app stop between them.
        open_session = getattr(loaded.backend, "session", None)
        for component in loaded.bundle.components() if callable(open_session) else ():
            if self.stopping.is_set():
                return
            open_session(component)
        if self.stopping.is_set():
            return
        try:
            loaded.pipeline.generate(GenerationRequest("warm-up", steps=1, width=smallest, height=smallest),
                                     on_step=lambda *_: self.stopping.is_set() and cancel.set(), cancel=cancel)
        except GenerationCancelled:
            pass

    @Slot(str, str, bool)
    def prepare(self, bundle_dir: str, backend: str, warm: bool = True) -> None:
        if self.stopping.is_set() or (self.wanted is not None and self.wanted != (bundle_dir, backend)):
            return  # superseded by a later choice, or closing
        try:
            loaded = self._load(bundle_dir, backend)
            if warm:
                self._warm(loaded)
            self.model_ready.emit(*loaded.summary())
        except EdgegenError as e:
            self.model_failed.emit(bundle_dir, str(e))
        except Exception as e:  # noqa: BLE001 - the UI edge: show it, never crash the thread
            _LOG.exception("loading %s failed", bundle_dir)
            self.model_failed.emit(bundle_dir, unexpected(e))

    # ----- one job ----------------------------------------------------------------------------------
    @Slot(object)
    def run(self, job) -> None:
        try:
            if job.cancel.is_set():
                raise GenerationCancelled("generation cancelled")
            self.status.emit(job.id, "loading")
            fresh = not self._is_loaded(str(job.bundle_dir), job.backend)
            loaded = self._load(str(job.bundle_dir), job.backend)
            if fresh:
                self.model_ready.emit(*loaded.summary())
            self.status.emit(job.id, "running")
            result = loaded.pipeline.generate(job.request, on_step=self._stepper(job), cancel=job.cancel,
                                              on_preview=self._previewer(job))
            self.finished.emit(job.id, to_qimage(result.image), self._save(job, loaded, result))
        except GenerationCancelled:
            self.cancelled.emit(job.id)
        except EdgegenError as e:
            self.failed.emit(job.id, str(e))
        except OSError as e:
            self.failed.emit(job.id, f"Could not save to {job.output_dir}: {e.strerror or e}. Choose another "
                                     "output folder in Settings.")
        except Exception as e:  # noqa: BLE001 - the UI edge
            _LOG.exception("job %s failed", job.id)
            self.failed.emit(job.id, unexpected(e))

    def _stepper(self, job):
        marks: list[float] = []

        def on_step(step: int, total: int) -> None:
            marks.append(time.perf_counter())
            # The first step also paid for loading and text encoding, so it says nothing about the rest: -1 = unknown.
            eta = (marks[-1] - marks[0]) / (len(marks) - 1) * (total - step) if len(marks) > 1 else -1.0
            self.progress.emit(job.id, step, total, eta)

        return on_step

    def _previewer(self, job):
        def on_preview(step: int, total: int, rgb) -> None:
            self.preview.emit(job.id, step, total, to_qimage(rgb))

        return on_preview

    def _save(self, job, loaded: Loaded, result):
        from app.runtime.generate import image_metadata, lora_metadata
        from app.runtime.images import save_png
        from app.ui.history import thumbnail_png
        from app.ui.jobs import JobResult

        meta = image_metadata(loaded.bundle, loaded.backend, result)
        folder = Path(job.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = save_png(output_path(folder, result.request.seed), result.image, meta).resolve()
        warnings = list(result.warnings)
        try:
            self._audit(loaded, result, path)
        except EdgegenError as e:  # the image is saved; say the audit failed rather than losing it
            warnings.append(str(e))
        return JobResult(path=path, meta={**meta, "bundle_dir": str(loaded.bundle.root)},
                         thumbnail=thumbnail_png(result.image), timings=dict(result.timings), warnings=warnings,
                         notes=tuple(result.notes))

    def _audit(self, loaded: Loaded, result, path: Path) -> None:
        from app.runtime.audit import AuditLog
        from app.runtime.generate import lora_metadata

        b, r = loaded.bundle, result.request
        (self.audit or AuditLog()).record(
            model=b.manifest["source"]["name"], family=b.manifest["family"], bundle_sha=b.manifest_sha256,
            seed=r.seed, steps=r.steps, guidance=r.guidance, width=r.width, height=r.height,
            backend=loaded.backend.name, precision=b.precision, output=str(path), prompt=r.prompt,
            negative_prompt=r.negative_prompt, event="generate", client="app", **lora_metadata(result),
        )


def unexpected(e: BaseException) -> str:
    """One sentence for the banner, with the path of the full report (the same file the CLI writes), so the
    user can copy it into a ticket."""
    from app.errors import one_line, write_report

    path = write_report(e, context="desktop app")
    where = f"the full report is {path}" if path else "writing the report failed too; see the log"
    return f"Unexpected error ({one_line(e)}); {where}. Please send it with `edgegen doctor` output."
