"""The VRAM monitor reads off the GUI thread and shows numbers, or says plainly that there is no GPU."""

from __future__ import annotations

import threading

from app.planning.devices import FakeGpuReader, fake_gpu
from app.ui.gpumonitor import MonitorThread
from app.ui.vram import NO_GPU, VramWidget
from tests.ui._paths import make_paths


class _ThreadNoting(FakeGpuReader):
    """FakeGpuReader that notes which thread reads it (the real NVML read must never block the GUI)."""

    def __init__(self, gpus):
        super().__init__(gpus)
        self.threads: set[int] = set()

    def read(self):
        self.threads.add(threading.get_ident())
        return super().read()


def _monitor(qtbot, reader) -> tuple[MonitorThread, VramWidget]:
    widget = VramWidget()
    qtbot.addWidget(widget)
    monitor = MonitorThread(reader, interval_ms=20)
    monitor.sampled.connect(widget.show_sample)
    monitor.start()
    return monitor, widget


def test_fake_gpu_numbers_and_history_graph(qtbot):
    reader = _ThreadNoting([fake_gpu("NVIDIA GeForce RTX 4090", total_gib=24.0, free_gib=20.0)])
    monitor, widget = _monitor(qtbot, reader)
    try:
        qtbot.waitUntil(lambda: len(widget.graph.values) >= 3, timeout=5000)
    finally:
        monitor.shutdown()
    assert widget.summary.text() == "NVIDIA GeForce RTX 4090: 4.0 GiB / 24.0 GiB used"
    assert abs(widget.graph.values[-1] - 4 / 24) < 1e-6
    assert "Utilisation" in widget.details.text()
    assert widget.graph.isVisibleTo(widget)
    assert threading.get_ident() not in reader.threads and len(reader.threads) == 1
    assert not widget.grab().isNull()  # the sparkline paints


def test_no_gpu_says_so_plainly(qtbot):
    monitor, widget = _monitor(qtbot, FakeGpuReader([]))
    try:
        qtbot.waitUntil(lambda: widget.last is not None, timeout=5000)
    finally:
        monitor.shutdown()
    assert widget.summary.text() == NO_GPU == "No NVIDIA GPU — running on CPU"
    assert not widget.graph.isVisibleTo(widget)


def test_window_warns_before_a_job_the_plan_says_will_not_fit(qtbot, tmp_path, ui_bundle):
    from app.ui.window import MainWindow

    asked: list[str] = []
    small = FakeGpuReader([fake_gpu("NVIDIA GeForce RTX 3050", sm="86", total_gib=1.0, free_gib=0.9)])
    w = MainWindow(paths=make_paths(tmp_path), bundle=ui_bundle, reader=small, monitor_interval_ms=50, preload=False,
                   confirm=lambda parent, title, text: asked.append(text) or False)
    qtbot.addWidget(w)
    assert "won't fit NVIDIA GeForce RTX 3050" in w.picker.info.text()
    w.form.prompt.setPlainText("a cat")
    assert "The plan says" in w.fit_label.text()
    assert w.generate() == [] and len(asked) == 1 and "Generate anyway?" in asked[0]
    assert not w.queue.jobs()
    qtbot.waitUntil(lambda: "RTX 3050" in w.vram.summary.text(), timeout=5000)


def test_window_says_it_fits_a_big_gpu(qtbot, tmp_path, ui_bundle):
    from app.ui.window import MainWindow

    big = FakeGpuReader([fake_gpu("NVIDIA GeForce RTX 4090", total_gib=24.0)])
    w = MainWindow(paths=make_paths(tmp_path), bundle=ui_bundle, reader=big, monitor_interval_ms=50, preload=False)
    qtbot.addWidget(w)
    assert "fits NVIDIA GeForce RTX 4090" in w.picker.info.text()
    assert w.fit_label.text().startswith("Fits NVIDIA GeForce RTX 4090 (all components stay loaded, peak ")


def test_the_fit_label_counts_the_input_images(qtbot, tmp_path, ui_bundle):
    """FLUX.2 Klein's references (and an inpainted image) are transformer tokens: the plan behind the fit label
    grows with each, as the runtime's own plan does."""
    from app.bundle.manifest import load_bundle
    from app.planning.components import bundle_plan
    from app.ui.window import MainWindow
    from tests.test_references import make_image

    big = FakeGpuReader([fake_gpu("NVIDIA GeForce RTX 4090", total_gib=24.0)])
    w = MainWindow(paths=make_paths(tmp_path), bundle=ui_bundle, reader=big, monitor_interval_ms=50, preload=False)
    qtbot.addWidget(w)
    if w.form.references.max_images < 2:
        import pytest

        pytest.skip("the UI bundle has no VAE encoder")
    v = w.form.values()
    peaks = [w.current_plan().peak_bytes]
    for i in range(2):
        w.form.references.add(make_image(tmp_path / f"r{i}.png", 64, 64, seed=i))
        w.form.set_size(v.width, v.height)  # the same size: only the images change
        peaks.append(w.current_plan().peak_bytes)
    assert peaks[0] < peaks[1] < peaks[2]
    b = load_bundle(ui_bundle, verify=False)
    assert peaks[2] == bundle_plan(b, w.gpu, v.width, v.height, references=2).peak_bytes
