"""Model families as data: which components a family has, their tensors and defaults. No torch import."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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
    role: str  # text_encoder | transformer | vae_decoder
    optional: bool = False  # may be absent from a model folder (SD3 without T5)


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

    def component(self, name: str) -> ComponentSpec:
        return next(c for c in self.components if c.name == name)


# Axes that vary per call. Other named dims (text_dim, latent_channels, ...) are fixed by the model config.
DYNAMIC_DIMS = frozenset({"batch", "text_seq", "img_seq", "latent_height", "latent_width", "height", "width"})


def _t(name: str, dtype: str, *dims: str | int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims))


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
        ComponentSpec(
            "vae_decoder", "vae", "klein_vae_decoder",
            inputs=(_t("latents", "float32", "batch", 128, "latent_height", "latent_width"),),
            outputs=(_t("image", "float32", "batch", 3, "height", "width"),),
            role="vae_decoder",
        ),
    ),
    tokenizers=("tokenizer",),
    patch=2,
    trace_grids=((4, 6), (5, 3)),
    size_range=(256, 2048),
    uses_negative_prompt=False,
    text_lengths={"text_encoder": 512, "transformer": 512},
    defaults=_klein_defaults,
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
        ComponentSpec(
            "vae_decoder", "vae", "sd3_vae_decoder",
            inputs=(_t("latents", "float32", "batch", "latent_channels", "latent_height", "latent_width"),),
            outputs=(_t("image", "float32", "batch", 3, "height", "width"),),
            role="vae_decoder",
        ),
    ),
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    patch=2,
    trace_grids=((8, 12), (10, 6)),  # 5x3 patches: odd counts catch wrong dynamic-shape arithmetic
    size_range=(256, 1536),
    uses_negative_prompt=True,
    text_lengths={"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 256, "transformer": 77 + 256},
    cfg_batched=("transformer",),
    defaults=_sd3_defaults,
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
