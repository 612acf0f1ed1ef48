"""Status bar pieces: which backend runs and why, and the offline indicator from the network guard."""

from __future__ import annotations

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QLabel, QWidget

OK, WARN, BAD = "#2e7d32", "#b26a00", "#b3261e"


class BackendLabel(QLabel):
    def __init__(self, parent: QWidget | None = None):
        super().__init__("Backend: not loaded yet", parent, objectName="backendLabel")

    def loading(self, name: str = "") -> None:
        self.setText(f"Backend: loading {name}…" if name else "Backend: loading…")

    def ready(self, bundle_dir: str, description: str, reason: str, signature: str = "") -> None:
        self.setText(f"Backend: {description} — {reason}")
        self.setToolTip("\n".join(x for x in (bundle_dir, reason, signature.capitalize()) if x))

    def failed(self) -> None:
        self.setText("Backend: none — the model could not be loaded")


class OfflineIndicator(QLabel):
    """'● Offline' while the guard is on (with a count of blocked attempts); red if it is not."""

    def __init__(self, parent: QWidget | None = None, interval_ms: int = 5000):
        super().__init__(parent, objectName="offlineLabel")
        self.timer = QTimer(self, interval=interval_ms)
        self.timer.timeout.connect(self.refresh)
        self.timer.start()
        self.refresh()

    def refresh(self) -> None:
        from app.offline import guard_status

        status = guard_status()
        if status.active and status.offline_env:
            text = "● Offline" + (f" — {status.blocked} blocked" if status.blocked else "")
            color = WARN if status.blocked else OK
        else:
            text, color = "● Network guard off", BAD
        self.setText(text)
        self.setStyleSheet(f"color: {color}")
        last = f"\nLast: {status.last_blocked}" if status.last_blocked else ""
        self.setToolTip(status.summary() + last)
