"""The history database: rows only for files on disk, survives reopening, finds unrecorded PNGs, deletes both."""

from __future__ import annotations

import numpy as np
import pytest

from app.runtime.images import save_png
from app.ui.history import History, thumbnail_png

META = {"prompt": "a red circle", "negative_prompt": "", "seed": 3, "steps": 4, "guidance": 1.0, "width": 32,
        "height": 32, "model": "tiny", "family": "flux2-klein", "bundle_sha256": "0" * 64, "backend": "onnxruntime-cpu",
        "precision": "fp32", "edgegen": "test"}


def _png(folder, name, **changes):
    meta = {**META, **changes}
    return save_png(folder / name, np.full((32, 32, 3), 128, np.uint8), meta), meta


def test_rows_survive_reopen_search_and_delete(tmp_path):
    db = tmp_path / "h.sqlite3"
    h = History(db)
    assert h.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    p1, m1 = _png(tmp_path, "a.png")
    p2, m2 = _png(tmp_path, "b.png", prompt="100% green_triangle", seed=4)
    id1 = h.add(p1, m1, thumbnail_png(np.zeros((32, 32, 3), np.uint8)))
    id2 = h.add(p2, m2, None)
    h.close()

    h = History(db)
    assert [e.id for e in h.search()] == [id2, id1]
    assert [e.id for e in h.search("RED")] == [id1]
    assert [e.id for e in h.search("100%")] == [id2]  # LIKE wildcards in the query are literal
    assert [e.id for e in h.search("_")] == [id2]
    assert h.get(id1).meta["seed"] == 3 and h.get(id1).thumbnail.startswith(b"\x89PNG")
    h.delete(id1)
    assert not p1.exists() and h.get(id1) is None and h.count() == 1
    h.close()


def test_no_row_without_its_file(tmp_path):
    h = History(tmp_path / "h.sqlite3")
    with pytest.raises(FileNotFoundError):
        h.add(tmp_path / "missing.png", META, None)
    assert h.count() == 0


def test_pngs_saved_before_a_kill_are_recovered(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _png(out, "kept.png")  # saved, then the app died before recording it
    (out / "other.png").write_bytes(b"not a png")  # not ours: left alone
    (out / ".kept.png.123.tmp").write_bytes(b"partial")  # an interrupted atomic write
    h = History(tmp_path / "h.sqlite3")
    assert h.import_orphans(out) == 1
    assert h.import_orphans(out) == 0
    (entry,) = h.search()
    assert entry.path == (out / "kept.png").resolve() and entry.prompt == "a red circle" and entry.thumbnail


def test_rows_committed_before_a_kill_survive_it(tmp_path):
    """SIGKILL a process that keeps recording images: every row it committed is still there, the db opens."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    out.mkdir()
    code = f"""
import sys, time
sys.path.insert(0, {str(root)!r})
from pathlib import Path
from app.ui.history import History
h = History(Path({str(tmp_path / "h.sqlite3")!r}))
for i in range(100000):
    p = Path({str(out)!r}) / f"{{i}}.png"
    p.write_bytes(b"x")  # stands in for the PNG, which exists before its row
    h.add(p, {{"prompt": f"image {{i}}", "seed": i}}, None)
    print(i, flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    committed = -1
    deadline = time.monotonic() + 30
    while committed < 50 and time.monotonic() < deadline:
        committed = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    h = History(tmp_path / "h.sqlite3")
    rows = h.search(limit=100000)
    assert len(rows) >= committed + 1  # every row reported as committed survived
    assert all(e.path.is_file() for e in rows)  # and no row without its file
