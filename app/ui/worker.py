"""The generation worker: lives in its own QThread, runs the Qt-free runtime, emits data and never touches widgets."""

from __future__ import annotations

import logging
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
    finished = Signal(int, QImage, object)  # job id, image, JobResult
    failed = Signal(int, str)  # job id, message with the fix
    cancelled = Signal(int)
    model_ready = Signal(str, str, str)  # bundle dir, backend description, reason
    model_failed = Signal(str, str)

    def __init__(self, audit=None):
        super().__init__()
        self.audit = audit  # an AuditLog, or None for the default one
        self.loaded: Loaded | None = None

    # ----- model ------------------------------------------------------------------------------------
    def _load(self, bundle_dir: str, backend: str) -> Loaded:
        key = (str(Path(bundle_dir).resolve()), backend)
        if self.loaded is not None and self.loaded.key == key:
            return self.loaded
        from app.runtime.backends import make_backend
        from app.runtime.manifest import load_bundle
        from app.runtime.pipelines import make_pipeline

        self.loaded = None  # drop the previous model first: one model in memory at a time
        bundle = load_bundle(Path(bundle_dir))
        be, reason = make_backend(bundle, backend)
        self.loaded = Loaded(key, bundle, be, reason, make_pipeline(bundle, be))
        self.model_ready.emit(str(bundle.root), be.describe(), reason)
        return self.loaded

    @Slot(str, str)
    def prepare(self, bundle_dir: str, backend: str) -> None:
        try:
            self._load(bundle_dir, backend)
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
            loaded = self._load(str(job.bundle_dir), job.backend)
            self.status.emit(job.id, "running")
            result = loaded.pipeline.generate(job.request, on_step=self._stepper(job), cancel=job.cancel)
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

    def _save(self, job, loaded: Loaded, result):
        from app.runtime.generate import image_metadata
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
                         thumbnail=thumbnail_png(result.image), timings=dict(result.timings), warnings=warnings)

    def _audit(self, loaded: Loaded, result, path: Path) -> None:
        from app.runtime.audit import AuditLog

        b, r = loaded.bundle, result.request
        (self.audit or AuditLog()).record(
            model=b.manifest["source"]["name"], family=b.manifest["family"], bundle_sha=b.manifest_sha256,
            seed=r.seed, steps=r.steps, guidance=r.guidance, width=r.width, height=r.height,
            backend=loaded.backend.name, precision=b.precision, output=str(path), prompt=r.prompt,
            negative_prompt=r.negative_prompt, event="generate", client="app",
        )


def unexpected(e: BaseException) -> str:
    return (f"Unexpected error: {type(e).__name__}: {e}. The details are in the log; please report it "
            "with `edgegen doctor` output.")
