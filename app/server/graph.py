"""Turn a ComfyUI API-format workflow graph into generation tasks, or into ComfyUI-shaped node_errors.

Two graph kinds are accepted:
- ComfyUI's own node sets, as "Save (API format)" writes them (a UI-format workflow is converted first,
  app/server/workflow.py): the classic CheckpointLoaderSimple -> KSampler graph and FLUX.2 Klein's
  custom-sampling and reference-editing graphs, evaluated by app/server/comfy.py. LoraLoader /
  LoraLoaderModelOnly take lora_name from the site LoRA library, per request, for a bundle exported with
  --runtime-lora (docs/LORA.md), or the LoRA fused into the bundle at export;
- the compact `EdgegenGenerate` node with the fields of `edgegen generate`.
Every other node type is refused by name, with what to use instead, so a client learns up front what will
not run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from app.server.bundles import BundleIndex
from app.server.comfy import NODES, unsupported_hint
from app.server.comfy import Bad as ComfyBad
from app.server.security import PathRefused, confined

# ComfyUI's node types we understand, and what each needs.
SUPPORTED = (*NODES, "EdgegenGenerate")
LORA_NODES = ("LoraLoader", "LoraLoaderModelOnly")
OUTPUT_TYPES = ("SaveImage", "EdgegenGenerate")
MAX_COUNT = 64  # images per output node; a catalogue fans out over prompts, not one giant batch
DEFAULT_PREFIX = "edgegen"


class GraphError(Exception):
    """An invalid graph: `body()` is ComfyUI's 400 payload {"error": {...}, "node_errors": {...}}."""

    def __init__(self, type_: str, message: str, details: str = "", node_errors: dict | None = None):
        super().__init__(message if not details else f"{message}: {details}")
        self.error = {"type": type_, "message": message, "details": details, "extra_info": {}}
        self.node_errors = node_errors or {}

    def body(self) -> dict:
        return {"error": self.error, "node_errors": self.node_errors}


@dataclass(frozen=True)
class Task:
    """One output node's work: N requests drawn with one loaded bundle, saved as `<prefix>_<job>_<i>.png`."""

    node: str  # the output node (SaveImage / EdgegenGenerate): `executed` and history outputs are keyed by it
    sampler_node: str  # reported in `progress` / `executing`
    bundle_dir: str
    requests: tuple[dict, ...]  # GenerationRequest fields, JSON-able
    filename_prefix: str = DEFAULT_PREFIX
    references: tuple[str, ...] = ()  # absolute paths of uploaded reference images
    # per reference: None, or [method, width, height] to scale it to first (ComfyUI's ImageScaleToTotalPixels)
    reference_scales: tuple = ()
    # FLUX.2 Klein inpainting (SetLatentNoiseMask): [image path, channel] the worker turns into a mask file
    mask: tuple | None = None
    # SD3.5 ControlNet: [net, image path, scale or None ([method, w, h, crop]), canny or None ([low, high]),
    # strength, start, end] each; the worker prepares the image as ComfyUI does (app/server/worker.py)
    controls: tuple = ()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Task:
        return cls(node=d["node"], sampler_node=d["sampler_node"], bundle_dir=d["bundle_dir"],
                   requests=tuple(d["requests"]), filename_prefix=d["filename_prefix"],
                   references=tuple(d.get("references", ())),
                   reference_scales=tuple(d.get("reference_scales", ())),
                   mask=tuple(d["mask"]) if d.get("mask") else None,
                   controls=tuple(tuple(c) for c in d.get("controls", ())))


@dataclass(frozen=True)
class Plan:
    tasks: tuple[Task, ...]
    notes: tuple[str, ...] = ()  # inputs accepted but ignored (sampler names, ...), reported in history messages

    @property
    def images(self) -> int:
        return sum(len(t.requests) for t in self.tasks)

    def to_json(self) -> str:
        return json.dumps({"tasks": [t.to_json() for t in self.tasks], "notes": list(self.notes)})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        return cls(tuple(Task.from_json(t) for t in d["tasks"]), tuple(d.get("notes", ())))


def request_fields() -> frozenset[str]:
    """GenerationRequest's fields in this runtime (reference images need a field for them)."""
    from app.runtime.pipelines import GenerationRequest

    return frozenset(f.name for f in dataclasses.fields(GenerationRequest))


@dataclass
class _Errors:
    by_node: dict = field(default_factory=dict)

    def add(self, graph: dict, node: str, type_: str, message: str, details: str = "", output: str | None = None,
            input_name: str | None = None):
        entry = self.by_node.setdefault(str(node), {
            "errors": [], "dependent_outputs": [],
            "class_type": (graph.get(node) or {}).get("class_type") if isinstance(graph.get(node), dict) else None,
        })
        extra = {"input_name": input_name} if input_name else {}
        if input_name and type_ != "required_input_missing":  # ComfyUI's extra_info for a value it refuses
            spec = graph.get(node) if isinstance(graph.get(node), dict) else {}
            extra.update(received_value=(spec.get("inputs") or {}).get(input_name),
                         input_config=_input_config(spec.get("class_type"), input_name))
            if type_ == "invalid_input_type":
                extra["exception_message"] = details
        entry["errors"].append({"type": type_, "message": message, "details": details, "extra_info": extra})
        if output is not None and output not in entry["dependent_outputs"]:
            entry["dependent_outputs"].append(output)


def _input_config(kind, name):
    from app.server.nodes import object_info

    spec = object_info([], []).get(kind) or {}
    return next((sec[name] for sec in spec.get("input", {}).values() if name in sec), None)


class _Bad(Exception):
    """One input of one node is wrong; collected into node_errors."""

    def __init__(self, node: str, message: str, details: str = "", type_: str = "value_not_valid",
                 input_name: str | None = None):
        super().__init__(message)
        self.node, self.message, self.details, self.type = node, message, details, type_
        self.input_name = input_name


def parse_prompt(graph: object, bundles: BundleIndex, input_dir: Path, aliases: dict | None = None) -> Plan:
    """Validate `graph` (the "prompt" member of POST /prompt) and plan its tasks; GraphError when invalid."""
    if graph is None:
        raise GraphError("no_prompt", "No prompt provided",
                         'expected {"prompt": {node_id: {"class_type": ..., "inputs": {...}}}}')
    if not isinstance(graph, dict):
        raise GraphError("invalid_prompt", "Invalid prompt",
                         'expected {"prompt": {node_id: {"class_type": ..., "inputs": {...}}}}')
    if not graph:
        raise GraphError("prompt_no_outputs", "Prompt has no outputs", "add a SaveImage node (or use the "
                         "EdgegenGenerate node)")
    errors = _Errors()
    for node, spec in graph.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("class_type"), str):
            errors.add(graph, node, "invalid_node", "Node is not {class_type, inputs}",
                       f"node {node} needs a string class_type and an inputs object")
        elif spec["class_type"] not in SUPPORTED:
            errors.add(graph, node, "unsupported_node", f"Node type {spec['class_type']} is not supported by edgegen",
                       unsupported_hint(spec["class_type"]))
        elif not isinstance(spec.get("inputs", {}), dict):
            errors.add(graph, node, "invalid_node", "Node inputs must be an object", f"node {node}")
    if errors.by_node:
        unsupported = [(n, e["class_type"]) for n, e in errors.by_node.items()
                       if any(x["type"] == "unsupported_node" for x in e["errors"])]
        if unsupported:  # ComfyUI's answer for a node type it lacks: invalid_prompt naming the first one
            node, kind = unsupported[0]
            raise GraphError("invalid_prompt", f"Cannot execute because node {kind} is not supported by edgegen.",
                             f"Node ID '#{node}'; " + unsupported_hint(kind), node_errors=errors.by_node)
        raise GraphError("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                         node_errors=errors.by_node)
    outputs = [n for n, s in graph.items() if s["class_type"] in OUTPUT_TYPES]
    if not outputs:
        raise GraphError("prompt_no_outputs", "Prompt has no outputs",
                         "add a SaveImage node (or use the EdgegenGenerate node)")
    tasks, notes = [], []
    for n in sorted((n for n, s in graph.items() if s["class_type"] == "PreviewImage"), key=_node_order):
        notes.append(f"PreviewImage (node {n}) is not drawn: edgegen returns the images SaveImage saves")
    for out in sorted(outputs, key=_node_order):
        try:
            if graph[out]["class_type"] == "EdgegenGenerate":
                tasks.append(_compact(graph, out, bundles, input_dir))
            else:
                task, more = _comfy(graph, out, bundles, input_dir, aliases or {})
                tasks.append(task)
                notes += [n for n in more if n not in notes]
        except (_Bad, ComfyBad) as b:
            errors.add(graph, b.node, b.type, b.message, b.details, output=out, input_name=b.input_name)
    if errors.by_node:
        raise GraphError("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                         node_errors=errors.by_node)
    return Plan(tuple(tasks), tuple(notes))


def _node_order(node: str):
    return (0, int(node), "") if str(node).isdigit() else (1, 0, str(node))


# ----- input readers ----------------------------------------------------------------------------------------

def _inputs(graph: dict, node: str) -> dict:
    return graph[node].get("inputs", {}) or {}


def _value(graph, node, name, kind, default=None, required=True):
    inputs = _inputs(graph, node)
    if name not in inputs:
        if required and default is None:
            raise _Bad(node, f"Required input is missing: {name}", f"{graph[node]['class_type']}.{name}",
                       "required_input_missing")
        return default
    v = inputs[name]
    if _is_link(v):
        raise _Bad(node, f"Input {name} must be a value, not a link to another node",
                   f"{graph[node]['class_type']}.{name} = {v}; edgegen evaluates only the supported nodes")
    try:
        if kind is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            return int(v)
        if kind is float:
            f = float(v)
            if not math.isfinite(f):
                raise ValueError
            return f
        if kind is str:
            if not isinstance(v, str):
                raise ValueError
            return v
    except (TypeError, ValueError):
        pass
    else:
        return v
    raise _Bad(node, f"Input {name} must be {kind.__name__}", f"got {v!r}", "invalid_input_type")


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], (str, int)) and isinstance(v[1], int)


def _link(graph, node, name, want: tuple[str, ...]) -> tuple[str, int]:
    inputs = _inputs(graph, node)
    v = inputs.get(name)
    if not _is_link(v):
        raise _Bad(node, f"Input {name} must link to a {' or '.join(want)} node", f"got {v!r}",
                   "required_input_missing" if v is None else "invalid_input_type")
    src = str(v[0])
    if src not in graph:
        raise _Bad(node, f"Input {name} links to node {src}, which is not in the graph", "", "bad_linked_input")
    if graph[src]["class_type"] not in want:
        raise _Bad(node, f"Input {name} must come from {' or '.join(want)}",
                   f"it comes from node {src} ({graph[src]['class_type']})", "bad_linked_input")
    return src, v[1]


# ----- ComfyUI's node sets (app/server/comfy.py evaluates them) ----------------------------------------------

def _comfy(graph: dict, save: str, bundles: BundleIndex, input_dir: Path, aliases: dict) -> tuple[Task, list[str]]:
    from app.server.comfy import Bad, Decoded, Empty, Encoded, Evaluator, Masked

    ev = Evaluator(graph, bundles, input_dir, aliases)
    prefix = _prefix(graph, save)
    try:
        dec = ev.arg(save, "images", Decoded)
    except Bad as b:
        raise _Bad(b.node, b.message, b.details, b.type, b.input_name) from None
    s = dec.sampled
    bundle = s.model.bundle
    manifest, family = bundle.manifest, bundle.manifest.get("family")

    def same_bundle(node, what, other):
        if other.path != bundle.path:
            raise _Bad(node, f"{what} must come from the same bundle as the model",
                       f"it loads {other.name} ({other.node}), the model {bundle.name} ({bundle.node}); edgegen "
                       "bundles carry their own text encoders and VAE")

    same_bundle(dec.node, "VAEDecode's vae", dec.vae.bundle)
    conds = [c for c in (s.positive, s.negative) if c is not None]
    for c in conds:
        same_bundle(c.node, "The text encoder (clip)", c.clip.bundle)
        for lora_node in c.clip.loras:
            _check_lora(graph, lora_node, bundle.name, manifest)
    if s.positive.text is None:
        raise _Bad(s.positive.node, "The positive conditioning is zeroed out", "link a CLIPTextEncode to positive")
    guided = abs(s.cfg - 1.0) > 1e-6
    negative, zero_negative = "", False
    if s.negative is not None and guided:
        if s.negative.text is None and family != "sd3.5":
            raise _Bad(s.negative.node, f"ConditioningZeroOut as the negative with cfg {s.cfg:g} is not supported "
                       f"for {family}", "FLUX.2 Klein's CFG uses the empty prompt (diffusers' default): use "
                       "CLIPTextEncode with empty text as the negative, or cfg 1")
        zero_negative = s.negative.text is None  # SD3.5: zeros, as ComfyUI (generate --zero-negative)
        negative = s.negative.text or ""
        if [r.picture for r in s.negative.refs] != [r.picture for r in s.positive.refs]:
            raise _Bad(s.negative.node, "The negative conditioning must carry the same reference images as the "
                       "positive", "edgegen (as diffusers' Flux2KleinPipeline) conditions both on the same "
                       "references: apply the same ReferenceLatent chain to both")
    refs = [r for r in s.positive.refs]
    for r in refs:
        same_bundle(r.node, "VAEEncode's vae", r.vae.bundle)
    if refs and family != "flux2-klein":
        raise _Bad(refs[0].node, "Reference images (ReferenceLatent) are FLUX.2 Klein's editing",
                   f"bundle {bundle.name} is {family}; for SD3.5 image-to-image feed VAEEncode to KSampler's "
                   "latent_image with denoise < 1")
    if s.sigmas is not None and family != "flux2-klein":
        raise _Bad(s.sigmas.node, "Flux2Scheduler is FLUX.2 Klein's schedule", f"bundle {bundle.name} is {family}: "
                   "use KSampler")
    latent, images, strength, mask = s.latent, [], None, None
    if isinstance(latent, Masked):
        same_bundle(latent.node, "VAEEncode's vae", latent.encoded.vae.bundle)
        if family != "flux2-klein":
            raise _Bad(latent.node, f"Inpainting (SetLatentNoiseMask) is FLUX.2 Klein's; bundle {bundle.name} is "
                       f"{family}", "for SD3.5 feed VAEEncode to KSampler's latent_image with denoise < 1")
        if not 0 < s.denoise <= 1:
            raise _Bad(s.node, f"denoise {s.denoise:g} must be above 0 and at most 1", "it is generate --strength")
        # diffusers' Flux2KleinInpaintPipeline conditions on the image inpainted itself, then the references
        images, strength, mask = [latent.encoded.picture], s.denoise, [latent.mask.path, latent.mask.channel]
        (width, height), count, computed = latent.encoded.picture.size, 1, True
        latent = latent.encoded
    elif isinstance(latent, Empty):
        if graph[latent.node]["class_type"] == "EmptyFlux2LatentImage" and family != "flux2-klein":
            raise _Bad(latent.node, "EmptyFlux2LatentImage is FLUX.2 Klein's", "use EmptySD3LatentImage")
        if s.denoise < 1 - 1e-6:
            raise _Bad(s.node, f"denoise {s.denoise:g} needs an image to start from",
                       "feed LoadImage -> VAEEncode to latent_image (SD3.5 image-to-image), or use denoise 1")
        width, height, count, computed = latent.width, latent.height, latent.batch, latent.computed
    elif isinstance(latent, Encoded):
        same_bundle(latent.node, "VAEEncode's vae", latent.vae.bundle)
        if family != "sd3.5":
            raise _Bad(s.node, f"Image-to-image (an encoded latent_image) is SD3.5's; bundle {bundle.name} is "
                       f"{family}", "FLUX.2 Klein edits with ReferenceLatent and an empty latent")
        if not 0 < s.denoise < 1:
            raise _Bad(s.node, f"denoise {s.denoise:g} on an encoded image must be above 0 and below 1",
                       "it is generate --strength: 1 would redraw the image entirely (use EmptySD3LatentImage)")
        images, strength = [latent.picture], s.denoise
        (width, height), count, computed = latent.picture.size, 1, True
    else:
        raise _Bad(s.node, "A second sampling pass over a sampled latent is not supported",
                   "edgegen draws each image in one pass: sample from an empty or encoded latent")
    mult = (manifest.get("size_range") or {}).get("multiple", 1)
    if computed:  # ComfyUI's latents floor a computed size to the latent grid; generate needs the multiple
        fw, fh = (width // mult) * mult, (height // mult) * mult
        if (fw, fh) != (width, height):
            notes_size = f"size {width}x{height} from the image is drawn at {fw}x{fh} (multiples of {mult})"
            ev.notes.append(notes_size)
        width, height = fw, fh
    if s.sigmas is not None and (s.sigmas.width, s.sigmas.height) != (latent.width, latent.height) \
            and not isinstance(latent, Encoded):
        raise _Bad(s.sigmas.node, f"Flux2Scheduler's size {s.sigmas.width}x{s.sigmas.height} differs from the "
                   f"latent's {latent.width}x{latent.height}", "link both to the same width and height (the "
                   "schedule's shift depends on the image size, as in generate)")
    runtime = [c for c in (_check_lora(graph, n, bundle.name, manifest) for n in reversed(s.model.loras)) if c]
    if len({n for n, _ in runtime}) < len(runtime):
        raise _Bad(s.model.loras[0], "The same LoRA is loaded twice", "load each LoRA once, with the strength you want")
    if runtime:
        _check_runtime_loras(s.model.loras[0], manifest, runtime, bundle.name)
    size_node = latent.node if isinstance(latent, Empty) else s.node
    _check_size(size_node, manifest, width, height)
    seed_node = s.node if graph[s.node.split("#")[0]]["class_type"] == "KSampler" else _seed_node(graph, s)
    _check_seed(seed_node, s.seed)
    _check_count(size_node, count)
    _check_steps(s.sigmas.node if s.sigmas else s.node, s.steps)
    pictures = images + [r.picture for r in refs] if mask else [r.picture for r in refs] + images
    if refs:
        _check_reference_sizes(refs, manifest)
    extra = {"loras": [list(c) for c in runtime]} if runtime else {}
    if strength is not None:
        extra["strength"] = strength
    if zero_negative:
        extra["zero_negative"] = True
    controls = _controls(s, guided, bundle, images, same_bundle)
    if pictures:
        _check_images(refs[0].node if refs else s.node, bundle.path, tuple(p.path for p in pictures), strength,
                      mask is not None)
    reqs = tuple(dict(_request(s.positive.text, negative, s.seed + i, s.steps, s.cfg, width, height), **extra)
                 for i in range(count))
    sampler = s.node.split("#")[0]
    return (Task(save, sampler, str(bundle.path), reqs, prefix, tuple(p.path for p in pictures),
                 tuple(list(p.scale) if p.scale else None for p in pictures), tuple(mask) if mask else None,
                 controls), ev.notes)


def _controls(s, guided: bool, bundle, images, same_bundle) -> tuple:
    """The sampler's ControlNet applications as Task.controls, checked against the model bundle's nets."""
    controls = s.positive.controls
    if guided and s.negative is not None and [c.node for c in s.negative.controls] != [c.node for c in controls]:
        raise _Bad((s.negative.controls or controls)[0].node, "The ControlNet must apply to the positive and the "
                   "negative conditioning alike", "edgegen (as diffusers' StableDiffusion3ControlNetPipeline) runs "
                   "each net on both halves of CFG: feed both through the same ControlNetApplyAdvanced")
    if not controls:
        return ()
    manifest, family = bundle.manifest, bundle.manifest.get("family")
    if family != "sd3.5":
        raise _Bad(controls[0].node, f"ControlNet is SD3.5's; bundle {bundle.name} is {family}",
                   "FLUX.2 Klein edits with reference images (ReferenceLatent)")
    if images:
        raise _Bad(controls[0].node, "ControlNet with an encoded latent_image (image-to-image) is not supported",
                   "StableDiffusion3ControlNetPipeline draws from text: use EmptySD3LatentImage")
    nets = manifest.get("controlnets") or {}
    out = []
    for c in controls:
        if c.vae is not None:
            same_bundle(c.node, "ControlNetApplyAdvanced's vae", c.vae.bundle)
        name = _net_name(c.net, nets)
        if name is None:
            known = ", ".join(nets) or "none"
            raise _Bad(c.net.node, f"ControlNet {c.net.name!r} is not in bundle {bundle.name}",
                       f"its nets: {known}; export the bundle with --controlnet NAME=DIR, or start the server with "
                       f"--alias {c.net.name}=NAME", "value_not_in_list", "control_net_name")
        out.append((name, c.picture.path, list(c.picture.scale) if c.picture.scale else None,
                    list(c.picture.canny) if c.picture.canny else None, c.strength, c.start, c.end))
    if len({o[0] for o in out}) < len(out):
        raise _Bad(controls[-1].node, "The same ControlNet is applied twice", "apply each net once")
    return tuple(out)


def _net_name(choice, nets: dict) -> str | None:
    """A ControlNetLoader name (after aliases) as one of the bundle's nets: the net's name, its file stem, or its
    source folder's name."""
    for candidate in (choice.target, Path(choice.target).stem):
        if candidate in nets:
            return candidate
        for name, rec in nets.items():
            if (rec.get("source") or {}).get("name") == candidate:
                return name
    return None


def _seed_node(graph, s) -> str:
    src = (graph[s.node.split("#")[0]].get("inputs") or {}).get("noise")
    return str(src[0]) if isinstance(src, list) and src else s.node


def _check_reference_sizes(refs, manifest) -> None:
    from app.runtime.references import MAX_ASPECT, MIN_SIDE, reference_size

    largest = manifest["size_range"]["max"]
    for r in refs:
        w, h = r.picture.size
        if min(w, h) < MIN_SIDE or max(w / h, h / w) > MAX_ASPECT:
            raise _Bad(r.picture.node, f"Reference image is {w}x{h}", f"references must be at least {MIN_SIDE} px a "
                       f"side and at most {MAX_ASPECT}:1 (as diffusers' Flux2KleinPipeline)")
        rw, rh = reference_size((w, h), manifest["pipeline"], largest)  # scaled to fit the bundle, not refused
        if min(rw, rh) < 1:
            raise _Bad(r.picture.node, f"Reference image is {w}x{h}; scaled to this bundle's {largest} px its short "
                       "side is under one latent cell", "crop it less elongated, or re-export the bundle with a "
                       "larger --max-size")


def _check_lora(graph, node, bundle_name, manifest) -> tuple[str, float] | None:
    """A LoraLoader's LoRA: (library name, strength) to apply at run time, or None for the LoRA fused into the
    bundle at export (its strength must be the fused one). strength_clip is accepted and has no effect: library
    LoRAs are transformer-only (lora add refuses text-encoder layers), as a transformer-only LoRA is in ComfyUI."""
    name = _value(graph, node, "lora_name", str)
    strength = _value(graph, node, "strength_model", float, default=1.0, required=False)
    fused = manifest.get("loras") or []
    stem = Path(name).stem
    match = [r for r in fused if r.get("file") in (name, Path(name).name) or Path(r.get("file", "")).stem == stem]
    runtime = ((manifest.get("components") or {}).get("transformer") or {}).get("lora")
    if match:
        scale = float(match[0].get("scale", 1.0))
        if abs(scale - strength) > 1e-6:
            raise _Bad(node, f"LoRA {name} is fused at strength {scale:g}, not {strength:g}",
                       f"set strength_model to {scale:g}, or re-export with --lora {name}:{strength:g}")
        return None
    if not runtime:
        names = ", ".join(r.get("file", "?") for r in fused) or "none"
        raise _Bad(node, f"LoRA {name} is not fused into bundle {bundle_name}",
                   f"this bundle has no run-time LoRA inputs (fused: {names}); export one with --runtime-lora "
                   f"MAX_RANK to choose LoRAs per request, or fuse this one: edgegen export --model DIR --out DIR "
                   f"--lora {name}:{strength:g}")
    from app.bundle.loras import check_name, check_strength
    from app.errors import UsageError

    try:
        return check_name(Path(name).name), check_strength(strength, "strength_model")
    except UsageError as e:
        raise _Bad(node, f"LoRA {name} cannot be used", str(e)) from None


def _check_runtime_loras(node, manifest, choices, bundle_name) -> None:
    """The library's records, family, shapes and total rank against the bundle, before the job is queued."""
    from app.errors import UsageError
    from app.runtime.loras import check_choices

    try:
        check_choices(manifest, choices, bundle=f"bundle {bundle_name}")
    except UsageError as e:
        raise _Bad(node, "This LoRA cannot be used with this bundle", str(e)) from None


def _prefix(graph, node) -> str:
    prefix = _value(graph, node, "filename_prefix", str, default=DEFAULT_PREFIX, required=False) or DEFAULT_PREFIX
    try:
        confined(Path("/"), prefix)  # a relative path with no '..' and no absolute part
    except PathRefused as e:
        raise _Bad(node, "filename_prefix must be a relative name inside the output folder", str(e)) from None
    return prefix


# ----- the compact node -------------------------------------------------------------------------------------

def _compact(graph: dict, node: str, bundles: BundleIndex, input_dir: Path) -> Task:
    bundle_name = _value(graph, node, "bundle", str)
    bundle_dir = _bundle(bundles, node, bundle_name)
    manifest = bundles.manifest(bundle_dir)
    defaults = manifest.get("defaults", {})
    prompt = _value(graph, node, "prompt", str)
    negative = _value(graph, node, "negative_prompt", str, default="", required=False)
    seed = _value(graph, node, "seed", int, default=0, required=False)
    steps = _value(graph, node, "steps", int, default=None, required=False)
    guidance = _value(graph, node, "guidance", float, default=None, required=False)
    width = _value(graph, node, "width", int, default=None, required=False)
    height = _value(graph, node, "height", int, default=None, required=False)
    count = _value(graph, node, "count", int, default=1, required=False)
    _check_size(node, manifest, width or defaults.get("width"), height or defaults.get("height"))
    _check_count(node, count)
    _check_seed(node, seed)
    if steps is not None:
        _check_steps(node, steps)
    refs = _references(graph, node, input_dir)
    strength = _value(graph, node, "strength", float, default=None, required=False)
    if (refs or strength is not None) and not {"images", "strength"} <= request_fields():
        raise _Bad(node, "Reference images need a newer bundle/runtime",
                   "this edgegen's runtime cannot condition on reference images yet; remove 'images' or "
                   "update edgegen")
    if refs or strength is not None:
        _check_images(node, bundle_dir, tuple(str(r) for r in refs), strength)
    extra = {"strength": strength} if strength is not None else {}
    loras = _compact_loras(graph, node)
    if loras:
        _check_runtime_loras(node, manifest, loras, bundle_name)
        extra["loras"] = [list(c) for c in loras]
    reqs = tuple(dict(_request(prompt, negative, seed + i, steps, guidance, width, height), **extra)
                 for i in range(count))
    prefix = _prefix(graph, node)
    return Task(node, node, str(bundle_dir), reqs, prefix, tuple(str(r) for r in refs))


def _compact_loras(graph, node) -> list[tuple[str, float]]:
    """EdgegenGenerate's `loras`: ["NAME[:STRENGTH]", ...] as generate --lora takes them."""
    from app.bundle.loras import parse_lora_choice
    from app.errors import UsageError

    items = _inputs(graph, node).get("loras") or []
    if isinstance(items, str):
        items = [items]
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise _Bad(node, "loras must be a list of \"NAME[:STRENGTH]\" strings", f"got {items!r}",
                   "invalid_input_type")
    try:
        return [parse_lora_choice(i) for i in items]
    except UsageError as e:
        raise _Bad(node, "A LoRA choice is not valid", str(e)) from None


def _check_images(node, bundle_dir: Path, images: tuple[str, ...], strength, mask: bool = False) -> None:
    """The runtime's own check (reference count, encoder present, strength range) from the manifest alone."""
    from app.errors import EdgegenError

    try:
        from app.runtime.references import check_count_and_strength
    except ImportError:
        return  # an older runtime: the job reports what is wrong when it runs
    from app.bundle.manifest import load_bundle

    try:
        check_count_and_strength(load_bundle(bundle_dir, verify=False), images, strength, True if mask else None)
    except EdgegenError as e:
        raise _Bad(node, "These input images cannot be used with this bundle", str(e)) from None


def _references(graph, node, input_dir: Path) -> list[Path]:
    images = _inputs(graph, node).get("images", [])
    if images in (None, ""):
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise _Bad(node, "images must be a list of uploaded file names", f"got {images!r}", "invalid_input_type")
    out = []
    for name in images:
        try:
            path = confined(input_dir, name)
        except PathRefused as e:
            raise _Bad(node, f"Reference image {name!r} is not a name inside the input folder", str(e)) from None
        if not path.is_file():
            raise _Bad(node, f"Reference image {name} was not uploaded",
                       "upload it first with POST /upload/image and use the name it returns")
        out.append(path)
    return out


# ----- shared checks ----------------------------------------------------------------------------------------

def _bundle(bundles: BundleIndex, node: str, name: str) -> Path:
    path = bundles.find(name)
    if path is None:
        known = ", ".join(bundles.names()) or "none found"
        raise _Bad(node, f"Bundle {name!r} is not served here",
                   f"available: {known}; start the server with --bundle DIR to add one")
    return path


def _check_size(node, manifest: dict, width, height) -> None:
    rng = manifest.get("size_range") or {}
    lo, hi, mult = rng.get("min", 0), rng.get("max", 1 << 30), rng.get("multiple", 1)
    for axis, v in (("width", width), ("height", height)):
        if v is None:
            continue
        if v % mult:
            raise _Bad(node, f"{axis} {v} is not a multiple of {mult}",
                       f"try {max(mult, round(v / mult) * mult)}")
        if not lo <= v <= hi:
            raise _Bad(node, f"{axis} {v} is outside this bundle's range {lo}-{hi} px",
                       "pick a size inside it, or re-export the bundle with --min-size/--max-size")


def _check_count(node, count: int) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise _Bad(node, f"batch size {count} must be between 1 and {MAX_COUNT}",
                   "submit more prompts instead of one larger batch")


def _check_steps(node, steps: int) -> None:
    if not 1 <= steps <= 1000:
        raise _Bad(node, f"steps {steps} must be between 1 and 1000")


def _check_seed(node, seed: int) -> None:
    if not 0 <= seed < 2**63 - MAX_COUNT:
        raise _Bad(node, f"seed {seed} must be between 0 and 2**63-{MAX_COUNT + 1}")


def _request(prompt, negative, seed, steps, guidance, width, height) -> dict:
    return {"prompt": prompt, "negative_prompt": negative, "seed": seed, "steps": steps, "guidance": guidance,
            "width": width, "height": height}
