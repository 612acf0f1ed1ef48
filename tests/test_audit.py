"""Audit log: records append and read back, prompts redact to sha256, files rotate, crashes stay readable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import platformdirs
import pytest

from app.runtime.audit import AuditLog, TornRecordWarning, read_audit

ROOT = Path(__file__).resolve().parents[1]
GEN = {
    "model": "tiny-flux", "family": "flux2-klein", "bundle_sha": "ab" * 32, "seed": 7, "steps": 4,
    "guidance": 1.0, "width": 256, "height": 256, "backend": "onnxruntime", "precision": "fp8",
    "output": "/tmp/x.png",
}


def collect_torn(path: Path, **kw):
    torn = []
    records = read_audit(path, on_torn=lambda *a: torn.append(a), **kw)
    return records, torn


def spawn_writer(path: Path, script: str) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        from app.runtime.audit import AuditLog
        log = AuditLog({str(path)!r}, max_bytes=1 << 30)
        """) + textwrap.dedent(script)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)


def test_records_append_and_read_back(tmp_path):
    path = tmp_path / "logs" / "audit.jsonl"
    log = AuditLog(path)
    first = log.record(prompt="a red fox\nin snow", negative_prompt="blurry", **GEN)
    log.record(prompt="ü ✓ 画", negative_prompt=None, **{**GEN, "seed": 8})
    records = read_audit(path)
    assert len(records) == 2 and records[0] == first
    assert first["prompt"] == "a red fox\nin snow" and records[1]["prompt"] == "ü ✓ 画"
    assert records[1]["seed"] == 8 and first["prompts_redacted"] is False
    for key in ("time", "user", "host", "pid", "model", "family", "bundle_sha", "steps", "guidance", "width",
                "height", "backend", "precision", "output"):
        assert key in first, key
    assert first["time"].endswith("+00:00")
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2 and raw.isascii()  # one line per record, whatever the prompt holds
    if os.name == "posix":
        assert (path.stat().st_mode & 0o777) == 0o600  # prompts are sensitive


def test_redaction_stores_sha256_not_prompt(tmp_path):
    path = tmp_path / "audit.jsonl"
    rec = AuditLog(path, redact_prompts=True).record(prompt="patient 4711 x-ray", negative_prompt="", **GEN)
    [stored] = read_audit(path)
    assert stored == rec and stored["prompts_redacted"] is True
    assert "prompt" not in stored and "negative_prompt" not in stored
    assert stored["prompt_sha256"] == hashlib.sha256(b"patient 4711 x-ray").hexdigest()
    assert stored["negative_prompt_sha256"] == hashlib.sha256(b"").hexdigest()
    assert b"4711" not in path.read_bytes()


def test_rotates_at_size_limit_and_keeps_n_backups(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2000, backups=2)
    for i in range(40):
        log.record(prompt=f"prompt {i}", **GEN)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in log.files())
    records = read_audit(path, include_rotated=True)
    seeds = [int(r["prompt"].split()[1]) for r in records]
    assert seeds == list(range(40 - len(seeds), 40))  # oldest dropped, order kept, newest in the main file
    assert read_audit(path)[-1]["prompt"] == "prompt 39"


def test_torn_trailing_line_is_skipped_reported_and_sealed(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.record(prompt="one", **GEN)
    with open(path, "ab") as f:
        f.write(b'{"v":1,"time":"2030-01-01T00:00:00+00:00","prompt":"tw')  # a write cut short by a crash
    records, torn = collect_torn(path)
    assert [r["prompt"] for r in records] == ["one"]
    assert len(torn) == 1 and torn[0][1:] == (2, torn[0][2], True) and torn[0][2].endswith(b'"tw')
    with pytest.warns(TornRecordWarning, match="torn trailing line"):
        read_audit(path)
    # The next record must not be glued onto the fragment.
    log.record(prompt="two", **GEN)
    records, torn = collect_torn(path)
    assert [r["prompt"] for r in records] == ["one", "two"]
    assert len(torn) == 1 and torn[0][3] is False  # the fragment is now a damaged middle line


def test_sigkill_while_writing_leaves_readable_log(tmp_path):
    path = tmp_path / "audit.jsonl"
    writer = spawn_writer(path, """
        i = 0
        while True:
            log.record(prompt="x" * 20000, i=i)
            i += 1
        """)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (not path.exists() or path.read_bytes().count(b"\n") < 30):
            time.sleep(0.01)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL
    records, torn = collect_torn(path)
    assert len(records) >= 30
    assert [r["i"] for r in records] == list(range(len(records)))
    assert all(t[3] for t in torn) and len(torn) <= 1  # at worst one partial trailing line
    AuditLog(path).record(prompt="after crash", **GEN)
    records2, _ = collect_torn(path)
    assert len(records2) == len(records) + 1 and records2[-1]["prompt"] == "after crash"


def test_two_processes_rotating_at_once_lose_nothing(tmp_path):
    path = tmp_path / "audit.jsonl"
    script = """
        log.max_bytes, log.backups = 8000, 50
        for i in range(60):
            log.record(prompt="p" * 200, writer=WHO, i=i)
        """
    writers = [spawn_writer(path, script.replace("WHO", repr(w))) for w in ("a", "b")]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    records, torn = collect_torn(path, include_rotated=True)
    assert torn == []
    for who in ("a", "b"):
        assert [r["i"] for r in records if r["writer"] == who] == list(range(60))


def test_location_argument_then_env_then_user_log_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEGEN_AUDIT_LOG", raising=False)
    default = Path(platformdirs.user_log_dir("edgegen", appauthor=False)) / "audit.jsonl"
    assert AuditLog().path == default
    monkeypatch.setenv("EDGEGEN_AUDIT_LOG", str(tmp_path / "env.jsonl"))
    assert AuditLog().path == tmp_path / "env.jsonl"
    assert AuditLog(tmp_path / "arg.jsonl").path == tmp_path / "arg.jsonl"


def test_caller_cannot_forge_who_and_when(tmp_path):
    with pytest.raises(ValueError, match="user"):
        AuditLog(tmp_path / "a.jsonl").record(user="someone-else", **GEN)
    assert not (tmp_path / "a.jsonl").exists()
    AuditLog(tmp_path / "b.jsonl").record(event="selftest", **GEN)
    assert json.loads((tmp_path / "b.jsonl").read_text())["event"] == "selftest"
