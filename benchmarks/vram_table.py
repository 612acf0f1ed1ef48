"""The VRAM plan for the four real models on 12/16/24/32 GB cards, from the same planner the runtime stages by.

Arithmetic, not a measurement: component sizes are parameter counts (transformers counted from the diffusers
classes at the released configs on the meta device; encoders from their published configs) times the bytes of
the precision the plan picks for an FP8 card (sm89: FP8 transformer, BF16 text encoders and VAE) or an sm86
card (BF16 everywhere), plus the planner's stated activation estimate at 1024x1024. The real bundle's bytes replace
the parameter arithmetic once a bundle exists (`edgegen plan --bundle`).

    python benchmarks/vram_table.py            # markdown for docs/PERFORMANCE.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.planning.gpus import parse_gpu_option  # noqa: E402
from app.planning.plan import ComponentInfo, make_plan  # noqa: E402
from app.planning.policy import GIB  # noqa: E402

# (name, kind, parameters, hidden size for the activation estimate, text tokens)
VARIANTS = {
    "FLUX.2 Klein 4B": [("text_encoder (Qwen3-4B)", "text_encoder", 4.02e9, 2560, 512),
                        ("transformer", "transformer", 3.876e9, 3072, 512),
                        ("vae_decoder", "vae_decoder", 0.05e9, None, 512)],
    "FLUX.2 Klein 9B": [("text_encoder (Qwen3-8B)", "text_encoder", 8.19e9, 4096, 512),
                        ("transformer", "transformer", 9.079e9, 4096, 512),
                        ("vae_decoder", "vae_decoder", 0.05e9, None, 512)],
    "SD3.5 Medium": [("text_encoder (CLIP-L)", "text_encoder", 0.123e9, 768, 77),
                     ("text_encoder_2 (CLIP-G)", "text_encoder", 0.695e9, 1280, 77),
                     ("text_encoder_3 (T5-XXL)", "text_encoder", 4.76e9, 4096, 256),
                     ("transformer", "transformer", 2.243e9, 1536, 333),
                     ("vae_decoder", "vae_decoder", 0.05e9, None, 333)],
    "SD3.5 Large": [("text_encoder (CLIP-L)", "text_encoder", 0.123e9, 768, 77),
                    ("text_encoder_2 (CLIP-G)", "text_encoder", 0.695e9, 1280, 77),
                    ("text_encoder_3 (T5-XXL)", "text_encoder", 4.76e9, 4096, 256),
                    ("transformer", "transformer", 8.057e9, 2432, 333),
                    ("vae_decoder", "vae_decoder", 0.05e9, None, 333)],
}
CARDS = ("sm89:12", "sm89:16", "sm89:24", "sm89:32", "sm86:24")


def plan(variant: str, card: str, size: int = 1024):
    comps = [ComponentInfo(name=n, kind=k, param_count=int(p), hidden_size=h, text_tokens=t)
             for n, k, p, h, t in VARIANTS[variant]]
    return make_plan(parse_gpu_option(card), comps, size, size, cfg=variant.startswith("SD3"))


def main() -> int:
    print("| model | card | precisions (TE / transformer / VAE) | weights GiB | peak GiB | usable GiB | runtime does |")
    print("|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        for card in CARDS:
            p = plan(v, card)
            precs = " / ".join(dict.fromkeys(c.precision for c in p.components))
            weights = sum(c.weights_bytes for c in p.components) / GIB
            what = p.staging_text() if p.strategy != "does-not-fit" else "does not fit: " + "; ".join(
                n for c in p.components for n in c.notes) or "does not fit"
            print(f"| {v} | {card.replace('sm', 'SM ').replace(':', ', ')} GB | {precs} | {weights:.1f} | "
                  f"{p.peak_bytes / GIB:.1f} | {(p.usable_bytes or 0) / GIB:.1f} | {what} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
