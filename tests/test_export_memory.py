"""Export memory: exporting a component peaks near one copy of its weights, not two or three.

A Klein-architecture transformer with real 128-wide heads (12 heads, 1 double + 1 single block, ~0.5 GB in
FP32, so it goes to ONNX external data like the real 15.5 GB one) is exported by the exporter's own
per-component step in a child process, whose peak RSS (VmHWM, reset just before) is compared with its FP32
bytes. Before the exporter kept one copy (deferred weight transposes, module dropped before the write,
ONNX Runtime's check without prepacking) this ratio was ~2-3x; benchmarks/export_memory.py measures the
full-size model the same way (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Peak RSS above the pre-export baseline, per weight byte as loaded. One copy + transients measures ~1.1-1.2;
# holding a second copy anywhere (module during write or check, eager transposes, prepacked ORT weights) >= 2.
MAX_RATIO = 1.5
# BF16: the module is loaded in BF16 and never widened as a whole (references through per-module FP32 hooks,
# the check through the FP32 twin in ONNX Runtime without graph optimisations). At real size that measures
# 1.22 (Qwen3-4B) and 1.16 (Klein 4B transformer) above the baseline, 1.27-1.28 in all (docs/PERFORMANCE.md,
# the 1.3x goal). At this size (258 MiB) about 0.3 GiB that does not scale with the weights (ONNX Runtime's run
# of the twin, the exporter's graph objects) dominates: measured 2.33-2.36. A second copy of the weights held
# anywhere adds 1.0 and fails the bound.
MAX_RATIO_BF16 = 2.8

CHILD = r"""
import json, sys
from pathlib import Path

from benchmarks.export_memory import proc_status as status, reset_peak

import time
t0 = time.monotonic()
from app.bundle.families import FLUX2_KLEIN, read_model_index
from app.bundle.modelfolder import ModelFolder
from export.exporter import export_one

path = Path(sys.argv[1])
folder = ModelFolder(path, read_model_index(path), FLUX2_KLEIN)
out = Path(sys.argv[2])
# Warm-up: a tiny module through the same path, so every library the export loads is in before the baseline.
import torch
from diffusers import Flux2Transformer2DModel
from app.bundle.families import ComponentSpec, TensorSpec
from export.exporter import _check
from export.onnx_export import save_component, trace_component
spec = ComponentSpec("warm", "warm", "", (TensorSpec("x", "float32", ("batch", 8)),),
                     (TensorSpec("y", "float32", ("batch", 4)),), "warm")
sample = {"x": torch.randn(2, 8)}
lin = torch.nn.Linear(8, 4).eval()
with torch.no_grad():
    ref = {"y": lin(sample["x"]).numpy()}
_check(spec, save_component(trace_component(spec, lin, sample), spec, out / "warm", True), [sample], [ref])
if len(sys.argv) > 4:  # BF16: the whole path once on a 1-head model (BF16 kernels, hooks, twin session) first
    warm = Path(sys.argv[4])
    export_one(ModelFolder(warm, read_model_index(warm), FLUX2_KLEIN), FLUX2_KLEIN.component("transformer"),
               out / "warm-transformer", progress=lambda m: None, precision=sys.argv[3])
    import gc; gc.collect()
t1 = time.monotonic()
reset_peak()  # VmHWM := the current RSS
before = status()["VmRSS"]
entry, _ = export_one(folder, folder.family.component("transformer"), out / "transformer", progress=lambda m: None,
                      precision=sys.argv[3])
print(json.dumps({"before": before, "peak": status()["VmHWM"], "parameters": entry["parameters"],
                  "warmup_s": t1 - t0, "export_s": time.monotonic() - t1,
                  "cosine": entry["fidelity"]["cosine"],
                  "files": sorted(p.name for p in (out / "transformer").iterdir())}))

"""


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def wide_klein(request, tmp_path_factory) -> tuple[Path, str]:
    """A model folder holding only the transformer (all the export step reads), stored in the dtype it is
    exported in (the released models ship BF16), and that precision."""
    import torch
    from diffusers import Flux2Transformer2DModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for name, heads in (("wide-klein", 12), ("warm-klein", 1)):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=heads, joint_attention_dim=96, timestep_guidance_channels=256,
            axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False,
        )
        if request.param == "bf16":
            transformer = transformer.to(torch.bfloat16)
        transformer.save_pretrained(root / name / "transformer", safe_serialization=True)
        (root / name / "model_index.json").write_text(json.dumps(
            {"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
    return root / "wide-klein", request.param


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_transformer_export_peaks_near_one_copy(wide_klein, tmp_path):
    folder, precision = wide_klein
    warm = [str(folder.with_name("warm-klein"))] if precision == "bf16" else []
    env = {k: v for k, v in os.environ.items() if k != "EDGEGEN_EXPORT_CACHE"}  # measure the real export
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path), precision, *warm], capture_output=True,
                          text=True, timeout=300, check=False, env={**env, "PYTHONWARNINGS": "ignore"},
                          cwd=Path(__file__).resolve().parents[1])  # the child imports benchmarks/
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    weight_bytes = r["parameters"] * (2 if precision == "bf16" else 4)
    bound = MAX_RATIO_BF16 if precision == "bf16" else MAX_RATIO
    ratio = (r["peak"] - r["before"]) / weight_bytes
    print(f"transformer {weight_bytes / 2**20:.0f} MiB {precision.upper()}: peak {r['peak'] / 2**20:.0f} MiB, baseline "
          f"{r['before'] / 2**20:.0f} MiB, (peak - baseline) / bytes = {ratio:.2f}; warm-up {r['warmup_s']:.1f}s, "
          f"export {r['export_s']:.1f}s")
    assert "model.onnx.data" in r["files"], "a component this size must use ONNX external data"
    assert "model.fp32.onnx" in r["files"] or precision == "fp32"  # the BF16 check's twin (removed at commit)
    assert r["cosine"] > 0.9999
    assert ratio <= bound, f"export held {ratio:.2f} copies of the weights at its peak (bound {bound})"
