"""Peak memory and wall time of `edgegen export`, per component, against the bytes each component holds.

Runs the real CLI in a child process and follows its progress lines (`[transformer] loading ...` starts a
component, `[transformer] done ...` ends it). At each start the child's peak-RSS counter (VmHWM) is reset
through /proc/PID/clear_refs, at each end it is read, so every component gets its own exact peak; RSS is also
polled as a fallback where clear_refs is not writable. A watchdog stops the child (only the child) if the
machine's available memory falls below --min-available-gib, so a too-big run fails instead of swapping
others out.

    python -m benchmarks.export_memory --model DIR --out BUNDLE [--min-size 256 --max-size 1024] [--json F]

Component bytes = the bytes of the module the exporter loads (parameters + persistent buffers, read from the
safetensors headers), at 4 bytes an element for --precision fp32 and 2 for bf16 (loaded in BF16, never widened). Ratios are reported two ways:
peak RSS / bytes (what the acceptance goal of <= 1.5x is about) and (peak - RSS before loading) / bytes,
which takes out the ~0.5-1 GB of interpreter, torch and ONNX libraries that every component pays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 2**30
COMPONENT_LINE = re.compile(r"^\[(?P<name>[a-z0-9_]+)\] (?P<what>\S+)")
SOURCES = {"text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3",
           "transformer": "transformer", "vae_encoder": "vae", "vae_decoder": "vae"}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}  # fp8: the PyTorch path loads BF16 modules
# FP8 through PyTorch (export/fp8_torch.py): phases after the components, measured against the largest
# component's bytes (what the calibration holds at most: the text encoders, then the transformer).
FP8_PHASES = ("calibration", "fp8_graph", "fp8_check")


def safetensors_bytes(folder: Path, as_dtype_bytes: int | None = 4) -> int:
    """Bytes of every tensor in folder/*.safetensors, counted at `as_dtype_bytes` per float element."""
    from app.planning.components import safetensors_headers

    total = 0
    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
    for header in safetensors_headers(folder):
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in info["shape"]:
                count *= d
            is_float = info["dtype"].startswith(("F", "BF"))
            total += count * (as_dtype_bytes if (is_float and as_dtype_bytes) else sizes[info["dtype"]])
    return total


def proc_status(pid: int | str = "self", keys: tuple[str, ...] = ("VmRSS", "VmHWM")) -> dict[str, int]:
    """Bytes of the /proc/PID/status memory fields in `keys` (empty once the process is gone). Also used by
    benchmarks/transformer_memory.py and the tests' child processes."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def reset_peak(pid: int | str = "self") -> bool:
    """VmHWM := the current RSS (Linux /proc/PID/clear_refs); False where that is not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Phase:
    name: str
    start_s: float
    end_s: float = 0.0
    rss_before: int = 0  # RSS when the phase began (libraries, earlier leftovers)
    peak_rss: int = 0
    exact: bool = False  # peak from VmHWM reset at phase start, not polling
    lines: list[str] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return self.end_s - self.start_s


@dataclass
class Result:
    returncode: int
    wall_s: float
    process_peak_rss: int
    phases: list[Phase]
    aborted: str = ""
    tail: list[str] = field(default_factory=list)


def measure(cmd: list[str], poll_s: float = 0.02, min_available: int = 2 * GIB, echo=None, env=None) -> Result:
    """Run `cmd` (an edgegen export) and measure each `[component]` phase it reports."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    try:  # if memory does run out, the kernel's OOM killer takes this child, not someone else's process
        with open(f"/proc/{proc.pid}/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    phases: list[Phase] = [Phase("startup", 0.0)]
    lock = threading.Lock()
    state = {"peak": 0, "aborted": "", "done": False}

    def poll():
        while not state["done"]:
            st = proc_status(proc.pid)
            with lock:
                rss = st.get("VmRSS", 0)
                state["peak"] = max(state["peak"], st.get("VmHWM", rss))
                cur = phases[-1]
                if not cur.exact:
                    cur.peak_rss = max(cur.peak_rss, rss)
            if _available() < min_available and proc.poll() is None:
                state["aborted"] = (f"stopped: machine's available memory fell below {min_available / GIB:.1f} GiB "
                                    f"(child RSS {rss / GIB:.2f} GiB)")
                proc.kill()
            time.sleep(poll_s)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    tail: list[str] = []

    def close(phase: Phase, now: float):
        st = proc_status(proc.pid)
        phase.end_s = now
        if phase.exact and "VmHWM" in st:
            phase.peak_rss = max(phase.peak_rss, st["VmHWM"])

    for raw in proc.stdout:
        line = raw.rstrip("\n")
        now = time.monotonic() - t0
        tail = (tail + [line])[-40:]
        if echo:
            echo(f"{now:8.1f}s | {line}")
        m = COMPONENT_LINE.match(line)
        with lock:
            cur = phases[-1]
            if m and m["what"] == "loading" and cur.name != m["name"]:
                close(cur, now)
                rss = proc_status(proc.pid).get("VmRSS", 0)
                phase = Phase(m["name"], now, rss_before=rss, peak_rss=rss)
                phase.exact = reset_peak(proc.pid)
                phases.append(phase)
            elif m and m["what"] == "done" and cur.name == m["name"]:
                close(cur, now)
                rss = proc_status(proc.pid).get("VmRSS", 0)
                phases.append(Phase(f"after {m['name']}", now, rss_before=rss, peak_rss=rss))
            phases[-1].lines.append(line)
    proc.wait()
    state["done"] = True
    watcher.join()
    end = time.monotonic() - t0
    if phases[-1].end_s == 0.0:
        phases[-1].end_s = end
    peak = max([state["peak"]] + [p.peak_rss for p in phases])
    return Result(proc.returncode, end, peak, phases, state["aborted"], tail)


def component_bytes(model: Path, precision: str = "fp32") -> dict[str, int]:
    """Bytes of each component as the exporter loads it: 4 a float element in FP32, 2 in BF16/FP16."""
    return {name: safetensors_bytes(model / src, ELEMENT_BYTES[precision]) for name, src in SOURCES.items()
            if (model / src).is_dir()}


def onnx_bytes(bundle: Path, name: str) -> int:
    d = bundle / name
    return sum(p.stat().st_size for p in d.glob("model.onnx*")) if d.is_dir() else 0


def table(result: Result, sizes: dict[str, int], bundle: Path) -> str:
    rows = ["| phase | loaded GiB | ONNX GiB | wall s | RSS before GiB | peak RSS GiB | peak / bytes | "
            "(peak - before) / bytes |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in result.phases:
        if p.wall_s < 0.05 and not sizes.get(p.name):
            continue  # the instant between one component's "done" and the next one's "loading"
        b = sizes.get(p.name, 0)
        ratio = f"{p.peak_rss / b:.2f}" if b else ""
        delta = f"{(p.peak_rss - p.rss_before) / b:.2f}" if b else ""
        rows.append(f"| {p.name} | {b / GIB:.2f} | {onnx_bytes(bundle, p.name) / GIB:.2f} | {p.wall_s:.1f} | "
                    f"{p.rss_before / GIB:.2f} | {p.peak_rss / GIB:.2f}{'' if p.exact or not b else ' (polled)'} | "
                    f"{ratio} | {delta} |")
    rows.append(f"\nwhole run: {result.wall_s:.1f} s, process peak RSS {result.process_peak_rss / GIB:.2f} GiB, "
                f"exit code {result.returncode}{', ' + result.aborted if result.aborted else ''}")
    return "\n".join(rows)


def edgegen_cmd() -> list[str]:
    script = Path(sys.executable).with_name("edgegen")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from app.cli import entrypoint; entrypoint()"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--min-size", default="256")
    p.add_argument("--max-size", default="1024")
    p.add_argument("--min-available-gib", type=float, default=1.5)
    p.add_argument("--json", type=Path)
    p.add_argument("--accept-low-fidelity", action="store_true",
                   help="passed to export: random weights at real depth are no fidelity test (docs/PERFORMANCE.md)")
    p.add_argument("--precision", choices=sorted(ELEMENT_BYTES), default="fp32",
                   help="export --precision (bf16: every component in BF16; component bytes count 2 per element)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--export-args", default="", help="more export arguments, e.g. \"--fp8-path torch "
                   "--text-encoder-precision bf16 --calibration-count 2\"")
    p.add_argument("--code", type=Path, help="run the edgegen source tree here instead (e.g. an older commit "
                   "unpacked with `git archive REV app export | tar -x -C DIR`), for before/after numbers")
    a = p.parse_args(argv)
    prefix = ([sys.executable, "-c", "from app.cli import entrypoint; entrypoint()"] if a.code else edgegen_cmd())
    cmd = prefix + ["export", "--model", str(a.model), "--out", str(a.out), "--min-size", a.min_size,
                    "--max-size", a.max_size, "--overwrite", "--precision", a.precision] + (["--accept-low-fidelity"] if a.accept_low_fidelity else []) + a.export_args.split()
    env = {"PYTHONPATH": str(a.code.absolute())} if a.code else None
    print("$", ("PYTHONPATH=" + env["PYTHONPATH"] + " " if env else "") + " ".join(cmd), flush=True)
    sizes = component_bytes(a.model, a.precision)
    if a.precision == "fp8":
        sizes.update({phase: max(sizes.values()) for phase in FP8_PHASES})
    result = measure(cmd, min_available=int(a.min_available_gib * GIB), echo=None if a.quiet else print, env=env)
    print(table(result, sizes, a.out))
    if result.returncode:
        print("\n".join(result.tail[-15:]))
    if a.json:
        a.json.write_text(json.dumps({"cmd": cmd, "sizes": sizes, **asdict(result)}, indent=1))
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
