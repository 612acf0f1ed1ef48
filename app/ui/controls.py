"""The ControlNet panel: one control image for one of the bundle's SD3.5 ControlNets, with its strength and window.

Shown only for a bundle exported with --controlnet (docs/CONTROLNET.md). The image is preprocessed by the net's
preprocessor (canny edges, blur) unless "Already a map" is ticked, exactly as `generate --control` does; the
panel shows the map the net will see. One control per image in the app; the CLI and the API take several.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from app.runtime.controls import MAX_SCALE, Control

THUMB = 96


class ControlPanel(QWidget):
    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.nets: dict[str, dict] = {}
        self.image_path: Path | None = None
        self.title = QLabel("ControlNet")
        self.net = QComboBox(objectName="controlNet")
        self.choose = QPushButton("Image…", objectName="controlChoose")
        self.clear = QPushButton("Clear", objectName="controlClear", enabled=False)
        self.thumb = QLabel(objectName="controlThumb", alignment=Qt.AlignmentFlag.AlignCenter)
        self.thumb.setFixedSize(THUMB, THUMB)
        self.thumb.setToolTip("The map the ControlNet sees")
        self.as_is = QCheckBox("Already a map", objectName="controlAsIs")
        self.as_is.setToolTip("The image is already edges / blurred / a depth map: no preprocessing")
        self.scale = QDoubleSpinBox(objectName="controlScale", decimals=2, singleStep=0.05, maximum=MAX_SCALE)
        self.start = QDoubleSpinBox(objectName="controlStart", decimals=2, singleStep=0.05, maximum=1.0)
        self.end = QDoubleSpinBox(objectName="controlEnd", decimals=2, singleStep=0.05, maximum=1.0)
        self.scale.setValue(1.0)
        self.end.setValue(1.0)
        self.scale.setToolTip("controlnet_conditioning_scale: how strongly the image steers")
        self.start.setToolTip("From this fraction of the steps")
        self.end.setToolTip("Until this fraction of the steps")
        top = QHBoxLayout()
        top.addWidget(self.net, 1)
        top.addWidget(self.choose)
        top.addWidget(self.clear)
        grid = QGridLayout()
        grid.addWidget(QLabel("Strength"), 0, 0)
        grid.addWidget(self.scale, 0, 1)
        grid.addWidget(QLabel("Steps"), 1, 0)
        window = QHBoxLayout()
        window.addWidget(self.start)
        window.addWidget(QLabel("to"))
        window.addWidget(self.end)
        grid.addLayout(window, 1, 1)
        grid.addWidget(self.as_is, 2, 0, 1, 2)
        body = QHBoxLayout()
        body.addWidget(self.thumb)
        body.addLayout(grid, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.title)
        lay.addLayout(top)
        lay.addLayout(body)
        self.choose.clicked.connect(self._pick)
        self.clear.clicked.connect(lambda: self.set_image(None))
        for sig in (self.net.currentTextChanged, self.as_is.toggled):
            sig.connect(lambda *_: self._refresh())
        for box in (self.scale, self.start, self.end):
            box.valueChanged.connect(lambda *_: self.changed.emit())
        self.setVisible(False)

    def set_model(self, manifest: dict | None) -> None:
        """The bundle's nets (none: the panel hides and the request carries no control)."""
        self.nets = dict((manifest or {}).get("controlnets") or {})
        self.net.blockSignals(True)
        self.net.clear()
        for name, rec in self.nets.items():
            self.net.addItem(f"{name} ({rec.get('preprocessor', 'none')})", name)
        self.net.blockSignals(False)
        self.setVisible(bool(self.nets))
        if not self.nets:
            self.set_image(None)
        self._refresh()

    def _pick(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Control image", "", "Images (*.png *.jpg *.jpeg *.webp)")
        if path:
            self.set_image(Path(path))

    def set_image(self, path: Path | None) -> None:
        self.image_path = Path(path) if path else None
        self.clear.setEnabled(self.image_path is not None)
        self._refresh()

    def set_choice(self, name: str, scale: float, start: float, end: float, preprocessed: bool) -> None:
        """Reuse a recorded control (an image's metadata)."""
        i = self.net.findData(name)
        if i >= 0:
            self.net.setCurrentIndex(i)
        self.scale.setValue(scale)
        self.start.setValue(start)
        self.end.setValue(end)
        self.as_is.setChecked(preprocessed)

    def values(self) -> tuple[Control, ...]:
        if not self.nets or self.image_path is None or self.net.currentData() is None:
            return ()
        return (Control(self.net.currentData(), str(self.image_path), round(self.scale.value(), 2),
                        round(self.start.value(), 2), round(self.end.value(), 2), not self.as_is.isChecked()),)

    def problem(self) -> str:
        if self.values() and not self.start.value() < self.end.value():
            return "The ControlNet's start must be before its end."
        return ""

    def _refresh(self) -> None:
        """The thumbnail: the map the net will see (its preprocessor on the image at a thumbnail's size)."""
        name, text, tip, pixmap = self.net.currentData(), "no image", "The map the ControlNet sees", None
        if self.image_path is not None and name in self.nets:
            from app.runtime.controls import control_picture
            from app.runtime.references import read_image

            try:
                img = read_image(self.image_path, "the control image").image
                w, h = img.size
                s = THUMB / max(w, h)
                pic = control_picture(img, max(1, round(w * s)), max(1, round(h * s)),
                                      self.nets[name].get("preprocessor", "none"), not self.as_is.isChecked())
                qimg = QImage(pic.tobytes(), pic.width, pic.height, pic.width * 3, QImage.Format.Format_RGB888)
                pixmap = QPixmap.fromImage(qimg.copy())
                tip = f"{self.image_path.name}: the map the ControlNet sees"
            except Exception as e:  # noqa: BLE001 - an unreadable file shows as a message, never a crash
                text, tip = "?", str(e)
        if pixmap is not None:
            self.thumb.setPixmap(pixmap)
        else:
            self.thumb.clear()
            self.thumb.setText(text)
        self.thumb.setToolTip(tip)
        self.changed.emit()
