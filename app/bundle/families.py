"""Model families as data: which components a family has, their tensors and defaults. No torch import."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from app.errors import ModelFolderError


@dataclass(frozen=True)
class TensorSpec:
    """One input or output. Symbolic dims are names shared across a component (e.g. "batch")."""

    name: str
    dtype: str  # numpy-style name: float32, int64
    dims: tuple[str | int, ...]


@dataclass(frozen=True)
class ComponentSpec:
    """A module exported to ONNX: where its weights live and what crosses its boundary."""

    name: str  # name inside the bundle: text_encoder, transformer, vae_decoder, ...
    source: str  # attribute of the diffusers pipeline / subfolder of the model folder
    wrapper: str  # key into app.models.wrappers.WRAPPERS
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    role: str  # text_encoder | vae_encoder | transformer | vae_decoder
    optional: bool = False  # may be absent from a model folder (SD3 without T5)
    on_request: bool = False  # exported only when asked (the VAE encoder: export --with-encoder)


@dataclass(frozen=True)
class Defaults:
    steps: int
    guidance: float
    width: int
    height: int


@dataclass(frozen=True)
class FamilySpec:
    name: str
    pipeline_classes: tuple[str, ...]  # model_index.json _class_name values that map here
    components: tuple[ComponentSpec, ...]
    tokenizers: tuple[str, ...]  # subfolders copied into the bundle as-is
    patch: int  # latent cells per token side (Klein 2x2 patchify, SD3 patch_size 2)
    trace_grids: tuple[tuple[int, int], ...]  # (rows, cols) of the component-facing latent grid for export
    size_range: tuple[int, int]  # default min/max pixels per side for export profiles
    uses_negative_prompt: bool
    # text_seq each component sees at run time (the pipelines pad to these lengths), for engine profiles
    text_lengths: dict = field(default_factory=dict)
    # components that see CFG's doubled batch ([negative, positive] in one call)
    cfg_batched: tuple[str, ...] = ()
    # (model_index, model folder) -> generation defaults; distilled vs base differ for Klein
    defaults: Callable[[dict, Path], Defaults] = field(repr=False, default=None)
    # Images as input (the VAE encoder): exported by default? how many images a request may carry (Klein:
    # references; SD3: the one image-to-image input) and the area above which a reference is scaled down.
    encoder_by_default: bool = False
    max_images: int = 0
    reference_max_pixels: int = 1024 * 1024  # Flux2KleinPipeline resizes references above 1 MP to 1024² area

    def component(self, name: str) -> ComponentSpec:
        return next(c for c in self.components if c.name == name)


# Axes that vary per call. Other named dims (text_dim, latent_channels, packed_channels, ...) are fixed by the
# model config (see model_dims).
DYNAMIC_DIMS = frozenset({"batch", "text_seq", "img_seq", "latent_height", "latent_width", "height", "width",
                          "lora_rank"})

# Run-time LoRA (export --runtime-lora, docs/LORA.md): the transformer graph carries a low-rank side branch on
# every nn.Linear, y = W x + B (A x), with A (lora_rank x in) and B (out x lora_rank) as inputs lora_a_<i> and
# lora_b_<i>; slot i is the manifest's components.transformer.lora.slots[i]. Several LoRAs at once are one
# branch whose rank is the sum of theirs; no LoRA is rank 1 of zeros.
LORA_RANK_DIM = "lora_rank"


def lora_input_names(i: int) -> tuple[str, str]:
    return f"lora_a_{i}", f"lora_b_{i}"


def with_lora_slots(spec: ComponentSpec, slots: list[dict]) -> ComponentSpec:
    """The transformer's spec with the side branch's inputs, one (A, B) pair per slot ({module, in, out})."""
    extra = []
    for i, slot in enumerate(slots):
        a, b = lora_input_names(i)
        extra += [TensorSpec(a, "float32", (LORA_RANK_DIM, int(slot["in"]))),
                  TensorSpec(b, "float32", (int(slot["out"]), LORA_RANK_DIM))]
    return replace(spec, inputs=spec.inputs + tuple(extra))


def component_spec(family: "FamilySpec", manifest: dict, name: str) -> ComponentSpec:
    """The family's spec for a bundle's component, with the run-time LoRA inputs where the bundle has them."""
    nets = manifest.get("controlnets") or {}
    if name.startswith(CONTROLNET_PREFIX):
        return controlnet_spec(name[len(CONTROLNET_PREFIX):], nets[name[len(CONTROLNET_PREFIX):]])
    spec = family.component(name)
    if name == "transformer" and nets:
        first = next(iter(nets.values()))
        spec = with_controlnet_input(spec, first["layers"], first["inner_dim"])
    slots = ((manifest.get("components", {}).get(name) or {}).get("lora") or {}).get("slots")
    return with_lora_slots(spec, slots) if slots else spec


# SD3.5 ControlNet (export --controlnet, docs/CONTROLNET.md): each SD3ControlNetModel is a component
# `controlnet_<name>` whose output stacks its per-layer residuals, (controlnet_layers, batch, img_seq, inner_dim);
# the transformer of a bundle with ControlNets takes that stack, scaled and summed over the request's nets, as
# one more input and adds residual int(i / (num_layers / controlnet_layers)) after each block i, as diffusers'
# SD3Transformer2DModel does. No control: zeros (adding 0.0 changes no bit).
CONTROLNET_PREFIX = "controlnet_"
CONTROLNET_RESIDUALS = "controlnet_residuals"


def controlnet_spec(name: str, record: dict) -> ComponentSpec:
    """The component of one of a bundle's ControlNets, from its manifest record (controlnets[name])."""
    text = (_t("encoder_hidden_states", "float32", "batch", "text_seq", "text_dim"),) if record["uses_text"] else ()
    return ComponentSpec(
        CONTROLNET_PREFIX + name, record["source"]["path"],
        "sd3_controlnet" if record["uses_text"] else "sd3_controlnet_single",
        inputs=(_t("hidden_states", "float32", "batch", "latent_channels", "latent_height", "latent_width"),
                _t("controlnet_cond", "float32", "batch", "latent_channels", "latent_height", "latent_width"),
                *text,
                _t("pooled_projections", "float32", "batch", "pooled_dim"),
                _t("timestep", "float32", "batch")),
        outputs=(_t("block_samples", "float32", int(record["layers"]), "batch", "img_seq", int(record["inner_dim"])),),
        role="controlnet",
    )


def with_controlnet_input(spec: ComponentSpec, layers: int, inner_dim: int) -> ComponentSpec:
    """The SD3 transformer's spec with the ControlNet residual stack as its last base input."""
    extra = _t(CONTROLNET_RESIDUALS, "float32", int(layers), "batch", "img_seq", int(inner_dim))
    return replace(spec, wrapper="sd3_transformer_controlnet", inputs=spec.inputs + (extra,))


# Flux2KleinPipeline's text_encoder_out_layers default: the Qwen3 hidden states it stacks into the prompt
# embedding (hidden_states[0] is the token embedding, so hidden_states[k] is the output of layer k-1).
KLEIN_TEXT_LAYERS = (9, 18, 27)
# Prompt lengths the pipelines pad to, per family: diffusers' own defaults (Flux2KleinPipeline
# max_sequence_length=512; SD3: CLIP tokenizers' 77, StableDiffusion3Pipeline max_sequence_length=256).
KLEIN_MAX_TOKENS = 512
SD3_CLIP_TOKENS, SD3_T5_TOKENS = 77, 256


def _t(name: str, dtype: str, *dims: str | int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims))


def _vae_decoder(wrapper: str, channels: str) -> ComponentSpec:
    """Latents (`channels` wide: Klein's packed 4C, SD3's C) -> image in [-1, 1]; the same for both families."""
    return ComponentSpec(
        "vae_decoder", "vae", wrapper,
        inputs=(_t("latents", "float32", "batch", channels, "latent_height", "latent_width"),),
        outputs=(_t("image", "float32", "batch", 3, "height", "width"),),
        role="vae_decoder",
    )


def _klein_defaults(index: dict, folder: Path) -> Defaults:
    if index.get("is_distilled", False):
        return Defaults(steps=4, guidance=1.0, width=1024, height=1024)
    return Defaults(steps=50, guidance=4.0, width=1024, height=1024)


def _sd3_defaults(index: dict, folder: Path) -> Defaults:
    return Defaults(steps=28, guidance=7.0, width=1024, height=1024)


FLUX2_KLEIN = FamilySpec(
    name="flux2-klein",
    pipeline_classes=("Flux2KleinPipeline",),
    components=(
        ComponentSpec(
            "text_encoder", "text_encoder", "klein_text_encoder",
            inputs=(_t("input_ids", "int64", "batch", "text_seq"), _t("attention_mask", "int64", "batch", "text_seq")),
            outputs=(_t("prompt_embeds", "float32", "batch", "text_seq", "text_dim"),),
            role="text_encoder",
        ),
        ComponentSpec(
            "transformer", "transformer", "klein_transformer",
            inputs=(
                _t("hidden_states", "float32", "batch", "img_seq", "latent_dim"),
                _t("encoder_hidden_states", "float32", "batch", "text_seq", "text_dim"),
                _t("timestep", "float32", "batch"),
                _t("img_ids", "int64", "batch", "img_seq", 4),
                _t("txt_ids", "int64", "batch", "text_seq", 4),
            ),
            outputs=(_t("noise_pred", "float32", "batch", "img_seq", "latent_dim"),),
            role="transformer",
        ),
        ComponentSpec(  # Flux2KleinPipeline._encode_vae_image: argmax, 2x2 patchify, batch-norm normalisation
            "vae_encoder", "vae", "klein_vae_encoder",
            inputs=(_t("image", "float32", "batch", 3, "height", "width"),),
            outputs=(_t("latents", "float32", "batch", "packed_channels", "latent_height", "latent_width"),),
            role="vae_encoder", on_request=True,
        ),
        _vae_decoder("klein_vae_decoder", "packed_channels"),
    ),
    tokenizers=("tokenizer",),
    patch=2,
    trace_grids=((4, 6), (5, 3)),
    size_range=(256, 2048),
    uses_negative_prompt=False,
    text_lengths={"text_encoder": KLEIN_MAX_TOKENS, "transformer": KLEIN_MAX_TOKENS},
    cfg_batched=("transformer",),  # the base (non-distilled) model's CFG; the runtime batches it
    defaults=_klein_defaults,
    encoder_by_default=True,
    max_images=4,  # reference images per request; the transformer's profiles cover this many
)

_CLIP_OUT = (
    _t("pooled", "float32", "batch", "pooled_dim"),
    _t("hidden", "float32", "batch", "text_seq", "hidden_dim"),
)

SD3 = FamilySpec(
    name="sd3.5",
    pipeline_classes=("StableDiffusion3Pipeline",),
    components=(
        ComponentSpec("text_encoder", "text_encoder", "clip_text_encoder",
                      inputs=(_t("input_ids", "int64", "batch", "text_seq"),), outputs=_CLIP_OUT,
                      role="text_encoder"),
        ComponentSpec("text_encoder_2", "text_encoder_2", "clip_text_encoder",
                      inputs=(_t("input_ids", "int64", "batch", "text_seq"),), outputs=_CLIP_OUT,
                      role="text_encoder"),
        ComponentSpec("text_encoder_3", "text_encoder_3", "t5_text_encoder",
                      inputs=(_t("input_ids", "int64", "batch", "text_seq"),),
                      outputs=(_t("hidden", "float32", "batch", "text_seq", "hidden_dim"),),
                      role="text_encoder", optional=True),
        ComponentSpec(
            "transformer", "transformer", "sd3_transformer",
            inputs=(
                _t("hidden_states", "float32", "batch", "latent_channels", "latent_height", "latent_width"),
                _t("encoder_hidden_states", "float32", "batch", "text_seq", "text_dim"),
                _t("pooled_projections", "float32", "batch", "pooled_dim"),
                _t("timestep", "float32", "batch"),
            ),
            outputs=(_t("noise_pred", "float32", "batch", "latent_channels", "latent_height", "latent_width"),),
            role="transformer",
        ),
        ComponentSpec(  # StableDiffusion3Img2ImgPipeline: latent_dist.sample (noise drawn on the host), scaled
            "vae_encoder", "vae", "sd3_vae_encoder",
            inputs=(_t("image", "float32", "batch", 3, "height", "width"),
                    _t("noise", "float32", "batch", "latent_channels", "latent_height", "latent_width")),
            outputs=(_t("latents", "float32", "batch", "latent_channels", "latent_height", "latent_width"),),
            role="vae_encoder", on_request=True,
        ),
        _vae_decoder("sd3_vae_decoder", "latent_channels"),
    ),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    patch=2,
    trace_grids=((8, 12), (10, 6)),  # 5x3 patches: odd counts catch wrong dynamic-shape arithmetic
    size_range=(256, 1536),
    uses_negative_prompt=True,
    text_lengths={"text_encoder": SD3_CLIP_TOKENS, "text_encoder_2": SD3_CLIP_TOKENS, "text_encoder_3": SD3_T5_TOKENS,
                  "transformer": SD3_CLIP_TOKENS + SD3_T5_TOKENS},
    cfg_batched=("transformer",),
    defaults=_sd3_defaults,
    # The VAE encoder (84 MB in FP32 for SD3.5) is exported by default, as for Klein: image-to-image then works
    # with any bundle, instead of a refusal after the bundle was built (issue 29). --no-encoder leaves it out.
    encoder_by_default=True,
    max_images=1,  # image-to-image: one init image
)

FAMILIES: dict[str, FamilySpec] = {f.name: f for f in (FLUX2_KLEIN, SD3)}


def family_for(index: dict, requested: str = "auto") -> FamilySpec:
    """The family named by --family, or detected from model_index.json's pipeline class."""
    if requested != "auto":
        if requested not in FAMILIES:
            raise ModelFolderError(
                f"unknown family '{requested}'; use one of: auto, {', '.join(FAMILIES)}"
            )
        return FAMILIES[requested]
    cls = index.get("_class_name", "")
    for fam in FAMILIES.values():
        if cls in fam.pipeline_classes:
            return fam
    raise ModelFolderError(
        f"model_index.json names pipeline '{cls or '?'}', which edgegen does not support; "
        f"supported: {', '.join(c for f in FAMILIES.values() for c in f.pipeline_classes)} "
        "(or pass --family to force one)"
    )


def read_model_index(folder: Path) -> dict:
    path = Path(folder) / "model_index.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"cannot read {path}: {e}; point --model at a diffusers model folder") from None


# ---------------------------------------------------------------- dimensions from the model's own configs



def _config(folder: Path, source: str) -> dict:
    path = Path(folder) / source / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"cannot read {path} ({e.__class__.__name__}); copy the complete model folder") from None
    if not isinstance(cfg, dict):
        raise ModelFolderError(f"{path} is not a JSON object; copy the complete model folder")
    return cfg


def _int(cfg: dict, key: str, where: str, default=None) -> int:
    v = cfg.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ModelFolderError(f"{where}/config.json {key} = {v!r} is not a positive integer; the folder is damaged")
    return v


def _unsupported(where: str, field: str, value, why: str) -> ModelFolderError:
    return ModelFolderError(f"unsupported model: {where}/config.json {field} = {value!r}; {why}")


def model_dims(folder: Path, family: FamilySpec, index: dict, max_sequence_length: int | None = None) -> dict:
    """Every dimension export and the runtime need, read from the folder's config.json files (no torch), and
    checked for agreement between components. Raises ModelFolderError naming the one unsupported field.

    The result is recorded as the manifest's `pipeline` section; the runtime reads shapes from there."""
    present = lambda s: isinstance(index.get(s), list) and index[s][0] is not None  # noqa: E731
    vae = _config(folder, "vae")
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not blocks:
        raise ModelFolderError("vae/config.json has no block_out_channels list; the folder is damaged")
    scale = 2 ** (len(blocks) - 1)  # diffusers: 2 ** (len(block_out_channels) - 1)
    tr = _config(folder, "transformer")
    if family.name == "flux2-klein":
        latent = _int(vae, "latent_channels", "vae", 32)
        vpatch = vae.get("patch_size", [2, 2])
        if list(vpatch) != [2, 2]:
            raise _unsupported("vae", "patch_size", vpatch, "Flux2KleinPipeline packs latents in 2x2 patches only")
        packed = latent * 4
        if _int(tr, "patch_size", "transformer", 1) != 1:
            raise _unsupported("transformer", "patch_size", tr.get("patch_size"),
                               "FLUX.2 transformers take packed tokens (patch_size 1)")
        if _int(tr, "in_channels", "transformer", 128) != packed:
            raise _unsupported("transformer", "in_channels", tr.get("in_channels"),
                               f"it must be 4 x the VAE's latent_channels ({latent}), i.e. {packed}")
        te = _config(folder, "text_encoder")
        layers = _int(te, "num_hidden_layers", "text_encoder")
        if layers < max(KLEIN_TEXT_LAYERS):
            raise _unsupported("text_encoder", "num_hidden_layers", layers,
                               f"Flux2KleinPipeline stacks hidden states {KLEIN_TEXT_LAYERS}, so it needs at least "
                               f"{max(KLEIN_TEXT_LAYERS)} layers")
        hidden = _int(te, "hidden_size", "text_encoder")
        joint = _int(tr, "joint_attention_dim", "transformer", 15360)
        if joint != len(KLEIN_TEXT_LAYERS) * hidden:
            raise _unsupported("transformer", "joint_attention_dim", joint,
                               f"it must be {len(KLEIN_TEXT_LAYERS)} x the text encoder's hidden_size ({hidden})")
        text = max_sequence_length or KLEIN_MAX_TOKENS
        return {"vae_scale_factor": scale, "patch": family.patch, "latent_channels": latent,
                "packed_channels": packed, "transformer_in_channels": packed, "text_dim": joint,
                "text_encoder_layers": list(KLEIN_TEXT_LAYERS), "last_tapped_layer": max(KLEIN_TEXT_LAYERS) - 1,
                "text_lengths": {**family.text_lengths, "text_encoder": text, "transformer": text}, "max_size_px": None}
    # SD3 / SD3.5
    latent = _int(vae, "latent_channels", "vae", 16)
    in_ch = _int(tr, "in_channels", "transformer", 16)
    if in_ch != latent:
        raise _unsupported("transformer", "in_channels", in_ch, f"it must equal the VAE's latent_channels ({latent})")
    out_ch = tr.get("out_channels") or in_ch
    if out_ch != latent:
        raise _unsupported("transformer", "out_channels", out_ch, f"it must equal the VAE's latent_channels ({latent})")
    patch = _int(tr, "patch_size", "transformer", 2)
    table = tr.get("pos_embed_max_size", 96)
    if table is not None and (not isinstance(table, int) or table <= 0):
        raise _unsupported("transformer", "pos_embed_max_size", table, "it must be a positive integer")
    joint = _int(tr, "joint_attention_dim", "transformer", 4096)
    pooled = 0  # (the CLIP hidden states are padded, or cut, to joint_attention_dim, as diffusers does)
    for name in ("text_encoder", "text_encoder_2"):
        pooled += _int(_config(folder, name), "projection_dim", name, 512)
    if _int(tr, "pooled_projection_dim", "transformer", 2048) != pooled:
        raise _unsupported("transformer", "pooled_projection_dim", tr.get("pooled_projection_dim"),
                           f"it must be the two CLIP encoders' projection_dim together ({pooled})")
    if present("text_encoder_3"):
        t5 = _int(_config(folder, "text_encoder_3"), "d_model", "text_encoder_3")
        if t5 != joint:
            raise _unsupported("transformer", "joint_attention_dim", joint, f"it must equal T5's d_model ({t5})")
    return {"vae_scale_factor": scale, "patch": patch, "latent_channels": latent, "transformer_in_channels": latent,
            "text_dim": joint, "pooled_dim": pooled, "pos_embed_max_size": table,
            # the VAE's latent scaling, for ControlNet latents (their shift depends on the net)
            "vae_scaling_factor": float(vae.get("scaling_factor", 0.18215)),
            "vae_shift_factor": float(vae.get("shift_factor") or 0.0),
            "text_lengths": dict(family.text_lengths),
            # The position table bounds the image: pos_embed_max_size patches per side.
            "max_size_px": table * patch * scale if table else None}


def controlnet_dims(controlnet: Path, model: Path, dims: dict) -> dict:
    """What a bundle records about one SD3ControlNetModel folder (config.json, no torch), checked against the
    model it is exported with. Raises ModelFolderError naming the one field that does not fit."""
    where = str(controlnet)
    cn = _config(controlnet.parent, controlnet.name)
    if cn.get("_class_name") != "SD3ControlNetModel":
        raise ModelFolderError(f"{where}/config.json names {cn.get('_class_name')!r}; --controlnet takes a diffusers "
                               "SD3ControlNetModel folder (config.json + safetensors)")
    tr = _config(model, "transformer")
    inner = _int(cn, "num_attention_heads", where, 18) * _int(cn, "attention_head_dim", where, 64)
    want = _int(tr, "num_attention_heads", "transformer", 18) * _int(tr, "attention_head_dim", "transformer", 64)
    if inner != want:
        raise _unsupported(where, "num_attention_heads x attention_head_dim", inner,
                           f"it must equal the transformer's width ({want}): this ControlNet is for another model")
    for key, value in (("in_channels", dims["latent_channels"]), ("patch_size", dims["patch"]),
                       ("pooled_projection_dim", dims["pooled_dim"])):
        if _int(cn, key, where, {"in_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048}[key]) != value:
            raise _unsupported(where, key, cn.get(key), f"the model's is {value}: this ControlNet is for another model")
    if cn.get("extra_conditioning_channels", 0):
        raise _unsupported(where, "extra_conditioning_channels", cn["extra_conditioning_channels"],
                           "ControlNet inpainting (StableDiffusion3ControlNetInpaintingPipeline) is not supported")
    joint = cn.get("joint_attention_dim", 4096)
    if joint is not None and joint != dims["text_dim"]:
        raise _unsupported(where, "joint_attention_dim", joint, f"the model's is {dims['text_dim']}")
    use_pos = cn.get("use_pos_embed", True)
    if use_pos and cn.get("pos_embed_max_size", 96) != dims["pos_embed_max_size"]:
        raise _unsupported(where, "pos_embed_max_size", cn.get("pos_embed_max_size"),
                           f"the model's position table is {dims['pos_embed_max_size']}")
    return {"layers": _int(cn, "num_layers", where, 18), "inner_dim": inner,
            "uses_text": joint is not None,  # SD3.5 Large's nets: single blocks, no text
            # SD3.5 Large's nets have no position table: diffusers lends them the transformer's (use_pos_embed false)
            "shares_transformer_pos_embed": not use_pos,
            # force_zeros_for_pooled_projection: zero pooled input and no VAE shift on the control latents
            "force_zeros_for_pooled_projection": bool(cn.get("force_zeros_for_pooled_projection", True)),
            "transformer_layers": _int(tr, "num_layers", "transformer", 18)}
