"""The server under load and under faults: many concurrent clients, a killed process, restarts."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image
from test_server_helpers import ROOT, rss_bytes, start_server, t2i_graph, wait_history

pytest.importorskip("aiohttp")


def test_200_jobs_from_8_clients_complete_once_with_flat_memory(demo_bundle, tmp_path):
    clients, per_client = 8, 25
    rss: dict[str, int | None] = {}
    done = []
    lock = threading.Lock()

    with start_server(tmp_path, demo_bundle) as s:
        def client(c: int) -> list[str]:
            mine = []
            with requests.Session() as http:
                for i in range(per_client):  # bounded loop: submit, wait, next
                    g = t2i_graph(seed=c * 1000 + i, steps=1, prefix=f"load/c{c}")
                    r = http.post(f"{s.url}/prompt", json={"prompt": g, "client_id": f"c{c}"}, timeout=60)
                    assert r.status_code == 200, r.text
                    pid = r.json()["prompt_id"]
                    entry = wait_history(s.url, pid, timeout=300)
                    assert entry["status"]["completed"], entry["status"]
                    mine.append(pid)
                    with lock:
                        done.append(pid)
                        if len(done) == 50:
                            rss["warm"] = rss_bytes()
            return mine

        with ThreadPoolExecutor(clients) as pool:
            ids = [pid for ids in pool.map(client, range(clients)) for pid in ids]
        rss["end"] = rss_bytes()
        history = requests.get(f"{s.url}/history", timeout=60).json()
        queue = requests.get(f"{s.url}/queue", timeout=60).json()
        out = s.server.config.output_dir

    assert len(ids) == len(set(ids)) == clients * per_client
    assert set(ids) <= set(history) and queue == {"queue_running": [], "queue_pending": []}
    images = [i for pid in ids for i in history[pid]["outputs"]["9"]["images"]]
    assert len(images) == len({(i["subfolder"], i["filename"]) for i in images}) == 200
    assert len(list(out.rglob("*.png"))) == 200
    for pid in ids:  # completed exactly once: one start, one success
        kinds = [m[0] for m in history[pid]["status"]["messages"]]
        assert kinds.count("execution_start") == 1 and kinds.count("execution_success") == 1
    audited = [json.loads(line)["prompt_id"] for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sorted(audited) == sorted(ids)
    if rss["warm"] and rss["end"]:
        grew = (rss["end"] - rss["warm"]) / 2**20
        assert grew < 64, f"RSS grew {grew:.0f} MiB over 150 jobs"


SERVE = """
import sys
from pathlib import Path
from app.server.config import ServerConfig
from app.server.run import serve
tmp, bundle = Path(sys.argv[1]), Path(sys.argv[2])
serve(ServerConfig(port=0, bundles=(bundle,), search_default_engines=False, output_dir=tmp / "output",
                   input_dir=tmp / "input", db_path=tmp / "queue.sqlite3", audit_path=tmp / "audit.jsonl"),
      say=lambda m: print(m, flush=True))
"""


def _spawn(tmp: Path, bundle: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tmp), str(bundle)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, m.group(1)
    raise AssertionError(f"server did not start (exit {proc.wait()})")


def test_killed_server_restarts_and_every_job_completes_or_fails(demo_bundle, tmp_path):
    proc, url = _spawn(tmp_path, demo_bundle)
    try:
        ids = []
        for i in range(8):
            r = requests.post(f"{url}/prompt", json={"prompt": t2i_graph(seed=100 + i, steps=30, batch=2)},
                              timeout=60)
            ids.append(r.json()["prompt_id"])
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:  # kill once two are done and another is under way
            finished = [i for i in ids if requests.get(f"{url}/history/{i}", timeout=30).json()]
            running = requests.get(f"{url}/queue", timeout=30).json()["queue_running"]
            if len(finished) >= 2 and running:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the first jobs did not finish in time")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    with sqlite3.connect(tmp_path / "queue.sqlite3") as db:
        at_kill = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    was_running = [i for i, st in at_kill.items() if st == "running"]
    assert len(was_running) <= 1 and set(at_kill) == set(ids)

    with start_server(tmp_path, demo_bundle) as s:  # same database and output folder
        assert s.server.requeued == was_running and s.server.failed == []
        entries = {i: wait_history(s.url, i, timeout=300) for i in ids}
    for i, e in entries.items():
        kinds = [m[0] for m in e["status"]["messages"]]
        assert e["status"]["completed"] or "execution_error" in kinds, (i, kinds)
        assert kinds.count("execution_success") <= 1
        if i in was_running:
            assert "execution_requeued" in kinds
        if e["status"]["completed"]:
            imgs = e["outputs"]["9"]["images"]
            assert len(imgs) == 2
            for img in imgs:
                with Image.open(tmp_path / "output" / img["subfolder"] / img["filename"]) as im:
                    im.load()  # whole, readable PNGs: written atomically
    listed = {img["filename"] for e in entries.values() for o in e["outputs"].values() for img in o["images"]}
    assert {p.name for p in (tmp_path / "output").rglob("*.png")} == listed  # no orphans, none twice


def test_a_job_that_keeps_dying_is_failed_not_retried_forever(tmp_path):
    from app.server.queue import ERROR, PENDING, JobQueue

    q = JobQueue(tmp_path / "q.sqlite3", max_attempts=2)
    job_id, _ = q.submit({"1": {}}, json.dumps({"tasks": [], "notes": []}))
    assert q.claim_next().id == job_id
    q.close()  # the process dies with the job running
    q = JobQueue(tmp_path / "q.sqlite3", max_attempts=2)
    assert q.recover() == ([job_id], []) and q.get(job_id).status == PENDING
    assert q.claim_next().attempts == 2
    q = JobQueue(tmp_path / "q.sqlite3", max_attempts=2)
    assert q.recover() == ([], [job_id])
    job = q.get(job_id)
    assert job.status == ERROR and "not retried" in job.error and job.messages[-1][0] == "execution_error"
    assert q.claim_next() is None
