"""How the window talks to the user: an inline banner for errors and warnings, a yes/no question."""

from __future__ import annotations

import re
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QHBoxLayout, QLabel, QMessageBox, QToolButton, QWidget

# An unexpected failure's message names its report file (app.errors.write_report, as the CLI prints it).
_REPORT = re.compile(r"the full report is (\S+?\.txt)")


def ask_yes_no(parent: QWidget, title: str, text: str) -> bool:
    buttons = QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No
    answer = QMessageBox.warning(parent, title, text, buttons, QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


class Banner(QWidget):
    """An inline message (error or warning) above the result, with a close button; never modal."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.label = QLabel(objectName="bannerText", wordWrap=True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.copy = QToolButton(text="Copy report", objectName="copyReport")
        self.copy.setToolTip("Copy the full error report (traceback, versions) to paste into a ticket")
        self.copy.clicked.connect(self.copy_report)
        self.copy.hide()
        self.report: Path | None = None
        close = QToolButton(text="✕", autoRaise=True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.copy, 0, Qt.AlignmentFlag.AlignTop)
        lay.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self.hide()

    def copy_report(self) -> None:
        try:
            text = self.report.read_text(encoding="utf-8", errors="replace") if self.report else ""
        except OSError as e:
            text = f"{self.label.text()}\n(the report {self.report} could not be read: {e})"
        QApplication.clipboard().setText(text)

    def show_message(self, text: str, error: bool = True) -> None:
        color = "#b3261e" if error else "#8a6d00"
        self.setStyleSheet(f"Banner {{ border: 1px solid {color}; border-radius: 4px; }} "
                           f"QLabel {{ color: {color}; }}")
        self.label.setText(text)
        m = _REPORT.search(text)
        self.report = Path(m.group(1)) if m else None
        self.copy.setVisible(self.report is not None)
        self.show()

    def text(self) -> str:
        return "" if self.isHidden() else self.label.text()
