"""The LoRA picker (issue 25): the library's LoRAs for a run-time LoRA bundle, strength sliders, the image's
metadata, and "reuse parameters" restoring the choice. The real window on a real bundle."""

from __future__ import annotations

import numpy as np
from PIL import Image

from app.cli import main
from app.runtime.images import read_metadata
from tests.conftest import variant_bundle
from tests.test_runtime_lora import KLEIN_B, make_lora
from tests.ui._paths import make_paths
from tests.ui.conftest import delete_now

IMAGE_MS = 240_000


def test_picker_strength_metadata_and_reuse(qapp, qtbot, tmp_path_factory, tmp_path, klein_bundle):
    from app.planning.devices import FakeGpuReader
    from app.runtime.audit import AuditLog
    from app.ui.window import MainWindow

    model, bundle = variant_bundle(tmp_path_factory, "lat8-heads3-gqa")
    lora = make_lora(model, "flux2-klein", tmp_path / "l", seed=8, **KLEIN_B)
    assert main(["lora", "add", str(lora), "--name", "brand-u"]) == 0
    w = MainWindow(paths=make_paths(tmp_path / "app"), bundle=bundle, reader=FakeGpuReader([]),
                   monitor_interval_ms=100, audit=AuditLog(tmp_path / "audit.jsonl"))
    w.show()
    try:
        picker = w.form.loras
        assert picker.isVisible() and list(picker.rows) == ["brand-u"]
        row = picker.rows["brand-u"]
        row.check.setChecked(True)
        row.slider.setValue(70)  # the slider drives the box: strength 0.70
        assert picker.values() == (("brand-u", 0.7),)
        w.form.set_size(48, 32)
        w.form.steps.setValue(2)
        w.form.prompt.setPlainText("a brand bag")
        w.form.random_seed.setChecked(False)
        w.form.seed.setText("3")
        with qtbot.waitSignal(w.image_saved, timeout=IMAGE_MS) as saved:
            w.generate()
        entry = w.history.get(saved.args[0])
        meta = read_metadata(entry.path)
        assert meta["loras"] == [{"name": "brand-u", "strength": 0.7, "sha256": picker.rows["brand-u"].record.sha256}]
        cli = tmp_path / "cli.png"  # the app's image is the CLI's for the same choice
        assert main(["generate", "--bundle", str(bundle), "--prompt", "a brand bag", "--seed", "3", "--steps", "2",
                     "--width", "48", "--height", "32", "--lora", "brand-u:0.7", "--out", str(cli)]) == 0
        assert np.array_equal(np.asarray(Image.open(cli).convert("RGB")),
                              np.asarray(Image.open(entry.path).convert("RGB")))

        row.check.setChecked(False)
        row.set_strength(1.0)
        w.reuse_entry(entry)  # the gallery's "reuse parameters"
        assert picker.values() == (("brand-u", 0.7),) and row.slider.value() == 70

        # a model without LoRA inputs hides the picker
        w.form.set_model({"steps": 4, "guidance": 1.0, "width": 64, "height": 64},
                         {"min": 32, "max": 256, "multiple": 16}, False,
                         manifest=read_manifest(klein_bundle))
        assert not picker.isVisible() and picker.values() == ()
    finally:
        w.close()
        delete_now(w)


def read_manifest(bundle):
    import json

    return json.loads((bundle / "manifest.json").read_text())
