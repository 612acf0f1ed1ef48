"""Form rules from the bundle (presets, size range, negative prompt), settings, and `edgegen app` start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from app.ui.settings import AppPaths, Settings, load_settings, save_settings
from app.ui.sizes import presets, size_error
from tests.ui._paths import make_paths

ROOT = Path(__file__).resolve().parents[2]


def test_presets_and_size_checks_follow_the_bundle():
    rng = {"min": 32, "max": 256, "multiple": 4}
    assert presets({"width": 1024, "height": 1024}, rng) == {
        "Square": (256, 256), "Portrait": (192, 256), "Landscape": (256, 192)}
    assert size_error(256, 192, rng) == ""
    assert size_error(30, 64, rng) == "Width 30 px is outside this model's range 32–256 px."
    assert size_error(64, 67, rng) == "Height 67 px is not a multiple of 4; try 68."


def test_settings_round_trip_and_bad_file(tmp_path):
    paths = AppPaths(tmp_path / "c", tmp_path / "d")
    assert load_settings(paths) == Settings()
    save_settings(paths, Settings(output_folder="/x", backend="onnxruntime"))
    assert load_settings(paths).output_path == Path("/x") and load_settings(paths).backend == "onnxruntime"
    paths.settings_file.write_text("{not json")
    assert load_settings(paths) == Settings()  # a damaged file never stops the app


def test_negative_prompt_only_for_families_that_use_it(qtbot, tmp_path, ui_bundle, ui_sd3_bundle):
    from app.planning.devices import FakeGpuReader
    from app.ui.window import MainWindow

    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "klein").symlink_to(ui_bundle.resolve(), target_is_directory=True)
    (engines / "sd3").symlink_to(ui_sd3_bundle.resolve(), target_is_directory=True)
    paths = make_paths(tmp_path)
    save_settings(paths, load_settings(paths).replace(engines_folder=str(engines)))
    w = MainWindow(paths=paths, reader=FakeGpuReader([]), preload=False)
    qtbot.addWidget(w)
    w.show()
    labels = [w.picker.combo.itemText(i) for i in range(w.picker.combo.count())]
    assert labels == ["klein (flux2-klein, fp32)", "sd3 (sd3.5, fp32)"]
    w.picker.combo.setCurrentIndex(0)
    assert not w.form.negative.isVisible()
    w.picker.combo.setCurrentIndex(1)
    assert w.form.negative.isVisible()
    assert w.form.steps.value() == 28 and w.form.guidance.value() == 7.0  # SD3.5's defaults
    assert "CPU only (no NVIDIA GPU)" in w.picker.info.text() and "ONNX" in w.picker.info.text()


def test_edgegen_app_goes_offline_first_and_opens_the_window(tmp_path, ui_bundle):
    code = textwrap.dedent(f"""
        import json, sys
        from PySide6.QtCore import QTimer
        from PySide6.QtWidgets import QApplication
        from app.cli import main
        app = QApplication([])
        def report():
            from app.offline import guard_status
            from app.ui.window import MainWindow
            w = next(x for x in app.topLevelWidgets() if isinstance(x, MainWindow))
            s = guard_status()
            print(json.dumps({{"guard": s.active, "late": list(s.late_imports), "offline": w.offline_label.text(),
                              "model": w.picker.current().name, "style": app.style().name()}}))
            w.close()
            app.quit()
        missing = main(["app", "--bundle", "no-such-bundle"])  # a usage error, before any window opens
        print(json.dumps({{"missing_rc": missing, "windows": len(app.topLevelWidgets())}}))
        QTimer.singleShot(0, report)
        sys.exit(main(["app", "--bundle", {str(ui_bundle)!r}]))
    """)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(ROOT),
           "EDGEGEN_CONFIG_DIR": str(tmp_path / "c"), "EDGEGEN_DATA_DIR": str(tmp_path / "d")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[-2]) == {"missing_rc": 2, "windows": 0}
    assert "no-such-bundle does not exist" in proc.stderr and "Traceback" not in proc.stderr
    out = json.loads(lines[-1])
    assert out == {"guard": True, "late": [], "offline": "● Offline", "model": ui_bundle.name, "style": "fusion"}



def test_theme_follows_the_scheme_and_about_names_versions(qapp):
    from PySide6.QtCore import Qt
    from PySide6.QtGui import QPalette

    from app.ui.about import about_text
    from app.ui.theme import apply_theme

    try:
        apply_theme(qapp, Qt.ColorScheme.Dark)
        assert qapp.style().name() == "fusion"
        assert qapp.palette().color(QPalette.ColorRole.Window).lightness() < 80
        apply_theme(qapp, Qt.ColorScheme.Light)
        assert qapp.palette().color(QPalette.ColorRole.Window).lightness() > 180
    finally:
        apply_theme(qapp)
    text = about_text()
    for name in ("edgegen", "Qt", "torch", "onnxruntime", "diffusers", "Offline"):
        assert name in text


def test_settings_dialog_keeps_defaults_unpinned_and_engines_env(qtbot, tmp_path, monkeypatch):
    from app.ui.settingsdialog import SettingsDialog

    monkeypatch.setenv("EDGEGEN_ENGINES", str(tmp_path))
    assert Settings().engines_folders()[0] == tmp_path  # an offline install points the app at its bundles
    dialog = SettingsDialog(Settings())
    qtbot.addWidget(dialog)
    assert dialog.result_settings() == Settings()  # OK without edits pins nothing
    dialog.engines.setText(str(tmp_path / "mine"))
    assert dialog.result_settings().engines_folders() == [tmp_path / "mine"]


def test_no_bundles_says_how_to_make_one(qtbot, tmp_path):
    from app.planning.devices import FakeGpuReader
    from app.ui.window import MainWindow

    w = MainWindow(paths=make_paths(tmp_path), reader=FakeGpuReader([]), preload=False)
    qtbot.addWidget(w)
    assert w.picker.current() is None and not w.generate_button.isEnabled()
    assert "No engine bundles in" in w.picker.info.text() and "edgegen export --model DIR" in w.picker.info.text()
    w.form.prompt.setPlainText("a cat")
    assert w.generate() == [] and w.banner.text() == "Pick a model first."
