"""The real window on the real runtime and a tiny bundle: generate, queue, cancel, gallery, restart."""

from __future__ import annotations

import time

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication

from app.offline import guard_status
from app.runtime.images import read_metadata
from tests.ui._paths import make_paths

FIRST_IMAGE_MS = 240_000  # the first job verifies the bundle and opens its ONNX sessions
IMAGE_MS = 60_000


def _small(window, steps: int = 2, size: int = 32) -> None:
    window.form.set_size(size, size)
    window.form.steps.setValue(steps)


def test_type_prompt_and_ctrl_enter_saves_image_and_gallery_entry(window, qtbot, app_root):
    assert window.picker.current().family == "flux2-klein"
    assert not window.form.negative.isVisible()  # Klein has no negative prompt
    assert window.form.steps.value() == 4 and window.form.guidance.value() == 1.0  # the bundle's defaults
    _small(window)
    window.form.prompt.setFocus()
    qtbot.keyClicks(window.form.prompt, "a red circle on a blue background")
    window.form.random_seed.setChecked(False)
    window.form.seed.setText("7")
    with qtbot.waitSignal(window.image_saved, timeout=FIRST_IMAGE_MS) as saved:
        qtbot.keyClick(window.form.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)
    assert window.form.prompt.toPlainText() == "a red circle on a blue background"  # no newline typed

    entry = window.history.get(saved.args[0])
    assert entry.path.is_file() and entry.path.parent == app_root / "out"
    meta = read_metadata(entry.path)
    assert (meta["prompt"], meta["seed"], meta["steps"], meta["width"]) == ("a red circle on a blue background", 7, 2, 32)
    assert window.result.has_image() and window.result.path == entry.path
    assert window.gallery.entries_shown() == [entry.id]
    assert "ONNX Runtime" in window.backend_label.text()  # backend and why, in the status bar
    # This test process has no network guard (run_app installs it; see test_main.py), and the label says so.
    assert window.offline_label.text() == ("● Offline" if guard_status().active else "● Network guard off")
    assert (app_root / "audit.jsonl").read_text().count('"client":"app"') == 1

    window.tabs.setCurrentWidget(window.result)
    window.result.view.setFocus()
    qtbot.keyClick(window.result.view, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    assert QGuiApplication.clipboard().image().size() == window.result.view.image.size()

    window.form.use_last_seed()  # "reuse last" goes back to seed 7
    assert window.form.seed.text() == "7" and not window.form.random_seed.isChecked()


def test_step_previews_show_in_the_result_pane_until_the_image_replaces_them(window, qtbot, ui_bundle):
    import json

    cell = json.loads((ui_bundle / "manifest.json").read_text())["pipeline"]["vae_scale_factor"]
    _small(window, steps=3)
    shown = []
    window.queue.preview.connect(lambda job, step, total, image: shown.append(
        (step, total, image.size().toTuple(), window.result.view.image.size().toTuple(), window.result.copy.isEnabled(),
         window.result.caption.text())))
    window.form.prompt.setPlainText("a green square")
    with qtbot.waitSignal(window.image_saved, timeout=IMAGE_MS):
        window.generate()
    assert [s[:2] for s in shown] == [(1, 3), (2, 3), (3, 3)]
    for _, _, size, on_screen, copy_enabled, caption in shown:
        assert size == (32 // cell, 32 // cell) and on_screen == size  # one pixel per VAE cell, in the pane
        assert not copy_enabled and "Preview" in caption  # a preview is not a result
    assert window.result.view.image.size().toTuple() == (32, 32) and window.result.copy.isEnabled()


def test_batch_queues_and_runs_one_at_a_time(window, qtbot):
    _small(window)
    window.form.prompt.setPlainText("green triangle at the top of a white background")
    window.form.random_seed.setChecked(False)
    window.form.seed.setText("100")
    window.form.count.setValue(3)
    before = window.history.count()
    seen_running: list[int] = []
    window.queue.started.connect(lambda job: seen_running.append(len([j for j in window.queue.jobs()
                                                                       if j.state != "queued"])))
    qtbot.mouseClick(window.generate_button, Qt.MouseButton.LeftButton)
    assert len(window.queue.pending) == 2 and window.queue_view.isVisible()
    assert "2 waiting" in window.queue_view.title()
    qtbot.waitUntil(lambda: window.history.count() == before + 3 and not window.queue.busy(), timeout=IMAGE_MS)
    assert seen_running == [1, 1, 1]  # never two jobs on the device at once
    seeds = sorted(e.meta["seed"] for e in window.history.search("green triangle"))
    assert seeds == [100, 101, 102]
    window.form.count.setValue(1)


def test_escape_cancels_within_a_step_and_saves_nothing(window, qtbot, app_root):
    _small(window, steps=200)
    window.form.prompt.setPlainText("a watercolor painting of a harbour at dawn")
    files_before = set((app_root / "out").glob("*.png"))
    rows_before = window.history.count()
    window.activateWindow()
    with qtbot.waitSignal(window.queue.progress, timeout=IMAGE_MS):
        window.generate()
    steps_at_cancel = window.queue.current.step
    with qtbot.waitSignal(window.queue.cancelled, timeout=10_000) as cancelled:
        qtbot.keyClick(window, Qt.Key.Key_Escape)
    job = cancelled.args[0]
    assert job.state == "cancelled" and job.step <= steps_at_cancel + 2
    assert set((app_root / "out").glob("*.png")) == files_before
    assert window.history.count() == rows_before
    assert not window.queue.busy() and not window.cancel_button.isEnabled()


def test_errors_are_sentences_with_the_fix(window, qtbot):
    window.form.prompt.setPlainText("")
    assert window.generate() == []
    assert "Type a prompt" in window.banner.text()
    window.form.prompt.setPlainText("a cat")
    window.form.set_size(34, 32)  # not a multiple of the bundle's 4 px
    assert "not a multiple of 4; try" in window.form.error.text()
    assert window.generate() == [] and "multiple of 4" in window.banner.text()
    window.form.set_size(32, 32)
    assert not window.form.error.isVisible()


def test_restart_finds_history_and_reuses_parameters(window, qtbot, app_root, ui_bundle):
    from app.planning.devices import FakeGpuReader
    from app.ui.window import MainWindow

    shown = window.history.count()
    window.close()
    again = MainWindow(paths=make_paths(app_root), reader=FakeGpuReader([]), preload=False)
    qtbot.addWidget(again)
    # The last model comes back from the settings; the history from the database.
    assert again.picker.current().path.resolve() == ui_bundle.resolve()
    assert len(again.gallery.entries_shown()) == shown == 5
    again.gallery.search.setText("red circle")
    qtbot.waitUntil(lambda: len(again.gallery.entries_shown()) == 1, timeout=2000)
    again.gallery.select(again.gallery.entries_shown()[0])
    again.gallery.reuse_button.click()
    assert again.form.prompt.toPlainText() == "a red circle on a blue background"
    assert again.form.seed.text() == "7" and again.form.steps.value() == 2
    assert (again.form.width_box.value(), again.form.height_box.value()) == (32, 32)

    entry = again.gallery.selected_entry()
    assert again.gallery.delete_selected(confirm=False)
    assert not entry.path.exists() and again.history.get(entry.id) is None
    again.gallery.search.setText("")
    qtbot.waitUntil(lambda: len(again.gallery.entries_shown()) == 4, timeout=2000)
    t0 = time.monotonic()
    again.close()
    assert time.monotonic() - t0 < 5  # closing waits for the threads, which are idle


def test_unexpected_failure_offers_its_report_to_copy(qtbot, tmp_path, monkeypatch):
    """An unexpected error in the app writes the same report the CLI writes and the banner copies it."""
    from PySide6.QtWidgets import QApplication

    from app.ui.messages import Banner
    from app.ui.worker import unexpected

    monkeypatch.setenv("EDGEGEN_LOG_DIR", str(tmp_path / "logs"))
    try:
        raise KeyError("model_index")
    except KeyError as e:
        message = unexpected(e)
    banner = Banner()
    qtbot.addWidget(banner)
    banner.show_message(message)
    assert banner.copy.isVisibleTo(banner) and banner.report.parent == tmp_path / "logs"
    banner.copy.click()
    copied = QApplication.clipboard().text()
    assert "Traceback" in copied and "KeyError" in copied
