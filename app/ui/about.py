"""The About box: edgegen's version and the versions of what it runs on, plus the offline guard's state."""

from __future__ import annotations

import platform
from importlib import metadata

from PySide6.QtCore import Qt, qVersion
from PySide6.QtWidgets import QMessageBox, QWidget

from app import __version__

PACKAGES = ("PySide6-Essentials", "torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu",
            "tensorrt-rtx-cu13", "tensorrt-cu13", "nvidia-ml-py")


def versions() -> dict[str, str]:
    """Installed versions, read from package metadata without importing anything heavy."""
    out = {"edgegen": __version__, "Python": platform.python_version(), "Qt": qVersion()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def about_text() -> str:
    from app.offline import guard_status

    rows = "".join(f"<tr><td>{k}</td><td>&nbsp;{v}</td></tr>" for k, v in versions().items())
    return (f"<h3>edgegen {__version__}</h3><p>Offline image generation with ONNX Runtime and TensorRT "
            f"engines.</p><table>{rows}</table><p>Offline: {guard_status().summary()}.</p>")


def show_about(parent: QWidget) -> None:
    box = QMessageBox(parent)
    box.setWindowTitle("About edgegen")
    box.setObjectName("aboutBox")
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setText(about_text())
    box.exec()
