"""benchmarks/gpu_acceptance.py --smoke on the CPU: the acceptance script's code paths (selftest's checks with
per-step time and VRAM columns, the Klein 4B part) run end to end. Its GPU half has never run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests._refs import tiny_references

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_acceptance.py"


def test_acceptance_smoke_runs_both_parts(klein_model, klein_bundle, tmp_path):
    model, refs = tiny_references(klein_model, tmp_path)
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--bundle", str(klein_bundle), "--model", str(model),
           "--references", str(refs), "--json", str(out), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={
        **__import__("os").environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    names = {b["name"]: b for b in r["backends"]}
    assert set(names) == {"torch", "onnxruntime-cpu"} and all(b["passed"] for b in names.values())
    assert all(b["ms_per_step"] > 0 and b["peak_torch_bytes"] is None for b in names.values())  # CPU: no VRAM
    k = r["klein4b"]  # benchmarks/gpu_klein4b.py --smoke --mini as a user runs it (the no-diffusers module)
    assert "MiniFlux2" in k["impl"] and k["smoke"]["flop_counter_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert [row["mode"] for row in k["rows"]] == ["eager"] and k["rows"][0]["median_ms"] > 0
    assert "ms/step" in proc.stdout and "| eager |" in proc.stdout
