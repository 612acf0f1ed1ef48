"""Per-component CPU time: the bundle's ONNX on ONNX Runtime vs the same diffusers modules in PyTorch eager.

Captures the exact inputs of one edgegen draw (text encoder, first transformer step, VAE decoder), then runs
each component on both sides with the same thread count and reports wall and process CPU time per call. At
one thread CPU time is hardly affected by other load on the machine, so this separates "which runtime is
faster" from "how busy was the machine" (cpu_vs_diffusers.py measures whole draws).

    python -m benchmarks.cpu_components --bundle B --model DIR [--threads 1] [--guidance G] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--model", type=Path, required=True, help="the diffusers folder the bundle was exported from")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guidance", type=float)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    from app.offline import enforce_offline

    enforce_offline()
    torch.set_num_threads(a.threads)
    import app.runtime.ort_backend as backends
    from app.bundle.manifest import load_bundle
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    default_options = backends.ort_session_options

    def options():  # the runtime's own session options, thread count pinned
        so = default_options()
        so.intra_op_num_threads = a.threads
        return so

    backends.ort_session_options = options
    bundle = load_bundle(a.bundle)
    ort = backends.OrtBackend(bundle)
    first: dict[str, dict] = {}
    run_ort = ort.run

    def capture(component, inputs):
        first.setdefault(component, {k: v.clone() for k, v in inputs.items()})
        return run_ort(component, inputs)

    ort.run = capture
    make_pipeline(bundle, ort).generate(GenerationRequest(prompt="a harbour at dawn", seed=1, steps=1,
                                                          guidance=a.guidance, width=a.size, height=a.size))
    ref = backends.TorchBackend(bundle, a.model)
    print(f"threads {a.threads}, {a.size}x{a.size}; ms per call (median of {a.repeat}), after one warm-up call")
    print("| component | input shapes | ORT wall | ORT CPU | torch wall | torch CPU | torch / ORT (CPU) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for component, inputs in first.items():
        out = {}
        for side, run in (("ort", run_ort), ("torch", ref.run)):
            run(component, inputs)
            walls, cpus = [], []
            for _ in range(a.repeat):
                w, c = time.perf_counter(), time.process_time()
                run(component, inputs)
                walls.append(time.perf_counter() - w)
                cpus.append(time.process_time() - c)
            out[side] = (sorted(walls)[len(walls) // 2] * 1000, sorted(cpus)[len(cpus) // 2] * 1000)
        shapes = ", ".join("x".join(map(str, v.shape)) for v in inputs.values())
        print(f"| {component} | {shapes} | {out['ort'][0]:.0f} | {out['ort'][1]:.0f} | {out['torch'][0]:.0f} | "
              f"{out['torch'][1]:.0f} | {out['torch'][1] / out['ort'][1]:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
