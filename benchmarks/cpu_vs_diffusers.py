"""CPU: diffusers' own pipeline vs the edgegen ONNX Runtime bundle, same model, prompts, seeds; per stage.

One mid-size random model per family (real classes, export/synthetic.py builders; sizes below), saved as a
diffusers folder and exported with `edgegen export`. Then, in one process and alternating which goes first,
each (prompt, seed) is drawn by diffusers (Flux2KleinPipeline / StableDiffusion3Pipeline, torch eager FP32)
and by edgegen (the family pipeline over OrtBackend, FP32 ONNX). Model calls are timed where each side makes
them (the modules' forward / vae.decode for diffusers, Backend.run for edgegen); "overhead" is the rest of the
wall time (tokenizer, scheduler, latent packing, tensor conversion, image post-processing). The images are
compared too (PSNR): an FP32 bundle should reproduce diffusers.

    python -m benchmarks.cpu_vs_diffusers [--families klein,sd3] [--rounds 3] [--work DIR] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

PROMPTS = [("a watercolor painting of a harbour at dawn", 11), ("portrait of a nurse in a hospital corridor", 12)]
SIZE, STEPS = 256, 8
STAGES = ("text_encode", "denoise", "decode", "overhead")


def build(family: str):
    from export import synthetic

    if family == "klein":  # hidden 512 (8 x 64), 4 double + 8 single blocks; Qwen3 28 x 256; 4-level VAE (16 px/token)
        size = synthetic.KleinSize(heads=8, head_dim=64, double_layers=4, single_layers=8, text_hidden=256,
                                   text_heads=4, vae_channels=(64, 128, 128, 128), vae_layers_per_block=1)
        return synthetic.build_klein(size), {"guidance_scale": 1.0}
    # hidden 512 (8 x 64), 12 MMDiT layers (dual attention in 0-3); CLIPs 256 wide; T5 512 x 4; 4-level VAE
    size = synthetic.SD3Size(layers=12, heads=8, head_dim=64, dual_attention_layers=(0, 1, 2, 3), clip_hidden=256,
                             clip_layers=4, t5_width=512, t5_heads=8, t5_layers=4, vae_channels=(64, 128, 128, 128))
    return synthetic.build_sd3(size=size), {"guidance_scale": 5.0}


def export(model_dir: Path, bundle: Path) -> float:
    from app.cli import main

    t = time.perf_counter()
    rc = main(["export", "--model", str(model_dir), "--out", str(bundle), "--min-size", "128", "--max-size", "512",
               "--overwrite"])
    if rc:
        raise SystemExit(f"export failed ({rc})")
    return time.perf_counter() - t


class Clock:
    """Accumulates seconds per stage for the run in progress."""

    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] += time.perf_counter() - t

    def wrap(self, fn, name: str):
        def timed(*a, **k):
            with self.stage(name):
                return fn(*a, **k)
        return timed


STAGE_OF = {"text_encoder": "text_encode", "text_encoder_2": "text_encode", "text_encoder_3": "text_encode",
            "transformer": "denoise", "vae_decoder": "decode"}


def diffusers_side(pipe, clock: Clock):
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        m = getattr(pipe, name, None)
        if m is not None:
            m.forward = clock.wrap(m.forward, "text_encode")
    pipe.transformer.forward = clock.wrap(pipe.transformer.forward, "denoise")
    pipe.vae.decode = clock.wrap(pipe.vae.decode, "decode")
    pipe.set_progress_bar_config(disable=True)

    def run(prompt: str, seed: int, guidance: float) -> np.ndarray:
        img = pipe(prompt=prompt, num_inference_steps=STEPS, guidance_scale=guidance, height=SIZE, width=SIZE,
                   generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
        return (img * 255).round().astype(np.uint8)
    return run


def edgegen_side(bundle_dir: Path, clock: Clock):
    from app.bundle.manifest import load_bundle
    from app.runtime.ort_backend import OrtBackend
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    bundle = load_bundle(bundle_dir)
    backend = OrtBackend(bundle)
    inner = backend.run
    backend.run = lambda component, inputs: clock.wrap(inner, STAGE_OF[component])(component, inputs)
    pipe = make_pipeline(bundle, backend)

    def run(prompt: str, seed: int, guidance: float, reuse: bool = False) -> np.ndarray:
        if not reuse:  # diffusers encodes every call; so does edgegen here, for a like-for-like comparison
            pipe.forget_prompt()
        return pipe.generate(GenerationRequest(prompt=prompt, seed=seed, steps=STEPS, guidance=guidance,
                                               width=SIZE, height=SIZE)).image
    return run, backend


def bench_family(family: str, work: Path, rounds: int, say) -> dict:
    from app.runtime.images import psnr

    model_dir, bundle = work / f"{family}-model", work / f"{family}-bundle"
    pipe, kw = build(family)
    if not (model_dir / "model_index.json").exists():
        from export.synthetic import save

        save(pipe, model_dir)
    export_s = None
    if not (bundle / "manifest.json").exists():
        say(f"[{family}] exporting the bundle ...")
        export_s = export(model_dir, bundle)
    pipe = pipe.__class__.from_pretrained(model_dir, local_files_only=True)  # the saved folder, as edgegen saw it
    clocks = {"diffusers": Clock(), "edgegen": Clock()}
    runners = {"diffusers": diffusers_side(pipe, clocks["diffusers"])}
    runners["edgegen"], backend = edgegen_side(bundle, clocks["edgegen"])
    guidance = kw["guidance_scale"]
    samples: dict[str, list[dict]] = {"diffusers": [], "edgegen": []}
    psnrs = []
    if rounds == 0:
        return {"family": family, "export_s": export_s}
    say(f"[{family}] warm-up (one draw each, not counted: session creation, first-call allocations)")
    for side in ("diffusers", "edgegen"):
        runners[side](PROMPTS[0][0], PROMPTS[0][1], guidance)
    for r in range(rounds):
        for i, (prompt, seed) in enumerate(PROMPTS):
            order = ("diffusers", "edgegen") if (r + i) % 2 == 0 else ("edgegen", "diffusers")
            images = {}
            for side in order:
                clock = clocks[side]
                clock.t.clear()
                t, c = time.perf_counter(), time.process_time()
                images[side] = runners[side](prompt, seed, guidance)
                total, cpu = time.perf_counter() - t, time.process_time() - c
                s = {k: clock.t.get(k, 0.0) for k in STAGES[:3]}
                s["overhead"] = total - sum(s.values())
                s["total"], s["cpu"] = total, cpu
                samples[side].append(s)
            psnrs.append(psnr(images["diffusers"], images["edgegen"]))
            say(f"[{family}] round {r + 1} '{prompt[:30]}' seed {seed}: " + ", ".join(
                f"{side} {samples[side][-1]['total']:.2f}s" for side in order) + f", PSNR {psnrs[-1]:.1f} dB")
    # edgegen with prompt reuse: the next seed of the same prompt (what --count N and the app's repeats do)
    reuse = []
    for r in range(rounds):
        prompt, seed = PROMPTS[r % len(PROMPTS)]
        runners["edgegen"](prompt, seed, guidance)
        clock = clocks["edgegen"]
        clock.t.clear()
        t = time.perf_counter()
        runners["edgegen"](prompt, seed + 100, guidance, reuse=True)
        reuse.append({"total": time.perf_counter() - t, "text_encode": clock.t.get("text_encode", 0.0)})
    say(f"[{family}] edgegen, same prompt next seed (embeddings reused): "
        + ", ".join(f"{x['total']:.2f}s" for x in reuse))
    med = {side: {k: statistics.median(x[k] for x in samples[side]) for k in STAGES + ("total", "cpu")}
           for side in samples}
    return {"family": family, "export_s": export_s, "median_s": med, "psnr_db_min": min(psnrs),
            "runs_per_side": len(samples["diffusers"]), "ort_threads": backend_threads(backend),
            "samples": samples, "edgegen_reuse_median_s": statistics.median(x["total"] for x in reuse),
            "load_average": os.getloadavg()[0]}


def pin_threads(n: int) -> None:
    import app.runtime.ort_backend as backends

    torch.set_num_threads(n)
    default_options = backends.ort_session_options

    def options():  # the runtime's own session options, thread count pinned
        so = default_options()
        so.intra_op_num_threads = n
        return so

    backends.ort_session_options = options


def backend_threads(backend) -> str:
    try:
        sess = next(iter(backend._sessions.values()))
        return sess.get_session_options().intra_op_num_threads or "default (physical cores)"
    except Exception:
        return "?"


def report(results: list[dict]) -> str:
    lines = ["| family | stage | diffusers (torch eager) s | edgegen (ORT) s | diffusers / edgegen |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        d, e = r["median_s"]["diffusers"], r["median_s"]["edgegen"]
        for k in STAGES + ("total", "cpu"):
            ratio = f"{d[k] / e[k]:.2f}x" if e[k] > 1e-4 else "n/a"
            name = {"total": "**total (wall)**", "cpu": "process CPU time"}.get(k, k)
            lines.append(f"| {r['family']} | {name} | {d[k]:.3f} | {e[k]:.3f} | {ratio} |")
        lines.append(f"| {r['family']} | overhead share of total | {d['overhead'] / d['total']:.1%} | "
                     f"{e['overhead'] / e['total']:.1%} | |")
        reuse = r["edgegen_reuse_median_s"]
        lines.append(f"| {r['family']} | next seed, same prompt (edgegen reuses embeddings) | {d['total']:.3f} | "
                     f"{reuse:.3f} | {d['total'] / reuse:.2f}x |")
        lines.append(f"| {r['family']} | image PSNR edgegen vs diffusers (min) | | {r['psnr_db_min']:.1f} dB | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default="klein,sd3")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, help="keep models and bundles here (reused when present)")
    p.add_argument("--json", type=Path)
    p.add_argument("--threads", type=int, help="pin both sides to this many threads (torch intra-op, ONNX Runtime "
                   "intra-op); default: each library's own default (here both use the 2 cores)")
    a = p.parse_args(argv)
    if a.threads:
        pin_threads(a.threads)
    from app.offline import enforce_offline  # same switches as the CLI: no hub access

    enforce_offline()
    work = a.work or Path(tempfile.mkdtemp(prefix="edgegen-cpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; {SIZE}x{SIZE}, {STEPS} steps")
    results = [bench_family(f, work, a.rounds, say) for f in a.families.split(",")]
    if a.rounds:
        print(report(results))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
