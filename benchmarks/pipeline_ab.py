"""This tree's pipeline against an older checkout's, same bundle and requests, alternating rounds, side by side.

Guards against regressions of the ONNX Runtime CPU path when the pipeline changes (issue 15 moved the Euler step,
the schedule and the image conversion). Each round runs each side in its own process (imports from its root),
warms up once, then times K images with fresh prompt encoding; the table shows per-round medians, the ratio of
the medians, and whether the images are bit-identical.

    git worktree add /tmp/old <commit>
    python benchmarks/pipeline_ab.py --old-root /tmp/old --bundle engines/demo [--rounds 4 --images 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import hashlib, json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
try:
    from app.bundle.manifest import load_bundle
    from app.runtime.ort_backend import OrtBackend
except ImportError:  # checkouts from before the package split
    from app.runtime.manifest import load_bundle
    from app.runtime.backends import OrtBackend
from app.runtime.pipelines import GenerationRequest, make_pipeline
b = load_bundle(sys.argv[2])
size, steps, n = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pipe = make_pipeline(b, OrtBackend(b, "cpu"))
req = lambda s: GenerationRequest(prompt="a red circle on a blue background", seed=s, steps=steps, width=size, height=size)
pipe.generate(req(0))
ts, digest = [], hashlib.sha256()
for i in range(n):
    pipe.forget_prompt()
    t = time.perf_counter()
    img = pipe.generate(req(i)).image
    ts.append(time.perf_counter() - t)
    digest.update(img.tobytes())
print(json.dumps({"median_ms": 1000 * statistics.median(ts), "sha": digest.hexdigest()}))
"""


def run(root: Path, args) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(root), str(args.bundle), str(args.size), str(args.steps),
                          str(args.images)], cwd="/", capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-root", type=Path, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args(argv)
    sides = {"old": args.old_root, "new": ROOT}
    results: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate who runs first
        for side in order:
            results[side].append(run(sides[side], args))
            print(f"round {r + 1} {side}: {results[side][-1]['median_ms']:.1f} ms/image", flush=True)
    med = {k: statistics.median(x["median_ms"] for x in v) for k, v in results.items()}
    same = {x["sha"] for v in results.values() for x in v}
    print(f"\n| side | median of round medians, ms/image |\n|---|---|\n| old ({args.old_root}) | {med['old']:.1f} |\n"
          f"| new (this tree) | {med['new']:.1f} |\n\nnew / old = {med['new'] / med['old']:.3f}; images "
          f"{'bit-identical' if len(same) == 1 else 'DIFFER'} across sides and rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
