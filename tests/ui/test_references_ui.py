"""The real window with images as input: the reference strip, SD3.5's strength slider, drops, gallery reuse, and
the images the app makes against diffusers' own pipelines (FP32, same seed)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QMimeData, QPointF, Qt, QUrl
from PySide6.QtGui import QDropEvent

from app.runtime.images import psnr, read_metadata
from tests.test_references import klein_reference, make_image, sd3_img2img_reference
from tests.ui._paths import make_paths
from tests.ui.conftest import delete_now

IMAGE_MS = 240_000


@pytest.fixture(scope="module")
def rwindow(qapp, tmp_path_factory, klein_encoder_bundle):
    from app.planning.devices import FakeGpuReader
    from app.runtime.audit import AuditLog
    from app.ui.window import MainWindow

    root = tmp_path_factory.mktemp("app-refs")
    w = MainWindow(paths=make_paths(root), bundle=klein_encoder_bundle, reader=FakeGpuReader([]),
                   monitor_interval_ms=100, audit=AuditLog(root / "audit.jsonl"), preload=False)
    w.show()
    yield w
    w.close()
    delete_now(w)


def _drop(widget, *paths: Path) -> None:
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    event = QDropEvent(QPointF(5, 5), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                       Qt.KeyboardModifier.NoModifier)
    widget.dropEvent(event)


def _select(window, bundle: Path) -> None:
    window.reload_models(select=bundle, extra=[bundle])
    assert window.bundle is not None and window.bundle.root == Path(bundle).resolve()


def _generate(window, qtbot, seed: int, steps: int, prompt: str = "a red circle on a blue background"):
    """Generate from the window's form with a fixed seed; the gallery entry of the saved image."""
    form = window.form
    form.prompt.setPlainText(prompt)
    form.random_seed.setChecked(False)
    form.seed.setText(str(seed))
    form.steps.setValue(steps)
    with qtbot.waitSignal(window.image_saved, timeout=IMAGE_MS) as saved:
        window.generate()
    return window.history.get(saved.args[0])


def test_reference_strip_add_reorder_remove_and_size(rwindow, tmp_path):
    strip = rwindow.form.references
    assert strip.max_images == 4 and not strip.strength_row.isVisibleTo(rwindow)  # Klein: no strength
    a = make_image(tmp_path / "a.png", 96, 64, seed=1)
    b = make_image(tmp_path / "b.png", 64, 80, seed=2)
    (tmp_path / "n.png").write_text("not an image")
    strip.clear()
    assert strip.add(a) and strip.add(b)
    assert not strip.add(tmp_path / "n.png")
    assert [p.name for p in strip.paths()] == ["a.png", "b.png"] and strip.list.count() == 2
    assert not strip.list.item(0).icon().isNull()  # a thumbnail
    v = rwindow.form.values()
    assert (v.width, v.height) == (96, 64)  # the first reference sets the size, as the CLI does
    strip.list.setCurrentRow(1)
    strip.move_selected(-1)
    assert [p.name for p in strip.paths()] == ["b.png", "a.png"]
    assert (rwindow.form.values().width, rwindow.form.values().height) == (64, 80)
    strip.list.setCurrentRow(0)
    strip.remove_selected()
    assert [p.name for p in strip.paths()] == ["a.png"]
    for i in range(4):
        strip.add(make_image(tmp_path / f"x{i}.png", 64, 64, seed=i))
    assert strip.list.count() == 4 and not strip.add_button.isEnabled()  # the bundle's limit
    strip.clear()


def test_generate_with_references_matches_diffusers_and_reuse_restores_them(rwindow, qtbot, tmp_path,
                                                                           klein_model):
    refs = [make_image(tmp_path / "r0.png", 80, 64, seed=3), make_image(tmp_path / "r1.png", 64, 96, seed=4)]
    form = rwindow.form
    form.references.set_paths(refs)
    entry = _generate(rwindow, qtbot, seed=7, steps=4)
    meta = read_metadata(entry.path)
    assert [r["name"] for r in meta["references"]] == ["r0.png", "r1.png"] and (meta["width"], meta["height"]) == (80, 64)
    assert [r["name"] for r in entry.meta["references"]] == ["r0.png", "r1.png"]  # the gallery keeps them
    ours = np.asarray(Image.open(entry.path).convert("RGB"))
    ref = klein_reference(klein_model, refs, "a red circle on a blue background", 7, width=80, height=64)
    assert psnr(ours, ref) >= 60

    form.references.clear()
    form.prompt.setPlainText("something else")
    rwindow.reuse_entry(entry)
    assert form.prompt.toPlainText() == "a red circle on a blue background"
    assert form.references.paths() == [p.absolute() for p in refs]

    # a reference that changed on disk is not silently swapped in: the banner names it
    make_image(refs[1], 64, 96, seed=99)
    rwindow.reuse_entry(entry)
    assert [p.name for p in form.references.paths()] == ["r0.png"]
    assert "r1.png" in rwindow.banner.text()

    # dropping the PNG on the window restores its parameters; a plain image dropped becomes a reference
    make_image(refs[1], 64, 96, seed=4)  # the original bytes again
    copy = shutil.copy(entry.path, tmp_path / "made-by-edgegen.png")
    form.references.clear()
    form.prompt.setPlainText("")
    _drop(rwindow, Path(copy))
    assert form.prompt.toPlainText() == "a red circle on a blue background" and form.seed.text() == "7"
    assert [p.name for p in form.references.paths()] == ["r0.png", "r1.png"]
    extra = make_image(tmp_path / "plain.png", 64, 64, seed=8)
    _drop(rwindow, extra)
    assert [p.name for p in form.references.paths()] == ["r0.png", "r1.png", "plain.png"]
    form.references.clear()


def test_sd3_strength_slider_and_image_to_image_match_diffusers(rwindow, qtbot, tmp_path, sd3_model,
                                                                sd3_encoder_bundle, sd3_no_encoder_bundle):
    _select(rwindow, sd3_no_encoder_bundle)  # exported without the encoder: the strip says how to fix it
    strip = rwindow.form.references
    assert strip.max_images == 0 and "--with-encoder" in strip.hint.text() and not strip.add_button.isEnabled()
    assert not strip.add(make_image(tmp_path / "i.png", 64, 64, seed=1))

    _select(rwindow, sd3_encoder_bundle)
    assert strip.max_images == 1 and strip.strength_row.isVisibleTo(rwindow)
    init = make_image(tmp_path / "init.png", 90, 70, seed=5)
    _drop(strip, init)
    strip.set_strength(0.6)
    form = rwindow.form
    assert form.values().strength == 0.6 and form.values().images == (str(init.absolute()),)
    form.set_size(80, 64)
    form.prompt.setPlainText("a watercolor painting of a harbour at dawn")
    form.negative.setPlainText("blurry")
    form.random_seed.setChecked(False)
    form.seed.setText("11")
    form.steps.setValue(5)
    form.guidance.setValue(4.5)
    with qtbot.waitSignal(rwindow.image_saved, timeout=IMAGE_MS) as saved:
        rwindow.generate()
    entry = rwindow.history.get(saved.args[0])
    assert entry.meta["strength"] == 0.6 and entry.meta["references"][0]["name"] == "init.png"
    ours = np.asarray(Image.open(entry.path).convert("RGB"))
    ref = sd3_img2img_reference(sd3_model, init, "a watercolor painting of a harbour at dawn", 11, 0.6, 5, 4.5,
                                80, 64, "blurry")
    assert psnr(ours, ref) >= 60
    strip.set_strength(0.3)
    rwindow.reuse_entry(entry)
    assert strip.strength.value() == 60 and strip.paths() == [init.absolute()]
    strip.clear()


def test_a_reference_larger_than_the_demo_bundle_is_scaled_in_the_app(rwindow, qtbot, tmp_path, demo_bundle):
    """The new user's case: a 192x144 photo as the reference of the 128 px demo bundle is scaled (the size it
    sets, the image, the status line), not refused."""
    from app.runtime.references import reference_size

    _select(rwindow, demo_bundle)
    m = rwindow.bundle.manifest
    largest = m["size_range"]["max"]
    assert max(192, 144) > largest  # the case only proves something while the demo bundle is smaller
    w, h = reference_size((192, 144), m["pipeline"], largest)
    form = rwindow.form
    form.references.clear()
    assert form.references.add(make_image(tmp_path / "photo.png", 192, 144, seed=6))
    size = (form.values().width, form.values().height)  # the reference's size where the bundle makes it
    lo = m["size_range"]["min"]
    assert (size == (w, h) if min(w, h) >= lo else lo <= min(size) <= max(size) <= largest)  # demo: 128 px only
    assert not form.error.isVisible()
    form.prompt.setPlainText("a red circle on a blue background")
    form.steps.setValue(2)
    with qtbot.waitSignal(rwindow.image_saved, timeout=IMAGE_MS) as saved:
        rwindow.generate()
    entry = rwindow.history.get(saved.args[0])
    assert (entry.meta["width"], entry.meta["height"]) == size
    assert f"reference photo.png 192x144 scaled to {w}x{h}" in rwindow.statusBar().currentMessage()
    assert not rwindow.banner.isVisible() or "scaled" not in rwindow.banner.text()
    form.references.clear()


def test_inpainting_mask_painted_in_the_app_matches_diffusers(rwindow, qtbot, tmp_path, klein_model,
                                                             klein_encoder_bundle):
    """Brush, eraser, invert and clear on the first image; the painted mask drives Klein inpainting, which equals
    diffusers' Flux2KleinInpaintPipeline with that mask file; reuse restores it; another first image drops it."""
    from PySide6.QtCore import QPointF
    from PySide6.QtTest import QTest

    from app.ui.maskpaint import MaskDialog
    from tests.test_inpaint import diffusers_inpaint

    _select(rwindow, klein_encoder_bundle)
    form, strip = rwindow.form, rwindow.form.references
    strip.clear()
    assert strip.mask_button.isVisibleTo(rwindow) and not strip.mask_button.isEnabled()
    init = make_image(tmp_path / "photo.png", 80, 64, seed=12)
    assert strip.add(init) and strip.mask_button.isEnabled() and not strip.strength_row.isVisibleTo(rwindow)

    dialog = MaskDialog(init)
    qtbot.addWidget(dialog)
    dialog.show()
    qtbot.waitExposed(dialog)
    canvas = dialog.canvas
    ok = dialog.buttons.button(dialog.buttons.StandardButton.Ok)
    assert canvas.mask.size() == canvas.image.size() and (canvas.image.width(), canvas.image.height()) == (80, 64)
    assert canvas.painted_fraction() == 0 and not ok.isEnabled()
    QTest.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=canvas.to_widget(QPointF(40, 32)))  # a real click
    assert canvas.mask.pixelColor(40, 32).value() == 255 and ok.isEnabled()
    canvas.radius = 6
    canvas.stroke(QPointF(20, 32), QPointF(60, 32))
    painted = canvas.painted_fraction()
    dialog.eraser.click()
    canvas.stroke(QPointF(55, 32), QPointF(60, 32))
    assert canvas.mask.pixelColor(58, 32).value() == 0 and canvas.painted_fraction() < painted
    kept = canvas.painted_fraction()
    dialog.invert.click()
    assert abs(canvas.painted_fraction() - (1 - kept)) < 1e-9
    dialog.clear.click()
    assert canvas.painted_fraction() == 0 and not ok.isEnabled()
    dialog.brush.click()
    canvas.stroke(QPointF(25, 20), QPointF(50, 40))
    assert strip.keep_mask(canvas.png())
    mask = strip.mask_path
    assert mask.parent == rwindow.paths.data_dir / "masks" and Image.open(mask).size == (80, 64)
    assert strip.strength_row.isVisibleTo(rwindow) and form.values().strength == 0.8
    assert form.values().mask == str(mask) and "Inpainting photo.png" in strip.title.text()

    entry = _generate(rwindow, qtbot, seed=4, steps=4)
    assert entry.meta["mask"]["name"] == mask.name and entry.meta["strength"] == 0.8
    ours = np.asarray(Image.open(entry.path).convert("RGB"))
    expect = diffusers_inpaint(klein_model, init, mask, 4, 0.8, 4, form.values().guidance)
    assert psnr(ours, expect) >= 60

    strip.set_mask(None)
    assert form.values().mask is None and form.values().strength is None
    rwindow.reuse_entry(entry)
    assert strip.mask_path == mask and form.values().strength == 0.8
    strip.set_paths([make_image(tmp_path / "other.png", 64, 64, seed=13)])  # the mask was painted on photo.png
    assert strip.mask_path is None and not strip.unmask_button.isVisibleTo(rwindow)
    strip.clear()


def test_controlnet_panel_generates_as_diffusers_and_reuse_restores_it(rwindow, qtbot, tmp_path, controlnet_bundle):
    """The ControlNet panel shows only for a bundle with nets; the app's image is StableDiffusion3ControlNetPipeline's
    (the image taken as the net's map); reusing the gallery entry restores the net, image and numbers."""
    from tests.test_controlnet import NEGATIVE, PROMPT, diffusers_controlnet

    root, bundle = controlnet_bundle
    panel = rwindow.form.controls
    assert not panel.isVisibleTo(rwindow)  # the Klein bundle has no nets
    _select(rwindow, bundle)
    assert panel.isVisibleTo(rwindow) and panel.net.count() == 3 and panel.values() == ()
    img = make_image(tmp_path / "control.png", 70, 50, seed=48)
    panel.set_image(img)
    assert not panel.thumb.pixmap().isNull()  # the map the net sees
    panel.net.setCurrentIndex(panel.net.findData("instantx"))
    panel.scale.setValue(0.8)
    panel.end.setValue(0.75)
    panel.as_is.setChecked(True)
    form = rwindow.form
    form.set_size(64, 48)
    form.negative.setPlainText(NEGATIVE)
    form.guidance.setValue(4.0)
    entry = _generate(rwindow, qtbot, seed=9, steps=4, prompt=PROMPT)
    assert entry.meta["controls"][0]["controlnet"] == "instantx" and entry.meta["controls"][0]["end"] == 0.75
    ours = np.asarray(Image.open(entry.path).convert("RGB"))
    ref = diffusers_controlnet(root, ["instantx"], [img], [0.8], [0.0], [0.75], 9, 4, 4.0, 64, 48)
    assert psnr(ours, ref) >= 60
    panel.set_image(None)
    panel.scale.setValue(1.0)
    rwindow.reuse_entry(entry)
    assert panel.values() == form.values().controls and panel.values()[0].scale == 0.8
    assert panel.values()[0].image == str(img.absolute()) and panel.values()[0].preprocess is False
    panel.start.setValue(0.9)
    panel.end.setValue(0.5)
    assert "start must be before" in form.problem()
    panel.set_image(None)
