"""Turn a ComfyUI API-format workflow graph into generation tasks, or into ComfyUI-shaped node_errors.

Two graph kinds are accepted:
- the plain text-to-image graph ComfyUI's "Save (API format)" writes: CheckpointLoaderSimple (ckpt_name names
  a bundle), CLIPTextEncode (positive, negative), EmptyLatentImage, KSampler, VAEDecode, SaveImage, and
  LoraLoader / LoraLoaderModelOnly: lora_name from the site LoRA library, per request, for a bundle exported
  with --runtime-lora (docs/LORA.md), or the LoRA fused into the bundle at export;
- the compact `EdgegenGenerate` node with the fields of `edgegen generate`.
Every other node type is refused by name, so a client learns up front what will not run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from app.server.bundles import BundleIndex
from app.server.security import PathRefused, confined

# ComfyUI's node types we understand, and what each needs.
SUPPORTED = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "EmptySD3LatentImage", "KSampler",
             "VAEDecode", "SaveImage", "LoraLoader", "LoraLoaderModelOnly", "EdgegenGenerate")
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

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Task:
        return cls(node=d["node"], sampler_node=d["sampler_node"], bundle_dir=d["bundle_dir"],
                   requests=tuple(d["requests"]), filename_prefix=d["filename_prefix"],
                   references=tuple(d.get("references", ())))


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

    def add(self, graph: dict, node: str, type_: str, message: str, details: str = "", output: str | None = None):
        entry = self.by_node.setdefault(str(node), {
            "errors": [], "dependent_outputs": [],
            "class_type": (graph.get(node) or {}).get("class_type") if isinstance(graph.get(node), dict) else None,
        })
        entry["errors"].append({"type": type_, "message": message, "details": details, "extra_info": {}})
        if output is not None and output not in entry["dependent_outputs"]:
            entry["dependent_outputs"].append(output)


class _Bad(Exception):
    """One input of one node is wrong; collected into node_errors."""

    def __init__(self, node: str, message: str, details: str = "", type_: str = "value_not_valid"):
        super().__init__(message)
        self.node, self.message, self.details, self.type = node, message, details, type_


def parse_prompt(graph: object, bundles: BundleIndex, input_dir: Path) -> Plan:
    """Validate `graph` (the "prompt" member of POST /prompt) and plan its tasks; GraphError when invalid."""
    if not isinstance(graph, dict) or not graph:
        raise GraphError("invalid_prompt", "Invalid prompt",
                         'expected {"prompt": {node_id: {"class_type": ..., "inputs": {...}}}}')
    errors = _Errors()
    for node, spec in graph.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("class_type"), str):
            errors.add(graph, node, "invalid_node", "Node is not {class_type, inputs}",
                       f"node {node} needs a string class_type and an inputs object")
        elif spec["class_type"] not in SUPPORTED:
            errors.add(graph, node, "unsupported_node", f"Node type {spec['class_type']} is not supported by edgegen",
                       f"edgegen runs text-to-image graphs of {', '.join(SUPPORTED[:-1])}, or the compact "
                       "EdgegenGenerate node; remove or replace this node")
        elif not isinstance(spec.get("inputs", {}), dict):
            errors.add(graph, node, "invalid_node", "Node inputs must be an object", f"node {node}")
    if errors.by_node:
        raise GraphError("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                         node_errors=errors.by_node)
    outputs = [n for n, s in graph.items() if s["class_type"] in OUTPUT_TYPES]
    if not outputs:
        raise GraphError("prompt_no_outputs", "Prompt has no outputs",
                         "add a SaveImage node (or use the EdgegenGenerate node)")
    tasks, notes = [], []
    for out in sorted(outputs, key=_node_order):
        try:
            if graph[out]["class_type"] == "EdgegenGenerate":
                tasks.append(_compact(graph, out, bundles, input_dir))
            else:
                task, more = _comfy(graph, out, bundles)
                tasks.append(task)
                notes += [n for n in more if n not in notes]
        except _Bad as b:
            errors.add(graph, b.node, b.type, b.message, b.details, output=out)
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


# ----- ComfyUI text-to-image --------------------------------------------------------------------------------

def _comfy(graph: dict, save: str, bundles: BundleIndex) -> tuple[Task, list[str]]:
    notes: list[str] = []
    prefix = _prefix(graph, save)
    decode, _ = _link(graph, save, "images", ("VAEDecode",))
    sampler, _ = _link(graph, decode, "samples", ("KSampler",))
    model_src = _model_chain(graph, sampler, "model", 0)
    ckpt, loras = model_src
    vae_ckpt, _ = _model_chain(graph, decode, "vae", 2)
    if vae_ckpt != ckpt:
        raise _Bad(decode, "VAEDecode must use the same checkpoint's VAE as the KSampler's model",
                   f"VAE from node {vae_ckpt}, model from node {ckpt}")
    bundle_name = _value(graph, ckpt, "ckpt_name", str)
    bundle_dir = _bundle(bundles, ckpt, bundle_name)
    manifest = bundles.manifest(bundle_dir)
    runtime = [c for c in (_check_lora(graph, n, bundle_name, manifest) for n in reversed(loras)) if c]
    if len({n for n, _ in runtime}) < len(runtime):
        raise _Bad(loras[0], "The same LoRA is loaded twice", "load each LoRA once, with the strength you want")
    if runtime:
        _check_runtime_loras(loras[0], manifest, runtime, bundle_name)
    prompts = {}
    for which in ("positive", "negative"):
        enc, _ = _link(graph, sampler, which, ("CLIPTextEncode",))
        clip_ckpt, clip_loras = _model_chain(graph, enc, "clip", 1)
        if clip_ckpt != ckpt:
            raise _Bad(enc, "CLIPTextEncode must use the same checkpoint as the KSampler",
                       f"clip from node {clip_ckpt}, model from node {ckpt}")
        for lora_node in clip_loras:
            _check_lora(graph, lora_node, bundle_name, manifest)
        prompts[which] = _value(graph, enc, "text", str)
    latent, _ = _link(graph, sampler, "latent_image", ("EmptyLatentImage", "EmptySD3LatentImage"))
    width = _value(graph, latent, "width", int)
    height = _value(graph, latent, "height", int)
    count = _value(graph, latent, "batch_size", int, default=1, required=False)
    seed = _value(graph, sampler, "seed", int)
    steps = _value(graph, sampler, "steps", int)
    cfg = _value(graph, sampler, "cfg", float)
    denoise = _value(graph, sampler, "denoise", float, default=1.0, required=False)
    if abs(denoise - 1.0) > 1e-6:
        raise _Bad(sampler, "KSampler denoise below 1.0 (image-to-image) is not supported in this graph",
                   "use denoise 1.0, or the EdgegenGenerate node with reference images")
    for name in ("sampler_name", "scheduler"):
        v = _inputs(graph, sampler).get(name)
        if v is not None:
            notes.append(f"KSampler {name} '{v}' ignored: edgegen uses the bundle's own flow-matching scheduler")
    _check_size(latent, manifest, width, height)
    _check_seed(sampler, seed)
    _check_count(latent, count)
    _check_steps(sampler, steps)
    extra = {"loras": [list(c) for c in runtime]} if runtime else {}
    reqs = tuple(dict(_request(prompts["positive"], prompts["negative"], seed + i, steps, cfg, width, height),
                      **extra) for i in range(count))
    return Task(save, sampler, str(bundle_dir), reqs, prefix), notes


def _model_chain(graph, node, name, slot) -> tuple[str, list[str]]:
    """Follow model/clip/vae links through LoraLoaders to the checkpoint: (checkpoint node, [lora nodes])."""
    loras: list[str] = []
    # the model chain may pass LoraLoaderModelOnly nodes; the clip chain only LoraLoader (which has a CLIP output)
    chain = {0: ("CheckpointLoaderSimple", *LORA_NODES), 1: ("CheckpointLoaderSimple", "LoraLoader")}
    want = chain.get(slot, ("CheckpointLoaderSimple",))
    src, out = _link(graph, node, name, want)
    seen = set()
    while graph[src]["class_type"] in LORA_NODES:
        if src in seen:
            raise _Bad(src, "LoraLoader links form a cycle", "", "bad_linked_input")
        seen.add(src)
        loras.append(src)
        src, _ = _link(graph, src, "model" if slot == 0 else "clip", want)
    if out != slot:
        raise _Bad(node, f"Input {name} must use output {slot} of its loader", f"it uses output {out}",
                   "bad_linked_input")
    return src, loras


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


def _check_images(node, bundle_dir: Path, images: tuple[str, ...], strength) -> None:
    """The runtime's own check (reference count, encoder present, strength range) from the manifest alone."""
    from app.errors import EdgegenError

    try:
        from app.runtime.references import check_count_and_strength
    except ImportError:
        return  # an older runtime: the job reports what is wrong when it runs
    from app.bundle.manifest import load_bundle

    try:
        check_count_and_strength(load_bundle(bundle_dir, verify=False), images, strength)
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
