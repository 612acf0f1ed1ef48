"""`edgegen app`: go offline first, then start Qt with the system theme and show the main window."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _check_display() -> None:
    from app.errors import UsageError

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                                 or os.environ.get("QT_QPA_PLATFORM")):
        raise UsageError("no display found for the desktop app; run it inside a desktop session "
                         "(or set QT_QPA_PLATFORM=offscreen for a headless check)")


def dispose(widget) -> None:
    """Free a closed window now, while the QApplication exists; left to interpreter exit, Python may destroy
    them in either order, and a widget outliving its QApplication crashes on the way out."""
    from PySide6.QtCore import QCoreApplication, QEvent

    widget.deleteLater()
    QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)


def _set_icon(app) -> None:
    from PySide6.QtGui import QIcon

    from app.bundle.locations import assets_dir

    icon = assets_dir() / "icons" / "edgegen.png"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))


def run_app(bundle: Path | None = None) -> int:
    from app import offline

    offline.enforce_offline()  # before anything imports diffusers or transformers
    from app.errors import UsageError

    try:
        from PySide6.QtWidgets import QApplication
    except ImportError:
        raise UsageError("the desktop app needs PySide6; install it with: pip install 'edgegen[ui]'") from None
    _check_display()
    if bundle is not None:
        from app.bundle.manifest import read_manifest

        read_manifest(Path(bundle))  # a missing or broken --bundle is a usage error, said before a window opens

    from app.ui.theme import follow_system
    from app.ui.window import MainWindow

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "edgegen"])
    app.setApplicationName("edgegen")
    app.setApplicationDisplayName("edgegen")
    app.setDesktopFileName("edgegen")
    _set_icon(app)
    follow_system(app)
    window = MainWindow(bundle=Path(bundle) if bundle else None)
    window.show()
    window.form.prompt.setFocus()
    code = app.exec()
    window.close()  # no-op if the user closed it; saves settings and stops the threads otherwise
    dispose(window)
    return code
