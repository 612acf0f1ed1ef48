"""Run-time LoRA, measured side by side in one run: per-step cost and the time to switch LoRA.

One mid-size random FLUX.2 Klein (real classes, export/synthetic.py; hidden 512, 4 double + 8 single blocks) is
exported three ways: plain, with --runtime-lora 96, and with LoRA A fused (--lora A:0.8). Three random LoRAs of
ranks 32, 16 and 16 on every attention and feed-forward layer. Then, alternating order per round, the same
prompt and seed are drawn:

- per denoising step: the plain graph; the run-time graph with no LoRA (rank 1 of zeros), with A, with A + B + C;
  the fused bundle. Ratios are to the plain graph's step.
- switching: the first request with a LoRA not used before (file read through diffusers + stack), a switch
  between two LoRAs already read (stack only), a repeat of the same choice; against a re-export of the fused
  bundle (the only way to change a fused LoRA).

    python -m benchmarks.lora_runtime [--rounds 3] [--work DIR [--reuse]] [--json F] [--backend onnxruntime]

On a GPU machine `--backend auto` measures the engines (export with --target); the GPU figures wait for a
device: this script has NEVER RUN ON A GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

SIZE, STEPS, MAX_RANK = 256, 4, 96
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.linear_in", "ff.linear_out", "to_qkv_mlp_proj"]
LORAS = {"a": (32, 1), "b": (16, 2), "c": (16, 3)}  # name: (rank, seed)


def build(work: Path) -> Path:
    from export import synthetic

    size = synthetic.KleinSize(heads=8, head_dim=64, double_layers=4, single_layers=8, text_hidden=256,
                               text_heads=4, vae_channels=(64, 128, 128, 128), vae_layers_per_block=1)
    return synthetic.save(synthetic.build_klein(size), work / "model")


def export(model: Path, out: Path, *extra: str) -> float:
    from app.cli import main

    t = time.perf_counter()
    if main(["export", "--model", str(model), "--out", str(out), "--min-size", "128", "--max-size", "512",
             "--overwrite", *extra]):
        raise SystemExit(f"export of {out.name} failed")
    return time.perf_counter() - t


def make_loras(model: Path, work: Path) -> dict[str, Path]:
    from export.synthetic import save_lora

    return {n: save_lora(model, "flux2-klein", work / f"lora-{n}", r, float(r), TARGETS, seed)
            for n, (r, seed) in LORAS.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--reuse", action="store_true", help="reuse the bundles an earlier run left in --work")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lora-bench-"))
    os.environ["EDGEGEN_LORAS"] = str(work / "library")
    from app.bundle.manifest import load_bundle
    from app.cli import main as cli
    from app.runtime import loras as runtime_loras
    from app.runtime.backend import make_backend
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    model = work / "model" if (work / "model" / "model_index.json").is_file() else build(work)
    files = make_loras(model, work)
    recorded = work / "exports.json"
    if args.reuse and recorded.is_file():  # the bundles and their export times from an earlier run in --work
        exports = json.loads(recorded.read_text())
    else:
        exports = {"plain": export(model, work / "plain"),
                   "runtime": export(model, work / "runtime", "--runtime-lora", str(MAX_RANK)),
                   "fused": export(model, work / "fused", "--lora", f"{files['a']}:0.8")}
        recorded.write_text(json.dumps(exports))
    for n, path in files.items():
        if cli(["lora", "add", str(path), "--name", n, "--overwrite"]):
            raise SystemExit(f"lora add {n} failed")

    pipes = {}
    for name in ("plain", "runtime", "fused"):
        bundle = load_bundle(work / name)
        backend, why = make_backend(bundle, args.backend)
        pipes[name] = make_pipeline(bundle, backend)
    cases = {"plain graph": ("plain", ()), "run-time, no LoRA": ("runtime", ()),
             "run-time, A (r32)": ("runtime", (("a", 0.8),)),
             "run-time, A+B+C (r64)": ("runtime", (("a", 0.8), ("b", 0.5), ("c", 0.5))),
             "fused A": ("fused", ())}
    req = dict(prompt="a leather tote bag, studio photo", seed=5, steps=STEPS, width=SIZE, height=SIZE)

    # switching, first: nothing read yet in this process
    pipe = pipes["runtime"]
    switch = {}
    for label, choice in (("first use of A (read + stack)", (("a", 0.8),)),
                          ("first use of B (read + stack)", (("b", 0.5),)),
                          ("switch B -> A (both read before)", (("a", 0.8),)),
                          ("same choice again", (("a", 0.8),))):
        t = time.perf_counter()
        job = pipe.prepare(GenerationRequest(**req, loras=choice))
        host = time.perf_counter() - t
        t = time.perf_counter()
        pipe.lora_on_device(job)
        switch[label] = {"host_s": host, "upload_s": time.perf_counter() - t}

    for p in pipes.values():  # warm-up: sessions open, prompt cached
        p.generate(GenerationRequest(**{**req, "steps": 1}))
    steps: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))
        for label in order:
            name, choice = cases[label]
            res = pipes[name].generate(GenerationRequest(**req, loras=choice))
            steps[label].append(res.timings["denoise"] / STEPS)
    base = statistics.median(steps["plain graph"])
    rows = {k: {"step_s": statistics.median(v), "ratio": statistics.median(v) / base} for k, v in steps.items()}

    device = pipes["runtime"].device
    print(f"# run-time LoRA, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, backend "
          f"{pipes['runtime'].backend.describe()} on {device}; Klein hidden 512, {SIZE}x{SIZE}, {STEPS} steps, "
          f"{args.rounds} rounds (median)")
    print("| case | per step (s) | vs plain graph |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['step_s']:.3f} | {v['ratio']:.3f} |")
    print("\n| switch | host (s) | upload (s) |\n|---|---|---|")
    for k, v in switch.items():
        print(f"| {k} | {v['host_s']:.3f} | {v['upload_s']:.4f} |")
    print(f"| re-export of the fused bundle (the only way to change a fused LoRA) | {exports['fused']:.1f} | |")
    print(f"\nexports: plain {exports['plain']:.1f} s, with --runtime-lora {MAX_RANK} {exports['runtime']:.1f} s, "
          f"fused {exports['fused']:.1f} s")
    if device.type != "cuda":
        print("GPU: not measured (no GPU here); run this on the GPU machine with --backend auto and engines")
    out = {"steps": rows, "switch": switch, "exports_s": exports, "device": str(device), "size": SIZE,
           "rounds": args.rounds, "factor_cache": len(runtime_loras._FACTORS)}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
