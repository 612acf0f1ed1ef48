"""`edgegen serve --cluster` on a local Ray cluster: a head and a worker node on loopback, one CPU replica each.

The whole run (cluster, server, a 100-row `edgegen batch`, a replica killed mid-batch) happens in a child
Python inside an empty network namespace with only loopback up, under `strace -f`, so the audit sees every
connect/bind/send of every process Ray starts, native ones included; the child's Ray processes are stopped
at its end and the test checks none is left.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
ROWS = int(os.environ.get("EDGEGEN_CLUSTER_TEST_ROWS", "100"))
STEPS = 2
DRAIN_ROWS = 12


# ----- pure parts: bundle per SM, settings ----------------------------------------------------------------------

def _bundle(root: Path, name: str, engines: list[dict], family: str = "flux2-klein", sha: str = "a" * 64) -> Path:
    d = root / name
    d.mkdir(parents=True)
    manifest = {"family": family, "source": {"name": "m", "path": "/models/m", "model_index_sha256": sha},
                "components": {"transformer": {}, "vae_decoder": {}}, "engines": engines, "loras": []}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def _engine(component: str, sm: str) -> dict:
    return {"component": component, "flavour": "tensorrt-rtx", "sm": sm, "version": "1.7.1.116"}


def test_each_replica_picks_the_bundle_whose_engines_match_its_gpu(tmp_path):
    from app.cluster.bundles import identity, pick_bundle
    from app.planning.devices import fake_gpu

    plain = _bundle(tmp_path, "klein", [])
    sm89 = _bundle(tmp_path, "klein-sm89", [_engine("transformer", "89"), _engine("vae_decoder", "89")])
    sm120 = _bundle(tmp_path, "klein-sm120", [_engine("transformer", "120"), _engine("vae_decoder", "120")])
    other = _bundle(tmp_path, "klein-other", [_engine("transformer", "89"), _engine("vae_decoder", "89")],
                    sha="b" * 64)  # another model under a similar name: never a candidate
    wanted = identity(json.loads((plain / "manifest.json").read_text()))
    cands = [plain, sm89, sm120, other]
    kw = {"installed": {"tensorrt-rtx": "1.7.1.116", "tensorrt": None}, "ort_providers": ["CPUExecutionProvider"],
          "torch_cuda": True}
    ada = fake_gpu("NVIDIA GeForce RTX 4090", "89")
    assert pick_bundle("klein", wanted, cands, ada, **kw)[0] == sm89
    blackwell = fake_gpu("NVIDIA GeForce RTX 5090", "120", 32)
    assert pick_bundle("klein", wanted, cands, blackwell, **kw)[0] == sm120
    ampere = fake_gpu("NVIDIA GeForce RTX 3090", "86")  # no sm86 engine: ONNX Runtime; ties go to the asked name
    path, why = pick_bundle("klein", wanted, cands, ampere, **kw)
    assert path == plain and "ONNX Runtime" in why
    assert pick_bundle("klein", wanted, cands, None, **kw)[0] == plain  # CPU replica
    from app.errors import BundleError

    with pytest.raises(BundleError, match="No bundle 'klein'"):
        pick_bundle("klein", wanted, [other], ada, **kw)


def test_cluster_addresses_beyond_loopback_need_ray_token_auth(tmp_path, capsys):
    from app.cli import main
    from app.cluster.run import ClusterSettings
    from app.errors import UsageError

    assert ClusterSettings("local").resolved().node_ip == "127.0.0.1"
    assert ClusterSettings("localhost:6379").resolved().address == "127.0.0.1:6379"
    with pytest.raises(UsageError, match="--cluster-token-file"):
        ClusterSettings("192.168.1.10:6379").resolved()
    token = tmp_path / "ray-token"
    token.write_text("x" * 32)
    s = ClusterSettings("192.168.1.10:6379", token_file=token).resolved()
    assert (s.address, s.node_ip) == ("192.168.1.10:6379", "192.168.1.10")
    with pytest.raises(UsageError, match="IP:PORT"):
        ClusterSettings("head.example").resolved()
    # The CLI refuses before anything connects: one line, exit 2.
    assert main(["serve", "--cluster", "10.0.0.1:6379"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--cluster-token-file" in err


def test_ray_node_environment_is_closed():
    from app.cluster.closed import node_env

    env = node_env("127.0.0.1")
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_USAGE_STATS_REPORT_URL"].startswith("http://127.0.0.1:")
    assert env["HF_HUB_OFFLINE"] == "1" and env["EDGEGEN_CLUSTER_GUARD"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0].endswith(os.path.join("app", "cluster", "boot"))
    site = node_env("10.0.0.5", token_file=Path("/etc/edgegen/ray-token"))
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in site
    assert site["RAY_AUTH_MODE"] == "token" and site["RAY_AUTH_TOKEN_PATH"] == "/etc/edgegen/ray-token"


def test_node_start_command_pins_the_address_ports_and_dashboard_off():
    from app.cluster.__main__ import PORTS, main, ray_start_command

    head = ray_start_command(True, None, "192.168.1.10")
    assert "--node-ip-address=192.168.1.10" in head and "--include-dashboard=false" in head
    assert "--disable-usage-stats" in head and f"--port={PORTS['gcs']}" in head and "--head" in head
    assert "--dashboard-host=192.168.1.10" in head  # Ray's API server: the node's address, never 0.0.0.0
    join = ray_start_command(False, "192.168.1.10:6379", "192.168.1.11")
    assert "--address=192.168.1.10:6379" in join and "--head" not in join
    assert main(["up", "--head", "--node-ip", "192.168.1.10"]) == 2  # beyond loopback without a token


# ----- the local cluster run --------------------------------------------------------------------------------------

def _netns_prefix() -> tuple[list[str], str]:
    """unshare into an empty network namespace, bring loopback up, and strace the run, where available."""
    unshare, ip, strace = shutil.which("unshare"), shutil.which("ip"), shutil.which("strace")
    notes = []
    inner = "exec"
    if strace:
        inner = f"exec {strace} -f -qq -e trace=connect,bind,sendto,sendmsg -o \"$STRACE_LOG\""
    else:
        notes.append("strace not installed: the audit reads the guard logs and the sockets Ray left open only")
    if unshare and ip:
        for flags in (["-n"], ["-rn"]):
            if subprocess.run([unshare, *flags, "true"], capture_output=True, check=False).returncode == 0:
                return [unshare, *flags, "sh", "-c", f"{ip} link set lo up && {inner} \"$@\"", "sh"], "; ".join(notes)
    notes.append("no network namespace here: the run sees the machine's real network")
    return ["sh", "-c", f"{inner} \"$@\"", "sh"], "; ".join(notes)


NONLOCAL = re.compile(r'inet_addr\("(?!127\.)[^"]+"\)|inet_pton\(AF_INET6, "(?!::1"|::ffff:127\.)[^"]+"')


def non_loopback_syscalls(strace_log: Path) -> list[str]:
    """connect/bind/sendto/sendmsg lines of any process that name an IPv4/IPv6 address outside loopback."""
    bad = []
    for line in strace_log.read_text(errors="replace").splitlines():
        if ("AF_INET" in line) and NONLOCAL.search(line):
            bad.append(line[:300])
    return bad


def test_hundred_rows_on_two_replicas_survive_a_killed_replica_with_no_network(demo_bundle, tmp_path):
    prefix, notes = _netns_prefix()
    strace_log = tmp_path / "strace.log"
    env = {**os.environ, "STRACE_LOG": str(strace_log), "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    started = time.monotonic()
    proc = subprocess.run([*prefix, sys.executable, str(Path(__file__)), "scenario", str(demo_bundle), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, f"scenario failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({**out, "elapsed_s": round(elapsed, 1), "notes": notes}, indent=1))

    # Every row completed, each exactly once, although a replica died under one of them.
    assert out["batch"] == {"done": ROWS, "failed": 0, "skipped": 0}
    assert out["jobs"] == {"success": ROWS + DRAIN_ROWS, "interrupted": 1}
    assert out["images_per_job"] == [1] and out["png_files"] == ROWS + DRAIN_ROWS
    assert out["successes_per_job"] == [1]
    assert out["api_audit_records"] == ROWS + DRAIN_ROWS and out["api_audit_unique_jobs"] == ROWS + DRAIN_ROWS
    # Draining the worker node: the job its replica was running completes there; no new job starts there.
    d = out["drain"]
    assert d["accepted"] and d["busy_job"] and d["batch"] == {"done": DRAIN_ROWS, "failed": 0}
    assert d["busy_job_status"] == "success" and d["busy_job_replica"] == d["replica_pid"]
    assert d["started_on_drained_node_after"] == []
    # /interrupt stops the job on its replica between steps, as it does without a cluster.
    i = out["interrupt"]
    assert i["answered"] == {"interrupted": True} and "execution_interrupted" in i["events"] and not i["outputs"]
    # The job replica 0 ran when its process died (the one seen running, or the next, if it finished first) went
    # back to the queue once, saying why, and then completed on a replica.
    assert out["killed"]["pid"] and len(out["requeued_jobs"]) == 1
    assert "replica 0" in out["requeue_reasons"][0] and "stopped while generating" in out["requeue_reasons"][0]
    assert out["killed"]["pid"] not in out["replica_pids_after"]  # Ray restarted it as a new process
    assert len(out["replicas_that_generated"]) >= 2  # both nodes' replicas did work
    assert out["guard_in_replicas"] == [True, True]
    # every replica reads the server's LoRA library (and checks each file's sha256 there, docs/LORA.md)
    assert out["lora_libraries"] == [str(Path(os.environ["EDGEGEN_LORAS"]).absolute())]

    # The network audit: no process of the run attempted anything beyond loopback.
    if strace_log.exists():
        assert non_loopback_syscalls(strace_log) == []
        assert out["listening"] and all(_loopback(a) for a in out["listening"]), out["listening"]
    # What the guard refused in-process never reached the kernel; only Ray's own API-server probes may be there.
    for rec in out["network_log"]:
        assert "ray/_common/usage/usage_lib.py" in rec["refused"], rec
        assert "dashboard.py" in rec["process"], rec
    # No Ray process outlives the run.
    alive = [p for p in out["ray_pids"] if Path(f"/proc/{p}").exists() and not _zombie(p)]
    assert alive == [], f"Ray processes left running: {alive}"


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# ----- the child: runs inside the namespace -----------------------------------------------------------------------

def _listening_addresses() -> list[str]:
    """Local addresses of listening TCP sockets in this network namespace (from /proc/net/tcp*)."""
    import ipaddress

    out = []
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            hexip = parts[1].split(":")[0]
            raw = bytes.fromhex(hexip)
            if v6:
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                out.append(str(ipaddress.IPv6Address(raw)))
            else:
                out.append(str(ipaddress.IPv4Address(raw[::-1])))
    return sorted(set(out))


def rows_for(path: Path, n: int, first: int) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sku", "shape", "colour", "background", "seed"])
        for i in range(first, first + n):
            w.writerow([f"SKU-{i:04d}", "circle", "red", "blue", i])
    return path


def drain_phase(cluster, pool, url: str, rows: Path, workflow: Path) -> dict:
    """Drain the worker node while its replica runs a job: that job completes, the node takes no new one."""
    import ray
    from ray.core.generated import autoscaler_pb2

    from app.server.batch import run_batch

    node = next(iter(cluster._cluster.worker_nodes))
    drained = next(w for w in pool.workers if w.info and w.info["node_id"] == node.node_id)
    out: dict = {"replica_pid": drained.info["pid"]}
    batch: dict = {}
    t = threading.Thread(target=lambda: batch.update(res=run_batch(rows, workflow, server=url, concurrency=4,
                                                                    say=lambda m: None, show_progress=False)))
    t.start()
    deadline = time.monotonic() + 120
    while not drained.running() and time.monotonic() < deadline:
        time.sleep(0.005)
    out["busy_job"] = drained.running()
    gcs = ray._raylet.GcsClient(address=cluster.address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    out["accepted"] = bool(gcs.drain_node(node.node_id, reason, "edgegen test: maintenance", 0)[0])
    out["drained_at"] = time.time()
    t.join(300)
    res = batch["res"]
    out["batch"] = {"done": res.done, "failed": res.failed}
    return out


def interrupt_phase(pool, url: str) -> dict:
    """POST /interrupt reaches the replica running the job: it stops between steps, the job is interrupted."""
    import requests
    from test_server_helpers import t2i_graph, wait_history

    job = requests.post(f"{url}/prompt", json={"prompt": t2i_graph(seed=5, steps=100, prefix="long")},
                        timeout=30).json()["prompt_id"]
    deadline = time.monotonic() + 60
    while pool.running() != job and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # some steps in
    started = time.monotonic()
    answered = requests.post(f"{url}/interrupt", json={"prompt_id": job}, timeout=30).json()
    h = wait_history(url, job, timeout=60)
    return {"answered": answered, "events": [m[0] for m in h["status"]["messages"]],
            "seconds_to_stop": round(time.monotonic() - started, 2), "outputs": h["outputs"]}


def scenario(bundle: Path, tmp: Path) -> dict:
    from app import offline
    from app.cluster import guard

    os.environ[guard.ENV_LOG] = str(tmp / "network.jsonl")
    os.environ["EDGEGEN_AUDIT_LOG"] = str(tmp / "node-audit.jsonl")  # the replicas' node audit log
    offline.enforce_offline(log=guard._sink)  # as the CLI does first

    from test_server_helpers import DOCS
    from test_server_helpers import server_config as base_config

    from app.cluster.closed import connect
    from app.cluster.local import LocalCluster
    from app.cluster.run import ClusterSettings, pool_factory, server_config
    from app.server.batch import run_batch
    from app.server.queue import JobQueue
    from app.server.run import ServerThread

    rows = rows_for(tmp / "rows.csv", ROWS, 0)
    graph = json.loads((DOCS / "catalogue_workflow.json").read_text())
    graph["3"]["inputs"]["steps"] = STEPS
    workflow = tmp / "workflow.json"
    workflow.write_text(json.dumps(graph))

    settings = ClusterSettings("local", retries=2).resolved()
    cfg = server_config(base_config(tmp / "srv", bundle), settings)
    result: dict = {}
    with LocalCluster(nodes=2, cpus=1, network_log=tmp / "network.jsonl") as cluster:
        connect(cluster.address, "127.0.0.1")
        node_pids = [p.process.pid for n in [cluster._cluster.head_node, *cluster._cluster.worker_nodes]
                     for procs in n.all_processes.values() for p in procs]
        with ServerThread(cfg, pool_factory(settings)).start() as server:
            pool = server.server.worker
            killed: dict = {}

            def kill_one_mid_job() -> None:
                out = cfg.output_dir / "catalogue"
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    done = len(list(out.glob("*.png"))) if out.is_dir() else 0
                    w0 = pool.workers[0]
                    job = w0.running()
                    if done >= 20 and job and w0.info:
                        killed.update(pid=w0.info["pid"], job=job)
                        os.kill(w0.info["pid"], signal.SIGKILL)
                        return
                    time.sleep(0.02)

            killer = threading.Thread(target=kill_one_mid_job, daemon=True)
            killer.start()
            res = run_batch(rows, workflow, server=server.url, concurrency=4, say=lambda m: None,
                            show_progress=False)
            killer.join(5)
            result["batch"] = {"done": res.done, "failed": res.failed, "skipped": res.skipped}
            result["killed"] = killed
            result["replica_pids_after"] = [w.info["pid"] for w in pool.workers if w.info]
            result["guard_in_replicas"] = [bool(w.info and w.info["guard"]) for w in pool.workers]
            result["lora_libraries"] = sorted({w.info.get("lora_library") for w in pool.workers if w.info})
            result["listening"] = _listening_addresses()
            worker_pids = [w.info["pid"] for w in pool.workers]
            result["drain"] = drain_phase(cluster, pool, server.url, rows_for(tmp / "rows2.csv", DRAIN_ROWS, 1000),
                                          workflow)
            worker_pids += [w.info["pid"] for w in pool.workers]
            result["interrupt"] = interrupt_phase(pool, server.url)
        q = JobQueue(cfg.db_path)
        jobs = q.jobs(("success", "error", "interrupted", "pending", "running"))
        result["jobs"] = {s: sum(1 for j in jobs if j.status == s) for s in {j.status for j in jobs}}
        done = [j for j in jobs if j.status == "success"]
        result["images_per_job"] = sorted({sum(len(v) for v in q.images(j.id).values()) for j in done})
        result["successes_per_job"] = sorted({sum(1 for m in j.messages if m[0] == "execution_success")
                                              for j in done})
        result["requeued_jobs"] = [j.id for j in jobs if any(m[0] == "execution_requeued" for m in j.messages)]
        result["requeue_reasons"] = [m[1]["reason"] for j in jobs for m in j.messages if m[0] == "execution_requeued"]
        q.close()
    result["png_files"] = len(list((cfg.output_dir / "catalogue").glob("*.png")))
    audit = [json.loads(line) for line in cfg.audit_path.read_text().splitlines()]
    api = [a for a in audit if a.get("source") == "api"]
    result["api_audit_records"] = len(api)
    result["api_audit_unique_jobs"] = len({a["prompt_id"] for a in api})
    result["replicas_that_generated"] = sorted({a["replica_pid"] for a in api})
    d = result["drain"]
    by_job = {a["prompt_id"]: a["replica_pid"] for a in api}
    q = JobQueue(cfg.db_path)
    busy = q.get(d["busy_job"]) if d["busy_job"] else None
    d["busy_job_status"] = busy.status if busy else None
    d["busy_job_replica"] = by_job.get(d["busy_job"])
    d["started_on_drained_node_after"] = [
        j.id for j in q.jobs(("success",)) if by_job.get(j.id) == d["replica_pid"] and j.started > d["drained_at"] + 0.5]
    q.close()
    result["network_log"] = guard.read_network_log(tmp / "network.jsonl")
    result["ray_pids"] = node_pids + worker_pids
    return result


if __name__ == "__main__" and sys.argv[1:2] == ["scenario"]:
    print(json.dumps(scenario(Path(sys.argv[2]), Path(sys.argv[3]))))
