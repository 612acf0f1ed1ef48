"""Mask painting for FLUX.2 Klein inpainting: paint over the image what to repaint (white in the mask file),
erase what to keep, invert, clear. The mask has the image's own pixels; generate --mask reads it as diffusers'
Flux2KleinInpaintPipeline reads its mask_image (resized, grey, binarised at 0.5)."""

from __future__ import annotations

import io
from pathlib import Path

from PySide6.QtCore import QPoint, QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QColor, QImage, QMouseEvent, QPainter, QPen
from PySide6.QtWidgets import (QButtonGroup, QDialog, QDialogButtonBox, QHBoxLayout, QLabel, QPushButton, QSlider,
                               QVBoxLayout, QWidget)

OVERLAY = QColor(255, 40, 40, 130)  # what will be repainted, over the image


def read_picture(path: Path) -> QImage:
    """The image as the runtime reads it (EXIF orientation applied), so mask pixels line up with its pixels."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        rgb = ImageOps.exif_transpose(im).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return QImage.fromData(buf.getvalue(), "PNG")


class MaskCanvas(QWidget):
    """The image scaled to fit, the mask painted over it in red. Left button paints with the current tool."""

    changed = Signal()

    def __init__(self, image: QImage, mask: QImage | None = None, parent: QWidget | None = None):
        super().__init__(parent, objectName="maskCanvas")
        self.image = image
        self.mask = QImage(image.size(), QImage.Format.Format_Grayscale8)
        self.mask.fill(0)
        if mask is not None and not mask.isNull():
            self.mask = mask.convertToFormat(QImage.Format.Format_Grayscale8).scaled(image.size())
        self.tool = "brush"  # or "eraser"
        self.radius = max(2, min(image.width(), image.height()) // 12)  # image pixels
        self._last: QPointF | None = None
        self.setMinimumSize(256, 256)
        self.setCursor(Qt.CursorShape.CrossCursor)

    # ----- geometry: widget <-> image pixels --------------------------------------------------------------
    def _target(self) -> QRectF:
        s = min(self.width() / self.image.width(), self.height() / self.image.height())
        w, h = self.image.width() * s, self.image.height() * s
        return QRectF((self.width() - w) / 2, (self.height() - h) / 2, w, h)

    def to_image(self, p: QPointF) -> QPointF:
        t = self._target()
        return QPointF((p.x() - t.x()) * self.image.width() / t.width(),
                       (p.y() - t.y()) * self.image.height() / t.height())

    def to_widget(self, p: QPointF) -> QPoint:
        t = self._target()
        return QPoint(round(t.x() + p.x() * t.width() / self.image.width()),
                      round(t.y() + p.y() * t.height() / self.image.height()))

    # ----- editing ----------------------------------------------------------------------------------------
    def stroke(self, a: QPointF, b: QPointF) -> None:
        """A round stroke from a to b (image pixels) with the current tool."""
        value = 255 if self.tool == "brush" else 0
        p = QPainter(self.mask)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, False)  # a hard mask: 0 or 255
        colour = QColor(value, value, value)
        p.setPen(QPen(colour, 2 * self.radius, Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
        p.drawLine(a, b)
        p.setPen(Qt.PenStyle.NoPen)  # the dab at the end: a zero-length line draws nothing
        p.setBrush(colour)
        p.drawEllipse(b, self.radius, self.radius)
        p.end()
        self.update()
        self.changed.emit()

    def invert(self) -> None:
        self.mask.invertPixels()
        self.update()
        self.changed.emit()

    def clear(self) -> None:
        self.mask.fill(0)
        self.update()
        self.changed.emit()

    def painted_fraction(self) -> float:
        """Share of the image that will be repainted (0..1)."""
        bits = self.mask.constBits()
        row = self.mask.bytesPerLine()
        data = bytes(bits)
        white = sum(data[y * row: y * row + self.mask.width()].count(255) for y in range(self.mask.height()))
        return white / (self.mask.width() * self.mask.height())

    def png(self) -> bytes:
        from PySide6.QtCore import QBuffer, QIODevice

        buf = QBuffer()
        buf.open(QIODevice.OpenModeFlag.WriteOnly)
        self.mask.save(buf, "PNG")
        return bytes(buf.data())

    # ----- Qt events --------------------------------------------------------------------------------------
    def mousePressEvent(self, e: QMouseEvent) -> None:
        if e.button() == Qt.MouseButton.LeftButton:
            self._last = self.to_image(e.position())
            self.stroke(self._last, self._last)

    def mouseMoveEvent(self, e: QMouseEvent) -> None:
        if self._last is not None and e.buttons() & Qt.MouseButton.LeftButton:
            here = self.to_image(e.position())
            self.stroke(self._last, here)
            self._last = here

    def mouseReleaseEvent(self, e: QMouseEvent) -> None:
        self._last = None

    def paintEvent(self, _event) -> None:
        p = QPainter(self)
        t = self._target()
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        p.drawImage(t, self.image)
        overlay = QImage(self.mask.size(), QImage.Format.Format_ARGB32_Premultiplied)
        overlay.fill(OVERLAY)
        alpha = self.mask.convertToFormat(QImage.Format.Format_Alpha8)
        q = QPainter(overlay)
        q.setCompositionMode(QPainter.CompositionMode.CompositionMode_DestinationIn)
        q.drawImage(0, 0, alpha)
        q.end()
        p.drawImage(t, overlay)
        p.end()


class MaskDialog(QDialog):
    """Brush, eraser, size, invert, clear; OK keeps the mask. Red = repainted by the model."""

    def __init__(self, image_path: Path, mask_path: Path | None = None, parent: QWidget | None = None):
        super().__init__(parent, objectName="maskDialog")
        self.setWindowTitle(f"Inpainting mask — {Path(image_path).name}")
        existing = QImage(str(mask_path)) if mask_path and Path(mask_path).is_file() else None
        self.canvas = MaskCanvas(read_picture(Path(image_path)), existing)
        self.brush = QPushButton("Brush", objectName="maskBrush", checkable=True, checked=True,
                                 toolTip="Paint what the model redraws")
        self.eraser = QPushButton("Eraser", objectName="maskEraser", checkable=True, toolTip="Keep what you erase")
        group = QButtonGroup(self)
        group.addButton(self.brush)
        group.addButton(self.eraser)
        self.invert = QPushButton("Invert", objectName="maskInvert")
        self.clear = QPushButton("Clear", objectName="maskClear")
        self.size = QSlider(Qt.Orientation.Horizontal, objectName="maskSize", minimum=1,
                            maximum=max(2, max(self.canvas.image.width(), self.canvas.image.height()) // 4),
                            value=self.canvas.radius, toolTip="Brush radius in image pixels")
        self.status = QLabel(objectName="maskStatus")
        tools = QHBoxLayout()
        for w in (self.brush, self.eraser, QLabel("Size"), self.size, self.invert, self.clear):
            tools.addWidget(w)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        lay = QVBoxLayout(self)
        lay.addLayout(tools)
        lay.addWidget(self.canvas, 1)
        lay.addWidget(self.status)
        lay.addWidget(self.buttons)
        self.brush.toggled.connect(lambda on: self._tool("brush" if on else "eraser"))
        self.size.valueChanged.connect(lambda v: setattr(self.canvas, "radius", v))
        self.invert.clicked.connect(self.canvas.invert)
        self.clear.clicked.connect(self.canvas.clear)
        self.canvas.changed.connect(self._changed)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        self.resize(640, 560)
        self._changed()

    def _tool(self, name: str) -> None:
        self.canvas.tool = name

    def _changed(self) -> None:
        share = self.canvas.painted_fraction()
        self.status.setText(f"{share:.0%} of the image will be redrawn" if share else
                            "Paint over what the model should redraw")
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(share > 0)
