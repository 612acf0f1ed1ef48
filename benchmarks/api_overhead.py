"""Per-image time through `edgegen serve` (HTTP submit, queue, PNG, history poll) vs in-process `--count`.

    .venv/bin/python benchmarks/api_overhead.py --bundle engines/demo --count 40

Both sides load the bundle once before timing (a warm-up image each) and write the same PNGs with metadata;
the API side submits every image as its own prompt, as a catalogue client does, and polls /history the way a
ComfyUI client does. Prints seconds per image for each and the ratio; the goal is an overhead under 5 %.
Not a test: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPT = "a red circle on a blue background"


def in_thread(fn, *args) -> float:
    """fn(*args) on a non-main thread, as the server's worker runs it (measured here: torch/ORT CPU runs on a
    non-main thread were faster than on the main thread, so compare like with like too)."""
    import threading

    box: list[float] = []
    t = threading.Thread(target=lambda: box.append(fn(*args)))
    t.start()
    t.join()
    return box[0]


def in_process(bundle_dir: Path, out: Path, count: int, steps: int | None) -> float:
    """What `edgegen generate --count N` does per image: one loaded pipeline, generate, save the PNG, audit."""
    from app.bundle.manifest import load_bundle
    from app.runtime.audit import AuditLog
    from app.runtime.backend import make_backend
    from app.runtime.generate import image_metadata
    from app.runtime.images import save_png
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    bundle = load_bundle(bundle_dir)
    backend, _ = make_backend(bundle, "auto")
    pipe = make_pipeline(bundle, backend)
    audit = AuditLog(out / "audit-cli.jsonl")
    pipe.generate(GenerationRequest(PROMPT, seed=0, steps=steps))  # warm-up
    t0 = time.perf_counter()
    for seed in range(1, count + 1):
        result = pipe.generate(GenerationRequest(PROMPT, seed=seed, steps=steps))
        path = save_png(out / f"cli-{seed}.png", result.image, image_metadata(bundle, backend, result))
        r = result.request
        audit.record(model=bundle.manifest["source"]["name"], family=bundle.manifest["family"],
                     bundle_sha=bundle.manifest_sha256, seed=r.seed, steps=r.steps, guidance=r.guidance,
                     width=r.width, height=r.height, backend=backend.name, precision=bundle.precision,
                     output=str(path), prompt=r.prompt, negative_prompt=r.negative_prompt)
    return (time.perf_counter() - t0) / count


def _call(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def through_api(bundle_dir: Path, work: Path, count: int, steps: int | None, poll: float = 0.05) -> float:
    from app.server.config import ServerConfig
    from app.server.run import ServerThread

    graph = json.loads((ROOT / "docs" / "api" / "edgegen_generate.json").read_text())
    graph["1"]["inputs"].update(bundle=bundle_dir.name, count=1, prompt=PROMPT)
    graph["1"]["inputs"].pop("width"), graph["1"]["inputs"].pop("height")
    if steps is not None:
        graph["1"]["inputs"]["steps"] = steps
    else:
        graph["1"]["inputs"].pop("steps")
    cfg = ServerConfig(port=0, bundles=(bundle_dir,), search_default_engines=False, output_dir=work / "output",
                       input_dir=work / "input", db_path=work / "queue.sqlite3", audit_path=work / "audit.jsonl")
    with ServerThread(cfg) as server:
        def submit(seed: int) -> str:
            graph["1"]["inputs"]["seed"] = seed
            return _call(f"{server.url}/prompt", {"prompt": graph})["prompt_id"]

        def wait(ids: list[str]) -> None:
            for pid in ids:
                while pid not in _call(f"{server.url}/history/{pid}"):
                    time.sleep(poll)

        wait([submit(0)])  # warm-up: loads and verifies the bundle
        t0 = time.perf_counter()
        wait([submit(seed) for seed in range(1, count + 1)])
        return (time.perf_counter() - t0) / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=ROOT / "engines" / "demo")
    p.add_argument("--count", type=int, default=40)
    p.add_argument("--steps", type=int, help="default: the bundle's")
    p.add_argument("--rounds", type=int, default=2, help="alternate the two sides this often; the best of each")
    args = p.parse_args()
    from app import offline

    offline.enforce_offline()
    runs: dict[str, list[float]] = {"local": [], "thread": [], "api": []}
    for r in range(args.rounds):  # alternating order, so drift in machine load hits both sides
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            runs["local"].append(in_process(args.bundle, work, args.count, args.steps))
            runs["thread"].append(in_thread(in_process, args.bundle, work, args.count, args.steps))
            runs["api"].append(through_api(args.bundle.resolve(), work, args.count, args.steps))
        print(f"round {r + 1}: in-process {runs['local'][-1] * 1000:.1f} ms/image (on a worker thread "
              f"{runs['thread'][-1] * 1000:.1f}), API {runs['api'][-1] * 1000:.1f} ms/image", flush=True)
    local, thread, api = min(runs["local"]), min(runs["thread"]), min(runs["api"])
    print(f"in-process (--count): {local * 1000:.1f} ms/image")
    print(f"API (/prompt + /history): {api * 1000:.1f} ms/image")
    print(f"in-process on a worker thread, as the server runs it: {thread * 1000:.1f} ms/image")
    print(f"ratio API / in-process: {api / local:.3f} (overhead {100 * (api / local - 1):+.1f} %)")
    print(f"ratio API / in-process on a worker thread: {api / thread:.3f} "
          f"(API overhead {100 * (api / thread - 1):+.1f} %)")


if __name__ == "__main__":
    main()
