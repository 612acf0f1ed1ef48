"""Reads the GPU about once a second in its own QThread and emits GpuSample data; never touches widgets."""

from __future__ import annotations

import time

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from app.planning.devices import GpuReader
from app.ui.gpustats import read_sample


class GpuMonitor(QObject):
    sampled = Signal(object)  # GpuSample

    def __init__(self, reader: GpuReader, interval_ms: int = 1000):
        super().__init__()
        self.reader, self.interval_ms = reader, interval_ms
        self._timer: QTimer | None = None

    @Slot()
    def start(self) -> None:
        # Created here so the timer belongs to (and fires in) the monitor thread.
        self._timer = QTimer(self)
        self._timer.setInterval(self.interval_ms)
        self._timer.timeout.connect(self.poll)
        self._timer.start()
        self.poll()

    @Slot()
    def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()

    @Slot()
    def poll(self) -> None:
        self.sampled.emit(read_sample(self.reader, time.time()))


class MonitorThread(QObject):
    """Owns the monitor and its thread: start() once, shutdown() when the window closes."""

    sampled = Signal(object)

    def __init__(self, reader: GpuReader, interval_ms: int = 1000, parent: QObject | None = None):
        super().__init__(parent)
        self.worker_thread = QThread()
        self.worker_thread.setObjectName("edgegen-gpu-monitor")
        self.monitor = GpuMonitor(reader, interval_ms)
        self.monitor.moveToThread(self.worker_thread)
        self.worker_thread.started.connect(self.monitor.start)
        self.worker_thread.finished.connect(self.monitor.deleteLater)
        self.monitor.sampled.connect(self.sampled)

    def start(self) -> None:
        self.worker_thread.start()

    def shutdown(self) -> None:
        if self.worker_thread.isRunning():
            # Quitting ends the thread's event loop, so its timer stops; `finished` then frees the monitor.
            self.worker_thread.quit()
            self.worker_thread.wait(5000)
