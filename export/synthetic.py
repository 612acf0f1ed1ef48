"""Tiny diffusers model folders of the real classes, built from configs with no hub (tests, demo, benchmarks)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

# Chat template in the shape of Qwen3's: thinking can be switched off, as Flux2KleinPipeline does.
QWEN_CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
    "{%- endif %}"
)

DEFAULT_CORPUS = [
    "a red circle on a blue background",
    "a photo of a cat holding a sign that says hello world",
    "portrait of a nurse in a hospital corridor, soft light",
    "a product shot of a silver watch on black velvet",
    "a watercolor painting of a harbour at dawn",
    "the word OPEN written in neon letters above a door",
    "an isometric illustration of a bank vault",
    "green triangle at the top of a white background",
]


def _bpe_vocab_merges(corpus: list[str], vocab_size: int, suffix: str | None) -> tuple[dict, list]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    extra = {"end_of_word_suffix": suffix} if suffix else {}
    tok = Tokenizer(models.BPE(**extra))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, **extra
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    if suffix:  # CLIP's pre-tokenizer can end any single symbol with the suffix
        for ch in pre_tokenizers.ByteLevel.alphabet():
            vocab.setdefault(ch + suffix, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def qwen_tokenizer(corpus: list[str] = DEFAULT_CORPUS, vocab_size: int = 400):
    """A Qwen2 byte-level BPE tokenizer trained in-process, with a chat template."""
    from transformers import Qwen2TokenizerFast

    vocab, merges = _bpe_vocab_merges(corpus, vocab_size, None)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    for s in specials:
        vocab.setdefault(s, len(vocab))
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token=None, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def clip_tokenizer(corpus: list[str] = DEFAULT_CORPUS, vocab_size: int = 600):
    from transformers import CLIPTokenizer

    vocab, merges = _bpe_vocab_merges(corpus, vocab_size, "</w>")
    for s in ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(s, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def t5_tokenizer(corpus: list[str] = DEFAULT_CORPUS, vocab_size: int = 200):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


@dataclass(frozen=True)
class KleinSize:
    """Shape knobs of a FLUX.2 Klein-architecture model. Defaults: tiny, for tests."""

    heads: int = 2
    head_dim: int = 32  # rope axes are head_dim // 4 each
    double_layers: int = 1
    single_layers: int = 1
    text_hidden: int = 32
    text_layers: int = 28  # >= 28 so the pipeline's default layers (9, 18, 27) exist
    text_heads: int = 2
    text_kv_heads: int | None = None  # fewer than text_heads: grouped-query attention, as Qwen3-4B/8B have
    vae_channels: tuple[int, ...] = (32, 32)
    vae_layers_per_block: int = 1
    latent_channels: int = 32  # the real Klein VAEs: 32; the transformer sees 4x (2x2 patchify)
    is_distilled: bool = True
    vae_mid_attention: bool = True  # the demo model turns it off so the VAE can train on crops
    vae_norm_groups: int | None = None  # None: min(32, first VAE width)


def build_klein(size: KleinSize = KleinSize(), corpus: list[str] = DEFAULT_CORPUS, seed: int = 0):
    """A Flux2KleinPipeline of the real classes with random weights."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = qwen_tokenizer(corpus)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=size.text_hidden,
            intermediate_size=size.text_hidden * 2,
            num_hidden_layers=size.text_layers,
            num_attention_heads=size.text_heads,
            num_key_value_heads=size.text_kv_heads or size.text_heads,
            head_dim=size.text_hidden // size.text_heads,
            max_position_embeddings=1024,
            tie_word_embeddings=True,
        )
    ).eval()
    axis = size.head_dim // 4
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * size.latent_channels,
        num_layers=size.double_layers,
        num_single_layers=size.single_layers,
        attention_head_dim=size.head_dim,
        num_attention_heads=size.heads,
        joint_attention_dim=3 * size.text_hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=(axis, axis, axis, axis),
        guidance_embeds=False,
    ).eval()
    vae = AutoencoderKLFlux2(
        block_out_channels=size.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(size.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(size.vae_channels),
        layers_per_block=size.vae_layers_per_block,
        latent_channels=size.latent_channels,
        norm_num_groups=size.vae_norm_groups or min(32, size.vae_channels[0]),
        mid_block_add_attention=size.vae_mid_attention,
    ).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so de-normalisation is exercised
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=transformer, is_distilled=size.is_distilled,
    )


@dataclass(frozen=True)
class SD3Size:
    """Shape knobs of an SD3.5-architecture model. Defaults: tiny, for tests."""

    layers: int = 2
    heads: int = 2
    head_dim: int = 16
    dual_attention_layers: tuple[int, ...] = (0,)
    clip_hidden: int = 32  # both CLIP stand-ins (the real ones: 768 and 1280); pooled = 2 * clip_hidden
    clip_layers: int = 2
    t5_width: int = 32  # = joint_attention_dim (real: 4096 >= the two CLIP widths together, which are padded)
    t5_heads: int = 2
    t5_layers: int = 2
    vae_channels: tuple[int, ...] = (32, 32)
    vae_layers_per_block: int = 1
    pos_embed_max_size: int = 64
    latent_channels: int = 16
    vae_mid_attention: bool = True  # off for the 1024 px template models: a 128² latent's attention is 1 GiB


def build_sd3(corpus: list[str] = DEFAULT_CORPUS, seed: int = 0, t5: bool = True, size: SD3Size = SD3Size()):
    """A StableDiffusion3Pipeline of the real classes (two CLIPs, T5, MMDiT, VAE) with random weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok1, tok2 = clip_tokenizer(corpus), clip_tokenizer(corpus)

    def clip(hidden: int, proj: int):
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(tok1), hidden_size=hidden, intermediate_size=hidden * 2,
                num_hidden_layers=size.clip_layers,
                num_attention_heads=2, max_position_embeddings=77, projection_dim=proj,
                bos_token_id=tok1.bos_token_id, eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id,
            )
        ).eval()

    c = size.clip_hidden
    text_encoder, text_encoder_2 = clip(c, c), clip(c, c)
    tok3 = t5_tokenizer(corpus) if t5 else None
    text_encoder_3 = (
        T5EncoderModel(
            T5Config(vocab_size=len(tok3), d_model=size.t5_width, d_ff=2 * size.t5_width, d_kv=16,
                     num_layers=size.t5_layers, num_heads=size.t5_heads, decoder_start_token_id=0, pad_token_id=0,
                     eos_token_id=1)
        ).eval()
        if t5
        else None
    )
    inner = size.heads * size.head_dim
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=size.latent_channels, num_layers=size.layers, attention_head_dim=size.head_dim,
        num_attention_heads=size.heads, joint_attention_dim=size.t5_width, caption_projection_dim=inner,
        pooled_projection_dim=2 * c, out_channels=size.latent_channels, pos_embed_max_size=size.pos_embed_max_size,
        dual_attention_layers=size.dual_attention_layers, qk_norm="rms_norm",
    ).eval()
    n = len(size.vae_channels)
    vae = AutoencoderKL(
        block_out_channels=size.vae_channels, in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=size.latent_channels, layers_per_block=size.vae_layers_per_block, norm_num_groups=32,
        sample_size=32, mid_block_add_attention=size.vae_mid_attention,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tok1, text_encoder_2=text_encoder_2, tokenizer_2=tok2,
        text_encoder_3=text_encoder_3, tokenizer_3=tok3,
    )


def build_sd3_controlnet(model: Path, layers: int, style: str = "large", seed: int = 1, gain: float = 0.05):
    """A random SD3ControlNetModel for an SD3 model folder, shaped from its transformer's config.json.

    style "large": as SD3.5 Large's canny/depth/blur nets (single blocks without text, the transformer's position
    table lent by the pipeline, zero pooled input); "instantx": as InstantX's SD3 nets (joint blocks with the prompt,
    its own position table), here with force_zeros_for_pooled_projection off so the VAE-shift path runs too.
    The zero-initialised output layers are re-randomised (times `gain`): a fresh net would add exactly nothing."""
    from diffusers import SD3ControlNetModel

    cfg = json.loads((Path(model) / "transformer" / "config.json").read_text())
    torch.manual_seed(seed)
    large = style == "large"
    net = SD3ControlNetModel(
        sample_size=cfg["sample_size"], patch_size=cfg["patch_size"], in_channels=cfg["in_channels"],
        num_layers=layers, attention_head_dim=cfg["attention_head_dim"], num_attention_heads=cfg["num_attention_heads"],
        joint_attention_dim=None if large else cfg["joint_attention_dim"],
        caption_projection_dim=cfg["caption_projection_dim"], pooled_projection_dim=cfg["pooled_projection_dim"],
        out_channels=cfg["out_channels"], pos_embed_max_size=cfg["pos_embed_max_size"],
        use_pos_embed=not large, force_zeros_for_pooled_projection=large,
        qk_norm=None if large else cfg.get("qk_norm"),
    ).eval()
    with torch.no_grad():
        for m in (*net.controlnet_blocks, net.pos_embed_input):
            for t in m.parameters():
                t.normal_(0.0, gain)
    return net


def save(pipe, folder: Path) -> Path:
    """save_pretrained with safetensors only, as a real model folder is."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":  # python -m export.synthetic klein|sd3 OUT_DIR: a tiny RANDOM (untrained) model
    import sys

    kind, out = sys.argv[1], Path(sys.argv[2])
    save(build_klein() if kind == "klein" else build_sd3(), out)
    (out / "edgegen_defaults.json").write_text(json.dumps({"min_size": 32, "max_size": 256, "width": 128,
                                                           "height": 128, "note": "tiny random model, draws noise"}))
    print(out)


def save_lora(model: Path, family: str, out: Path, r: int, alpha: float, targets: list[str], seed: int,
              gain: float = 1.0) -> Path:
    """A random diffusers-layout LoRA file for a model folder's transformer (peft's init off: A and B random,
    B times `gain`), with its alpha in the adapter metadata, as diffusers' training scripts save it. For tests
    and benchmarks (run-time LoRA, docs/LORA.md)."""
    import diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    cls = {"flux2-klein": ("Flux2Transformer2DModel", "Flux2KleinPipeline"),
           "sd3.5": ("SD3Transformer2DModel", "StableDiffusion3Pipeline")}[family]
    torch.manual_seed(seed)
    tr = getattr(diffusers, cls[0]).from_pretrained(Path(model) / "transformer")
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    tr.add_adapter(cfg)
    state = {k: v * gain if "lora_B" in k else v for k, v in get_peft_model_state_dict(tr).items()}
    Path(out).mkdir(parents=True, exist_ok=True)
    getattr(diffusers, cls[1]).save_lora_weights(out, transformer_lora_layers=state,
                                                 transformer_lora_adapter_metadata=cfg.to_dict())
    return next(Path(out).glob("*.safetensors"))
