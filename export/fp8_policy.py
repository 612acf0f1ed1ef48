"""Which layers of each model family stay out of FP8, and which precisions each component may never use."""

from __future__ import annotations

from app.errors import UsageError


def _module(path: str) -> str:
    return rf"(^|\.){path}$"


# Upstream practice for FLUX-family and SD3.5 FP8 (NVIDIA TensorRT demo, ModelOpt, TensorRT-Model-Connect;
# FACTS.md "FP8 (ModelOpt)"): per-tensor E4M3, "max" calibration over real prompts through the real sampler,
# and in high precision: the input embedders, the time/guidance/text embedders, the adaLN modulation
# linears, norm_out and proj_out, with RoPE in FP32. They hold few of the weights, and their outputs
# (embeddings, modulation shifts/scales/gates) feed every block.
#
# Each pattern is a regex searched (re.search) in a node's name and in each torch module path the dynamo
# exporter recorded on it (e.g. "transformer.transformer_blocks.0.norm1.linear"). Anchoring on path
# components keeps "norm_out" from also hitting a "norm_out2".
FP8_EXCLUDE: dict[str, tuple[str, ...]] = {
    "flux2-klein": (
        _module("x_embedder"),
        _module("context_embedder"),
        _module("time_guidance_embed"),
        # FLUX.2 shares one modulation per stream across all blocks, so an error there hits every block.
        _module("double_stream_modulation_img"),
        _module("double_stream_modulation_txt"),
        _module("single_stream_modulation"),
        _module("norm_out"),
        _module("proj_out"),
    ),
    "sd3.5": (
        _module("pos_embed"),
        _module("context_embedder"),
        _module("time_text_embed"),
        # adaLN modulation of each MMDiT block (image and context streams).
        _module(r"transformer_blocks\.\d+\.norm1(_context)?\.linear"),
        _module("norm_out"),
        _module("proj_out"),
        # NVIDIA's demo also runs SD3.5-Large's last block (transformer_blocks[35]) in FP32; that is a
        # workaround for its own pipeline, not a rule, so it is not excluded here (FACTS.md).
    ),
}

# Precisions a component may never be built in, from the same upstream practice (FACTS.md): VAE never FP16
# (BF16/FP32) and never FP8; T5 never FP16 (BF16/FP32). Both are the usual source of FP16 overflow, seen by
# users as black or NaN images.
FORBIDDEN_PRECISIONS: dict[str, frozenset[str]] = {
    "vae": frozenset({"fp8", "fp16"}),
    "t5": frozenset({"fp16"}),
}


def fp8_exclude_patterns(family: str) -> tuple[str, ...]:
    """The regexes of layers that stay high precision when the family's transformer is quantized to FP8."""
    try:
        return FP8_EXCLUDE[family]
    except KeyError:
        raise UsageError(
            f"No FP8 policy for model family {family!r}; known families: {', '.join(sorted(FP8_EXCLUDE))}."
        ) from None


def check_precision(component: str, precision: str) -> None:
    """Raise UsageError when a component is asked for a precision it must never run in."""
    if precision in FORBIDDEN_PRECISIONS.get(component, frozenset()):
        raise UsageError(f"The {component} cannot be built in {precision.upper()}; use BF16 or FP32.")
