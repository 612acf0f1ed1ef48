"""The gallery: thumbnails from the history database, prompt search, show, reuse parameters, delete with the file."""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import QSize, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QIcon, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.ui.history import THUMB_PX, Entry, History

ID_ROLE = Qt.ItemDataRole.UserRole
SHOWN = 500  # thumbnails kept in the list (each costs ~100 KB of pixmap)


def ask_delete(parent: QWidget, entry: Entry) -> bool:
    answer = QMessageBox.question(parent, "Delete image",
                                  f"Delete this image and its file?\n\n{entry.path}",
                                  QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                  QMessageBox.StandardButton.No)
    return answer == QMessageBox.StandardButton.Yes


class GalleryWidget(QWidget):
    show_requested = Signal(object)  # Entry
    reuse_requested = Signal(object)  # Entry

    def __init__(self, history: History, parent: QWidget | None = None,
                 confirm_delete: Callable[[QWidget, Entry], bool] = ask_delete):
        super().__init__(parent)
        self.history, self.confirm_delete = history, confirm_delete
        self.search = QLineEdit(objectName="gallerySearch", placeholderText="Search prompts…", clearButtonEnabled=True)
        self.count_label = QLabel(objectName="galleryCount")
        self.list = QListWidget(objectName="galleryList")
        self.list.setViewMode(QListWidget.ViewMode.IconMode)
        self.list.setResizeMode(QListWidget.ResizeMode.Adjust)
        self.list.setMovement(QListWidget.Movement.Static)
        self.list.setUniformItemSizes(True)
        self.list.setWordWrap(True)
        self.list.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.list.setSpacing(6)
        self.show_button = QPushButton("Show", objectName="galleryShow")
        self.reuse_button = QPushButton("Reuse parameters", objectName="galleryReuse")
        self.folder_button = QPushButton("Open folder", objectName="galleryFolder")
        self.delete_button = QPushButton("Delete", objectName="galleryDelete")
        top = QHBoxLayout()
        top.addWidget(self.search, 1)
        top.addWidget(self.count_label)
        buttons = QHBoxLayout()
        for b in (self.show_button, self.reuse_button, self.folder_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.delete_button)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.list, 1)
        lay.addLayout(buttons)

        self._debounce = QTimer(self, singleShot=True, interval=200)
        self._debounce.timeout.connect(self.refresh)
        self.search.textChanged.connect(self._debounce.start)
        self.list.itemDoubleClicked.connect(lambda _: self._emit(self.show_requested))
        self.list.itemSelectionChanged.connect(self._selection_changed)
        self.show_button.clicked.connect(lambda: self._emit(self.show_requested))
        self.reuse_button.clicked.connect(lambda: self._emit(self.reuse_requested))
        self.folder_button.clicked.connect(self._open_folder)
        self.delete_button.clicked.connect(lambda: self.delete_selected())
        self.refresh()

    def refresh(self) -> None:
        selected = self.selected_id()
        entries = self.history.search(self.search.text(), limit=SHOWN)
        self.list.clear()
        for e in entries:
            item = self._item(e)
            self.list.addItem(item)
            if e.id == selected:
                item.setSelected(True)
        self._count(len(entries))

    def add_new(self, entry_id: int) -> None:
        """Put a just-saved image first without reloading every thumbnail (keeps the GUI thread quick)."""
        entry = self.history.get(entry_id)
        if entry is None:
            return
        query = self.search.text().strip().lower()
        if not query or query in entry.prompt.lower() or query in entry.meta.get("negative_prompt", "").lower():
            self.list.insertItem(0, self._item(entry))
            while self.list.count() > SHOWN:  # as many as refresh() shows; older ones are a search away
                self.list.takeItem(self.list.count() - 1)
        self._count(self.list.count())

    def _item(self, e: Entry) -> QListWidgetItem:
        item = QListWidgetItem(self._icon(e), _short(e.prompt))
        item.setData(ID_ROLE, e.id)
        item.setToolTip(f"{e.prompt}\nseed {e.meta.get('seed')} · {e.meta.get('width')}×{e.meta.get('height')}"
                        f"\n{e.path}" + ("" if e.exists else "\n(file missing)"))
        return item

    def _count(self, shown: int) -> None:
        total = self.history.count()
        noun = "image" if total == 1 else "images"
        self.count_label.setText(f"{shown} of {total} {noun}" if self.search.text() else f"{total} {noun}")
        self._selection_changed()

    def _icon(self, e: Entry) -> QIcon:
        pm = QPixmap()
        if e.thumbnail:
            pm.loadFromData(e.thumbnail, "PNG")
        if not pm.isNull() and max(pm.width(), pm.height()) < THUMB_PX:  # small images: enlarge, keep pixels crisp
            pm = pm.scaled(THUMB_PX, THUMB_PX, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.FastTransformation)
        return QIcon(pm)

    def entries_shown(self) -> list[int]:
        return [self.list.item(i).data(ID_ROLE) for i in range(self.list.count())]

    def selected_id(self) -> int | None:
        items = self.list.selectedItems()
        return items[0].data(ID_ROLE) if items else None

    def select(self, entry_id: int) -> None:
        for i in range(self.list.count()):
            if self.list.item(i).data(ID_ROLE) == entry_id:
                self.list.setCurrentRow(i)
                return

    def selected_entry(self) -> Entry | None:
        entry_id = self.selected_id()
        return None if entry_id is None else self.history.get(entry_id)

    def delete_selected(self, confirm: bool = True) -> bool:
        entry = self.selected_entry()
        if entry is None or (confirm and not self.confirm_delete(self, entry)):
            return False
        self.history.delete(entry.id, delete_file=True)
        self.refresh()
        return True

    def _emit(self, signal) -> None:
        entry = self.selected_entry()
        if entry is not None:
            signal.emit(entry)

    def _open_folder(self) -> None:
        entry = self.selected_entry()
        if entry is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(entry.path.parent)))

    def _selection_changed(self) -> None:
        has = self.selected_id() is not None
        for b in (self.show_button, self.reuse_button, self.folder_button, self.delete_button):
            b.setEnabled(has)


def _short(text: str, n: int = 40) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"
