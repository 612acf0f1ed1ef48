"""The TensorRT module for an engine flavour, its labels, and the one logger TensorRT keeps per process."""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass

from app.errors import UsageError
from app.planning.policy import RTX_TARGET_SMS


@dataclass(frozen=True)
class FlavourInfo:
    name: str
    module: str
    key_prefix: str
    label: str
    install_hint: str
    aot_targets: tuple[str, ...] | None  # None: builds only for the GPU it runs on


FLAVOURS: dict[str, FlavourInfo] = {
    "tensorrt-rtx": FlavourInfo(
        "tensorrt-rtx", "tensorrt_rtx", "trtrtx", "TensorRT-RTX", "pip install 'edgegen[rtx]'", RTX_TARGET_SMS
    ),
    "tensorrt": FlavourInfo(
        "tensorrt", "tensorrt", "trt", "TensorRT", "install the [gpu] extra from NVIDIA's package index", None
    ),
}


def flavour_info(flavour: str) -> FlavourInfo:
    try:
        return FLAVOURS[flavour]
    except KeyError:
        raise UsageError(f"'{flavour}' is not an engine target; use tensorrt-rtx or tensorrt.") from None


def import_trt(flavour: str):
    """The TensorRT module for `flavour`, imported only when an engine is built or run."""
    fl = flavour_info(flavour)
    try:
        return importlib.import_module(fl.module)
    except Exception as e:  # ImportError, or a bindings wheel whose native libraries are missing
        raise UsageError(
            f"{fl.label} is not usable here ({type(e).__name__}: {e}); {fl.install_hint}, "
            "or export with --target onnx."
        ) from None


def short_version(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


class _LogSink:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []


_LOGGERS: dict[str, object] = {}


_LOG_LOCK = threading.Lock()


def _logger(trt):
    """One logger per TensorRT module: TensorRT keeps the first logger it sees for the whole process."""
    with _LOG_LOCK:
        if trt.__name__ not in _LOGGERS:

            class CapturingLogger(trt.ILogger):
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)
                    self.sink: _LogSink | None = None

                def log(self, severity, msg):  # called from TensorRT threads; never raise here
                    sink = self.sink
                    if sink is None:
                        return
                    if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                        sink.errors.append(str(msg))
                    elif severity == trt.ILogger.Severity.WARNING:
                        sink.warnings.append(str(msg))

            _LOGGERS[trt.__name__] = CapturingLogger()
        return _LOGGERS[trt.__name__]



LABELS = {k: f.label for k, f in FLAVOURS.items()}  # "tensorrt-rtx" -> "TensorRT-RTX"


def installed_versions() -> dict[str, str | None]:
    """Installed TensorRT-RTX / TensorRT versions (None when missing or unusable)."""
    out: dict[str, str | None] = {}
    for flavour, fl in FLAVOURS.items():
        try:
            out[flavour] = str(importlib.import_module(fl.module).__version__)
        except Exception:  # a bindings wheel without its native libraries raises OSError, not ImportError
            out[flavour] = None
    return out
