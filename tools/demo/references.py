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
# Reference-image cases (FLUX.2 Klein image=...): prompt, seed, input files (already in the folder). They prove
# the VAE-encoder path reproduces diffusers; the demo model was not trained to edit, so this is not a quality test.
IMAGE_REFERENCES = [
    ("a yellow square on a purple background, on the left", 5, ["ref-0.png"]),
]
# Inpainting cases (Flux2KleinInpaintPipeline): prompt, seed, the image inpainted (already in the folder), the mask
# file written here (a centred ellipse, white = repaint), strength. Same caveat: the path, not the quality.
INPAINT_REFERENCES = [
    ("a blue circle at the bottom of an orange background", 6, "ref-1.png", "mask-0.png", 0.8),
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
    index += write_image_cases(model, out, d, first=len(index))
    index += write_inpaint_cases(model, out, d, first=len(index))
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def write_image_cases(model: Path, out: Path, d: dict, first: int) -> list[dict]:
    """IMAGE_REFERENCES drawn by Flux2KleinPipeline(image=[...]) with the inputs read as diffusers' load_image."""
    import torch
    from diffusers import Flux2KleinPipeline
    from diffusers.utils import load_image

    pipe = Flux2KleinPipeline.from_pretrained(model, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, (prompt, seed, inputs) in enumerate(IMAGE_REFERENCES, first):
        images = [load_image(str(out / f)) for f in inputs]
        image = pipe(image=images, prompt=prompt, num_inference_steps=d["steps"], guidance_scale=d["guidance"],
                     width=d["width"], height=d["height"], max_sequence_length=d.get("max_sequence_length", 512),
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        name = f"ref-{i}.png"
        image.save(out / name)
        rows.append({"prompt": prompt, "seed": seed, "steps": d["steps"], "guidance": d["guidance"],
                     "width": d["width"], "height": d["height"], "file": name, "images": list(inputs)})
    return rows


def write_mask(path: Path, width: int, height: int) -> None:
    from PIL import Image, ImageDraw

    m = Image.new("L", (width, height), 0)
    ImageDraw.Draw(m).ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], fill=255)
    m.save(path)


def write_inpaint_cases(model: Path, out: Path, d: dict, first: int) -> list[dict]:
    """INPAINT_REFERENCES drawn by Flux2KleinInpaintPipeline, inputs read as diffusers' load_image."""
    import torch
    from diffusers import Flux2KleinInpaintPipeline
    from diffusers.utils import load_image

    pipe = Flux2KleinInpaintPipeline.from_pretrained(model, local_files_only=True, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for i, (prompt, seed, init, mask, strength) in enumerate(INPAINT_REFERENCES, first):
        picture = load_image(str(out / init))
        write_mask(out / mask, *picture.size)
        image = pipe(image=picture, mask_image=load_image(str(out / mask)), prompt=prompt, strength=strength,
                     num_inference_steps=d["steps"], guidance_scale=d["guidance"],
                     max_sequence_length=d.get("max_sequence_length", 512),
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        name = f"ref-{i}.png"
        image.save(out / name)
        rows.append({"prompt": prompt, "seed": seed, "steps": d["steps"], "guidance": d["guidance"],
                     "width": image.width, "height": image.height, "file": name, "images": [init], "mask": mask,
                     "strength": strength})
    return rows


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
