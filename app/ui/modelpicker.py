"""The model picker: bundles found in the engines folder, each with family, precision, target and fit."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QStyle, QVBoxLayout, QWidget

from app.ui.catalog import BundleEntry


class ModelPicker(QWidget):
    selected = Signal(object)  # BundleEntry, or None when there is nothing to pick
    refresh_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = QComboBox(objectName="modelPicker")
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(24)
        self.refresh = QPushButton(objectName="refreshModels")
        self.refresh.setIcon(self.style().standardIcon(QStyle.StandardPixmap.SP_BrowserReload))
        self.refresh.setToolTip("Look for bundles in the engines folder again")
        self.info = QLabel(objectName="modelInfo", wordWrap=True)
        row = QHBoxLayout()
        row.addWidget(self.combo, 1)
        row.addWidget(self.refresh)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.info)
        self.entries: list[BundleEntry] = []
        self.engines_folders: list[Path] = []
        self.combo.currentIndexChanged.connect(self._chosen)
        self.refresh.clicked.connect(self.refresh_requested)

    def set_entries(self, entries: list[BundleEntry], engines_folders: list[Path], select: Path | None = None) -> None:
        self.entries, self.engines_folders = list(entries), list(engines_folders)
        self.combo.blockSignals(True)
        self.combo.clear()
        for e in self.entries:
            self.combo.addItem(e.label(), str(e.path))
            self.combo.setItemData(self.combo.count() - 1, f"{e.details()}\n{e.path}", Qt.ItemDataRole.ToolTipRole)
        index = 0
        if select is not None:
            want = str(Path(select).resolve())
            index = next((i for i, e in enumerate(self.entries) if str(e.path.resolve()) == want), 0)
        self.combo.setCurrentIndex(index if self.entries else -1)
        self.combo.blockSignals(False)
        self._chosen(self.combo.currentIndex())

    def current(self) -> BundleEntry | None:
        i = self.combo.currentIndex()
        return self.entries[i] if 0 <= i < len(self.entries) else None

    def _chosen(self, index: int) -> None:
        entry = self.current()
        if entry is None:
            where = " or ".join(str(f) for f in self.engines_folders) or "the engines folder"
            first = self.engines_folders[0] if self.engines_folders else Path("engines")
            self.info.setText(f"No engine bundles in {where}. Export one with: edgegen export --model DIR "
                              f"--out {first / 'NAME'}, or choose another engines folder in Settings.")
        else:
            self.info.setText(entry.details())
            self.info.setToolTip(str(entry.path))
        self.selected.emit(entry if entry is not None and not entry.error else None)
