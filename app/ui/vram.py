"""The VRAM panel: used/total, a sparkline of recent use, utilisation, temperature, this process's share."""

from __future__ import annotations

from collections import deque

from PySide6.QtCore import QPointF, QSize, Slot
from PySide6.QtGui import QPainter, QPainterPath, QPalette, QPen
from PySide6.QtWidgets import QGroupBox, QLabel, QSizePolicy, QVBoxLayout, QWidget

from app.ui.gpustats import GpuSample

NO_GPU = "No NVIDIA GPU — running on CPU"
GIB = 1024**3


class Sparkline(QWidget):
    """Fractions in [0, 1], newest on the right, drawn with QPainter; scales with the font for high DPI."""

    def __init__(self, length: int = 60, parent: QWidget | None = None):
        super().__init__(parent)
        self.values: deque[float] = deque(maxlen=length)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMinimumHeight(self.fontMetrics().height() * 3)

    def sizeHint(self) -> QSize:
        h = self.fontMetrics().height()
        return QSize(h * 12, h * 3)

    def add(self, value: float) -> None:
        self.values.append(min(max(value, 0.0), 1.0))
        self.update()

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = self.rect().adjusted(1, 1, -1, -1)
        pal = self.palette()
        p.fillRect(rect, pal.color(QPalette.ColorRole.Base))
        p.setPen(QPen(pal.color(QPalette.ColorRole.Mid), 1))
        p.drawRect(rect)
        n = self.values.maxlen or 1
        if len(self.values) >= 1:
            dx = rect.width() / max(n - 1, 1)
            x0 = rect.right() - dx * (len(self.values) - 1)
            pts = [QPointF(x0 + i * dx, rect.bottom() - v * rect.height()) for i, v in enumerate(self.values)]
            path = QPainterPath(pts[0])
            for pt in pts[1:]:
                path.lineTo(pt)
            fill = QPainterPath(path)
            fill.lineTo(pts[-1].x(), rect.bottom())
            fill.lineTo(pts[0].x(), rect.bottom())
            fill.closeSubpath()
            color = pal.color(QPalette.ColorRole.Highlight)
            soft = color.lighter(100)
            soft.setAlpha(60)
            p.fillPath(fill, soft)
            p.setPen(QPen(color, 1.5))
            p.drawPath(path)
        p.end()


def _gib(n: int | None) -> str:
    return "–" if n is None else f"{n / GIB:.1f} GiB"


class VramWidget(QGroupBox):
    """Shows GpuSample data; the window connects it to a GpuMonitor."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__("GPU memory", parent)
        self.summary = QLabel("Reading the GPU…")
        self.summary.setObjectName("vramSummary")
        self.details = QLabel("")
        self.details.setObjectName("vramDetails")
        self.details.setWordWrap(True)
        self.graph = Sparkline()
        lay = QVBoxLayout(self)
        lay.addWidget(self.summary)
        lay.addWidget(self.graph)
        lay.addWidget(self.details)
        self.last: GpuSample | None = None

    @Slot(object)
    def show_sample(self, sample: GpuSample) -> None:
        self.last = sample
        g = sample.gpu
        if g is None:
            self.summary.setText(NO_GPU)
            self.details.setText("Generation runs on the CPU with ONNX Runtime; no GPU memory to show.")
            self.graph.setVisible(False)
            return
        self.graph.setVisible(True)
        if g.total_bytes:
            self.summary.setText(f"{g.name}: {_gib(g.used_bytes)} / {_gib(g.total_bytes)} used")
            self.graph.add((g.used_bytes or 0) / g.total_bytes)
        else:  # unified memory parts: NVML reports no framebuffer size
            self.summary.setText(f"{g.name}: shared system memory (no VRAM figures)")
        e = sample.extras
        util = "–" if e.utilisation is None else f"{e.utilisation}%"
        temp = "–" if e.temperature is None else f"{e.temperature} °C"
        self.details.setText(f"Utilisation {util} · Temperature {temp} · This app {_gib(e.process_bytes)}")
        self.setToolTip(f"{g.name}, sm{g.sm}, driver {g.driver}")

    def text(self) -> str:
        return f"{self.summary.text()}\n{self.details.text()}"
