"""Images per second through `edgegen serve --cluster` with 1 and then 2 CPU replicas, and their ratio.

A local Ray cluster on loopback (one node per replica, one CPU each), the server's API in front, a batch of
rows through `edgegen batch` against it. Each run starts after a warm-up job per replica (bundle verified and
loaded), so the figure is steady-state throughput. On the 2-core build machine the two replicas share the
cores with Ray, the server and the batch client, so expect well under 2x; on a site each replica has a GPU.

    .venv/bin/python benchmarks/cluster_throughput.py --bundle engines/demo [--rows 40] [--steps 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(bundle: Path, replicas: int, rows: int, steps: int, size: int, work: Path) -> float:
    from app.cluster.closed import connect
    from app.cluster.local import LocalCluster
    from app.cluster.run import ClusterSettings, pool_factory, server_config
    from app.server.batch import run_batch
    from app.server.config import ServerConfig
    from app.server.run import ServerThread

    work.mkdir(parents=True)
    graph = json.loads((ROOT / "docs" / "api" / "catalogue_workflow.json").read_text())
    graph["3"]["inputs"]["steps"] = steps
    graph["4"]["inputs"]["ckpt_name"] = bundle.name
    graph["5"]["inputs"].update(width=size, height=size)
    workflow = work / "workflow.json"
    workflow.write_text(json.dumps(graph))

    def rows_csv(name: str, n: int, first: int) -> Path:
        path = work / name
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["sku", "shape", "colour", "background", "seed"])
            for i in range(first, first + n):
                w.writerow([f"{name[:4]}-{i:04d}", "circle", "red", "blue", i])
        return path

    settings = ClusterSettings("local", replicas=replicas).resolved()
    cfg = server_config(ServerConfig(port=0, bundles=(bundle,), search_default_engines=False,
                                     output_dir=work / "output", db_path=work / "queue.sqlite3",
                                     audit_path=work / "audit.jsonl"), settings)
    with LocalCluster(nodes=replicas, cpus=1, network_log=work / "network.jsonl") as cluster:
        connect(cluster.address, "127.0.0.1")
        with ServerThread(cfg, pool_factory(settings)).start() as server:
            quiet = {"say": lambda m: None, "show_progress": False}
            run_batch(rows_csv("warm.csv", 2 * replicas, 10_000), workflow, server=server.url,
                      concurrency=2 * replicas, **quiet)  # every replica verifies and loads the bundle
            start = time.perf_counter()
            res = run_batch(rows_csv("rows.csv", rows, 0), workflow, server=server.url, concurrency=2 * replicas,
                            **quiet)
            elapsed = time.perf_counter() - start
    if res.done != rows or res.failed:
        first = next(iter(res.rows.values()), {}).get("error", "")
        raise SystemExit(f"{res.failed} of {rows} rows failed, e.g.: {first}")
    return rows / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "engines" / "demo")
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()

    from app import offline

    offline.enforce_offline()
    os.environ.setdefault("EDGEGEN_AUDIT_LOG", str(Path(tempfile.gettempdir()) / "edgegen-bench-audit.jsonl"))
    with tempfile.TemporaryDirectory(prefix="edgegen-cluster-bench-") as tmp:
        one = run(args.bundle.absolute(), 1, args.rows, args.steps, args.size, Path(tmp) / "one")
        two = run(args.bundle.absolute(), 2, args.rows, args.steps, args.size, Path(tmp) / "two")
    print(f"cpu cores: {os.cpu_count()}; {args.rows} rows, {args.steps} steps, {args.size}x{args.size}")
    print(f"1 replica : {one:.2f} images/s")
    print(f"2 replicas: {two:.2f} images/s")
    print(f"ratio 2/1 : {two / one:.2f}x")


if __name__ == "__main__":
    main()
