"""Write the self-test's reference images: a few (prompt, seed) drawn by diffusers' pipeline at the model defaults."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REFERENCES = [
    ("a red circle on a blue background", 0),
    ("a yellow square on a purple background, on the left", 1),
    ("white background with a small green triangle at the top", 2),
    ("a blue circle at the bottom of an orange background", 3),
    ("black square, yellow background, right", 4),
]


def write(model: Path, out: Path) -> list[dict]:
    """Generate REFERENCES with Flux2KleinPipeline and write PNGs plus index.json into out."""
    from tools.demo.evaluate import generate

    d = json.loads((model / "edgegen_defaults.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, (prompt, image) in enumerate(generate(model, REFERENCES)):
        name = f"ref-{i}.png"
        image.save(out / name)
        index.append({"prompt": prompt, "seed": REFERENCES[i][1], "steps": d["steps"], "guidance": d["guidance"],
                      "width": d["width"], "height": d["height"], "file": name})
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("assets/demo-model"))
    ap.add_argument("--out", type=Path, default=Path("assets/demo-references"))
    a = ap.parse_args(argv)
    for row in write(a.model, a.out):
        print(row["file"], row["prompt"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
