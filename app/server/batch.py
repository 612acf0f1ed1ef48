"""`edgegen batch ROWS.csv --workflow W.json`: one job per CSV row, a bounded number in flight, resumable.

Each row fills the workflow in two ways: a column named NODE.INPUT ("3.seed", "6.text") sets that input, and
"{column}" placeholders inside string inputs are replaced by the row's value (an input that is exactly one
placeholder takes the value's type, so "{seed}" becomes a number). Rows go to a running server (--server URL)
or to a server started in this process on a free loopback port. The results CSV is rewritten atomically as rows
finish; --resume skips rows it already records as done (matched by row number and content).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import EdgegenError, UsageError

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_ -]*)\}")
RESULT_FIELDS = ["row", "key", "status", "prompt_id", "images", "error", "seconds"]
POLL_MAX = 1.0  # seconds between /history polls at most


@dataclass
class BatchResult:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    results_csv: Path | None = None
    rows: dict = field(default_factory=dict)


def load_workflow(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--workflow {path} cannot be read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--workflow {path} is not JSON ({e.msg}, line {e.lineno}); save it from ComfyUI with "
                         "'Save (API format)'") from None
    graph = data.get("prompt", data) if isinstance(data, dict) else None
    from app.server.workflow import is_ui_workflow

    if is_ui_workflow(graph):  # saved from ComfyUI's canvas: converted with the schemas /object_info serves
        from app.server.graph import GraphError
        from app.server.nodes import object_info
        from app.server.workflow import to_api

        try:
            return to_api(graph, object_info([], []))
        except GraphError as e:
            raise UsageError(f"--workflow {path}: {e}") from None
    if not isinstance(graph, dict) or not all(isinstance(v, dict) and "class_type" in v for v in graph.values()):
        raise UsageError(f"--workflow {path} is not an API-format workflow ({{node_id: {{class_type, inputs}}}}); "
                         "save it from ComfyUI (either 'Save' or 'Save (API format)')")
    return graph


def load_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise UsageError(f"{path} cannot be read ({e.strerror})") from None
    except (csv.Error, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a UTF-8 CSV file ({e})") from None
    if not rows:
        raise UsageError(f"{path} has no rows under its header line")
    return rows


def _typed(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


LORA_COLUMNS = ("lora", "loras")


def fill(graph: dict, row: dict[str, str]) -> dict:
    """A copy of `graph` with the row applied (NODE.INPUT columns, then {column} placeholders, then the LoRA
    column)."""
    g = copy.deepcopy(graph)
    for col, value in row.items():
        if col is None or "." not in col:
            continue
        node, _, name = col.partition(".")
        if node in g:
            old = g[node].setdefault("inputs", {}).get(name)
            g[node]["inputs"][name] = value if isinstance(old, str) else _typed(value)

    def sub(v):
        if isinstance(v, str):
            m = PLACEHOLDER.fullmatch(v)
            if m and m.group(1) in row:
                return _typed(row[m.group(1)])
            return PLACEHOLDER.sub(lambda m: row.get(m.group(1), m.group(0)), v)
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    for spec in g.values():
        inputs = spec.get("inputs", {})
        for k, v in list(inputs.items()):
            inputs[k] = sub(v)
    missing = sorted({m for spec in g.values() for v in spec.get("inputs", {}).values()
                      for s in (v if isinstance(v, list) else [v]) if isinstance(s, str)
                      for m in PLACEHOLDER.findall(s) if m not in row})
    if missing:
        raise UsageError(f"the workflow uses {', '.join('{' + m + '}' for m in missing)} but the CSV has no such "
                         f"column (columns: {', '.join(c for c in row if c)})")
    column = next((c for c in row if c and c.strip().lower() in LORA_COLUMNS), None)
    if column is not None and (row[column] or "").strip():
        add_loras(g, row[column])
    return g


def add_loras(graph: dict, text: str) -> None:
    """The LoRA column ("brand-a:0.8; brand-b:0.4", library names as generate --lora takes them): EdgegenGenerate
    nodes get them as `loras`; ComfyUI graphs get a LoraLoaderModelOnly per LoRA between each checkpoint's
    MODEL output and what used it, as a user would wire them in ComfyUI."""
    from app.bundle.loras import parse_lora_choice

    items = [t.strip() for t in re.split(r"[;,]", text) if t.strip()]
    try:
        choices = [parse_lora_choice(t) for t in items]
    except UsageError as e:
        raise UsageError(f"LoRA column {text!r}: {e}") from None
    for spec in graph.values():
        if spec.get("class_type") == "EdgegenGenerate":
            spec.setdefault("inputs", {})["loras"] = [f"{n}:{s:g}" for n, s in choices]
    for ckpt in [k for k, v in graph.items() if v.get("class_type") == "CheckpointLoaderSimple"]:
        users = [(spec, name) for k, spec in graph.items() for name, v in (spec.get("inputs") or {}).items()
                 if isinstance(v, list) and len(v) == 2 and str(v[0]) == str(ckpt) and v[1] == 0]
        source = [ckpt, 0]
        for i, (name, strength) in enumerate(choices):
            node = f"{ckpt}-lora-{i + 1}"
            graph[node] = {"class_type": "LoraLoaderModelOnly",
                           "inputs": {"lora_name": name, "strength_model": strength, "model": source}}
            source = [node, 0]
        for spec, name in users:
            spec["inputs"][name] = source


def row_key(index: int, row: dict) -> str:
    text = json.dumps([index, sorted((k or "", v or "") for k, v in row.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Client:
    """ComfyUI's client protocol over urllib: POST /prompt, poll /history/{id}."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                payload = json.loads(e.read())
            except Exception:
                payload = {}
            raise RequestFailed(e.code, payload) from None
        except urllib.error.URLError as e:
            raise EdgegenError(f"cannot reach the server at {self.url} ({e.reason}); start it with: edgegen serve, "
                               "or leave out --server to run in this process") from None

    def submit(self, graph: dict, client_id: str) -> str:
        return self._call("POST", "/prompt", {"prompt": graph, "client_id": client_id})["prompt_id"]

    def wait(self, prompt_id: str, stop: threading.Event) -> dict:
        delay = 0.05
        while not stop.is_set():
            h = self._call("GET", f"/history/{prompt_id}")
            if prompt_id in h:
                return h[prompt_id]
            stop.wait(delay)
            delay = min(POLL_MAX, delay * 1.5)
        raise EdgegenError("stopped")


class RequestFailed(EdgegenError):
    def __init__(self, status: int, payload: dict):
        err = payload.get("error", {}) if isinstance(payload, dict) else {}
        text = f"HTTP {status}: {err.get('message', 'request failed')}"
        if err.get("details"):
            text += f" ({err['details']})"
        for node, e in (payload.get("node_errors") or {}).items():
            for item in e.get("errors", []):
                text += f"; node {node} ({e.get('class_type')}): {item.get('message')}"
                if item.get("details"):
                    text += f" - {item['details']}"
        super().__init__(text)
        self.status = status


def _history_error(entry: dict) -> str:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data.get("exception_message", "failed")
        if event == "execution_interrupted":
            return "interrupted"
    return "failed"


def _read_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        return {r["key"]: r for r in csv.DictReader(f) if r.get("key")}


def _write_results(path: Path, rows: dict[str, dict]) -> None:
    from app.bundle.files import atomic_write_bytes

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RESULT_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in sorted(rows.values(), key=lambda r: int(r["row"])):
        w.writerow(r)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def run_batch(rows_csv: Path, workflow: Path, *, server: str | None = None, concurrency: int = 2,
              resume: bool = False, results: Path | None = None, token: str | None = None,
              local_config=None, say: Callable[[str], None] = print, show_progress: bool = True) -> BatchResult:
    """Run every row; returns counts. `local_config` (a ServerConfig) is used when `server` is None."""
    if concurrency < 1:
        raise UsageError(f"--concurrency {concurrency} must be at least 1")
    graph = load_workflow(workflow)
    rows = load_rows(rows_csv)
    jobs = [(i, row_key(i, r), fill(graph, r)) for i, r in enumerate(rows, start=1)]  # fail early on bad columns
    results = Path(results or Path(rows_csv).with_suffix(".results.csv"))
    recorded = _read_results(results) if resume else {}
    if not resume and results.exists():
        raise UsageError(f"{results} exists; pass --resume to continue that run, or remove it to start over")
    todo = [j for j in jobs if recorded.get(j[1], {}).get("status") != "success"]
    out = BatchResult(skipped=len(jobs) - len(todo), results_csv=results, rows=dict(recorded))
    if out.skipped:
        say(f"resuming: {out.skipped} of {len(jobs)} rows already done")
    local = None
    if server is None:
        from app.server.config import ServerConfig
        from app.server.run import ServerThread

        local = ServerThread(local_config or ServerConfig(port=0)).start()
        server = local.url
        say(f"running in this process (output: {local.server.config.output_dir})")
    client = Client(server, token)
    client_id = f"edgegen-batch-{time.time_ns()}"
    lock = threading.Lock()
    stop = threading.Event()
    last_write = [0.0]

    def one(index: int, key: str, g: dict) -> dict:
        t0 = time.monotonic()
        rec = {"row": index, "key": key, "prompt_id": "", "images": "", "error": ""}
        try:
            pid = client.submit(g, client_id)
            rec["prompt_id"] = pid
            entry = client.wait(pid, stop)
            if entry["status"].get("completed"):
                imgs = [f"{i['subfolder'] + '/' if i['subfolder'] else ''}{i['filename']}"
                        for o in entry["outputs"].values() for i in o.get("images", [])]
                rec.update(status="success", images=";".join(imgs))
            else:
                rec.update(status="error", error=_history_error(entry))
        except EdgegenError as e:
            rec.update(status="error", error=str(e))
        rec["seconds"] = f"{time.monotonic() - t0:.2f}"
        with lock:
            out.rows[key] = rec
            if time.monotonic() - last_write[0] > 2.0:
                _write_results(results, out.rows)
                last_write[0] = time.monotonic()
        return rec

    try:
        with _progress(len(jobs), out.skipped, show_progress) as advance, \
                ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="edgegen-batch") as pool:
            futures = [pool.submit(one, *j) for j in todo]
            try:
                for f in as_completed(futures):
                    rec = f.result()
                    if rec["status"] == "success":
                        out.done += 1
                    else:
                        out.failed += 1
                    advance(rec["status"] == "success")
            except BaseException:
                stop.set()
                for f in futures:
                    f.cancel()
                raise
    finally:
        with lock:
            _write_results(results, out.rows)
        if local is not None:
            local.close()
    return out


class _progress:
    """A rich progress bar on stderr (rows done / total, failures), or nothing."""

    def __init__(self, total: int, already: int, show: bool):
        self.total, self.already, self.show = total, already, show

    def __enter__(self):
        if not self.show:
            return lambda ok: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from app.progress import console

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[failed]} failed"), TimeRemainingColumn(), console=console)
        self.bar.__enter__()
        task = self.bar.add_task("rows", total=self.total, completed=self.already, failed=0)
        failed = [0]

        def advance(ok: bool) -> None:
            failed[0] += 0 if ok else 1
            self.bar.update(task, advance=1, failed=failed[0])

        return advance

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
        return False
