"""The result pane: the image with fit/zoom, copy and open-folder, its parameters, and job progress."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices, QGuiApplication, QImage, QPixmap
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

ZOOM_STEPS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


class ImageView(QScrollArea):
    """Shows a QImage scaled to fit the viewport, or at a fixed zoom with scroll bars."""

    zoom_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.label = QLabel(alignment=Qt.AlignmentFlag.AlignCenter, objectName="resultImage")
        self.label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Ignored)
        self.setWidget(self.label)
        self.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.setWidgetResizable(True)
        self.image = QImage()
        self.fit = True
        self.zoom = 1.0
        self.smooth = False

    def set_image(self, image: QImage, smooth: bool = False) -> None:
        self.image, self.smooth = image, smooth
        self._render()

    def set_placeholder(self, text: str) -> None:
        self.image = QImage()
        self.label.setPixmap(QPixmap())
        self.label.setText(text)

    def fit_to_window(self) -> None:
        self.fit = True
        self._render()

    def actual_size(self) -> None:
        self.fit, self.zoom = False, 1.0
        self._render()

    def zoom_by(self, direction: int) -> None:
        current = self._effective_zoom()
        if direction > 0:
            nxt = next((z for z in ZOOM_STEPS if z > current + 1e-6), ZOOM_STEPS[-1])
        else:
            nxt = next((z for z in reversed(ZOOM_STEPS) if z < current - 1e-6), ZOOM_STEPS[0])
        self.fit, self.zoom = False, nxt
        self._render()

    def _effective_zoom(self) -> float:
        if self.image.isNull():
            return 1.0
        if not self.fit:
            return self.zoom
        vp = self.viewport().size()
        return max(min(vp.width() / self.image.width(), vp.height() / self.image.height()), 0.01)

    def _render(self) -> None:
        if self.image.isNull():
            return
        self.label.setText("")
        z = self._effective_zoom()
        pm = QPixmap.fromImage(self.image)
        dpr = self.devicePixelRatioF()
        # Scale in device pixels so the image stays sharp on high-DPI screens; pixelated when enlarged.
        smooth = z < 1 or self.smooth  # a preview is enlarged smoothly: its pixels are not the image's
        mode = Qt.TransformationMode.SmoothTransformation if smooth else Qt.TransformationMode.FastTransformation
        size = self.image.size() * (z * dpr)
        scaled = pm.scaled(size, Qt.AspectRatioMode.KeepAspectRatio, mode)
        scaled.setDevicePixelRatio(dpr)
        self.setWidgetResizable(self.fit)
        self.label.setPixmap(scaled)
        if not self.fit:
            self.label.resize(scaled.size() / dpr)
        self.zoom_changed.emit("Fit" if self.fit else f"{z * 100:.0f}%")

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if self.fit:
            self._render()


class ResultView(QWidget):
    PLACEHOLDER = "Your image appears here.\nType a prompt and press Ctrl+Enter."

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.view = ImageView()
        self.view.set_placeholder(self.PLACEHOLDER)
        self.path: Path | None = None
        self.meta: dict = {}

        def button(text: str, name: str, tip: str) -> QPushButton:
            b = QPushButton(text, objectName=name)
            b.setToolTip(tip)
            return b

        self.fit = button("Fit", "fit", "Fit the image to the window")
        self.actual = button("1:1", "actualSize", "Show the image at its real size")
        self.zoom_in = button("+", "zoomIn", "Zoom in")
        self.zoom_out = button("−", "zoomOut", "Zoom out")
        self.zoom_label = QLabel("Fit", objectName="zoomLabel")
        self.copy = button("Copy", "copyImage", "Copy the image to the clipboard (Ctrl+C)")
        self.open_folder = button("Open folder", "openFolder", "Show the saved file's folder")
        bar = QHBoxLayout()
        for w in (self.fit, self.actual, self.zoom_out, self.zoom_in, self.zoom_label):
            bar.addWidget(w)
        bar.addStretch(1)
        bar.addWidget(self.copy)
        bar.addWidget(self.open_folder)
        self.caption = QLabel(objectName="resultCaption", wordWrap=True)
        self.caption.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.caption.setSizePolicy(QSizePolicy.Policy.Preferred, QSizePolicy.Policy.Minimum)
        self.progress = QProgressBar(objectName="progress", textVisible=True)
        self.progress.setVisible(False)
        lay = QVBoxLayout(self)
        lay.addLayout(bar)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.progress)
        lay.addWidget(self.caption)

        self.fit.clicked.connect(self.view.fit_to_window)
        self.actual.clicked.connect(self.view.actual_size)
        self.zoom_in.clicked.connect(lambda: self.view.zoom_by(+1))
        self.zoom_out.clicked.connect(lambda: self.view.zoom_by(-1))
        self.view.zoom_changed.connect(self.zoom_label.setText)
        self.copy.clicked.connect(self.copy_image)
        self.open_folder.clicked.connect(self.show_folder)
        self._enable(False)

    def _enable(self, has_image: bool) -> None:
        for b in (self.fit, self.actual, self.zoom_in, self.zoom_out, self.copy):
            b.setEnabled(has_image)
        self.open_folder.setEnabled(self.path is not None)

    def show_image(self, image: QImage, path: Path | None, meta: dict, seconds: float | None = None) -> None:
        self.path, self.meta = path, dict(meta)
        self.view.set_image(image)
        took = f" · {seconds:.1f} s" if seconds else ""
        neg = f"\nNegative: {meta['negative_prompt']}" if meta.get("negative_prompt") else ""
        self.caption.setText(
            f"{meta.get('prompt', '')}{neg}\nseed {meta.get('seed')} · {meta.get('steps')} steps · guidance "
            f"{meta.get('guidance')} · {meta.get('width')}×{meta.get('height')} · {meta.get('backend', '')}{took}"
            + (f"\n{path}" if path else "")
        )
        self._enable(not image.isNull())

    def show_preview(self, image: QImage, caption: str) -> None:
        """A step preview (a small picture, scaled smoothly to fit): not a result, so nothing to copy or open."""
        self.path, self.meta = None, {}
        self.view.fit = True
        self.view.set_image(image, smooth=True)
        self.caption.setText(caption)
        self._enable(False)

    def clear(self, text: str = PLACEHOLDER) -> None:
        self.path, self.meta = None, {}
        self.view.set_placeholder(text)
        self.caption.setText("")
        self._enable(False)

    def has_image(self) -> bool:
        return not self.view.image.isNull()

    def copy_image(self) -> bool:
        if not self.has_image():
            return False
        QGuiApplication.clipboard().setImage(self.view.image)
        return True

    def show_folder(self) -> None:
        if self.path is not None:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.path.parent)))

    # ----- progress -------------------------------------------------------------------------------
    def show_progress(self, text: str, step: int = 0, total: int = 0) -> None:
        self.progress.setVisible(True)
        self.progress.setRange(0, total or 0)  # 0..0 is Qt's busy indicator, for loading
        self.progress.setValue(step)
        self.progress.setFormat(text)

    def hide_progress(self) -> None:
        self.progress.setVisible(False)
