"""GPU acceptance in one run (< 8 minutes): every GPU backend here on the demo bundle, then a real-size Klein 4B.

Part 1 is `edgegen selftest`'s own check (app.site.selftest.run_candidate): the demo bundle's reference requests
through each backend, PSNR against the reference PNGs (diffusers' FP32 pipeline on the CPU), milliseconds per
denoising step, peak VRAM from torch's allocator and from NVML. Part 2 runs benchmarks/gpu_klein4b.py on a
random-weight transformer at the released Klein 4B config (eager, torch.compile, FP8 through torch; TensorRT FP8
where `tensorrt` imports).

    python benchmarks/gpu_acceptance.py                      # on the GPU machine; prints both tables
    python benchmarks/gpu_acceptance.py --smoke              # CPU: the same code paths, tiny sizes (CI)
    python benchmarks/gpu_acceptance.py --json out.json

Nothing here has run on a GPU yet (docs/PERFORMANCE.md says which paths have). Exit code 0 when every backend
that ran passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_CANDIDATES = ("torch-cuda", "onnxruntime-cuda", "tensorrt-rtx", "tensorrt")
CPU_CANDIDATES = ("torch", "onnxruntime-cpu")


def demo_part(args, say) -> tuple[list, list]:
    from app.bundle.locations import assets_dir
    from app.cli import _selftest_export
    from app.site.selftest import _environment, load_references, run_candidate
    from app.site.selftest_bundle import demo_bundle
    from app.site.selftest_plan import plan
    from app.site.selftest_view import render

    model = Path(args.model or assets_dir() / "demo-model")
    refs_dir = Path(args.references or assets_dir() / "demo-references")
    refs = load_references(refs_dir)[: args.images]
    env = _environment()
    bundle, how, notes = demo_bundle(model, args.bundle, env, _selftest_export)
    say(f"bundle: {bundle.root} ({how})")
    wanted = CPU_CANDIDATES if args.smoke else GPU_CANDIDATES
    cands = plan(bundle, model, env["gpus"], env["ort_providers"], env["torch_cuda"], env["installed"])
    outcomes = [run_candidate(bundle, c, refs, refs_dir) for c in cands if c.skip is None and c.name in wanted]
    skipped = [(c.label, c.skip) for c in cands if c.skip is not None and c.name in wanted] + list(notes)
    render(outcomes, skipped, bundle, len(refs))
    return outcomes, skipped


def klein4b_part(args, say) -> dict | None:
    out = Path(args.workdir) / "klein4b.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_klein4b.py"), "--json", str(out),
           "--workdir", str(args.workdir)]
    cmd += (["--smoke", "--mini", "--skip-onnx", "--iters", "2", "--warmup", "1"] if args.smoke
            else ["--modes", args.klein_modes, "--iters", "5", "--budget-s", str(args.klein_budget_s)])
    say("real-size Klein 4B transformer: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, text=True, capture_output=True, timeout=args.klein_budget_s + 240)
    print(proc.stdout[-6000:])
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        return {"error": f"exit {proc.returncode}"}
    return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU backends and tiny sizes: check the code paths")
    p.add_argument("--bundle", type=Path, help="bundle to test (default: the demo bundle, exported if missing)")
    p.add_argument("--model", type=Path, help="its model folder (default: assets/demo-model)")
    p.add_argument("--references", type=Path, help="reference PNGs (default: assets/demo-references)")
    p.add_argument("--images", type=int, default=5, help="reference requests per backend")
    p.add_argument("--skip-klein4b", action="store_true")
    p.add_argument("--klein-modes", default="eager,compile,fp8-torch,trt-fp8")
    p.add_argument("--klein-budget-s", type=int, default=240)
    p.add_argument("--workdir", default="/tmp/edgegen-gpu-acceptance")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    from app import offline

    offline.enforce_offline()
    t0 = time.monotonic()
    say = lambda m: print(f"[{time.monotonic() - t0:6.1f}s] {m}", flush=True)  # noqa: E731
    outcomes, skipped = demo_part(args, say)
    klein = None if args.skip_klein4b else klein4b_part(args, say)
    result = {
        "smoke": args.smoke, "seconds": round(time.monotonic() - t0, 1),
        "backends": [{"name": o.name, "label": o.label, "passed": o.passed, "worst_db": o.worst_db,
                      "threshold_db": o.threshold_db, "detail": o.detail,
                      **({k: getattr(o.cost, k) for k in ("ms_per_step", "peak_torch_bytes", "peak_nvml_bytes")}
                         if o.cost else {})} for o in outcomes],
        "not_covered": [{"label": lbl, "why": why} for lbl, why in skipped],
        "klein4b": klein,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    say(f"done in {result['seconds']} s")
    ok = bool(outcomes) and all(o.passed for o in outcomes) and not (klein or {}).get("error")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
