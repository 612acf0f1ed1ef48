"""The reference strip: input images as thumbnails (drop, add, remove, reorder) and SD3.5's strength slider.

FLUX.2 Klein takes up to the bundle's `max_images` references; SD3.5 takes one init image and a strength.
A bundle exported without the VAE encoder takes none: the strip says how to re-export it.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImageReader, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

THUMB = 64
IMAGE_FILTER = "Images (*.png *.jpg *.jpeg *.webp *.bmp *.tif *.tiff)"


def dropped_files(mime) -> list[Path]:
    return [Path(u.toLocalFile()) for u in mime.urls() if u.isLocalFile()] if mime.hasUrls() else []


def thumbnail(path: Path) -> QIcon | None:
    reader = QImageReader(str(path))
    reader.setAutoTransform(True)  # EXIF orientation, as the runtime reads it
    image = reader.read()
    if image.isNull():
        return None
    return QIcon(QPixmap.fromImage(image.scaled(THUMB, THUMB, Qt.AspectRatioMode.KeepAspectRatio,
                                                Qt.TransformationMode.SmoothTransformation)))


class ReferenceStrip(QWidget):
    changed = Signal()
    problem = Signal(str)  # a file that could not be added, and why

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.max_images = 0
        self.family = ""
        self.mask_dir: Path | None = None  # where painted masks are saved (the app's data folder)
        self.mask_path: Path | None = None  # FLUX.2 Klein inpainting: the mask of the first image
        self._mask_for: Path | None = None
        self.title = QLabel("Reference images", objectName="referenceTitle")
        self.list = QListWidget(objectName="referenceList")
        self.list.setViewMode(QListView.ViewMode.IconMode)
        self.list.setFlow(QListView.Flow.LeftToRight)
        self.list.setWrapping(False)
        self.list.setIconSize(QSize(THUMB, THUMB))
        self.list.setFixedHeight(THUMB + 40)
        self.list.setMovement(QListView.Movement.Snap)
        self.list.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)  # reorder by dragging
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.list.model().rowsMoved.connect(lambda *_: (self._update(), self.changed.emit()))
        self.add_button = QPushButton("Add…", objectName="referenceAdd")
        self.remove_button = QPushButton("Remove", objectName="referenceRemove")
        self.left_button = QPushButton("◀", objectName="referenceLeft", toolTip="Move earlier (the first sets the size)")
        self.right_button = QPushButton("▶", objectName="referenceRight", toolTip="Move later")
        self.mask_button = QPushButton("Mask…", objectName="referenceMask",
                                       toolTip="FLUX.2 Klein inpainting: paint what to redraw on the first image")
        self.unmask_button = QPushButton("No mask", objectName="referenceUnmask",
                                         toolTip="Drop the mask: the images are references again")
        self.mask_button.clicked.connect(self.edit_mask)
        self.unmask_button.clicked.connect(lambda: self.set_mask(None))
        buttons = QHBoxLayout()
        for b in (self.add_button, self.remove_button, self.left_button, self.right_button, self.mask_button,
                  self.unmask_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        self.hint = QLabel(objectName="referenceHint", wordWrap=True)
        self.hint.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.strength = QSlider(Qt.Orientation.Horizontal, objectName="strength", minimum=1, maximum=100, value=60)
        self.strength.setToolTip("How much of the init image to redraw: 1.0 redraws everything")
        self.strength_label = QLabel(objectName="strengthLabel")
        strength_row = QHBoxLayout()
        strength_row.addWidget(QLabel("Strength"))
        strength_row.addWidget(self.strength, 1)
        strength_row.addWidget(self.strength_label)
        self.strength_row = QWidget()
        self.strength_row.setLayout(strength_row)
        strength_row.setContentsMargins(0, 0, 0, 0)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.title)
        lay.addWidget(self.list)
        lay.addLayout(buttons)
        lay.addWidget(self.strength_row)
        lay.addWidget(self.hint)
        self.setAcceptDrops(True)

        self.add_button.clicked.connect(self.choose_files)
        self.remove_button.clicked.connect(self.remove_selected)
        self.left_button.clicked.connect(lambda: self.move_selected(-1))
        self.right_button.clicked.connect(lambda: self.move_selected(1))
        self.strength.valueChanged.connect(self._strength_changed)
        self.list.itemSelectionChanged.connect(self._update)
        self._strength_changed()
        self.set_model("", 0, None)

    # ----- model ------------------------------------------------------------------------------------
    def set_model(self, family: str, max_images: int, missing_encoder_hint: str | None) -> None:
        """What the selected bundle takes; `missing_encoder_hint` (the export command) when it has no encoder."""
        self.family, self.max_images = family, max_images
        sd3 = family == "sd3.5"
        self.title.setText("Init image (image-to-image)" if sd3 else "Reference images")
        if family != "flux2-klein":
            self.mask_path = self._mask_for = None
        if missing_encoder_hint:
            self.hint.setText(f"This model was exported without the VAE encoder, so it cannot take images. "
                              f"Re-export it with: {missing_encoder_hint}")
        elif max_images:
            what = "one image to start from" if sd3 else f"up to {max_images} images; the first sets the size"
            self.hint.setText(f"Drop or add {what}.")
        else:
            self.hint.setText("")
        self.hint.setVisible(bool(self.hint.text()))
        while self.list.count() > max_images:
            self.list.takeItem(self.list.count() - 1)
        self._update()
        self.changed.emit()

    # ----- contents ---------------------------------------------------------------------------------
    def paths(self) -> list[Path]:
        return [Path(self.list.item(i).data(Qt.ItemDataRole.UserRole)) for i in range(self.list.count())]

    def strength_value(self) -> float | None:
        used = (self.family == "sd3.5" and self.list.count()) or self.mask_path is not None
        return self.strength.value() / 100 if used else None

    # ----- inpainting mask (FLUX.2 Klein) --------------------------------------------------------------
    def set_mask(self, path: Path | None) -> None:
        """The first image's inpainting mask (white repaints), or None: the images are references."""
        from app.runtime.references import INPAINT_STRENGTH

        first = self.paths()[0] if self.list.count() else None
        if path is not None and self.mask_path is None:
            self.set_strength(INPAINT_STRENGTH)  # diffusers' Flux2KleinInpaintPipeline default
        self.mask_path = Path(path) if path is not None and first is not None else None
        self._mask_for = first if self.mask_path else None
        self._update()
        self.changed.emit()

    def edit_mask(self) -> bool:
        """Open the painter on the first image; OK saves the mask (atomic, by content) and uses it."""
        from app.ui.maskpaint import MaskDialog

        if not self.list.count():
            return False
        dialog = MaskDialog(self.paths()[0], self.mask_path, self)
        if dialog.exec() != MaskDialog.DialogCode.Accepted:
            return False
        return self.keep_mask(dialog.canvas.png())

    def keep_mask(self, png: bytes) -> bool:
        import hashlib

        from app.bundle.files import atomic_write_bytes

        folder = self.mask_dir or Path.home() / ".edgegen-masks"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"mask-{hashlib.sha256(png).hexdigest()[:16]}.png"
            atomic_write_bytes(path, png)
        except OSError as e:
            self.problem.emit(f"Could not save the mask in {folder}: {e.strerror or e}")
            return False
        self.set_mask(path)
        return True

    def set_strength(self, value: float) -> None:
        self.strength.setValue(max(1, min(100, round(value * 100))))

    def add(self, path: Path) -> bool:
        """Add one file; False (and `problem`) when it is not an image or the model takes no more."""
        path = Path(path)
        if self.list.count() >= self.max_images:
            self.problem.emit("This model takes no images." if not self.max_images else
                              f"This model takes at most {self.max_images} image{'s' if self.max_images > 1 else ''}; "
                              "remove one first.")
            return False
        icon = thumbnail(path)
        if icon is None:
            self.problem.emit(f"{path.name} is not an image the app can read.")
            return False
        item = QListWidgetItem(icon, path.name)
        item.setData(Qt.ItemDataRole.UserRole, str(path.absolute()))
        item.setToolTip(str(path))
        self.list.addItem(item)
        self._update()
        self.changed.emit()
        return True

    def set_paths(self, paths) -> None:
        self.list.clear()
        for p in paths:
            self.add(Path(p))
        self._update()
        self.changed.emit()

    def clear(self) -> None:
        self.set_paths([])

    def remove_selected(self) -> None:
        row = self.list.currentRow()
        if row >= 0:
            self.list.takeItem(row)
            self._update()
            self.changed.emit()

    def move_selected(self, delta: int) -> None:
        row = self.list.currentRow()
        to = row + delta
        if row < 0 or not 0 <= to < self.list.count():
            return
        item = self.list.takeItem(row)
        self.list.insertItem(to, item)
        self.list.setCurrentRow(to)
        self.changed.emit()

    def choose_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Add images", "", IMAGE_FILTER)
        for f in files:
            if not self.add(Path(f)):
                break

    # ----- drag and drop -----------------------------------------------------------------------------
    def dragEnterEvent(self, event) -> None:
        if dropped_files(event.mimeData()) and self.max_images:
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:
        for f in dropped_files(event.mimeData()):
            if not self.add(f):
                break
        event.acceptProposedAction()

    def _strength_changed(self, *_) -> None:
        self.strength_label.setText(f"{self.strength.value() / 100:.2f}")
        self.changed.emit()

    def _update(self) -> None:
        first = self.paths()[0] if self.list.count() else None
        if self.mask_path is not None and first != self._mask_for:  # the mask belongs to the image it was painted on
            self.mask_path = self._mask_for = None
        klein = self.family == "flux2-klein" and self.max_images > 0
        self.mask_button.setVisible(klein)
        self.mask_button.setEnabled(first is not None)
        self.mask_button.setText("Edit mask…" if self.mask_path else "Mask…")
        self.unmask_button.setVisible(klein and self.mask_path is not None)
        self.strength_row.setVisible((self.family == "sd3.5" and self.max_images > 0) or self.mask_path is not None)
        if klein and self.mask_path is not None:
            self.title.setText(f"Inpainting {first.name} (red is redrawn); a second image is a reference")
        elif klein:
            self.title.setText("Reference images")
        n, enabled = self.list.count(), self.max_images > 0
        self.list.setEnabled(enabled)
        self.add_button.setEnabled(enabled and n < self.max_images)
        selected = self.list.currentRow() >= 0 and bool(self.list.selectedItems())
        self.remove_button.setEnabled(selected)
        self.left_button.setEnabled(selected and self.list.currentRow() > 0)
        self.right_button.setEnabled(selected and self.list.currentRow() < n - 1)
