"""Prompt-adherence scores of the demo model on held-out prompts: diffusers' own pipeline on the model folder
(the PyTorch reference), or the edgegen runtime on an exported bundle (--bundle, ONNX Runtime on CPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def generate(model: Path, items: list[tuple[str, int]], steps: int | None = None, guidance: float | None = None,
             size: int | None = None):
    """(prompt, PIL image) for each (prompt, seed), with Flux2KleinPipeline and a CPU generator per seed."""
    from app import offline

    offline.set_offline_env()
    import torch
    from diffusers import Flux2KleinPipeline

    torch.set_num_threads(1)  # tiny model: one thread is as fast, and never stalls on a busy machine
    d = json.loads((model / "edgegen_defaults.json").read_text())
    steps, guidance = steps or d["steps"], d["guidance"] if guidance is None else guidance
    w, h = (size, size) if size else (d["width"], d["height"])
    pipe = Flux2KleinPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for prompt, seed in items:
        image = pipe(prompt=prompt, num_inference_steps=steps, guidance_scale=guidance, width=w, height=h,
                     max_sequence_length=d.get("max_sequence_length", 512),
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        out.append((prompt, image))
    return out


def generate_bundle(bundle_dir: Path, items: list[tuple[str, int]], backend: str = "onnxruntime"):
    """(prompt, HxWx3 uint8) for each (prompt, seed), through the edgegen runtime at the bundle's defaults."""
    from app import offline

    offline.set_offline_env()
    from app.bundle.manifest import load_bundle
    from app.runtime.backend import make_backend
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    bundle = load_bundle(Path(bundle_dir))
    be, _ = make_backend(bundle, backend)
    try:
        pipe = make_pipeline(bundle, be)
        return [(prompt, pipe.generate(GenerationRequest(prompt=prompt, seed=seed)).image) for prompt, seed in items]
    finally:
        close = getattr(be, "close", None)
        if close is not None:
            close()


def main(argv: list[str] | None = None) -> int:
    from tools.demo import adherence, split

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("assets/demo-model"))
    ap.add_argument("--bundle", type=Path, default=None, help="score this exported bundle (ONNX Runtime) instead")
    ap.add_argument("--n", type=int, default=48, help="held-out prompts to draw")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--guidance", type=float, default=None)
    ap.add_argument("--save", type=Path, default=None, help="also write the images and a contact sheet here")
    ap.add_argument("--json", action="store_true", help="print the per-prompt details as JSON too")
    a = ap.parse_args(argv)
    if a.bundle:
        items = generate_bundle(a.bundle, split.held_out(a.n))
    else:
        items = generate(a.model, split.held_out(a.n), a.steps, a.guidance)
    result = adherence.score(items)
    for k in adherence.ATTRIBUTES:
        print(f"{k:12s} {result[k]:5.1f} %")
    print(f"{'prompts':12s} {result['n']:5d}")
    if a.save:
        from PIL import Image

        a.save.mkdir(parents=True, exist_ok=True)
        sheet = Image.new("RGB", (128 * 8, 128 * ((len(items) + 7) // 8)))
        for i, (_, im) in enumerate(items):
            im = im if isinstance(im, Image.Image) else Image.fromarray(im)
            im.save(a.save / f"{i:03d}.png")
            sheet.paste(im.resize((128, 128)), (128 * (i % 8), 128 * (i // 8)))
        sheet.save(a.save / "sheet.png")
    if a.json:
        print(json.dumps(result["details"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
