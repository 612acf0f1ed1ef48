"""User-facing failure kinds. Each is caught once at the CLI/UI edge and shown as one sentence with the fix."""

from __future__ import annotations


class EdgegenError(Exception):
    """Base class. `str(err)` is the whole message a user sees: what is wrong and how to fix it."""

    exit_code = 1


class UsageError(EdgegenError):
    """Bad input or usage: a flag, a size, a prompt file. Exit code 2."""

    exit_code = 2


class ModelFolderError(UsageError):
    """The --model folder is missing, not a diffusers folder, unsupported, or holds pickle weights."""


class BundleError(UsageError):
    """An engine bundle is missing, from an unknown schema, tampered with, or not built for this machine."""


class NetworkBlockedError(EdgegenError):
    """Library code tried to reach the network; edgegen never does."""


class GenerationCancelled(EdgegenError):
    """The user cancelled a running generation."""


class EnvironmentProblem(EdgegenError):
    """This machine cannot do what was asked (disk full, output not writable, a runtime library failed).
    Exit code 1; the CLI adds the path of a full report."""


# ---------------------------------------------------------------- reports of failures nobody anticipated

ENV_LOG_DIR = "EDGEGEN_LOG_DIR"


def log_dir():
    """The user's log folder (platformdirs user_log_dir; EDGEGEN_LOG_DIR overrides, for tests and sites)."""
    import os
    from pathlib import Path

    if os.environ.get(ENV_LOG_DIR):
        return Path(os.environ[ENV_LOG_DIR])
    from platformdirs import user_log_dir

    return Path(user_log_dir("edgegen"))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line: its type and the first non-empty line of its message."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def write_report(exc: BaseException, argv: list[str] | None = None, context: str = ""):
    """Write a full report of `exc` (traceback, versions, argv, platform) to a new file in the user's log folder,
    atomically, and return its path; None when even that fails (a report must never raise). The CLI prints the
    path; the app offers the same file for copying."""
    import os
    import platform
    import sys
    import time
    import traceback

    try:
        from app import __version__

        versions = {"edgegen": __version__, "python": platform.python_version(), "platform": platform.platform()}
        for mod in ("torch", "onnxruntime", "onnx", "diffusers", "transformers", "tensorrt_rtx", "tensorrt",
                    "modelopt", "PySide6"):
            m = sys.modules.get(mod)  # only what this process loaded: importing here could fail again
            if m is not None:
                versions[mod] = str(getattr(m, "__version__", "?"))
        lines = [f"edgegen failure report, {time.strftime('%Y-%m-%d %H:%M:%S %z')}",
                 f"argv: {argv if argv is not None else sys.argv}", f"context: {context}" if context else "",
                 "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
                 *traceback.format_exception(type(exc), exc, exc.__traceback__)]
        text = "\n".join(ln for ln in lines if ln is not None).encode("utf-8", "backslashreplace")
        from app.atomic import atomic_write_bytes

        path = log_dir() / f"report-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        atomic_write_bytes(path, text)
        return path
    except Exception:  # noqa: BLE001  (disk full, read-only home: the one line still gets printed)
        return None
