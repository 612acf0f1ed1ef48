"""The persistent job queue and history in SQLite (WAL): jobs survive restarts, none runs to completion twice.

A job moves pending -> running -> success | error | interrupted. Each image is recorded only after its PNG is
atomically on disk, and a job is `success` only when all of its images are recorded. A job found `running`
at startup (the server died under it) goes back to pending, keeping the images it already wrote, until it has
been started `max_attempts` times; then it is marked failed with a message saying so.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    number INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    client_id TEXT,
    graph TEXT NOT NULL,
    plan TEXT NOT NULL,
    extra TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    messages TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, number);
CREATE TABLE IF NOT EXISTS images (
    job_id TEXT NOT NULL,
    node TEXT NOT NULL,
    idx INTEGER NOT NULL,
    filename TEXT NOT NULL,
    subfolder TEXT NOT NULL,
    type TEXT NOT NULL,
    PRIMARY KEY (job_id, node, idx)
);
"""
PENDING, RUNNING, SUCCESS, ERROR, INTERRUPTED = "pending", "running", "success", "error", "interrupted"
FINISHED = (SUCCESS, ERROR, INTERRUPTED)


@dataclass(frozen=True)
class Job:
    number: int
    id: str
    client_id: str | None
    graph: dict
    plan: str  # graph.Plan JSON
    extra: dict
    status: str
    attempts: int
    messages: list
    error: str | None
    created: float
    started: float | None
    finished: float | None

    def outputs_to_execute(self) -> list[str]:
        return [t["node"] for t in json.loads(self.plan)["tasks"]]

    def comfy_prompt(self) -> list:
        """ComfyUI's queue/history item: [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
        return [self.number, self.id, self.graph, self.extra, self.outputs_to_execute()]


def _job(row) -> Job:
    return Job(number=row[0], id=row[1], client_id=row[2], graph=json.loads(row[3]), plan=row[4],
               extra=json.loads(row[5]), status=row[6], attempts=row[7], messages=json.loads(row[8]),
               error=row[9], created=row[10], started=row[11], finished=row[12])


_COLS = "number, id, client_id, graph, plan, extra, status, attempts, messages, error, created, started, finished"


class JobQueue:
    """Thread-safe: the event loop submits and reads, the worker claims and finishes."""

    def __init__(self, path: Path, max_attempts: int = 2, history_limit: int = 10_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self.history_limit = history_limit
        self._lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def _tx(self):
        return _Tx(self)

    # ----- lifecycle --------------------------------------------------------------------------------------
    def recover(self) -> tuple[list[str], list[str]]:
        """After a restart: re-queue jobs that were running, or fail those already started max_attempts times.

        Returns (requeued ids, failed ids)."""
        now = time.time()
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts, messages FROM jobs WHERE status=?", (RUNNING,)).fetchall()
            requeued, failed = [], []
            for job_id, attempts, messages in rows:
                msgs = json.loads(messages)
                if attempts < self.max_attempts:
                    msgs.append(["execution_requeued", {"prompt_id": job_id, "timestamp": _ms(now),
                                 "reason": "the server stopped while this job ran; it runs again"}])
                    db.execute("UPDATE jobs SET status=?, messages=? WHERE id=?", (PENDING, json.dumps(msgs), job_id))
                    requeued.append(job_id)
                else:
                    text = (f"the server stopped while this job ran, {attempts} times; it was not retried again. "
                            "Resubmit it, and check the server log if it keeps happening")
                    msgs.append(["execution_error", {"prompt_id": job_id, "timestamp": _ms(now),
                                 "exception_message": text, "exception_type": "ServerRestarted"}])
                    db.execute("UPDATE jobs SET status=?, messages=?, error=?, finished=? WHERE id=?",
                               (ERROR, json.dumps(msgs), text, now, job_id))
                    failed.append(job_id)
        return requeued, failed

    def submit(self, graph: dict, plan: str, client_id: str | None = None, extra: dict | None = None,
               job_id: str | None = None, messages: list | None = None) -> tuple[str, int]:
        """Queue a job; returns (prompt_id, number). A given job_id that exists already raises KeyError."""
        job_id = job_id or str(uuid.uuid4())
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id=?", (job_id,)).fetchone():
                raise KeyError(job_id)
            cur = db.execute(
                "INSERT INTO jobs (id, client_id, graph, plan, extra, status, messages, created) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, client_id, json.dumps(graph), plan, json.dumps(extra or {}), PENDING,
                 json.dumps(messages or []), time.time()))
            return job_id, cur.lastrowid

    def claim_next(self) -> Job | None:
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLS} FROM jobs WHERE status=? ORDER BY number LIMIT 1", (PENDING,)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status=?, attempts=attempts+1, started=? WHERE id=?",
                       (RUNNING, time.time(), row[1]))
            row = db.execute(f"SELECT {_COLS} FROM jobs WHERE id=?", (row[1],)).fetchone()
            return _job(row)

    def release(self, job_id: str) -> None:
        """A running job the server stops on purpose goes back to pending without using up an attempt."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status=?, attempts=MAX(attempts-1, 0) WHERE id=? AND status=?",
                       (PENDING, job_id, RUNNING))

    def retry(self, job_id: str, reason: str) -> bool:
        """A running job whose generating process died (a cluster replica): back to pending, the attempt counted,
        or failed once it has been started `max_attempts` times. True if it was re-queued."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts, messages FROM jobs WHERE id=? AND status=?", (job_id, RUNNING)).fetchone()
            if row is None:
                return False
            attempts, msgs = row[0], json.loads(row[1])
            if attempts < self.max_attempts:
                msgs.append(["execution_requeued", {"prompt_id": job_id, "timestamp": _ms(now),
                             "reason": f"{reason}; it runs again"}])
                db.execute("UPDATE jobs SET status=?, messages=? WHERE id=?", (PENDING, json.dumps(msgs), job_id))
                return True
            text = (f"{reason}, on each of {attempts} attempts; it was not retried again. Resubmit it, and check the "
                    "cluster's logs if it keeps happening")
            msgs.append(["execution_error", {"prompt_id": job_id, "timestamp": _ms(now), "exception_message": text,
                         "exception_type": "WorkerLost"}])
            db.execute("UPDATE jobs SET status=?, messages=?, error=?, finished=? WHERE id=?",
                       (ERROR, json.dumps(msgs), text, now, job_id))
            self._trim(db)
            return False

    def record_image(self, job_id: str, node: str, idx: int, filename: str, subfolder: str, type_: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?)",
                       (job_id, node, idx, filename, subfolder, type_))

    def add_message(self, job_id: str, event: str, data: dict) -> None:
        with self._tx() as db:
            row = db.execute("SELECT messages FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is not None:
                msgs = json.loads(row[0]) + [[event, data]]
                db.execute("UPDATE jobs SET messages=? WHERE id=?", (json.dumps(msgs), job_id))

    def finish(self, job_id: str, status: str, event: str, data: dict, error: str | None = None) -> None:
        assert status in FINISHED
        with self._tx() as db:
            row = db.execute("SELECT messages FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return
            msgs = json.loads(row[0]) + [[event, data]]
            db.execute("UPDATE jobs SET status=?, messages=?, error=?, finished=? WHERE id=? AND status=?",
                       (status, json.dumps(msgs), error, time.time(), job_id, RUNNING))
            self._trim(db)

    def _trim(self, db) -> None:
        n = db.execute("SELECT COUNT(*) FROM jobs WHERE status IN (?,?,?)", FINISHED).fetchone()[0]
        if n > self.history_limit:
            old = db.execute("SELECT id FROM jobs WHERE status IN (?,?,?) ORDER BY number LIMIT ?",
                             (*FINISHED, n - self.history_limit)).fetchall()
            self._delete(db, [o[0] for o in old])

    @staticmethod
    def _delete(db, ids: list[str]) -> None:
        for i in ids:
            db.execute("DELETE FROM images WHERE job_id=?", (i,))
            db.execute("DELETE FROM jobs WHERE id=?", (i,))

    # ----- reading ----------------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, status: tuple[str, ...], limit: int | None = None, newest_first: bool = False) -> list[Job]:
        marks = ",".join("?" * len(status))
        order = "DESC" if newest_first else "ASC"
        sql = f"SELECT {_COLS} FROM jobs WHERE status IN ({marks}) ORDER BY number {order}"
        args: tuple = status
        if limit is not None:
            sql += " LIMIT ?"
            args = (*status, int(limit))
        with self._tx() as db:
            rows = db.execute(sql, args).fetchall()
        return [_job(r) for r in rows]

    def images(self, job_id: str) -> dict[str, list[dict]]:
        with self._tx() as db:
            rows = db.execute("SELECT node, idx, filename, subfolder, type FROM images WHERE job_id=? ORDER BY node, idx",
                              (job_id,)).fetchall()
        out: dict[str, list[dict]] = {}
        for node, _idx, filename, subfolder, type_ in rows:
            out.setdefault(node, []).append({"filename": filename, "subfolder": subfolder, "type": type_})
        return out

    def recorded(self, job_id: str) -> set[tuple[str, int]]:
        with self._tx() as db:
            rows = db.execute("SELECT node, idx FROM images WHERE job_id=?", (job_id,)).fetchall()
        return {(n, i) for n, i in rows}

    def count(self, status: str) -> int:
        with self._tx() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE status=?", (status,)).fetchone()[0]

    # ----- deleting ---------------------------------------------------------------------------------------
    def delete_pending(self, ids: list[str] | None = None) -> int:
        """Remove pending jobs (all when ids is None); running and finished jobs are not touched."""
        with self._tx() as db:
            if ids is None:
                rows = db.execute("SELECT id FROM jobs WHERE status=?", (PENDING,)).fetchall()
            else:
                rows = [(i,) for i in ids if db.execute("SELECT 1 FROM jobs WHERE id=? AND status=?",
                                                        (i, PENDING)).fetchone()]
            self._delete(db, [r[0] for r in rows])
            return len(rows)

    def delete_history(self, ids: list[str] | None = None) -> int:
        with self._tx() as db:
            if ids is None:
                rows = db.execute("SELECT id FROM jobs WHERE status IN (?,?,?)", FINISHED).fetchall()
            else:
                rows = [(i,) for i in ids if db.execute("SELECT 1 FROM jobs WHERE id=? AND status IN (?,?,?)",
                                                        (i, *FINISHED)).fetchone()]
            self._delete(db, [r[0] for r in rows])
            return len(rows)


class _Tx:
    """Lock + BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time, across processes too."""

    def __init__(self, q: JobQueue):
        self.q = q

    def __enter__(self):
        self.q._lock.acquire()
        try:
            self.q.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.q._lock.release()
            raise
        return self.q.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.q.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.q._lock.release()


def _ms(t: float) -> int:
    return int(t * 1000)
