"""The visible job queue: the running job first, then the waiting ones; cancel, remove, clear."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QGroupBox,
    QHBoxLayout,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.ui.jobs import JobQueue


class QueueView(QGroupBox):
    def __init__(self, queue: JobQueue, parent: QWidget | None = None):
        super().__init__("Queue", parent)
        self.queue = queue
        self.list = QListWidget(objectName="queueList")
        lines = self.fontMetrics().lineSpacing()
        self.list.setMaximumHeight(lines * 6)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setUniformItemSizes(True)
        self.remove = QPushButton("Remove", objectName="queueRemove")
        self.remove.setToolTip("Take the selected waiting job off the queue")
        self.clear = QPushButton("Clear waiting", objectName="queueClear")
        buttons = QHBoxLayout()
        buttons.addWidget(self.remove)
        buttons.addWidget(self.clear)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.addWidget(self.list)
        lay.addLayout(buttons)
        self.remove.clicked.connect(self._remove)
        self.clear.clicked.connect(queue.clear_pending)
        queue.changed.connect(self.refresh)
        self.list.itemSelectionChanged.connect(self._buttons)
        self.refresh()

    def refresh(self) -> None:
        jobs = self.queue.jobs()
        self.list.clear()
        for job in jobs:
            item = QListWidgetItem(job.label())
            item.setData(Qt.ItemDataRole.UserRole, job.id)
            item.setToolTip(job.request.prompt)
            self.list.addItem(item)
        waiting = len(self.queue.pending)
        self.setTitle(f"Queue — {waiting} waiting" if waiting else "Queue")
        self.setVisible(bool(jobs))
        self._buttons()

    def _remove(self) -> None:
        for item in self.list.selectedItems():
            self.queue.remove(item.data(Qt.ItemDataRole.UserRole))

    def _buttons(self) -> None:
        pending = {j.id for j in self.queue.pending}
        self.remove.setEnabled(any(i.data(Qt.ItemDataRole.UserRole) in pending for i in self.list.selectedItems()))
        self.clear.setEnabled(bool(pending))
