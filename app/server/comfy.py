"""ComfyUI's own node sets evaluated symbolically into one `edgegen generate` request per image.

Each node type maps its inputs to a value that says what it stands for (a bundle's model, a prompt with its
reference images, an empty or encoded latent, a sampled latent, ...); a SaveImage is planned from the decoded
image that reaches it. Nothing runs here: the plan is checked against the bundle's manifest and the uploaded
images' sizes, and the worker runs it with the same arithmetic as `edgegen generate`.

Node sets (docs/api/README.md lists each node's inputs and what edgegen does with them):
- the classic graph: CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage / EmptySD3LatentImage, KSampler
  (denoise < 1 on a VAEEncode'd LoadImage: SD3.5 image-to-image), VAEDecode, SaveImage, LoraLoader*;
- FLUX.2 Klein's templates: UNETLoader, CLIPLoader, VAELoader, CLIPTextEncode, ConditioningZeroOut,
  EmptyFlux2LatentImage, Flux2Scheduler, RandomNoise, KSamplerSelect, CFGGuider / BasicGuider,
  SamplerCustomAdvanced, VAEDecode, and for editing LoadImage, ImageScaleToTotalPixels, GetImageSize, VAEEncode,
  ReferenceLatent;
- SD3.5 ControlNet's templates: ControlNetLoader (a net of the model's bundle, by name or alias),
  ControlNetApplyAdvanced / ControlNetApplySD3, Canny (kornia, as ComfyUI's node) and ImageScale;
- ComfyUI's primitive nodes (PrimitiveInt, PrimitiveString, ...), whose values may feed any widget input.
Loaders name a bundle, or a model file name the site aliased to one (`serve --alias`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from app.server.bundles import BundleIndex
from app.server.security import PathRefused, confined

CLASSIC = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "EmptySD3LatentImage", "KSampler",
           "VAEDecode", "SaveImage", "LoraLoader", "LoraLoaderModelOnly")
NATIVE = ("UNETLoader", "CLIPLoader", "VAELoader", "ConditioningZeroOut", "EmptyFlux2LatentImage",
          "Flux2Scheduler", "RandomNoise", "KSamplerSelect", "CFGGuider", "BasicGuider", "SamplerCustomAdvanced",
          "LoadImage", "ImageScaleToTotalPixels", "GetImageSize", "VAEEncode", "ReferenceLatent", "LoadImageMask",
          "SetLatentNoiseMask", "ControlNetLoader", "ControlNetApplyAdvanced", "ControlNetApplySD3", "Canny",
          "ImageScale", "PreviewImage")
PRIMITIVES = ("PrimitiveInt", "PrimitiveFloat", "PrimitiveString", "PrimitiveStringMultiline", "PrimitiveBoolean")
NODES = CLASSIC + NATIVE + PRIMITIVES
# What to use instead, for nodes users reach for that edgegen does not run (one line each).
INSTEAD = {
    "FluxKVCache": "the FLUX.2 Klein KV-cache variant is not in edgegen yet; the same edit runs without it",
    "UpscaleModelLoader": "upscalers are not in edgegen yet; save the image and upscale it outside",
    "ImageUpscaleWithModel": "upscalers are not in edgegen yet; save the image and upscale it outside",
    "VAEEncodeForInpaint": "FLUX.2 Klein inpainting: VAEEncode -> SetLatentNoiseMask (with LoadImage's MASK or "
                           "LoadImageMask) into the sampler's latent_image",
    "KSamplerAdvanced": "use KSampler, or SamplerCustomAdvanced with RandomNoise / CFGGuider / Flux2Scheduler",
    "FluxGuidance": "FLUX.2 Klein has no guidance embedding; use CFGGuider's cfg",
    "TextEncodeQwenImageEditPlus": "Qwen-Image is not an edgegen family",
    "Flux3LayoutPrompt": "FLUX.3 Klein is not an edgegen family yet",
    "CreateBoundingBoxes": "FLUX.3 Klein's layout boxes: FLUX.3 is not an edgegen family yet",
    "ReferenceMultiLatent": "FLUX.3 Klein is not an edgegen family yet; FLUX.2 Klein edits with ReferenceLatent",
    "TextGenerate": "edgegen runs no prompt upsampler (a local one may come with FLUX.3 Klein)",
    "BasicScheduler": "FLUX.2 Klein: Flux2Scheduler; SD3.5: KSampler",
    "ControlNetApply": "use ControlNetApplyAdvanced (positive and negative, with start/end percent)",
    "DiffControlNetLoader": "use ControlNetLoader: a bundle's ControlNets are exported with it (export --controlnet)",
    "SetUnionControlNetType": "union ControlNets are not supported: SD3.5's canny, depth and blur nets are single-type",
}
FAMILY_CLIP = {"flux2-klein": "flux2", "sd3.5": "sd3"}  # family -> ComfyUI CLIPLoader type
RES = 16384


class Bad(Exception):
    """One input of one node is wrong; collected into node_errors."""

    def __init__(self, node: str, message: str, details: str = "", type_: str = "value_not_valid",
                 input_name: str | None = None):
        super().__init__(message)
        self.node, self.message, self.details, self.type = node, message, details, type_
        self.input_name = input_name


# ----- what the nodes stand for -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Bundle:
    node: str  # the loader node
    name: str  # as the graph names it
    path: Path
    manifest: dict = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class Model:
    bundle: Bundle
    loras: tuple = ()  # LoraLoader nodes, outermost last


@dataclass(frozen=True)
class Clip:
    bundle: Bundle
    loras: tuple = ()


@dataclass(frozen=True)
class Vae:
    bundle: Bundle


@dataclass(frozen=True)
class Picture:
    """An input image: a file in the input folder, maybe scaled (ComfyUI's ImageScaleToTotalPixels)."""

    node: str
    path: str
    size: tuple[int, int]  # after scaling
    scale: tuple | None = None  # (method, width, height[, crop]): ImageScaleToTotalPixels, ImageScale
    canny: tuple | None = None  # (low, high): ComfyUI's Canny node, after the scale


@dataclass(frozen=True)
class ControlNetChoice:
    """ControlNetLoader: a name the model's bundle resolves to one of its nets (manifest controlnets)."""

    node: str
    name: str  # as the graph names it
    target: str  # after the site's aliases


@dataclass(frozen=True)
class Control:
    """ControlNetApplyAdvanced / ControlNetApplySD3 on a conditioning: one control image for one net."""

    node: str
    net: ControlNetChoice
    picture: Picture
    strength: float
    start: float
    end: float
    vae: object = None


@dataclass(frozen=True)
class Cond:
    node: str
    clip: Clip
    text: str | None  # None: zeroed out (ConditioningZeroOut)
    refs: tuple = ()  # Encoded latents, in the order ReferenceLatent added them
    controls: tuple = ()  # Control, in the order the apply nodes added them


@dataclass(frozen=True)
class Empty:
    node: str
    width: int
    height: int
    batch: int
    computed: bool = False  # the size came from another node (GetImageSize): floored as ComfyUI's latent is


@dataclass(frozen=True)
class Encoded:
    node: str
    picture: Picture
    vae: Vae


@dataclass(frozen=True)
class Mask:
    """An inpainting mask read from an input-folder image: ComfyUI's LoadImage MASK (1 - alpha) or LoadImageMask's
    channel ("alpha" inverted, as ComfyUI does, or "red" / "green" / "blue"); 1 repaints."""

    node: str
    path: str
    channel: str = "alpha"


@dataclass(frozen=True)
class Masked:
    """SetLatentNoiseMask: an encoded image with the mask the sampler repaints (FLUX.2 Klein inpainting)."""

    node: str
    encoded: Encoded
    mask: Mask


@dataclass(frozen=True)
class Noise:
    node: str
    seed: int


@dataclass(frozen=True)
class SamplerChoice:
    node: str
    name: str


@dataclass(frozen=True)
class Sigmas:
    node: str
    steps: int
    width: int
    height: int


@dataclass(frozen=True)
class Guider:
    node: str
    model: Model
    positive: Cond
    negative: Cond | None
    cfg: float


@dataclass(frozen=True)
class Sampled:
    node: str
    model: Model
    positive: Cond
    negative: Cond | None
    latent: object  # Empty or Encoded
    seed: int
    steps: int
    cfg: float
    denoise: float = 1.0
    sigmas: Sigmas | None = None


@dataclass(frozen=True)
class Decoded:
    node: str
    sampled: Sampled
    vae: Vae


TYPE_NAMES = {Model: "MODEL", Clip: "CLIP", Vae: "VAE", Picture: "IMAGE", Cond: "CONDITIONING",
              ControlNetChoice: "CONTROL_NET",
              Empty: "LATENT", Encoded: "LATENT", Sampled: "LATENT", Mask: "MASK", Masked: "LATENT", Noise: "NOISE", SamplerChoice: "SAMPLER",
              Sigmas: "SIGMAS", Guider: "GUIDER", Decoded: "IMAGE"}


def is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


class Evaluator:
    """Values of nodes' outputs, computed on demand from the outputs back, each node once."""

    def __init__(self, graph: dict, bundles: BundleIndex, input_dir: Path, aliases: dict | None = None):
        self.graph, self.bundles, self.input_dir = graph, bundles, Path(input_dir)
        self.aliases = aliases or {}
        self.notes: list[str] = []
        self._memo: dict = {}
        self._active: set = set()

    # ----- inputs ---------------------------------------------------------------------------------------
    def kind(self, node) -> str:
        return self.graph[node]["class_type"]

    def inputs(self, node) -> dict:
        return self.graph[node].get("inputs", {}) or {}

    def output(self, node: str, slot: int):
        if node not in self._memo:
            if node in self._active:
                raise Bad(node, "The graph's links form a cycle", f"node {node} ({self.kind(node)}) feeds itself",
                          "bad_linked_input")
            self._active.add(node)
            try:
                handler = HANDLERS.get(self.kind(node))
                if handler is None:
                    raise Bad(node, f"Node type {self.kind(node)} is not supported by edgegen", unsupported_hint(
                        self.kind(node)), "unsupported_node")
                self._memo[node] = handler(self, node)
            finally:
                self._active.discard(node)
        outs = self._memo[node]
        if not 0 <= slot < len(outs):
            raise Bad(node, f"{self.kind(node)} has no output {slot}", f"it has {len(outs)}", "bad_linked_input")
        return outs[slot]

    def arg(self, node, name, want, default=..., required=True):
        """Input `name`: a literal or the value of the output it links to, checked against `want` (a Python
        type for widget values, or value classes for links)."""
        inputs = self.inputs(node)
        if name not in inputs or inputs[name] is None:
            if default is ... and required:
                raise Bad(node, f"Required input is missing: {name}", f"{self.kind(node)}.{name}",
                          "required_input_missing", name)
            return None if default is ... else default
        v = inputs[name]
        linked = is_link(v)
        if linked:
            src = str(v[0])
            if src not in self.graph:
                raise Bad(node, f"Input {name} links to node {src}, which is not in the graph", "",
                          "bad_linked_input", name)
            v = self.output(src, v[1])
        wants = want if isinstance(want, tuple) else (want,)
        if all(isinstance(w, type) and w in TYPE_NAMES for w in wants):
            if not linked:
                names = " or ".join(sorted({TYPE_NAMES[w] for w in wants}))
                raise Bad(node, f"Input {name} must link to a node's {names} output", f"got {v!r}",
                          "invalid_input_type", name)
            if not isinstance(v, wants):
                names = " or ".join(sorted({TYPE_NAMES[w] for w in wants}))
                raise Bad(node, f"Input {name} must come from a {names} output",
                          f"it comes from node {src} ({self.kind(src)}, {TYPE_NAMES.get(type(v), type(v).__name__)})",
                          "bad_linked_input", name)
            return v
        return self._literal(node, name, v, wants[0])

    def _literal(self, node, name, v, kind):
        try:
            if kind is int:
                if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                    raise ValueError
                return int(v)
            if kind is float:
                f = float(v)
                if isinstance(v, bool) or not math.isfinite(f):
                    raise ValueError
                return f
            if kind is str and isinstance(v, str):
                return v
        except (TypeError, ValueError):
            pass
        raise Bad(node, f"Input {name} must be {kind.__name__}", f"got {v!r}", "invalid_input_type", name)

    def computed(self, node, name) -> bool:
        return is_link(self.inputs(node).get(name))

    # ----- bundles ----------------------------------------------------------------------------------------
    def bundle(self, node, name_input: str) -> Bundle:
        name = self.arg(node, name_input, str)
        target = self.aliases.get(name, name)
        path = self.bundles.find(target)
        if path is None:
            known = ", ".join(self.bundles.names()) or "none found"
            alias = f"; aliased names: {', '.join(sorted(self.aliases))}" if self.aliases else ""
            raise Bad(node, f"Bundle {name!r} is not served here",
                      f"available: {known}{alias}; start the server with --bundle DIR to add one, or "
                      f"--alias {name}=BUNDLE to map this name onto one", type_="value_not_in_list",
                      input_name=name_input)  # ComfyUI's type for a name not in the loader's choices
        return Bundle(node, name, path, self.bundles.manifest(path))


def unsupported_hint(kind: str) -> str:
    hint = INSTEAD.get(kind)
    base = "edgegen runs ComfyUI's FLUX.2 Klein and SD3.5 node sets (docs/api/README.md)"
    return f"{hint}; {base}" if hint else f"{base}, or the compact EdgegenGenerate node; remove or replace it"


# ----- node handlers: each returns the node's outputs ---------------------------------------------------------

def _checkpoint(ev: Evaluator, node):
    b = ev.bundle(node, "ckpt_name")
    return Model(b), Clip(b), Vae(b)


def _unet(ev: Evaluator, node):
    b = ev.bundle(node, "unet_name")
    dtype = ev.arg(node, "weight_dtype", str, default="default")
    if dtype != "default":
        ev.notes.append(f"UNETLoader weight_dtype '{dtype}' ignored: the bundle runs at its own precision "
                        f"({b.manifest.get('precision', '?')})")
    return (Model(b),)


def _clip_loader(ev: Evaluator, node):
    b = ev.bundle(node, "clip_name")
    kind = ev.arg(node, "type", str, default=None, required=False)
    want = FAMILY_CLIP.get(b.manifest.get("family"))
    if kind is not None and want and kind != want:
        raise Bad(node, f"CLIPLoader type {kind!r} does not match bundle {b.name} ({b.manifest.get('family')})",
                  f"use type {want!r}", input_name="type")
    return (Clip(b),)


def _vae_loader(ev: Evaluator, node):
    return (Vae(ev.bundle(node, "vae_name")),)


def _lora(ev: Evaluator, node):
    model = ev.arg(node, "model", Model)
    out = [Model(model.bundle, (*model.loras, node))]
    if ev.kind(node) == "LoraLoader":
        clip = ev.arg(node, "clip", Clip, default=None, required=False)
        out.append(Clip(clip.bundle, (*clip.loras, node)) if clip else Clip(model.bundle, (node,)))
    return tuple(out)


def _text(ev: Evaluator, node):
    clip = ev.arg(node, "clip", Clip)
    return (Cond(node, clip, ev.arg(node, "text", str)),)


def _zero(ev: Evaluator, node):
    return (replace(ev.arg(node, "conditioning", Cond), text=None),)


def _reference(ev: Evaluator, node):
    cond = ev.arg(node, "conditioning", Cond)
    latent = ev.arg(node, "latent", (Encoded, Empty, Sampled), default=None, required=False)
    if latent is None:
        return (cond,)
    if not isinstance(latent, Encoded):
        raise Bad(node, "ReferenceLatent's latent must be a VAEEncode of an input image",
                  "edgegen references are images: LoadImage -> VAEEncode -> ReferenceLatent", "bad_linked_input",
                  "latent")
    return (replace(cond, refs=(*cond.refs, latent)),)


def _load_image(ev: Evaluator, node):
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = ev.arg(node, "image", str)
    clean = name.removesuffix(" [input]").strip()
    if clean.endswith("]"):
        raise Bad(node, f"LoadImage {name!r}: only the input folder is read", "upload it with POST /upload/image",
                  input_name="image")
    try:
        path = confined(ev.input_dir, clean)
    except PathRefused as e:
        raise Bad(node, f"Image {name!r} is not a name inside the input folder", str(e), input_name="image") from None
    if not path.is_file():
        raise Bad(node, f"Image {name} was not uploaded", "upload it first with POST /upload/image (or put it in "
                  "the server's input folder) and use the name it returns", input_name="image")
    try:
        with Image.open(path) as im:
            size = ImageOps.exif_transpose(im).size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise Bad(node, f"Image {name} is not an image PIL can read", "upload a PNG, JPEG or WebP",
                  input_name="image") from None
    return Picture(node, str(path), size), Mask(node, str(path))


MASK_CHANNELS = ("alpha", "red", "green", "blue")


def _load_image_mask(ev: Evaluator, node):
    pic, _ = _load_image(ev, node)
    channel = ev.arg(node, "channel", str, default="alpha")
    if channel not in MASK_CHANNELS:
        raise Bad(node, f"channel {channel!r} is not one of {', '.join(MASK_CHANNELS)}", input_name="channel")
    return (Mask(node, pic.path, channel),)


def _noise_mask(ev: Evaluator, node):
    latent = ev.arg(node, "samples", (Encoded, Empty, Sampled, Masked))
    if not isinstance(latent, Encoded):
        raise Bad(node, "SetLatentNoiseMask's samples must be a VAEEncode of an input image",
                  "FLUX.2 Klein inpaints an image: LoadImage -> VAEEncode -> SetLatentNoiseMask", "bad_linked_input",
                  "samples")
    return (Masked(node, latent, ev.arg(node, "mask", Mask)),)


def scaled_size(size: tuple[int, int], megapixels: float, steps: int) -> tuple[int, int]:
    """ComfyUI's ImageScaleToTotalPixels: the area scaled to megapixels * 1024², each side rounded to `steps`."""
    w, h = size
    scale = math.sqrt(megapixels * 1024 * 1024 / (w * h))
    return round(w * scale / steps) * steps, round(h * scale / steps) * steps


def _scale_total(ev: Evaluator, node):
    from app.server.nodes import UPSCALE_METHODS

    pic = ev.arg(node, "image", Picture)
    method = ev.arg(node, "upscale_method", str)
    if method not in UPSCALE_METHODS:
        raise Bad(node, f"upscale_method {method!r} is not one of {', '.join(UPSCALE_METHODS)}",
                  input_name="upscale_method")
    mp = ev.arg(node, "megapixels", float)
    steps = ev.arg(node, "resolution_steps", int, default=1)
    if not 0.01 <= mp <= 16 or not 1 <= steps <= 256:
        raise Bad(node, "megapixels must be 0.01-16 and resolution_steps 1-256", f"got {mp:g} and {steps}")
    w, h = scaled_size(pic.size, mp, steps)
    if w < 1 or h < 1:
        raise Bad(node, f"The image scales to {w}x{h}", "use more megapixels")
    return (replace(pic, node=node, size=(w, h), scale=(method, w, h)),)


def _image_scale(ev: Evaluator, node):
    from app.server.nodes import UPSCALE_METHODS

    pic = ev.arg(node, "image", Picture)
    if pic.canny is not None:
        raise Bad(node, "ImageScale after Canny is not supported", "scale the image first, then Canny (as ComfyUI's "
                  "SD3.5 canny template does)", "bad_linked_input", "image")
    method = ev.arg(node, "upscale_method", str)
    if method not in UPSCALE_METHODS:
        raise Bad(node, f"upscale_method {method!r} is not one of {', '.join(UPSCALE_METHODS)}",
                  input_name="upscale_method")
    w, h = ev.arg(node, "width", int), ev.arg(node, "height", int)
    crop = ev.arg(node, "crop", str, default="disabled")
    if crop not in ("disabled", "center"):
        raise Bad(node, f"crop {crop!r} is not disabled or center", input_name="crop")
    if w == 0 and h == 0:
        return (pic,)
    ow, oh = pic.size
    w, h = w or max(1, round(ow * h / oh)), h or max(1, round(oh * w / ow))  # ComfyUI: 0 keeps the aspect
    if not (1 <= w <= RES and 1 <= h <= RES):
        raise Bad(node, f"ImageScale to {w}x{h} is outside 1-{RES} px", input_name="width")
    return (replace(pic, node=node, size=(w, h), scale=(method, w, h, crop)),)


def _canny(ev: Evaluator, node):
    pic = ev.arg(node, "image", Picture)
    low, high = ev.arg(node, "low_threshold", float, default=0.4), ev.arg(node, "high_threshold", float, default=0.8)
    if not 0.01 <= low <= high <= 0.99:
        raise Bad(node, f"Canny thresholds {low:g} / {high:g} must satisfy 0.01 <= low <= high <= 0.99",
                  input_name="low_threshold")
    return (replace(pic, node=node, canny=(low, high)),)


def _controlnet_loader(ev: Evaluator, node):
    name = ev.arg(node, "control_net_name", str)
    return (ControlNetChoice(node, name, ev.aliases.get(name, name)),)


def _controlnet_apply(ev: Evaluator, node):
    positive, negative = ev.arg(node, "positive", Cond), ev.arg(node, "negative", Cond)
    net = ev.arg(node, "control_net", ControlNetChoice)
    pic = ev.arg(node, "image", (Picture, Decoded))
    if isinstance(pic, Decoded):
        raise Bad(node, "A generated image as the control image is not supported", "save it, then LoadImage it",
                  "bad_linked_input", "image")
    strength = ev.arg(node, "strength", float, default=1.0)
    start, end = ev.arg(node, "start_percent", float, default=0.0), ev.arg(node, "end_percent", float, default=1.0)
    vae = ev.arg(node, "vae", Vae, default=None, required=False)
    from app.runtime.controls import MAX_SCALE

    if not 0.0 <= strength <= MAX_SCALE:
        raise Bad(node, f"strength {strength:g} must be between 0 and {MAX_SCALE:g}", input_name="strength")
    if not 0.0 <= start < end <= 1.0:
        raise Bad(node, f"start_percent {start:g} / end_percent {end:g} must satisfy 0 <= start < end <= 1",
                  "edgegen applies the window as diffusers' control_guidance_start/end (fractions of the steps)",
                  input_name="start_percent")
    c = Control(node, net, pic, strength, start, end, vae)
    if strength == 0.0:  # ComfyUI passes the conditioning through unchanged
        return positive, negative
    return replace(positive, controls=(*positive.controls, c)), replace(negative, controls=(*negative.controls, c))


def _image_size(ev: Evaluator, node):
    pic = ev.arg(node, "image", Picture)
    return pic.size[0], pic.size[1], 1


def _vae_encode(ev: Evaluator, node):
    pic = ev.arg(node, "pixels", (Picture, Decoded))
    if isinstance(pic, Decoded):
        raise Bad(node, "VAEEncode of a generated image is not supported", "save it, then LoadImage it",
                  "bad_linked_input", "pixels")
    if pic.canny is not None:
        raise Bad(node, "VAEEncode of a Canny edge map is not supported", "Canny's image feeds "
                  "ControlNetApplyAdvanced (an SD3.5 ControlNet's control image)", "bad_linked_input", "pixels")
    return (Encoded(node, pic, ev.arg(node, "vae", Vae)),)


def _empty(ev: Evaluator, node):
    w, h = ev.arg(node, "width", int), ev.arg(node, "height", int)
    batch = ev.arg(node, "batch_size", int, default=1)
    return (Empty(node, w, h, batch, ev.computed(node, "width") or ev.computed(node, "height")),)


def _noise(ev: Evaluator, node):
    return (Noise(node, ev.arg(node, "noise_seed", int)),)


def _check_sampler(node, name, input_name="sampler_name"):
    from app.server.nodes import SAMPLERS

    if name not in SAMPLERS:
        raise Bad(node, f"Sampler {name!r} is not available in edgegen",
                  "edgegen bundles run the flow-matching Euler sampler of diffusers' pipelines: use 'euler'",
                  input_name=input_name)


def _sampler_select(ev: Evaluator, node):
    name = ev.arg(node, "sampler_name", str)
    _check_sampler(node, name)
    return (SamplerChoice(node, name),)


def _flux2_scheduler(ev: Evaluator, node):
    return (Sigmas(node, ev.arg(node, "steps", int), ev.arg(node, "width", int), ev.arg(node, "height", int)),)


def _cfg_guider(ev: Evaluator, node):
    return (Guider(node, ev.arg(node, "model", Model), ev.arg(node, "positive", Cond),
                   ev.arg(node, "negative", Cond), ev.arg(node, "cfg", float)),)


def _basic_guider(ev: Evaluator, node):
    return (Guider(node, ev.arg(node, "model", Model), ev.arg(node, "conditioning", Cond), None, 1.0),)


def _custom_advanced(ev: Evaluator, node):
    noise = ev.arg(node, "noise", Noise)
    guider = ev.arg(node, "guider", Guider)
    ev.arg(node, "sampler", SamplerChoice)
    sigmas = ev.arg(node, "sigmas", Sigmas)
    latent = ev.arg(node, "latent_image", (Empty, Encoded, Sampled, Masked))
    s = Sampled(node, guider.model, guider.positive, guider.negative, latent, noise.seed, sigmas.steps, guider.cfg,
                sigmas=sigmas)
    return s, replace(s, node=f"{node}#denoised")


def _ksampler(ev: Evaluator, node):
    from app.server.nodes import SCHEDULERS

    name = ev.arg(node, "sampler_name", str, default="euler")
    _check_sampler(node, name)
    sched = ev.arg(node, "scheduler", str, default="simple")
    if sched not in SCHEDULERS:
        raise Bad(node, f"Scheduler {sched!r} is not one of {', '.join(SCHEDULERS)}", input_name="scheduler")
    if sched != "simple":
        ev.notes.append(f"KSampler scheduler '{sched}' runs as the bundle's own flow-matching schedule "
                        "(as edgegen generate)")
    s = Sampled(node, ev.arg(node, "model", Model), ev.arg(node, "positive", Cond), ev.arg(node, "negative", Cond),
                ev.arg(node, "latent_image", (Empty, Encoded, Sampled, Masked)), ev.arg(node, "seed", int),
                ev.arg(node, "steps", int), ev.arg(node, "cfg", float), ev.arg(node, "denoise", float, default=1.0))
    return (s,)


def _decode(ev: Evaluator, node):
    return (Decoded(node, ev.arg(node, "samples", Sampled), ev.arg(node, "vae", Vae)),)


def _primitive(ev: Evaluator, node):
    kind = {"PrimitiveInt": int, "PrimitiveFloat": float}.get(ev.kind(node), str)
    if ev.kind(node) == "PrimitiveBoolean":
        v = ev.inputs(node).get("value")
        if not isinstance(v, bool):
            raise Bad(node, "Input value must be a boolean", f"got {v!r}", "invalid_input_type", "value")
        return (v,)
    return (ev.arg(node, "value", kind),)


def _save(ev: Evaluator, node):
    return ()


HANDLERS = {
    "CheckpointLoaderSimple": _checkpoint, "UNETLoader": _unet, "CLIPLoader": _clip_loader,
    "VAELoader": _vae_loader, "LoraLoader": _lora, "LoraLoaderModelOnly": _lora, "CLIPTextEncode": _text,
    "ConditioningZeroOut": _zero, "ReferenceLatent": _reference, "LoadImage": _load_image,
    "ImageScaleToTotalPixels": _scale_total, "GetImageSize": _image_size, "VAEEncode": _vae_encode,
    "EmptyLatentImage": _empty, "EmptySD3LatentImage": _empty, "EmptyFlux2LatentImage": _empty,
    "RandomNoise": _noise, "KSamplerSelect": _sampler_select, "Flux2Scheduler": _flux2_scheduler,
    "CFGGuider": _cfg_guider, "BasicGuider": _basic_guider, "SamplerCustomAdvanced": _custom_advanced,
    "KSampler": _ksampler, "VAEDecode": _decode, "SaveImage": _save, "LoadImageMask": _load_image_mask,
    "SetLatentNoiseMask": _noise_mask, "ImageScale": _image_scale, "Canny": _canny, "PreviewImage": _save,
    "ControlNetLoader": _controlnet_loader, "ControlNetApplyAdvanced": _controlnet_apply,
    "ControlNetApplySD3": _controlnet_apply,
    **{p: _primitive for p in PRIMITIVES},
}
