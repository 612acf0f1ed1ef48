"""Write a FLUX.2 Klein 4B diffusers folder at real size with random weights, one block at a time.

The transformer and VAE use the released configs of black-forest-labs/FLUX.2-klein-4B (values checked
against diffusers 0.42's Flux2Transformer2DModel / AutoencoderKLFlux2 and the published config.json files).
Weights are random: the module is built on the meta device, then each block is materialised, initialised,
written to its own safetensors shard and dropped before the next, so the writer never holds more than one
shard (one block, <= 0.5 GB in BF16) however deep the model is. An index json maps every tensor to its shard, as
`save_pretrained` writes it.

The text encoder is a *narrow* Qwen3: the real output width (hidden 2560, so the transformer's
joint_attention_dim is the real 7680) and 28 layers (the pipeline reads layers 9, 18, 27), but 2 heads and
MLP width 512 instead of Qwen3-4B's 32 heads and 9728 (0.18B parameters instead of 4.0B). `--text-encoder
full` writes the real Qwen3-4B shape (same streaming code; 16 GB in FP32, too big to export on a 24 GB box).

    python -m benchmarks.realsize_klein OUT [--double 5 --single 20] [--dtype bf16|fp32] [--text-encoder narrow|full]
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import torch
from torch import nn

# black-forest-labs/FLUX.2-klein-4B transformer/config.json
KLEIN4B_TRANSFORMER = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 5, "num_single_layers": 20,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000,
    "eps": 1e-6, "guidance_embeds": False,
}
# vae/config.json (the FLUX.2 VAE, shared by every FLUX.2 model)
FLUX2_VAE = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 32, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True, "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1, "patch_size": [2, 2],
}
# Qwen3-4B (text_encoder/config.json); "narrow" keeps the output width and depth the pipeline reads.
QWEN3_4B = {
    "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}
QWEN3_NARROW = dict(QWEN3_4B, intermediate_size=512, num_hidden_layers=28, num_attention_heads=2,
                    num_key_value_heads=2)
# scheduler/scheduler_config.json
KLEIN_SCHEDULER = {
    "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096, "time_shift_type": "exponential",
}

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _chunks(model: nn.Module, prefix: str = ""):
    """(prefix, module, recurse) pieces that partition the state dict: each ModuleList item is its own piece."""
    if any(True for _ in model.parameters(recurse=False)) or any(True for _ in model.buffers(recurse=False)):
        yield prefix, model, False
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for i, item in enumerate(child):
                yield f"{prefix}{name}.{i}.", item, True
        else:  # recurse: a wrapper such as Qwen3ForCausalLM.model holds the block list one level down
            yield from _chunks(child, f"{prefix}{name}.")


def _init_(name: str, t: torch.Tensor, seed: int) -> None:
    """Random but well-scaled: weights ~ N(0, 1/fan_in) keep activations O(1) through a deep random stack."""
    g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    with torch.no_grad():
        if not t.is_floating_point():
            t.zero_()
        elif leaf == "running_var" or (t.ndim == 1 and leaf == "weight"):  # norm scales, BN variance
            t.fill_(1.0)
        elif leaf == "running_mean":  # non-trivial BN statistics, so de-normalisation is exercised
            t.uniform_(-0.5, 0.5, generator=g)
        elif t.ndim <= 1:
            t.zero_()
        else:
            t.normal_(0.0, t[0].numel() ** -0.5, generator=g)


def stream_random_weights(model: nn.Module, out: Path, stem: str, dtype: torch.dtype, seed: int = 0,
                          shard_bytes: int = 1 << 29, say=print) -> int:
    """Materialise `model` (built on the meta device) piece by piece into safetensors shards + index json.

    Returns the bytes written. At most one shard's tensors (<= shard_bytes, or one piece if bigger) are
    alive at any time."""
    from safetensors.torch import save_file

    # Persistent tensors, each once: a tied parameter (Qwen3's lm_head = embed_tokens) is written under its
    # first name only, as save_pretrained does; non-persistent buffers (RoPE inv_freq) are rebuilt at load.
    every_param = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    keep = {n for n, _ in model.named_parameters()} | (set(model.state_dict()) - every_param)
    shards: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            path = out / f"{stem}.part{len(shards):05d}"
            save_file(pending, str(path), metadata={"format": "pt"})
            shards.append((path, list(pending)))
            say(f"  wrote shard {len(shards)} ({pending_bytes / 2**30:.2f} GiB)")
        pending, pending_bytes = {}, 0

    for prefix, piece, recurse in _chunks(model):
        size = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                   for t in list(piece.parameters(recurse)) + list(piece.buffers(recurse)))
        if pending_bytes + size > shard_bytes:
            flush()
        # Allocate straight in the stored dtype: no float32 copy of the piece ever exists.
        piece._apply(lambda t: torch.empty_like(t, device="cpu", dtype=dtype if t.is_floating_point() else t.dtype),
                     recurse=recurse)
        named = list(piece.named_parameters(recurse=recurse)) + list(piece.named_buffers(recurse=recurse))
        for name, t in named:
            full = prefix + name
            if full not in keep:
                continue
            _init_(full, t.data, seed)
            pending[full] = t.data
            pending_bytes += t.numel() * t.element_size()
        piece.to_empty(device="meta", recurse=recurse)  # the module lets go; only the shard dict holds them
    flush()
    n = len(shards)
    weight_map = {}
    for i, (path, names) in enumerate(shards):
        final = out / (f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors")
        path.rename(final)
        total += final.stat().st_size
        weight_map.update({k: final.name for k in names})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    missing = keep - set(weight_map)
    if missing:
        raise RuntimeError(f"tensors not written: {sorted(missing)[:5]}")
    return total


def write_transformer(out: Path, double: int, single: int, dtype: torch.dtype, say=print) -> int:
    from diffusers import Flux2Transformer2DModel

    cfg = dict(KLEIN4B_TRANSFORMER, num_layers=double, num_single_layers=single)
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**cfg)
    out.mkdir(parents=True)
    model.save_config(out)
    return stream_random_weights(model, out, "diffusion_pytorch_model", dtype, seed=1, say=say)


def write_text_encoder(out: Path, shape: dict, vocab: int, dtype: torch.dtype, say=print) -> int:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab, **shape)
    config.architectures = ["Qwen3ForCausalLM"]
    config.dtype = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    out.mkdir(parents=True)
    config.save_pretrained(out)
    return stream_random_weights(model, out, "model", dtype, seed=2, say=say)


def write_vae(out: Path, dtype: torch.dtype, say=print) -> int:
    from diffusers import AutoencoderKLFlux2

    with torch.device("meta"):
        model = AutoencoderKLFlux2(**FLUX2_VAE)
    out.mkdir(parents=True)
    model.save_config(out)
    return stream_random_weights(model, out, "diffusion_pytorch_model", dtype, seed=3, say=say)


def write_folder(out: Path, double: int = 5, single: int = 20, dtype: str = "bf16", text_encoder: str = "narrow",
                 say=print) -> dict:
    """The whole Flux2KleinPipeline folder; returns bytes written per component."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from export.synthetic import qwen_tokenizer

    out = Path(out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick a new folder")
    out.mkdir(parents=True)
    dt = DTYPES[dtype]
    tok = qwen_tokenizer()
    tok.save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER).save_pretrained(out / "scheduler")
    sizes = {}
    say(f"text_encoder ({text_encoder} Qwen3)")
    sizes["text_encoder"] = write_text_encoder(out / "text_encoder", QWEN3_NARROW if text_encoder == "narrow"
                                               else QWEN3_4B, len(tok), dt, say)
    say(f"transformer ({double} double + {single} single blocks, 24 x 128 heads)")
    sizes["transformer"] = write_transformer(out / "transformer", double, single, dt, say)
    say("vae (AutoencoderKLFlux2, released config)")
    sizes["vae"] = write_vae(out / "vae", dt, say)
    index = {
        "_class_name": "Flux2KleinPipeline", "_diffusers_version": diffusers.__version__, "is_distilled": True,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "REALSIZE.json").write_text(json.dumps({
        "note": "random weights; transformer and VAE at the released FLUX.2-klein-4B config "
                f"(depth {double}+{single}); text encoder: {text_encoder} Qwen3", "dtype": dtype, "bytes": sizes}))
    return sizes


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--double", type=int, default=5, help="double-stream blocks (real: 5)")
    p.add_argument("--single", type=int, default=20, help="single-stream blocks (real: 20)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="stored dtype (the release ships bf16)")
    p.add_argument("--text-encoder", choices=["narrow", "full"], default="narrow")
    a = p.parse_args(argv)
    sizes = write_folder(a.out, a.double, a.single, a.dtype, a.text_encoder)
    print(json.dumps({k: f"{v / 2**30:.2f} GiB" for k, v in sizes.items()}))


if __name__ == "__main__":
    main()
