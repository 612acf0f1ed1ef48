"""UI test fixtures: offscreen Qt, isolated app folders, and one real window on the shared tiny Klein bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.ui._paths import make_paths

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

pytest.importorskip("PySide6.QtWidgets", reason="the desktop app needs PySide6 (pip install 'edgegen[ui]')")
pytest.importorskip("pytestqt", reason="UI tests need pytest-qt")


@pytest.fixture(scope="session")
def ui_bundle(request) -> Path:
    """The shared klein_bundle; EDGEGEN_UI_TEST_BUNDLE may name an already exported one to iterate faster."""
    given = os.environ.get("EDGEGEN_UI_TEST_BUNDLE")
    return Path(given) if given else request.getfixturevalue("klein_bundle")


@pytest.fixture(scope="session")
def ui_sd3_bundle(request) -> Path:
    """The shared sd3_bundle; EDGEGEN_UI_TEST_SD3_BUNDLE may name an already exported one."""
    given = os.environ.get("EDGEGEN_UI_TEST_SD3_BUNDLE")
    return Path(given) if given else request.getfixturevalue("sd3_bundle")


@pytest.fixture(scope="module")
def app_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("app")


@pytest.fixture(scope="module")
def window(qapp, app_root, ui_bundle):
    """One real MainWindow per module: the model loads once, later tests reuse it."""
    from app.planning.devices import FakeGpuReader
    from app.runtime.audit import AuditLog
    from app.ui.window import MainWindow

    w = MainWindow(paths=make_paths(app_root), bundle=ui_bundle, reader=FakeGpuReader([]),
                   monitor_interval_ms=100, audit=AuditLog(app_root / "audit.jsonl"))
    w.show()
    yield w
    w.close()
    delete_now(w)


def delete_now(widget) -> None:
    """Free a window while the QApplication is alive: left to interpreter exit, the order is undefined."""
    from PySide6.QtCore import QCoreApplication, QEvent

    widget.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
