"""The LoRA picker: the site library's LoRAs that fit the chosen bundle, each with a strength slider.

Shown only for a bundle exported with --runtime-lora; the library is read through app.bundle.loras (records
only: no tensors are loaded until a generation uses a LoRA). docs/LORA.md.
"""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QCheckBox, QDoubleSpinBox, QGridLayout, QLabel, QSlider, QVBoxLayout, QWidget

from app.bundle import loras as lib
from app.errors import UsageError

SLIDER_STEPS = 100  # slider units per strength unit (0.01)
SLIDER_RANGE = 2.0  # the slider covers -2..2; the box takes the library's whole range


class LoraRow:
    def __init__(self, rec: lib.LoraRecord, grid: QGridLayout, row: int, changed):
        self.record = rec
        self.check = QCheckBox(rec.name, objectName=f"lora-{rec.name}")
        self.check.setToolTip(f"rank {rec.rank}, {len(rec.targets)} layers, sha256 {rec.sha256[:12]}")
        self.slider = QSlider(Qt.Orientation.Horizontal, objectName=f"loraSlider-{rec.name}")
        self.slider.setRange(int(-SLIDER_RANGE * SLIDER_STEPS), int(SLIDER_RANGE * SLIDER_STEPS))
        self.box = QDoubleSpinBox(objectName=f"loraStrength-{rec.name}", decimals=2, singleStep=0.05)
        self.box.setRange(*lib.STRENGTH_RANGE)
        self.box.valueChanged.connect(self._box_moved)
        self.slider.valueChanged.connect(lambda v: self.box.setValue(v / SLIDER_STEPS))
        self.set_strength(1.0)
        for w, col in ((self.check, 0), (self.slider, 1), (self.box, 2)):
            grid.addWidget(w, row, col)
        self.check.toggled.connect(lambda *_: changed())
        self.box.valueChanged.connect(lambda *_: changed())

    def _box_moved(self, value: float) -> None:
        self.slider.blockSignals(True)
        self.slider.setValue(round(max(-SLIDER_RANGE, min(SLIDER_RANGE, value)) * SLIDER_STEPS))
        self.slider.blockSignals(False)

    def set_strength(self, value: float) -> None:
        self.box.setValue(value)
        self._box_moved(value)


class LoraPicker(QWidget):
    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.rows: dict[str, LoraRow] = {}
        self.max_rank = 0
        self.title = QLabel("LoRAs")
        self.note = QLabel(objectName="loraNote", wordWrap=True)
        self.grid_host = QWidget()
        self.grid = QGridLayout(self.grid_host)
        self.grid.setContentsMargins(0, 0, 0, 0)
        self.grid.setColumnStretch(1, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.title)
        lay.addWidget(self.grid_host)
        lay.addWidget(self.note)
        self.setVisible(False)

    def set_model(self, manifest: dict | None) -> None:
        """The library's LoRAs for this bundle: its family, its layers' shapes and engine rank."""
        for row in self.rows.values():
            for w in (row.check, row.slider, row.box):
                w.deleteLater()
        self.rows = {}
        lora = ((manifest or {}).get("components", {}).get("transformer") or {}).get("lora")
        self.setVisible(lora is not None)
        self.max_rank = int(lora["max_rank"]) if lora else 0
        if lora is None:
            return
        fits, skipped = [], 0
        try:
            records = lib.list_records()
        except Exception as e:  # noqa: BLE001 - a damaged record must not stop the app; say which
            self.note.setText(str(e))
            return
        for rec in records:
            try:
                lib.check_against(rec, manifest["family"], lora["slots"], lora["max_rank"])
                fits.append(rec)
            except UsageError:
                skipped += 1
        for i, rec in enumerate(fits):
            self.rows[rec.name] = LoraRow(rec, self.grid, i, self.changed.emit)
        text = f"Library {lib.library_dir()}; up to total rank {lora['max_rank']} at once."
        if skipped:
            text += f" {skipped} LoRA(s) there are for another model."
        if not fits:
            text = f"No LoRA for this model in {lib.library_dir()}; add one with: edgegen lora add FILE"
        self.note.setText(text)

    def values(self) -> tuple[tuple[str, float], ...]:
        return tuple((n, round(r.box.value(), 2)) for n, r in self.rows.items() if r.check.isChecked())

    def problem(self) -> str:
        chosen = [self.rows[n].record for n, _ in self.values()]
        total = sum(r.rank for r in chosen)
        return "" if not chosen or total <= self.max_rank else (
            f"The chosen LoRAs add up to rank {total}; this model takes {self.max_rank} at once: untick one.")


    def apply(self, recorded: list[dict]) -> list[str]:
        """Tick the recorded LoRAs (same name and sha256) at their strengths; returns those not in the library."""
        for row in self.rows.values():
            row.check.setChecked(False)
        missing = []
        for r in recorded or []:
            row = self.rows.get(r.get("name"))
            if row is None or row.record.sha256 != r.get("sha256"):
                missing.append(f"LoRA {r.get('name')}")
                continue
            row.check.setChecked(True)
            row.set_strength(float(r.get("strength", 1.0)))
        return missing
