"""Write any of the four mission models as a diffusers folder at real shape, random BF16 weights, shard by shard.

Variants (configs from the released config.json files, checked against diffusers 0.42 / transformers 5.24):
  klein-4b    FLUX.2 Klein 4B transformer (5 double + 20 single, 24 x 128)  + Qwen3-4B  + FLUX.2 VAE
  klein-9b    FLUX.2 Klein 9B transformer (8 double + 24 single, 32 x 128)  + Qwen3-8B  + FLUX.2 VAE
  sd35-medium SD3.5 Medium MMDiT (24 layers, dual attention 0-12, 24 x 64) + CLIP-L + CLIP-G + T5-XXL + SD3 VAE
  sd35-large  SD3.5 Large MMDiT (38 layers, 38 x 64)                       + CLIP-L + CLIP-G + T5-XXL + SD3 VAE

Every module is built on the meta device and streamed by benchmarks.realsize_klein.stream_random_weights: one
block materialised at a time, so writing a 16 GiB component needs ~1 GiB of RAM. Weights come from one bank of
2^24 normal samples, sliced at a per-tensor offset and scaled by 1/sqrt(fan_in) (--fast, the default): the
memory and time of an export do not depend on the values, and filling 30 GiB with fresh normal samples on two
shared cores takes an hour. Tokenizers are the tiny trained ones of export.synthetic; configs keep the real
vocabulary sizes, so embedding tables have their real size.

    python -m benchmarks.realsize_models VARIANT OUT [--only transformer,text_encoder,...]
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch

from benchmarks import realsize_klein as rk

QWEN3_8B = {
    "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
}
QWEN_VOCAB = 151936
KLEIN9B_TRANSFORMER = dict(rk.KLEIN4B_TRANSFORMER, num_layers=8, num_single_layers=24, num_attention_heads=32,
                           joint_attention_dim=12288)
SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
}
SD35_LARGE = dict(SD35_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  pos_embed_max_size=192, dual_attention_layers=[])
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu"}
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32,
          "relative_attention_max_distance": 128, "is_encoder_decoder": False, "use_cache": False}
SD3_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512],
           "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32, "sample_size": 1024,
           "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_SCHEDULER = {"shift": 3.0}

_BANK: list[torch.Tensor] = []


def _fast_init_(name: str, t: torch.Tensor, seed: int) -> None:
    """rk._init_'s distribution from a shared bank of normal samples (a copy, not a draw, per tensor)."""
    leaf = name.rsplit(".", 1)[-1]
    if not t.is_floating_point() or t.ndim <= 1 or leaf in ("running_var", "running_mean"):
        return rk._slow_init_(name, t, seed)
    if not _BANK:
        _BANK.append(torch.randn(1 << 24, generator=torch.Generator().manual_seed(seed)))
    bank, n = _BANK[0], t.numel()
    start = (seed + zlib.crc32(name.encode())) % bank.numel()
    flat = t.view(-1)
    with torch.no_grad():
        done = 0
        while done < n:
            take = min(n - done, bank.numel() - start)
            flat[done:done + take].copy_(bank[start:start + take])
            done, start = done + take, 0
        flat.mul_(t[0].numel() ** -0.5)


def _write(model, out: Path, stem: str, seed: int, save_config) -> int:
    out.mkdir(parents=True)
    save_config(out)
    return rk.stream_random_weights(model, out, stem, torch.bfloat16, seed=seed)


def write_klein(out: Path, big: bool, only: set[str], say=print) -> dict:
    import diffusers
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from export.synthetic import qwen_tokenizer

    qwen_tokenizer().save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**rk.KLEIN_SCHEDULER).save_pretrained(out / "scheduler")
    sizes = {}
    if "text_encoder" in only:
        config = Qwen3Config(vocab_size=QWEN_VOCAB, **(QWEN3_8B if big else rk.QWEN3_4B))
        config.architectures, config.dtype = ["Qwen3ForCausalLM"], "bfloat16"
        with torch.device("meta"):
            model = Qwen3ForCausalLM(config)
        say(f"text_encoder: Qwen3-{'8' if big else '4'}B")
        sizes["text_encoder"] = _write(model, out / "text_encoder", "model", 2, config.save_pretrained)
    if "transformer" in only:
        with torch.device("meta"):
            model = Flux2Transformer2DModel(**(KLEIN9B_TRANSFORMER if big else rk.KLEIN4B_TRANSFORMER))
        say(f"transformer: Klein {'9' if big else '4'}B")
        sizes["transformer"] = _write(model, out / "transformer", "diffusion_pytorch_model", 1, model.save_config)
    if "vae" in only:
        with torch.device("meta"):
            model = AutoencoderKLFlux2(**rk.FLUX2_VAE)
        sizes["vae"] = _write(model, out / "vae", "diffusion_pytorch_model", 3, model.save_config)
    index = {
        "_class_name": "Flux2KleinPipeline", "_diffusers_version": diffusers.__version__, "is_distilled": True,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    return index, sizes


def write_sd3(out: Path, large: bool, only: set[str], say=print) -> dict:
    import diffusers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from export.synthetic import clip_tokenizer, t5_tokenizer

    clip_tokenizer().save_pretrained(out / "tokenizer")
    clip_tokenizer().save_pretrained(out / "tokenizer_2")
    t5_tokenizer().save_pretrained(out / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(out / "scheduler")
    sizes = {}
    for name, cfg_cls, model_cls, cfg, seed in (
            ("text_encoder", CLIPTextConfig, CLIPTextModelWithProjection, CLIP_L, 4),
            ("text_encoder_2", CLIPTextConfig, CLIPTextModelWithProjection, CLIP_G, 5),
            ("text_encoder_3", T5Config, T5EncoderModel, T5_XXL, 6)):
        if name not in only:
            continue
        config = cfg_cls(**cfg)
        config.dtype = "bfloat16"
        with torch.device("meta"):
            model = model_cls(config)
        say(f"{name}: {model_cls.__name__}")
        sizes[name] = _write(model, out / name, "model", seed, config.save_pretrained)
    if "transformer" in only:
        with torch.device("meta"):
            model = SD3Transformer2DModel(**(SD35_LARGE if large else SD35_MEDIUM))
        say(f"transformer: SD3.5 {'Large' if large else 'Medium'}")
        sizes["transformer"] = _write(model, out / "transformer", "diffusion_pytorch_model", 1, model.save_config)
    if "vae" in only:
        with torch.device("meta"):
            model = AutoencoderKL(**SD3_VAE)
        sizes["vae"] = _write(model, out / "vae", "diffusion_pytorch_model", 3, model.save_config)
    index = {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    return index, sizes


VARIANTS = {"klein-4b": (write_klein, False), "klein-9b": (write_klein, True),
            "sd35-medium": (write_sd3, False), "sd35-large": (write_sd3, True)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variant", choices=sorted(VARIANTS))
    p.add_argument("out", type=Path)
    p.add_argument("--only", default="text_encoder,text_encoder_2,text_encoder_3,transformer,vae",
                   help="components to write (the others are left out of the folder)")
    p.add_argument("--slow-init", action="store_true", help="fresh normal samples per tensor (slow)")
    a = p.parse_args(argv)
    if a.out.exists():
        raise SystemExit(f"{a.out} exists; pick a new folder")
    if not a.slow_init:
        rk._slow_init_, rk._init_ = rk._init_, _fast_init_
    a.out.mkdir(parents=True)
    writer, big = VARIANTS[a.variant]
    index, sizes = writer(a.out, big, set(a.only.split(",")))
    index = {k: v for k, v in index.items() if not isinstance(v, list) or (a.out / k).is_dir()}
    (a.out / "model_index.json").write_text(json.dumps(index, indent=2))
    (a.out / "REALSIZE.json").write_text(json.dumps({"variant": a.variant, "dtype": "bf16", "bytes": sizes,
                                                     "note": "random weights at the released shapes"}))
    print(json.dumps({k: f"{v / 2**30:.2f} GiB" for k, v in sizes.items()}))


if __name__ == "__main__":
    main()
