"""The main window: wires the model picker, form, queue, result, gallery and VRAM panel to the runtime."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QByteArray, Qt, Signal, Slot
from PySide6.QtGui import QAction, QImage, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPushButton,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from app.errors import EdgegenError
from app.planning.devices import GpuReader
from app.planning.gpus import gpu_spec_from_info
from app.runtime.pipelines import GenerationRequest
from app.ui.catalog import find_bundles, fit_text, fit_warning, plan_for, this_gpu
from app.ui.form import GenerationForm
from app.ui.gallery import GalleryWidget
from app.ui.gpumonitor import MonitorThread
from app.ui.gpustats import GpuSample, NvmlStatsReader
from app.ui.history import History
from app.ui.jobs import Job, JobQueue, JobResult
from app.ui.messages import Banner, ask_yes_no
from app.ui.modelpicker import ModelPicker
from app.ui.queueview import QueueView
from app.ui.resultview import ResultView
from app.ui.settings import AppPaths, Settings, load_settings, save_settings
from app.ui.statusbar import BackendLabel, OfflineIndicator
from app.ui.vram import VramWidget

_LOG = logging.getLogger("edgegen.ui")


class MainWindow(QMainWindow):
    image_saved = Signal(int)  # history id, after the PNG is on disk and its row committed

    def __init__(self, paths: AppPaths | None = None, bundle: Path | None = None, reader: GpuReader | None = None,
                 monitor_interval_ms: int = 1000, audit=None,
                 confirm: Callable[[QWidget, str, str], bool] = ask_yes_no, preload: bool = True):
        super().__init__()
        self.setWindowTitle("edgegen")
        self._closed = False
        self.paths = paths or AppPaths.default()
        self.settings: Settings = load_settings(self.paths)
        self.confirm = confirm
        self.preload = preload  # open the model's sessions as soon as it is picked, not at the first Generate
        self.reader = reader or NvmlStatsReader()
        self.gpu = this_gpu(self.reader)
        self.bundle = None  # the selected Bundle (manifest only; the worker verifies before running)
        self.history = History(self.paths.history_db)
        self.queue = JobQueue(self, audit=audit)

        self.picker = ModelPicker()
        self.form = GenerationForm()
        self.form.references.mask_dir = self.paths.data_dir / "masks"  # painted inpainting masks
        self.form.output_folder.setText(str(self.settings.output_path))
        self.form.backend.setCurrentText(self.settings.backend)
        self.fit_label = QLabel(objectName="fitLabel", wordWrap=True)
        self.generate_button = QPushButton("Generate", objectName="generate", default=True)
        self.generate_button.setToolTip("Generate (Ctrl+Enter); while busy, further requests wait in the queue")
        self.cancel_button = QPushButton("Cancel", objectName="cancel", enabled=False)
        self.cancel_button.setToolTip("Stop the running image (Esc)")
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button, 1)
        buttons.addWidget(self.cancel_button)
        self.queue_view = QueueView(self.queue)
        self.vram = VramWidget()

        left = QWidget()
        left_lay = QVBoxLayout(left)
        left_lay.addWidget(self.picker)
        left_lay.addWidget(self.form, 1)
        left_lay.addWidget(self.fit_label)
        left_lay.addLayout(buttons)
        left_lay.addWidget(self.vram)
        scroll = QScrollArea(widgetResizable=True)
        scroll.setWidget(left)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(left.sizeHint().width() + scroll.verticalScrollBar().sizeHint().width())

        self.banner = Banner()
        self.result = ResultView()
        self.gallery = GalleryWidget(self.history)
        self.tabs = QTabWidget(objectName="tabs")
        self.tabs.addTab(self.result, "Result")
        self.tabs.addTab(self.gallery, "Gallery")
        right = QWidget()
        right_lay = QVBoxLayout(right)
        right_lay.setContentsMargins(0, 0, 0, 0)
        right_lay.addWidget(self.banner)
        right_lay.addWidget(self.tabs, 1)
        right_lay.addWidget(self.queue_view)
        split = QSplitter(objectName="split")
        split.addWidget(scroll)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        self.setCentralWidget(split)

        self.backend_label = BackendLabel()
        self.offline_label = OfflineIndicator()
        self.statusBar().addWidget(self.backend_label, 1)
        self.statusBar().addPermanentWidget(self.offline_label)

        self._menus()
        self._shortcuts()
        self._wire()
        self.monitor = MonitorThread(self.reader, monitor_interval_ms)
        self.monitor.sampled.connect(self.vram.show_sample)
        self.monitor.sampled.connect(self._gpu_sampled)
        self.monitor.start()

        self._restore_geometry()
        last = Path(self.settings.last_model) if self.settings.last_model else None
        remembered = last if last is not None and (last / "manifest.json").is_file() else None
        self.reload_models(select=bundle or remembered, extra=[p for p in (bundle, remembered) if p is not None])
        self._import_orphans()

    # ----- construction helpers -------------------------------------------------------------------
    def _menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        for text, slot, key in (("Choose output folder…", self.choose_output_folder, None),
                                ("Settings…", self.open_settings, QKeySequence.StandardKey.Preferences),
                                ("Quit", self.close, QKeySequence.StandardKey.Quit)):
            action = QAction(text, self)
            if key is not None:
                action.setShortcut(key)
            action.triggered.connect(slot)
            file_menu.addAction(action)
        help_menu = self.menuBar().addMenu("&Help")
        about = QAction("About edgegen", self)
        about.triggered.connect(self.show_about)
        help_menu.addAction(about)

    def _shortcuts(self) -> None:
        for keys in ("Ctrl+Return", "Ctrl+Enter"):
            QShortcut(QKeySequence(keys), self, self.generate)
        QShortcut(QKeySequence(Qt.Key.Key_Escape), self, self.cancel)
        # Text boxes keep their own Ctrl+C (they claim it first); elsewhere it copies the image.
        QShortcut(QKeySequence(QKeySequence.StandardKey.Copy), self, self.result.copy_image)

    def _wire(self) -> None:
        self.setAcceptDrops(True)  # edgegen PNGs restore their parameters; other images become references
        self.form.references.problem.connect(lambda msg: self.banner.show_message(msg, error=False))
        self.generate_button.clicked.connect(self.generate)
        self.cancel_button.clicked.connect(self.cancel)
        self.picker.selected.connect(self.model_selected)
        self.picker.refresh_requested.connect(lambda: self.reload_models(select=self._selected_path()))
        self.form.changed.connect(self.update_fit)
        self.form.backend.currentTextChanged.connect(self._backend_changed)
        self.form.choose_output.clicked.connect(self.choose_output_folder)
        self.queue.changed.connect(self._queue_changed)
        self.queue.progress.connect(self._progress)
        self.queue.preview.connect(self._preview)
        self.queue.finished.connect(self._finished)
        self.queue.failed.connect(self._failed)
        self.queue.cancelled.connect(self._cancelled)
        self.queue.idle.connect(self.result.hide_progress)
        self.queue.model_ready.connect(self._model_ready)
        self.queue.model_failed.connect(self._model_failed)
        self.gallery.show_requested.connect(self.show_entry)
        self.gallery.reuse_requested.connect(self.reuse_entry)

    # ----- models ---------------------------------------------------------------------------------
    def reload_models(self, select: Path | None = None, extra: list[Path] = ()) -> None:
        folders = self.settings.engines_folders()
        # Bundles opened by path (--bundle, the last model, a reused image's model) stay listed.
        extras = list(extra) + [e.path for e in self.picker.entries if not _inside(e.path, folders)]
        self.picker.set_entries(find_bundles(folders, self.gpu, extras), folders, select)

    def _selected_path(self) -> Path | None:
        entry = self.picker.current()
        return entry.path if entry else None

    @Slot(object)
    def model_selected(self, entry) -> None:
        from app.bundle.manifest import load_bundle

        self.bundle = None
        if entry is None:
            self.generate_button.setEnabled(False)
            self.update_fit()
            return
        try:
            self.bundle = load_bundle(entry.path, verify=False)
        except EdgegenError as e:
            self.banner.show_message(str(e))
            self.generate_button.setEnabled(False)
            return
        self.generate_button.setEnabled(True)
        m = self.bundle.manifest
        from app.runtime.references import encoder_export_command

        hint = None if "vae_encoder" in self.bundle.components() else encoder_export_command(self.bundle)
        self.form.set_model(m["defaults"], m["size_range"], self.bundle.family.uses_negative_prompt,
                            family=m["family"], pipeline=m["pipeline"], encoder_hint=hint, manifest=m)
        self.settings = self.settings.replace(last_model=str(entry.path))
        self._save_settings()
        self.backend_label.loading(entry.name)
        self.queue.prepare(entry.path, self.form.backend.currentText(), warm=self.preload)
        self.update_fit()

    def _backend_changed(self, backend: str) -> None:
        self.settings = self.settings.replace(backend=backend)
        self._save_settings()
        if self.bundle is not None:
            self.backend_label.loading()
            self.queue.prepare(self.bundle.root, backend, warm=self.preload)

    @Slot(str, str, str, str)
    def _model_ready(self, bundle_dir: str, description: str, reason: str, signature: str) -> None:
        self.backend_label.ready(bundle_dir, description, reason, signature)

    @Slot(str, str)
    def _model_failed(self, bundle_dir: str, message: str) -> None:
        self.backend_label.failed()
        self.banner.show_message(message)

    # ----- fit ------------------------------------------------------------------------------------
    @Slot(object)
    def _gpu_sampled(self, sample: GpuSample) -> None:
        # Live free memory feeds the plan, so the fit line follows other programs' use of the GPU.
        self.gpu = gpu_spec_from_info(sample.gpu) if sample.gpu is not None else None
        self.update_fit()

    def current_plan(self):
        if self.bundle is None:
            return None
        v = self.form.values()
        try:
            refs = len(v.images) if self.bundle.manifest["family"] == "flux2-klein" else 0
            return plan_for(self.bundle, self.gpu, v.width, v.height, references=refs)
        except EdgegenError:
            return None  # an invalid size: the form already says so

    def update_fit(self) -> None:
        plan = self.current_plan()
        if plan is None:
            self.fit_label.setText("")
            return
        warning = fit_warning(plan)
        if warning:
            self.fit_label.setStyleSheet("color: #d9534f")
            self.fit_label.setText(warning)
        else:
            self.fit_label.setStyleSheet("")
            text = fit_text(plan)  # says the peak and what the runtime does with memory
            self.fit_label.setText(f"{text[:1].upper()}{text[1:]}.")

    # ----- generation -----------------------------------------------------------------------------
    @Slot()
    def generate(self) -> list[Job]:
        """Queue one job per requested image; returns them (empty when something needs fixing first)."""
        problem = "Pick a model first." if self.bundle is None else self.form.problem()
        if problem:
            self.banner.show_message(problem)
            return []
        plan = self.current_plan()
        warning = fit_warning(plan) if plan else ""
        if warning and not self.confirm(self, "This may not fit", f"{warning}\n\nGenerate anyway?"):
            return []
        from app.errors import UsageError
        from app.runtime.images import check_output_folder

        v = self.form.values()
        try:
            self.settings.output_path.mkdir(parents=True, exist_ok=True)
            check_output_folder(self.settings.output_path, "the images", v.count, v.width, v.height)
        except (UsageError, OSError) as e:
            self.banner.show_message(str(e) if isinstance(e, UsageError) else
                                     f"cannot create {self.settings.output_path} ({e.strerror}); choose another "
                                     "output folder")
            return []
        self.banner.hide()
        jobs = [Job(bundle_dir=self.bundle.root, backend=v.backend, output_dir=self.settings.output_path,
                    request=GenerationRequest(prompt=v.prompt, negative_prompt=v.negative_prompt, seed=seed,
                                              steps=v.steps, guidance=v.guidance, width=v.width, height=v.height,
                                              images=v.images, strength=v.strength, loras=v.loras,
                                              mask=v.mask, controls=v.controls))
                for seed in self.form.seeds()]
        self.queue.enqueue(jobs)
        return jobs

    @Slot()
    def cancel(self) -> None:
        if self.queue.cancel_current():
            self.result.show_progress("Cancelling…")

    def _queue_changed(self) -> None:
        job = self.queue.current
        self.cancel_button.setEnabled(job is not None)
        if job is None:
            return
        if job.state == "loading":
            self.result.show_progress(f"Loading the model for #{job.id}…")
        elif job.state == "running" and not job.step:
            self.result.show_progress(f"Reading the prompt for #{job.id}…")

    @Slot(object, int, int, float)
    def _progress(self, job: Job, step: int, total: int, eta: float) -> None:
        if job.cancel.is_set():
            return
        waiting = len(self.queue.pending)
        more = f" · {waiting} waiting" if waiting else ""
        left = "estimating time left" if eta < 0 else f"about {eta:.0f} s left"
        self.result.show_progress(f"#{job.id}: step {step}/{total} · {left}{more}", step, total)

    @Slot(object, int, int, QImage)
    def _preview(self, job: Job, step: int, total: int, image: QImage) -> None:
        self.result.show_preview(image, f"Preview of #{job.id}, step {step}/{total}: the final image replaces it")

    @Slot(object, QImage, object)
    def _finished(self, job: Job, image: QImage, result: JobResult) -> None:
        try:
            entry_id = self.history.add(result.path, result.meta, result.thumbnail)
        except Exception as e:  # noqa: BLE001 - the file is saved; only the gallery row is missing
            _LOG.exception("history insert failed")
            self.banner.show_message(f"Saved {result.path}, but the gallery could not record it: {e}")
            entry_id = -1
        self.result.show_image(image, result.path, result.meta, result.timings.get("total"))
        self.form.set_last_seed(int(result.meta["seed"]))
        if entry_id >= 0:
            self.gallery.add_new(entry_id)
        if result.warnings:
            self.banner.show_message("; ".join(result.warnings), error=False)
        self.statusBar().showMessage("; ".join((f"Saved {result.path}", *result.notes)), 10_000)
        if entry_id >= 0:
            self.image_saved.emit(entry_id)

    @Slot(object, str)
    def _failed(self, job: Job, message: str) -> None:
        self.banner.show_message(f"Image #{job.id} failed: {message}")

    @Slot(object)
    def _cancelled(self, job: Job) -> None:
        self.statusBar().showMessage(f"Cancelled #{job.id}", 10_000)

    # ----- gallery --------------------------------------------------------------------------------
    def show_entry(self, entry) -> None:
        image = QImage(str(entry.path))
        if image.isNull():
            self.banner.show_message(f"{entry.path} is missing or unreadable; delete it from the gallery.")
            return
        self.result.show_image(image, entry.path, entry.meta)
        self.tabs.setCurrentWidget(self.result)

    def reuse_entry(self, entry) -> None:
        bundle_dir = Path(entry.meta["bundle_dir"]) if entry.meta.get("bundle_dir") else None
        if bundle_dir is not None and (bundle_dir / "manifest.json").is_file() and (
                self.bundle is None or bundle_dir != self.bundle.root):
            self.reload_models(select=bundle_dir, extra=[bundle_dir])
        missing = self.form.apply_meta(entry.meta, near=Path(entry.path).parent)
        self._say_missing(missing)
        self.tabs.setCurrentWidget(self.result)
        self.form.prompt.setFocus()

    def _say_missing(self, missing: list[str]) -> None:
        if missing:
            what = "LoRA" if all(m.startswith("LoRA ") for m in missing) else "Input image"
            self.banner.show_message(f"{what}{'s' if len(missing) > 1 else ''} no longer here (or changed): "
                                     f"{', '.join(missing)}. Add {'them' if len(missing) > 1 else 'it'} "
                                     "again to reproduce the image.", error=False)

    # ----- drag and drop ----------------------------------------------------------------------------
    def restore_from_png(self, path: Path) -> bool:
        """An image edgegen made: its model (if still here) and parameters, including input images on disk.
        False when the file carries no edgegen metadata."""
        from app.runtime.images import read_metadata

        try:
            meta = read_metadata(path)
        except (OSError, KeyError, ValueError, SyntaxError):
            return False
        if not isinstance(meta, dict) or "prompt" not in meta:
            return False
        from app.ui.history import Entry

        self.reuse_entry(Entry(id=-1, path=Path(path), created=0.0, meta=meta, thumbnail=None))
        self.statusBar().showMessage(f"Parameters restored from {Path(path).name}", 10_000)
        return True

    def dragEnterEvent(self, event) -> None:
        from app.ui.references import dropped_files

        if dropped_files(event.mimeData()):
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        """An edgegen PNG restores its parameters; any other image becomes a reference / init image."""
        from app.ui.references import dropped_files

        for f in dropped_files(event.mimeData()):
            if not self.restore_from_png(f) and not self.form.references.add(f):
                break
        event.acceptProposedAction()

    def _import_orphans(self) -> None:
        try:
            if self.history.import_orphans(self.settings.output_path):
                self.gallery.refresh()
        except Exception:  # noqa: BLE001 - a damaged folder must not stop the app from starting
            _LOG.exception("importing unrecorded images failed")

    # ----- settings and chrome --------------------------------------------------------------------
    def choose_output_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save images to", str(self.settings.output_path))
        if folder:
            self.set_output_folder(Path(folder))

    def set_output_folder(self, folder: Path) -> None:
        from app.errors import UsageError
        from app.runtime.images import check_output_folder

        try:
            check_output_folder(folder, "the images")
        except UsageError as e:  # a read-only or full folder is refused when chosen, not after a generation
            self.banner.show_message(str(e))
            return
        self.settings = self.settings.replace(output_folder=str(folder))
        self.form.output_folder.setText(str(folder))
        self._save_settings()
        self._import_orphans()

    def open_settings(self) -> None:
        from app.ui.settingsdialog import SettingsDialog

        dialog = SettingsDialog(self.settings, self)
        if not dialog.exec():
            return
        new = dialog.result_settings()
        engines_changed = new.engines_folders() != self.settings.engines_folders()
        self.settings = new
        self.form.output_folder.setText(str(new.output_path))
        self.form.backend.setCurrentText(new.backend)
        self._save_settings()
        self._import_orphans()
        if engines_changed:
            self.reload_models(select=self._selected_path())

    def show_about(self) -> None:
        from app.ui.about import show_about

        show_about(self)

    def _save_settings(self) -> None:
        try:
            save_settings(self.paths, self.settings)
        except OSError as e:
            self.statusBar().showMessage(f"Could not save settings to {self.paths.settings_file}: {e}", 10_000)

    def _restore_geometry(self) -> None:
        if self.settings.geometry:
            self.restoreGeometry(QByteArray.fromHex(self.settings.geometry.encode()))
        else:
            h = self.fontMetrics().height()
            self.resize(h * 80, h * 50)  # in font units, so the first window suits any DPI
        if self.settings.window_state:
            self.restoreState(QByteArray.fromHex(self.settings.window_state.encode()))

    def closeEvent(self, event) -> None:
        if self._closed:
            return super().closeEvent(event)
        self._closed = True
        self.settings = self.settings.replace(geometry=bytes(self.saveGeometry().toHex()).decode(),
                                              window_state=bytes(self.saveState().toHex()).decode())
        self._save_settings()
        self.offline_label.timer.stop()
        self.queue.shutdown()
        self.monitor.shutdown()
        self.history.close()
        super().closeEvent(event)


def _inside(path: Path, folders: list[Path]) -> bool:
    try:
        return any(Path(path).resolve().parent == Path(f).resolve() for f in folders)
    except OSError:
        return False
