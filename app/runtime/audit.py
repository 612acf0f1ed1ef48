"""Append-only, crash-safe JSONL audit log: one line per generated image saying who made what, when, and how.

Each record is one JSON object on one line, written by a single `os.write` to an O_APPEND descriptor and
fsynced before `record()` returns, so a crash can at worst leave one partial trailing line, which
`read_audit` skips and reports. Files rotate by size (`audit.jsonl` -> `audit.jsonl.1` -> ...).

With `redact_prompts=True` the prompt texts are replaced by their sha256: an auditor can confirm that a
given prompt was used, but a short or guessable prompt can still be confirmed by trying candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.errors import EdgegenError

ENV_PATH = "EDGEGEN_AUDIT_LOG"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
SCHEMA_VERSION = 1
PROMPT_FIELDS = ("prompt", "negative_prompt")
# Filled in by the log itself; a caller must not be able to forge them.
AUTO_FIELDS = ("v", "time", "user", "host", "pid", "prompts_redacted")

try:
    import fcntl
except ImportError:  # Windows: no cross-process lock; single O_APPEND writes still don't interleave
    fcntl = None


# O_BINARY: Windows would otherwise write "\r\n"; O_CLOEXEC: child processes must not inherit the log.
_O_EXTRA = getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


class AuditError(EdgegenError):
    """The audit log could not be written."""


class TornRecordWarning(UserWarning):
    """`read_audit` met a line that is not a whole record (a write cut short by a crash)."""


def default_audit_path() -> Path:
    """$EDGEGEN_AUDIT_LOG if set, else audit.jsonl in the per-user log directory."""
    env = os.environ.get(ENV_PATH)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_log_dir("edgegen", appauthor=False)) / "audit.jsonl"


def _os_user() -> str:
    # The account the process runs as, not $USER, which any user can set to anything.
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        pass
    try:
        import getpass

        return getpass.getuser()
    except (ImportError, KeyError, OSError):
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _sha256(text: Any) -> str | None:
    return None if text is None else hashlib.sha256(str(text).encode("utf-8")).hexdigest()


class AuditLog:
    """Appends one record per generation. Path: argument, else $EDGEGEN_AUDIT_LOG, else the user log dir."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        redact_prompts: bool = False,
        max_bytes: int = DEFAULT_MAX_BYTES,
        backups: int = DEFAULT_BACKUPS,
    ) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError("max_bytes must be positive and backups not negative")
        self.path = Path(path).expanduser() if path is not None else default_audit_path()
        self.redact_prompts = redact_prompts
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()

    def files(self) -> list[Path]:
        """The existing log files, oldest first."""
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.backups, 0, -1)]
        return [p for p in [*rotated, self.path] if p.exists()]

    def record(self, **fields: Any) -> dict[str, Any]:
        """Append one record and return it as written.

        Expected fields: model, family, bundle_sha, seed, steps, guidance, width, height, backend,
        precision, output, prompt, negative_prompt; any other JSON-able field is kept as given.
        """
        forged = sorted(set(fields) & set(AUTO_FIELDS))
        if forged:
            raise ValueError(f"audit fields set by the log itself: {', '.join(forged)}")
        rec: dict[str, Any] = {
            "v": SCHEMA_VERSION,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "user": _os_user(),
            "host": platform.node(),
            "pid": os.getpid(),
            "event": fields.pop("event", "generate"),
        }
        for key, value in fields.items():
            if key in PROMPT_FIELDS and self.redact_prompts:
                rec[f"{key}_sha256"] = _sha256(value)
            else:
                rec[key] = value
        rec["prompts_redacted"] = self.redact_prompts
        # ensure_ascii: the line can then hold no byte that any tool might take for a line break.
        line = (json.dumps(rec, ensure_ascii=True, separators=(",", ":"), default=str) + "\n").encode("ascii")
        try:
            self._append(line)
        except OSError as err:
            raise AuditError(
                f"Cannot write the audit log {self.path}: {err.strerror or err}. Make it writable, or set "
                f"{ENV_PATH} to a writable file."
            ) from err
        return rec

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock, self._interprocess_lock():
            self._rotate_if_needed(len(line))
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | _O_EXTRA, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size:
                    os.lseek(fd, size - 1, os.SEEK_SET)
                    if os.read(fd, 1) != b"\n":
                        # An earlier writer died mid-line: end that fragment so this record stays whole.
                        line = b"\n" + line
                written = os.write(fd, line)
                while written < len(line):  # short writes only happen on a full disk or a signal
                    written += os.write(fd, line[written:])
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                _fsync_dir(self.path.parent)

    def _rotate_if_needed(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= self.max_bytes:
            return
        if self.backups == 0:
            os.remove(self.path)
        else:
            for i in range(self.backups - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        _fsync_dir(self.path.parent)

    @contextmanager
    def _interprocess_lock(self) -> Iterator[None]:
        # The CLI and the app may write at once; rotation must not race another process's append.
        if fcntl is None:
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _O_EXTRA, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock


def _fsync_dir(directory: Path) -> None:
    # Makes a new or renamed file's directory entry survive a power cut; not possible on Windows.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _warn_torn(path: Path, line_no: int, fragment: bytes, trailing: bool) -> None:
    kind = "torn trailing line" if trailing else "damaged line"
    warnings.warn(
        TornRecordWarning(f"{path}:{line_no}: skipped a {kind} ({len(fragment)} bytes): {fragment[:80]!r}"),
        stacklevel=3,
    )


def read_audit(
    path: str | os.PathLike[str],
    *,
    include_rotated: bool = False,
    on_torn: Callable[[Path, int, bytes, bool], None] | None = None,
) -> list[dict[str, Any]]:
    """All whole records in `path` (and its rotated files, oldest first, if asked).

    Lines that are not a whole record (a crash cut the write short) are skipped and reported to
    `on_torn(path, line_no, fragment, is_trailing)`, by default as a TornRecordWarning.
    """
    path = Path(path)
    report = on_torn or _warn_torn
    files = [path]
    if include_rotated:
        rotated = sorted(
            (p for p in path.parent.glob(path.name + ".*") if p.name[len(path.name) + 1:].isdigit()),
            key=lambda p: int(p.name[len(path.name) + 1:]),
            reverse=True,
        )
        files = [*rotated, path]
    records: list[dict[str, Any]] = []
    for file in files:
        lines = file.read_bytes().split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            trailing = number == len(lines)  # no newline after it: the write was cut short
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = None
            if isinstance(rec, dict):  # a cut that spared the whole object lost nothing
                records.append(rec)
            else:
                report(file, number, raw, trailing)
    return records
