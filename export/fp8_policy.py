"""Which layers of each model family stay out of FP8, and which precisions each component may never use."""

from __future__ import annotations

from app.bundle.families import KLEIN_TEXT_LAYERS
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

# Text encoders are FP8 only on request (--text-encoder-precision fp8), and whatever is not FP8 in them stays
# FP32: T5 overflows FP16 (transformers keeps T5's FFN output projection `wo` in FP32 for that reason,
# T5PreTrainedModel._keep_in_fp32_modules), and a prompt embedding feeds every step of every image. Only
# linear layers (MatMul weights) are ever quantized, so token/position embeddings (Gather) and norms stay
# FP32 by construction; they are listed anyway, so the manifest names everything kept high precision and a
# graph that lost its module paths fails loudly instead of quantizing what the list protects.
TEXT_ENCODER_HIGH_PRECISION = "fp32"
_CLIP = (
    _module("embeddings"),
    _module(r"(?:layer_norm[12]|final_layer_norm)"),
    # The pooled projection conditions the time/text embedder, i.e. the modulation of every transformer block.
    _module("text_projection"),
)
TEXT_ENCODER_FP8_EXCLUDE: dict[str, dict[str, tuple[str, ...]]] = {
    "flux2-klein": {
        "text_encoder": (  # Qwen3; the prompt embedding stacks hidden_states (9, 18, 27)
            _module("embed_tokens"),
            _module(r"(?:input_layernorm|post_attention_layernorm|self_attn\.[qk]_norm)"),
            # hidden_states[27] is the output of layers.26 (hidden_states[0] is the embedding): the last layer
            # the embedding taps, written into it as is, with no later layer to absorb its error; the deepest
            # layers also carry the largest activation outliers of an LLM. Derived from the one list of tapped
            # layers (app.bundle.families.KLEIN_TEXT_LAYERS), so the two cannot disagree.
            _module(rf"layers\.{max(KLEIN_TEXT_LAYERS) - 1}"),
        ),
    },
    "sd3.5": {
        "text_encoder": _CLIP,  # CLIP-L
        "text_encoder_2": _CLIP,  # CLIP-G
        "text_encoder_3": (  # T5-XXL
            _module("embed_tokens"),
            _module("relative_attention_bias"),
            _module(r"(?:layer_norm|final_layer_norm)"),
            _module(r"DenseReluDense\.wo"),  # the FFN output whose activations overflow FP16 (see above)
        ),
    },
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


def text_encoder_fp8_exclude_patterns(family: str, component: str, pipeline: dict | None = None) -> tuple[str, ...]:
    """The regexes of layers that stay FP32 when one of the family's text encoders is quantized to FP8.
    `pipeline` (the manifest's section) names the last tapped layer when the model taps other layers."""
    try:
        patterns = TEXT_ENCODER_FP8_EXCLUDE[family][component]
    except KeyError:
        raise UsageError(f"No FP8 policy for the {component} of model family {family!r}; "
                         "use --text-encoder-precision fp32.") from None
    last = (pipeline or {}).get("last_tapped_layer")
    if family == "flux2-klein" and last is not None and last != max(KLEIN_TEXT_LAYERS) - 1:
        default = _module(rf"layers\.{max(KLEIN_TEXT_LAYERS) - 1}")
        patterns = tuple(_module(rf"layers\.{last}") if p == default else p for p in patterns)
    return patterns
