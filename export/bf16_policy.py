"""Which precision each component is exported in, and what stays FP32 inside a BF16 (or FP16) graph.

One table per family, read by export/bf16.py (the graph pass) and export/exporter.py (which component gets
which precision). The rule upstream follows (FACTS.md, "FP8 (ModelOpt)"; diffusers' and transformers' own
BF16 code): weights and matrix products in BF16, statistics and transcendental functions in FP32.

What is already FP32 in the traced graph, because the PyTorch code itself upcasts (seen in the exported
graphs of both families): RMSNorm statistics (diffusers RMSNorm, Qwen3RMSNorm, T5LayerNorm cast to float32
before pow/mean), RoPE (edgegen's Fp32RopePosEmbed; diffusers' apply_rotary_emb computes in float32),
LayerNormalization (ONNX stash_type=1: mean and variance in FP32). What the graph pass adds: the ops below,
whose inputs arrive in BF16 from the traced module and whose accumulation must not be BF16.
"""

from __future__ import annotations

from app.errors import UsageError

HALF = ("bf16", "fp16")  # graph precisions export/bf16.py writes (FP8 starts from an FP32 graph)

# Softmax: attention probabilities (a sum over up to 4,600 tokens). InstanceNormalization: the dynamo
# exporter's form of GroupNorm (VAE), statistics over whole feature maps. Exp/Log/Pow/ReduceMean/ReduceSum/
# Sqrt/Reciprocal/Sin/Cos: norm statistics, timestep sinusoids and RoPE wherever the module did not already
# upcast them (a no-op where it did).
_COMMON_FP32_OPS = frozenset({
    "Softmax", "InstanceNormalization", "GroupNormalization", "ReduceMean", "ReduceSum", "Pow", "Sqrt",
    "Reciprocal", "Exp", "Log", "Sin", "Cos",
})
FP32_OPS: dict[str, frozenset[str]] = {
    "flux2-klein": _COMMON_FP32_OPS,
    "sd3.5": _COMMON_FP32_OPS,
}

# Graph inputs that enter the graph in FP32 and are not rounded at the boundary. The bundle's tensors stay
# FP32 at every boundary (the runtime feeds FP32 and reads FP32; the graph casts at its edges), and the
# timestep is never rounded: SD3.5's runs 0..1000, where BF16 steps by 4-8. diffusers' own BF16 pipelines
# keep it FP32 too (the time projection is computed in float32 and cast after).
FP32_INPUTS: dict[str, frozenset[str]] = {
    "flux2-klein": frozenset({"timestep"}),
    "sd3.5": frozenset({"timestep"}),
}

# FP16 only where it is known not to overflow: the SD3.5 MMDiT (NVIDIA's TensorRT demo runs it in FP16) and
# the CLIP encoders. Never for T5 (FFN activations overflow FP16; transformers keeps its `wo` in FP32), the
# VAE (black/NaN images, FACTS.md), Qwen3 (LLM activation outliers) or the FLUX.2 transformer (upstream runs
# it in BF16 only; no FP16 evidence).
FP16_ALLOWED: dict[str, frozenset[str]] = {
    "flux2-klein": frozenset(),
    "sd3.5": frozenset({"transformer", "text_encoder", "text_encoder_2"}),
}


def kind(component: str) -> str:
    """transformer | text_encoder | vae (the encoder and decoder share the VAE's rules)."""
    if component.startswith("vae"):
        return "vae"
    return "text_encoder" if component.startswith("text_encoder") else "transformer"


def fp32_ops(family: str) -> frozenset[str]:
    try:
        return FP32_OPS[family]
    except KeyError:
        raise UsageError(f"No BF16 policy for model family {family!r}; export it with --precision fp32") from None


def component_precisions(family: str, components: list[str], precision: str, text_encoder_precision: str,
                         vae_precision: str | None = None) -> dict[str, str]:
    """{component: precision its graph is exported in, fp8 meaning "FP32 graph, quantized afterwards"}.

    The transformer follows --precision, the text encoders --text-encoder-precision, the VAE `vae_precision`
    or else BF16 when the transformer is BF16 and FP32 otherwise (never FP16/FP8). Refuses FP16 where
    FP16_ALLOWED does not list the component, naming the precision to use instead."""
    out = {}
    for name in components:
        k = kind(name)
        p = {"transformer": precision, "text_encoder": text_encoder_precision}.get(
            k, vae_precision or ("bf16" if precision == "bf16" else "fp32"))
        if p == "fp16" and name not in FP16_ALLOWED.get(family, frozenset()):
            flag = {"transformer": "--precision", "text_encoder": "--text-encoder-precision"}.get(k, "--precision")
            why = {"vae": "the VAE is never FP16 (black or NaN images)",
                   "text_encoder": "T5 overflows FP16, and Qwen3's activation outliers can too"}.get(k, "this transformer is only run in BF16 upstream")
            raise UsageError(f"the {name} of a {family} model cannot be exported in FP16 ({why}); use {flag} bf16")
        if k == "vae" and p not in ("fp32", "bf16"):
            raise UsageError(f"the VAE is exported in BF16 or FP32 only, not {p.upper()}")
        out[name] = p
    if any(p in HALF for p in out.values()):
        fp32_ops(family)  # a family without a policy fails here, before any weight is read
    return out
