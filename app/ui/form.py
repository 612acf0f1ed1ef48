"""The generation form: prompt, negative prompt, seed, steps, guidance, size, batch and the Advanced section."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QRegularExpressionValidator
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from app.ui.collapsible import Collapsible
from app.ui.controls import ControlPanel
from app.ui.loras import LoraPicker
from app.ui.references import ReferenceStrip
from app.ui.sizes import presets, size_error

BACKENDS = ("auto", "onnxruntime", "tensorrt", "torch")
MAX_SEED = 2**63 - 1
CUSTOM = "Custom"


@dataclass(frozen=True)
class FormValues:
    prompt: str
    negative_prompt: str
    seed: int | None  # None: draw a random one per image
    steps: int
    guidance: float
    width: int
    height: int
    count: int
    backend: str
    images: tuple[str, ...] = ()  # Klein references / SD3.5 init image, in order
    strength: float | None = None  # SD3.5 image-to-image, FLUX.2 Klein inpainting
    mask: str | None = None  # FLUX.2 Klein inpainting: the painted mask of the first image
    loras: tuple[tuple[str, float], ...] = ()  # run-time LoRAs from the library: (name, strength)
    controls: tuple = ()  # SD3.5 ControlNet: app.runtime.controls.Control each (the app sets one)


class GenerationForm(QWidget):
    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.size_range = {"min": 64, "max": 2048, "multiple": 16}
        self.defaults = {"steps": 4, "guidance": 1.0, "width": 1024, "height": 1024}
        self._presets: dict[str, tuple[int, int]] = {}
        self.last_seed: int | None = None
        self.pipeline: dict = {}  # the bundle's manifest "pipeline" section (reference sizes)

        self.prompt = QPlainTextEdit(objectName="prompt", placeholderText="Describe the image…")
        self.prompt.setTabChangesFocus(True)
        self.negative = QPlainTextEdit(objectName="negativePrompt", placeholderText="What to avoid (optional)")
        self.negative.setTabChangesFocus(True)
        lines = self.fontMetrics().lineSpacing()
        self.prompt.setMinimumHeight(lines * 4)
        # Take the spare height, but ask for none: the side panel then only scrolls on really small screens.
        self.prompt.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)
        self.negative.setMaximumHeight(lines * 4)
        self.negative_label = QLabel("Negative prompt")
        self.references = ReferenceStrip()
        self.loras = LoraPicker()
        self.controls = ControlPanel()

        self.random_seed = QCheckBox("Random", checked=True, objectName="randomSeed")
        self.seed = QLineEdit(objectName="seed", placeholderText="seed")
        self.seed.setValidator(QRegularExpressionValidator(r"\d{0,19}"))
        self.seed.setEnabled(False)
        self.reuse_seed = QPushButton("Reuse last", objectName="reuseSeed", enabled=False)
        self.reuse_seed.setToolTip("Use the seed of the last image again")
        seed_row = QHBoxLayout()
        seed_row.addWidget(self.random_seed)
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.reuse_seed)

        self.steps = QSpinBox(objectName="steps", minimum=1, maximum=200)
        self.guidance = QDoubleSpinBox(objectName="guidance", minimum=0.0, maximum=30.0, singleStep=0.5, decimals=1)
        self.size_preset = QComboBox(objectName="sizePreset")
        self.width_box = QSpinBox(objectName="width", suffix=" px")
        self.height_box = QSpinBox(objectName="height", suffix=" px")
        size_row = QHBoxLayout()
        size_row.addWidget(self.width_box, 1)
        size_row.addWidget(QLabel("×"))
        size_row.addWidget(self.height_box, 1)
        self.count = QSpinBox(objectName="count", minimum=1, maximum=64)
        self.count.setToolTip("Images to draw, with seeds seed, seed+1, …")

        self.backend = QComboBox(objectName="backend")
        self.backend.addItems(BACKENDS)
        self.backend.setToolTip("auto: a TensorRT engine for this GPU if the bundle has one, else ONNX Runtime")
        self.output_folder = QLineEdit(objectName="outputFolder", readOnly=True)
        self.choose_output = QPushButton("Change…", objectName="chooseOutput")
        self.reset_defaults = QPushButton("Model defaults", objectName="resetDefaults")
        self.reset_defaults.setToolTip("Steps, guidance and size as the model recommends")
        out_row = QHBoxLayout()
        out_row.addWidget(self.output_folder, 1)
        out_row.addWidget(self.choose_output)
        adv = QWidget()
        adv_form = QFormLayout(adv)
        adv_form.setContentsMargins(0, 0, 0, 0)
        adv_form.addRow("Backend", self.backend)
        adv_form.addRow("Save to", out_row)
        adv_form.addRow("", self.reset_defaults)
        self.advanced = Collapsible("Advanced", adv)

        self.error = QLabel(objectName="formError", wordWrap=True)
        self.error.setStyleSheet("color: #d9534f")
        self.error.setVisible(False)

        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Seed", seed_row)
        form.addRow("Steps", self.steps)
        form.addRow("Guidance", self.guidance)
        form.addRow("Size", self.size_preset)
        form.addRow("", size_row)
        form.addRow("Images", self.count)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(QLabel("Prompt"))
        lay.addWidget(self.prompt, 1)
        lay.addWidget(self.negative_label)
        lay.addWidget(self.negative)
        lay.addWidget(self.references)
        lay.addWidget(self.loras)
        lay.addWidget(self.controls)
        lay.addLayout(form)
        lay.addWidget(self.advanced)
        lay.addWidget(self.error)

        self.random_seed.toggled.connect(lambda on: self.seed.setEnabled(not on))
        self.reuse_seed.clicked.connect(self.use_last_seed)
        self.size_preset.currentTextChanged.connect(self._preset_chosen)
        self.reset_defaults.clicked.connect(self.apply_defaults)
        self.references.changed.connect(self._references_changed)
        self.loras.changed.connect(self._changed)
        self.controls.changed.connect(self._changed)
        self._first_reference: str | None = None
        for sig in (self.prompt.textChanged, self.negative.textChanged, self.random_seed.toggled,
                    self.seed.textChanged, self.steps.valueChanged, self.guidance.valueChanged,
                    self.width_box.valueChanged, self.height_box.valueChanged, self.count.valueChanged,
                    self.backend.currentTextChanged):
            sig.connect(self._changed)

    # ----- model ----------------------------------------------------------------------------------
    def set_model(self, defaults: dict, size_range: dict, uses_negative_prompt: bool, family: str = "",
                  pipeline: dict | None = None, encoder_hint: str | None = None, manifest: dict | None = None) -> None:
        """Adopt a bundle's defaults and size range; the negative prompt shows only where the family uses it;
        the reference strip takes as many images as the bundle allows (none without its VAE encoder); the LoRA
        picker shows the library's LoRAs for a run-time LoRA bundle (`manifest`)."""
        self.loras.set_model(manifest)
        self.controls.set_model(manifest)
        self.defaults, self.size_range = dict(defaults), dict(size_range)
        self.pipeline = dict(pipeline or {})
        self.references.set_model(family, int(self.pipeline.get("max_images", 0)), encoder_hint)
        self._presets = presets(self.defaults, self.size_range)
        for box in (self.width_box, self.height_box):
            box.setRange(size_range["min"], size_range["max"])
            box.setSingleStep(size_range["multiple"])
        self.size_preset.blockSignals(True)
        self.size_preset.clear()
        for name, (w, h) in self._presets.items():
            self.size_preset.addItem(f"{name} {w}×{h}", name)
        self.size_preset.addItem(CUSTOM, CUSTOM)
        self.size_preset.blockSignals(False)
        self.negative.setVisible(uses_negative_prompt)
        self.negative_label.setVisible(uses_negative_prompt)
        self.apply_defaults()

    def apply_defaults(self) -> None:
        self.steps.setValue(int(self.defaults["steps"]))
        self.guidance.setValue(float(self.defaults["guidance"]))
        self.set_size(int(self.defaults["width"]), int(self.defaults["height"]))

    def set_size(self, width: int, height: int) -> None:
        """Select the preset with this size, or Custom with the boxes filled in."""
        name = next((n for n, wh in self._presets.items() if wh == (width, height)), CUSTOM)
        self.size_preset.setCurrentIndex(max(self.size_preset.findData(name), 0))
        self.width_box.setValue(width)
        self.height_box.setValue(height)
        self._preset_chosen()

    def _preset_chosen(self, *_) -> None:
        name = self.size_preset.currentData()
        custom = name == CUSTOM
        self.width_box.setEnabled(custom)
        self.height_box.setEnabled(custom)
        if not custom and name in self._presets:
            w, h = self._presets[name]
            self.width_box.setValue(w)
            self.height_box.setValue(h)
        self._changed()

    # ----- seed -----------------------------------------------------------------------------------
    def set_last_seed(self, seed: int) -> None:
        self.last_seed = seed
        self.reuse_seed.setEnabled(True)

    def use_last_seed(self) -> None:
        if self.last_seed is not None:
            self.random_seed.setChecked(False)
            self.seed.setText(str(self.last_seed))

    # ----- values ---------------------------------------------------------------------------------
    def values(self) -> FormValues:
        seed = None if self.random_seed.isChecked() else (int(self.seed.text()) if self.seed.text() else 0)
        return FormValues(
            prompt=self.prompt.toPlainText().strip(),
            negative_prompt=self.negative.toPlainText().strip() if self.negative.isVisibleTo(self) else "",
            seed=seed, steps=self.steps.value(), guidance=round(self.guidance.value(), 2),
            width=self.width_box.value(), height=self.height_box.value(), count=self.count.value(),
            backend=self.backend.currentText(), images=tuple(str(p) for p in self.references.paths()),
            strength=self.references.strength_value(), loras=self.loras.values(),
            mask=str(self.references.mask_path) if self.references.mask_path else None,
            controls=self.controls.values(),
        )

    def seeds(self) -> list[int]:
        """The seeds for one click: seed, seed+1, … (a fresh random start when Random is ticked)."""
        v = self.values()
        start = random.randrange(0, 2**32) if v.seed is None else v.seed
        return [start + i for i in range(v.count)]

    def problem(self) -> str:
        """'' when Generate can go ahead, else what to fix."""
        v = self.values()
        if not v.prompt:
            return "Type a prompt first."
        if v.seed is not None and v.seed + v.count - 1 > MAX_SEED:
            return f"The seed must be at most {MAX_SEED - v.count + 1}."
        return self.loras.problem() or self.controls.problem() or size_error(v.width, v.height, self.size_range)

    def apply_meta(self, meta: dict, near: Path | None = None) -> list[str]:
        """Reuse an image's parameters: prompt, negative prompt, seed (fixed), steps, guidance, size, the LoRAs at
        their strengths (those in the library with the same sha256), and the input images still on disk with the
        same sha256 (at their recorded path, or by name next to `near`).
        Returns the names of input images and LoRAs that could not be found."""
        self.prompt.setPlainText(meta.get("prompt", ""))
        self.negative.setPlainText(meta.get("negative_prompt", ""))
        if "seed" in meta:
            self.random_seed.setChecked(False)
            self.seed.setText(str(meta["seed"]))
        if "steps" in meta:
            self.steps.setValue(int(meta["steps"]))
        if "guidance" in meta:
            self.guidance.setValue(float(meta["guidance"]))
        found, missing = find_inputs(meta.get("references") or [], near)
        self.references.set_paths(found)
        self._first_reference = str(found[0]) if found else None  # keep the recorded size, not the image's
        masks, missing_mask = find_inputs([meta["mask"]], near) if meta.get("mask") else ([], [])
        self.references.set_mask(masks[0] if masks and found else None)
        if meta.get("strength") is not None:
            self.references.set_strength(float(meta["strength"]))
        controls = meta.get("controls") or []
        found_controls, missing_controls = find_inputs(controls[:1], near)  # the app holds one control
        self.controls.set_image(found_controls[0] if found_controls else None)
        if found_controls:
            c = controls[0]
            self.controls.set_choice(c["controlnet"], c["scale"], c["start"], c["end"], c["preprocessed"])
        if "width" in meta and "height" in meta:
            self.set_size(int(meta["width"]), int(meta["height"]))
        self.count.setValue(1)
        return missing + missing_mask + missing_controls + self.loras.apply(meta.get("loras") or [])

    def _references_changed(self) -> None:
        """A new first Klein reference sets the size, as the CLI defaults it (diffusers' preprocessing)."""
        paths = self.references.paths()
        first = str(paths[0]) if paths else None
        if first != self._first_reference and first is not None and self.references.family == "flux2-klein":
            from PIL import Image, ImageOps

            from app.runtime.references import reference_size

            try:
                with Image.open(first) as im:
                    w, h = reference_size(ImageOps.exif_transpose(im).size, self.pipeline, self.size_range["max"])
            except (OSError, ValueError, KeyError):
                w = h = 0
            if self.size_range["min"] <= min(w, h) and max(w, h) <= self.size_range["max"]:
                self.set_size(w, h)
        self._first_reference = first
        self._changed()

    def _changed(self, *_) -> None:
        # Only a size problem is worth shouting about while typing; an empty prompt is obvious.
        v = self.values()
        msg = size_error(v.width, v.height, self.size_range)
        self.error.setText(msg)
        self.error.setVisible(bool(msg))
        self.changed.emit()


def find_inputs(records: list[dict], near: Path | None = None) -> tuple[list[Path], list[str]]:
    """Input images recorded in an image's metadata that are still on disk unchanged (same sha256): at the
    recorded path, else by file name next to `near` (the image's folder). Returns (found paths, missing names)."""
    found, missing = [], []
    for r in records:
        candidates = [Path(r["path"])] if r.get("path") else []
        if near is not None and r.get("name"):
            candidates.append(Path(near) / r["name"])
        hit = next((c for c in candidates if c.is_file() and _sha256(c) == r.get("sha256")), None)
        if hit is None:
            missing.append(r.get("name") or "?")
        else:
            found.append(hit)
    return found, missing


def _sha256(path: Path) -> str:
    from app.bundle.files import sha256_file

    return sha256_file(path)
