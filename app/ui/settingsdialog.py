"""The Settings dialog: output folder, engines folder and default backend."""

from __future__ import annotations

from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QPushButton,
    QWidget,
)

from app.ui.form import BACKENDS
from app.ui.settings import Settings


class SettingsDialog(QDialog):
    def __init__(self, settings: Settings, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.output = QLineEdit(str(settings.output_path), objectName="settingsOutput")
        self.engines = QLineEdit(str(settings.engines_path), objectName="settingsEngines")
        self.backend = QComboBox(objectName="settingsBackend")
        self.backend.addItems(BACKENDS)
        self.backend.setCurrentText(settings.backend)
        form = QFormLayout(self)
        form.addRow("Save images to", self._with_browse(self.output, "Choose the output folder"))
        form.addRow("Engines folder", self._with_browse(self.engines, "Choose the folder that holds bundles"))
        form.addRow("Default backend", self.backend)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)
        self.settings = settings

    def _with_browse(self, edit: QLineEdit, title: str) -> QHBoxLayout:
        row = QHBoxLayout()
        browse = QPushButton("Browse…")
        browse.clicked.connect(lambda: self._browse(edit, title))
        row.addWidget(edit, 1)
        row.addWidget(browse)
        return row

    def _browse(self, edit: QLineEdit, title: str) -> None:
        folder = QFileDialog.getExistingDirectory(self, title, edit.text())
        if folder:
            edit.setText(folder)

    def result_settings(self) -> Settings:
        """The edited settings; a folder left as shown keeps following the default rather than pinning it."""
        s = self.settings

        def chosen(edit: QLineEdit, shown: object, current: str) -> str:
            text = edit.text().strip()
            return current if text == str(shown) else text

        return s.replace(output_folder=chosen(self.output, s.output_path, s.output_folder),
                         engines_folder=chosen(self.engines, s.engines_path, s.engines_folder),
                         backend=self.backend.currentText())
