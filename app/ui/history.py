"""Generation history in SQLite (WAL): one row per saved PNG, inserted only after the file exists."""

from __future__ import annotations

import io
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL DEFAULT '',
    seed INTEGER NOT NULL,
    steps INTEGER NOT NULL,
    guidance REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    bundle TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL,
    thumbnail BLOB
);
CREATE INDEX IF NOT EXISTS images_created ON images(created);
"""
THUMB_PX = 160


@dataclass(frozen=True)
class Entry:
    id: int
    path: Path
    created: float
    meta: dict  # the PNG's edgegen JSON chunk, plus "bundle_dir" where known
    thumbnail: bytes | None

    @property
    def prompt(self) -> str:
        return self.meta.get("prompt", "")

    @property
    def exists(self) -> bool:
        return self.path.is_file()


def thumbnail_png(image, px: int = THUMB_PX) -> bytes:
    """A small PNG of an HxWx3 uint8 array or a PIL image, for the gallery."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(image)
    im = im.convert("RGB")
    im.thumbnail((px, px))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class History:
    """Not thread-safe: use it from one thread (the GUI thread) only."""

    def __init__(self, db_path: Path):
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        # WAL + synchronous=NORMAL: a committed row survives an application kill; readers never block.
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def add(self, path: Path, meta: dict, thumbnail: bytes | None, created: float | None = None) -> int:
        path = Path(path).resolve()
        if not path.is_file():  # the row describes a file; never record one that is not on disk
            raise FileNotFoundError(path)
        with self.db:
            cur = self.db.execute(
                "INSERT OR REPLACE INTO images (path, created, prompt, negative_prompt, seed, steps, guidance, "
                "width, height, model, bundle, meta, thumbnail) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (str(path), created or time.time(), meta.get("prompt", ""), meta.get("negative_prompt", ""),
                 int(meta.get("seed", 0)), int(meta.get("steps", 0)), float(meta.get("guidance", 0.0)),
                 int(meta.get("width", 0)), int(meta.get("height", 0)), meta.get("model", ""),
                 meta.get("bundle_dir", ""), json.dumps(meta, sort_keys=True), thumbnail),
            )
        return int(cur.lastrowid)

    def search(self, text: str = "", limit: int = 500) -> list[Entry]:
        """Newest first; `text` matches the prompt or negative prompt, case-insensitively."""
        pattern = f"%{_escape_like(text.strip())}%"
        rows = self.db.execute(
            "SELECT id, path, created, meta, thumbnail FROM images "
            "WHERE prompt LIKE ? ESCAPE '\\' OR negative_prompt LIKE ? ESCAPE '\\' "
            "ORDER BY created DESC, id DESC LIMIT ?",
            (pattern, pattern, limit),
        ).fetchall()
        return [_entry(r) for r in rows]

    def get(self, entry_id: int) -> Entry | None:
        row = self.db.execute("SELECT id, path, created, meta, thumbnail FROM images WHERE id=?",
                              (entry_id,)).fetchone()
        return _entry(row) if row else None

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def delete(self, entry_id: int, delete_file: bool = True) -> None:
        """Remove the row, then the file; a file already gone is not an error."""
        entry = self.get(entry_id)
        if entry is None:
            return
        with self.db:
            self.db.execute("DELETE FROM images WHERE id=?", (entry_id,))
        if delete_file:
            entry.path.unlink(missing_ok=True)

    def import_orphans(self, folder: Path) -> int:
        """Add edgegen PNGs in `folder` that have no row (the app was killed between saving and recording)."""
        from app.runtime.images import read_metadata

        folder = Path(folder)
        if not folder.is_dir():
            return 0
        known = {r[0] for r in self.db.execute("SELECT path FROM images")}
        added = 0
        for png in sorted(folder.glob("*.png")):
            resolved = png.resolve()
            if png.name.startswith(".") or str(resolved) in known:
                continue
            try:
                meta = read_metadata(png)
                from PIL import Image

                with Image.open(png) as im:
                    thumb = thumbnail_png(im)
            except (OSError, KeyError, ValueError):
                continue  # not ours, or unreadable: leave it alone
            self.add(resolved, meta, thumb, created=png.stat().st_mtime)
            added += 1
        return added


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _entry(row) -> Entry:
    entry_id, path, created, meta, thumb = row
    return Entry(int(entry_id), Path(path), float(created), json.loads(meta), thumb)
