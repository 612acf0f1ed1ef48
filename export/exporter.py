"""Model folder -> engine bundle: export each component, check it against PyTorch, write the manifest."""

from __future__ import annotations

import gc
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal

import numpy as np
import torch

from app.bundle.families import DYNAMIC_DIMS, controlnet_spec, model_dims, with_controlnet_input
from app.bundle.modelfolder import ModelFolder, inspect_folder, own_defaults
from app.errors import EdgegenError, UsageError
from app.models.loading import load_component
from app.models.samples import sample_inputs
from app.models.wrappers import wrap
from app.runtime.images import psnr
from export import cache as export_cache
from export import preflight
from export.bundle_writer import BundleWriter
from export.fidelity import gate
from export.lora import check_loras, fuse_loras
from export.onnx_export import compare, needs_external_data, save_component, trace_component

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
Target = Literal["onnx", "tensorrt-rtx", "tensorrt"]
Progress = Callable[[str], None]

# Trace at batch 2 (batch 1 gets specialised away) and a short text; validate on a second, odd-sized shape
# so a wrong dynamic-shape translation cannot hide behind the trace shape.
TRACE_BATCH, TRACE_TEXT = 2, 16
CHECK_BATCH, CHECK_TEXT = 1, 24


def vae_scale_factor(folder: ModelFolder) -> int:
    """Pixels per latent cell, as diffusers derives it: 2 ** (len(block_out_channels) - 1)."""
    return model_dims(folder.path, folder.family, folder.index)["vae_scale_factor"]


@dataclass(frozen=True)
class ExportOptions:
    model: Path
    out: Path
    family: str = "auto"
    precision: Precision = "fp32"
    target: Target = "onnx"
    sms: tuple[str, ...] = ()
    min_size: int | None = None
    max_size: int | None = None
    calibration_prompts: Path | None = None
    calibration_size: int | None = None
    calibration_count: int = 8
    # sampler steps of each FP8 calibration and check image; None: the model's default steps (SD3.5: 28, with CFG;
    # on a CPU build machine fewer keep calibration to minutes: docs/PERFORMANCE.md 1c)
    calibration_steps: int | None = None
    # None: BF16 with --precision bf16, else FP32; FP8 only on request; FP16 only where export/bf16_policy.py
    # allows it (never T5 or Qwen3)
    text_encoder_precision: Precision | None = None
    vae_precision: Literal["fp32", "bf16"] | None = None  # None: BF16 with --precision bf16, else FP32
    loras: tuple[tuple[Path, float], ...] = ()
    # Run-time LoRA (docs/LORA.md): > 0 gives the transformer a low-rank side branch on every nn.Linear whose
    # A/B inputs take LoRAs per request, up to this total rank (the engines' lora_rank profile); 0: none.
    runtime_lora: int = 0
    overwrite: bool = False
    accept_low_fidelity: bool = False  # keep components below export/fidelity.py's thresholds (recorded)
    skip_memory_check: bool = False
    with_encoder: bool | None = None  # the VAE encoder (images as input); None: the family's default (Klein on)
    # How the transformer becomes FP8: "onnx" (ModelOpt ONNX PTQ on the FP32 graph, export/fp8.py), "torch"
    # (ModelOpt PyTorch calibration of the BF16 module, export/fp8_torch.py), "auto": onnx when it fits in RAM
    fp8_path: Literal["auto", "onnx", "torch"] = "auto"
    # SD3.5 ControlNets (docs/CONTROLNET.md): (name, SD3ControlNetModel folder) each, exported as
    # controlnet_<name>; the transformer then takes their residuals
    controlnets: tuple[tuple[str, Path], ...] = ()
    extra: dict = field(default_factory=dict)


def _versions() -> dict:
    import diffusers
    import onnx
    import transformers

    from app import __version__

    return {"edgegen": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "python": platform.python_version()}


def _source_identity(folder: ModelFolder) -> dict:
    from app.bundle.files import sha256_file

    return {"path": str(folder.path), "name": folder.path.name, "pipeline": folder.index.get("_class_name"),
            "model_index_sha256": sha256_file(folder.path / "model_index.json")}


def _text_length(folder: ModelFolder, own: dict) -> dict:
    """{"max_sequence_length": n} when the model folder's edgegen_defaults.json sets the prompt length its
    pipeline pads to (Klein only: Flux2KleinPipeline's max_sequence_length, 512 when absent), else {}."""
    n = own.get("max_sequence_length")
    if n is None:
        return {}
    if folder.family.name != "flux2-klein" or not isinstance(n, int) or not 16 <= n <= 512:
        raise UsageError(f"{folder.path / 'edgegen_defaults.json'}: max_sequence_length {n!r} is not usable; it "
                         "must be an integer in 16..512 and only FLUX.2 Klein models may set it")
    return {"max_sequence_length": n}


def _image_inputs(fam, components: dict) -> dict:
    """What a bundle with the VAE encoder accepts as images: the runtime, the profiles and the plan read it."""
    if "vae_encoder" not in components:
        return {}
    return {"max_images": fam.max_images, "reference_max_pixels": fam.reference_max_pixels}


def _defaults_and_range(folder: ModelFolder, opts: ExportOptions, own: dict | None = None,
                        dims: dict | None = None, say: Progress = lambda _m: None) -> tuple[dict, dict]:
    fam = folder.family
    own = own_defaults(folder.path) if own is None else own  # a model may carry its own (the demo model does)
    dims = model_dims(folder.path, fam, folder.index) if dims is None else dims
    d = fam.defaults(folder.index, folder.path)
    defaults = {"steps": d.steps, "guidance": d.guidance, "width": d.width, "height": d.height}
    defaults.update({k: own[k] for k in ("steps", "guidance", "width", "height") if k in own})
    lo, hi = own.get("min_size", fam.size_range[0]), own.get("max_size", fam.size_range[1])
    m = dims["vae_scale_factor"] * dims["patch"]
    limit = dims.get("max_size_px")  # SD3's position table: pos_embed_max_size patches per side
    if limit:
        limit -= limit % m
        if opts.max_size and opts.max_size > limit:
            raise UsageError(f"--max-size {opts.max_size} exceeds this model's position table "
                             f"(pos_embed_max_size {dims['pos_embed_max_size']} = {limit} px per side); "
                             f"use --max-size {limit} or less")
        if hi > limit and not opts.max_size:
            say(f"[preflight] size range capped at {limit} px by the model's position table "
                f"(pos_embed_max_size {dims['pos_embed_max_size']})")
            hi = limit
        if lo > hi and not opts.min_size:
            lo = hi
    lo, hi = opts.min_size or lo, opts.max_size or hi
    if lo % m or hi % m or lo > hi or lo < m:
        raise UsageError(f"--min-size {lo} / --max-size {hi} must be multiples of {m} with min <= max")
    defaults["width"] = min(max(defaults["width"], lo), hi)
    defaults["height"] = min(max(defaults["height"], lo), hi)
    return defaults, {"min": lo, "max": hi, "multiple": m}


def _io(spec, onnx_path: Path) -> dict:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def describe(values, specs):
        out = []
        for v, s in zip(values, specs):
            dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
                v.type.tensor_type.elem_type).name, "shape": dims,
                "dynamic": [d for d in s.dims if d in DYNAMIC_DIMS]})
        return out

    return {"inputs": describe(model.graph.input, spec.inputs), "outputs": describe(model.graph.output, spec.outputs)}


def options_for_gpu(opts: ExportOptions, gpu, explicit_target: str | None = None,
                    say: Progress = lambda _m: None) -> ExportOptions:
    """`export --gpu`: the precisions app.planning.policy.choose_precision picks per component for that card
    (FP8 transformer on sm89+, BF16 elsewhere from sm80; BF16 text encoders and VAE from sm80), and engines for
    its compute capability with the flavour that targets it, unless --target/--sm say otherwise."""
    from dataclasses import replace

    from app.planning.policy import choose_precision, engine_flavour_for_sm

    if gpu is None:
        raise UsageError('--gpu auto found no NVIDIA GPU here; name the card, e.g. --gpu "RTX 4090" or --gpu sm89:24')
    sm = gpu.sm
    transformer = choose_precision("transformer", sm)
    if transformer == "fp16":  # pre-Ampere: FP16 only where export/bf16_policy.py allows it, else FP32
        from export.bf16_policy import FP16_ALLOWED

        folder = inspect_folder(opts.model, opts.family)
        transformer = "fp16" if "transformer" in FP16_ALLOWED.get(folder.family.name, ()) else "fp32"
    text, vae = choose_precision("text_encoder", sm), choose_precision("vae", sm)
    target = explicit_target or engine_flavour_for_sm(sm)
    chosen = replace(opts, precision=transformer, text_encoder_precision=text, vae_precision=vae, target=target,
                     sms=opts.sms or ((sm,) if target != "onnx" else ()))
    say(f"[plan] {gpu.name} (sm{sm}): transformer {transformer.upper()}, text encoders {text.upper()}, "
        f"VAE {vae.upper()}; {target}" + (f" engines for sm{', sm'.join(chosen.sms)}" if chosen.sms else ""))
    return chosen


def export_bundle(opts: ExportOptions, progress: Progress = print) -> Path:
    """Preflight (everything checkable before the first weight is read), then the export itself."""
    t0 = time.monotonic()
    folder = inspect_folder(opts.model, opts.family)
    fam = folder.family
    own = own_defaults(folder.path)
    dims = model_dims(folder.path, fam, folder.index, _text_length(folder, own).get("max_sequence_length"))
    from export.bf16_policy import HALF, component_precisions

    te_precision = opts.text_encoder_precision or ("bf16" if opts.precision == "bf16" else "fp32")
    with_encoder = fam.encoder_by_default if opts.with_encoder is None else opts.with_encoder
    present = [c.name for c in fam.components if folder.present(c.source) and (with_encoder or not c.on_request)]
    precisions = component_precisions(fam.name, present, opts.precision, te_precision, opts.vae_precision)
    fp8_encoders = ()
    if te_precision == "fp8":
        from export.fp8_policy import text_encoder_fp8_exclude_patterns

        fp8_encoders = tuple(c.name for c in fam.components
                             if c.role == "text_encoder" and folder.present(c.source))
        for name in fp8_encoders:
            text_encoder_fp8_exclude_patterns(fam.name, name)  # a family without a policy fails here
    if opts.precision == "fp8" or fp8_encoders:
        from export.calibrate import read_prompts

        prompts = read_prompts(opts.calibration_prompts)  # fail on a bad file before hours of export
    notes: list[str] = []  # said once every check has passed, so a refusal stays the only line
    route = None
    if opts.precision == "fp8":
        route, why = preflight.fp8_path(folder, fp8_encoders, precisions, opts.fp8_path)
        if route == "torch":
            if fp8_encoders:
                raise UsageError("--text-encoder-precision fp8 quantizes through ModelOpt's ONNX path (FP32 "
                                 "graphs); with the PyTorch FP8 path use --text-encoder-precision bf16, or "
                                 "--fp8-path onnx where the FP32 graphs fit in memory")
            precisions = {**precisions, "transformer": "bf16"}  # its BF16 graph, quantized after calibration
        notes.append(f"[fp8] transformer through ModelOpt's {'PyTorch' if route == 'torch' else 'ONNX'} path: {why}")
    nets = check_controlnets(folder, opts.controlnets, dims, with_encoder)
    defaults, size_range = _defaults_and_range(folder, opts, own, dims, notes.append)
    preflight.check_calibration_size(opts.calibration_size, size_range, dims)
    if opts.loras:
        check_loras(folder.path / fam.component("transformer").source, folder.index["_class_name"], opts.loras)
    graph_precision = ("fp8" if opts.precision == "fp8" or fp8_encoders else
                       "bf16" if "bf16" in precisions.values() else "fp16" if "fp16" in precisions.values() else "fp32")
    sms = preflight.check_targets(opts.target, opts.sms, graph_precision, progress)
    preflight.check_tools(opts.precision, te_precision, opts.target, progress)
    out = Path(opts.out).absolute()
    preflight.clean_stale_partials(out.parent, progress)
    n_engines = len(sms) if opts.target != "onnx" else 0
    preflight.check_disk(out, preflight.bundle_bytes_estimate(folder, opts.precision, fp8_encoders, n_engines,
                                                              precisions), progress)
    preflight.check_memory(preflight.memory_estimate(folder, opts.precision, fp8_encoders, precisions,
                                                     route or "onnx"), progress, opts.skip_memory_check)
    for note in notes:
        progress(note)
    progress(f"[preflight] passed in {time.monotonic() - t0:.1f}s")
    components: dict[str, dict] = {}
    lora_records: list[dict] = []
    started = time.monotonic()
    with BundleWriter(opts.out, overwrite=opts.overwrite) as w:
        for spec in fam.components:
            if spec.name not in precisions:
                continue
            p = precisions[spec.name]
            if spec.role == "transformer" and nets:
                first = next(iter(nets.values()))
                spec = with_controlnet_input(spec, first["layers"], first["inner_dim"])
            components[spec.name], records = export_one(folder, spec, w.tmp / spec.name, opts.loras, progress,
                                                        precision=p if p in HALF else "fp32",
                                                        runtime_lora=opts.runtime_lora)
            lora_records = records or lora_records
            _gate(components[spec.name], spec.name, p, opts.accept_low_fidelity)
        for name, record in nets.items():
            spec = controlnet_spec(name, record)
            p = controlnet_precision(opts.precision)
            components[spec.name], _ = export_one(folder, spec, w.tmp / spec.name, (), progress,
                                                  precision=p if p in HALF else "fp32", controlnet=record)
            precisions[spec.name] = p
            _gate(components[spec.name], spec.name, p, opts.accept_low_fidelity)
        for name in fam.tokenizers + ("scheduler",):
            if folder.present(name):
                shutil.copytree(folder.path / name, w.tmp / name)
        manifest = {
            "family": fam.name,
            "source": _source_identity(folder),
            "precision": opts.precision,
            "text_encoder_precision": te_precision,
            "component_precisions": precisions,
            # Every shape the runtime needs, from the model's configs (app.bundle.families.model_dims).
            "pipeline": {"is_distilled": bool(folder.index.get("is_distilled", False)),
                         **{k: v for k, v in dims.items() if v is not None}, **_text_length(folder, own),
                         **_image_inputs(fam, components)},
            "components": components,
            **({"controlnets": nets} if nets else {}),
            "loras": lora_records,
            "tokenizers": [t for t in fam.tokenizers if folder.present(t)],
            "scheduler": "scheduler/scheduler_config.json",
            "defaults": defaults,
            "size_range": size_range,
            "engines": [],
            "exporter": _versions(),
            "export_seconds": round(time.monotonic() - started, 2),
        }
        if any(p in HALF for p in precisions.values()):
            half_images(opts, folder, manifest, w.tmp, progress)
        if route == "torch":
            from export.fp8_policy import fp8_exclude_patterns
            from export.fp8_torch import quantize_transformer

            quantize_transformer(w.tmp, manifest, folder.path, prompts, opts.calibration_count,
                                 opts.calibration_size, fp8_exclude_patterns(fam.name), progress,
                                 opts.accept_low_fidelity, steps=opts.calibration_steps, fused_loras=opts.loras)
        elif opts.precision == "fp8" or fp8_encoders:
            quantize_components(opts, fam, manifest, w.tmp, prompts, fp8_encoders, progress)
        _drop_twins(manifest, w.tmp)
        for entry in manifest["components"].values():
            entry["bytes"] = sum(f.stat().st_size for f in (w.tmp / entry["onnx"]).parent.iterdir() if f.is_file())
        if opts.target != "onnx":
            manifest["engines"] = build_engines(opts, fam, manifest, w.tmp, progress)
        overridden = {n: c.get(k) for n, c in components.items()
                      for k in ("fidelity_gate", "fp8_fidelity_gate", "bf16_fidelity_gate", "fp16_fidelity_gate")
                      if (c.get(k) or {}).get("accepted_low_fidelity")}
        fid = manifest.get("fidelity") or {}
        image_gate_record = fid.get("image_gate") or (fid.get("half") or {}).get("image_gate") or {}
        if image_gate_record.get("accepted_low_fidelity"):
            overridden["images"] = image_gate_record
        if overridden:
            manifest["fidelity_override"] = {"accepted_low_fidelity": True, "components": sorted(overridden),
                                             "why": "exported with --accept-low-fidelity"}
            progress(f"warning: kept {', '.join(sorted(overridden))} below the fidelity thresholds "
                     "(--accept-low-fidelity); the manifest records it")
        return w.commit(manifest)


def _gate(entry: dict, name: str, precision: str, accept_low_fidelity: bool) -> None:
    """The fidelity gates of one exported component: its FP32 check, and its half-precision one where it is half."""
    from export.bf16_policy import HALF

    f = entry["fidelity"]
    entry["fidelity_gate"] = gate(name, "fp32", f["cosine"], f["max_rel_err"], accept_low_fidelity)
    if precision in HALF:
        h = entry[f"fidelity_{precision}"]
        entry[f"{precision}_fidelity_gate"] = gate(name, precision, h["cosine"], h["max_rel_err"], accept_low_fidelity)


def cpu_runnable(manifest: dict) -> dict:
    """The manifest with each BF16/FP16 component swapped for its FP32 twin (export/bf16.py), which ONNX
    Runtime's CPU provider can run: same graph and rounded weights, FP32 arithmetic. For export-time checks
    and calibration only; the twins are deleted before the bundle is committed."""
    from export.bf16 import TWIN_NAME

    comps = {}
    for name, entry in manifest["components"].items():
        if entry.get("precision") in ("bf16", "fp16"):
            entry = {**entry, "onnx": f"{Path(entry['onnx']).parent.as_posix()}/{TWIN_NAME}", "precision": "fp32"}
        comps[name] = entry
    return {**manifest, "components": comps}


def _drop_twins(manifest: dict, root: Path) -> None:
    from export.bf16 import TWIN_NAME

    for entry in manifest["components"].values():
        (root / entry["onnx"]).with_name(TWIN_NAME).unlink(missing_ok=True)


def half_images(opts: ExportOptions, folder: ModelFolder, manifest: dict, root: Path, progress: Progress) -> None:
    """Image PSNR of the half-precision bundle vs FP32 on fixed prompts and seeds (export.calibrate's cases),
    two ways: the bundle's graphs run as their FP32 twins in ONNX Runtime (the effect of the rounded weights,
    with FP32 arithmetic), and the same modules in PyTorch with BF16/FP16 arithmetic (the effect of both).
    The reference is the source folder's modules in PyTorch FP32, which the FP32 bundle matches to ~85-130 dB.
    Skipped, and said so in the manifest, when the FP32 reference would not fit in memory (real-size models)."""
    from app.bundle.manifest import Bundle
    from app.runtime.pipelines import make_pipeline
    from export import calibrate
    from export.bf16 import HalfTorchBackend, fp32_bytes_needed
    from export.fidelity import image_gate

    precisions = manifest["component_precisions"]
    label = "/".join(sorted({p.upper() for p in precisions.values() if p in ("bf16", "fp16")}))
    need, have = fp32_bytes_needed(folder, precisions), preflight.available_memory()
    if have is not None and need > have:
        manifest["fidelity"] = {"image_psnr_vs_fp32_db": None, "skipped": (
            f"the PyTorch FP32 reference needs about {preflight.fmt_gib(need)} of RAM, {preflight.fmt_gib(have)} "
            "was available; each component's own check above still ran")}
        progress(f"[fidelity] {label} vs FP32 images skipped: {manifest['fidelity']['skipped']}")
        return
    progress(f"[fidelity] {label} vs FP32 images on fixed prompts and seeds")
    provisional = Bundle(root, manifest, "provisional")
    size = opts.calibration_size

    def draw(bundle, backend):
        pipe = make_pipeline(bundle, backend)
        from app.runtime.pipelines import GenerationRequest

        return [pipe.generate(GenerationRequest(prompt=p, seed=s, width=size, height=size)).image
                for p, s in calibrate.FIDELITY_CASES]

    from app.runtime.torch_backend import TorchBackend

    ref = draw(provisional, TorchBackend(provisional, folder.path, fused_loras=opts.loras))
    twin = calibrate.images(Bundle(root, cpu_runnable(manifest), "provisional"), size)
    half = draw(provisional, HalfTorchBackend(provisional, folder.path, precisions, fused_loras=opts.loras))
    rounded = [psnr(a, b) for a, b in zip(ref, twin)]
    computed = [psnr(a, b) for a, b in zip(ref, half)]
    worst = min(rounded + computed)
    manifest["fidelity"] = {
        "image_psnr_vs_fp32_db": worst,
        "image_psnr_rounded_weights_db": [round(p, 2) for p in rounded],
        "image_psnr_half_compute_db": [round(p, 2) for p in computed],
        "image_cases": [list(c) for c in calibrate.FIDELITY_CASES],
        "half_components": sorted(n for n, p in precisions.items() if p in ("bf16", "fp16")),
        "how": ("reference: the source modules in PyTorch FP32; rounded_weights: the bundle's graphs as FP32 "
                f"twins in ONNX Runtime; half_compute: the same modules in PyTorch with {label} arithmetic"),
        "image_gate": image_gate(label.split("/")[0].lower(), worst, opts.accept_low_fidelity),
    }
    progress(f"[fidelity] image PSNR vs FP32: {min(rounded):.1f} dB with rounded weights (ONNX graphs, FP32 "
             f"twins), {min(computed):.1f} dB with {label} arithmetic (PyTorch)")


def quantize_components(opts: ExportOptions, fam, manifest: dict, root: Path, prompts: list[str],
                        encoders: tuple[str, ...], progress: Progress) -> None:
    """FP8 where asked: the text encoders, calibrated on the calibration prompts as the pipeline tokenizes
    them; then the transformer, calibrated on the real sampler fed by those encoders, as it will run. Each is
    measured against its FP32 export, then the whole bundle's images against the all-FP32 bundle's."""
    from app.bundle.manifest import Bundle
    from export import calibrate
    from export.fp8_policy import (
        TEXT_ENCODER_HIGH_PRECISION,
        fp8_exclude_patterns,
        text_encoder_fp8_exclude_patterns,
    )

    fp32 = Bundle(root, cpu_runnable(manifest), "provisional")  # BF16 parts run as their FP32 twins
    current, cosines = fp32, {}
    if encoders:
        # Held out: the fixed image prompts, never calibrated on.
        feeds = calibrate.capture_encoders(fp32, encoders, prompts[: opts.calibration_count], progress)
        held_out = calibrate.capture_encoders(fp32, encoders, [p for p, _ in calibrate.FIDELITY_CASES],
                                              lambda _m: None)
        for name in encoders:
            cosines[name] = _quantize_component(root, manifest, name, feeds[name], held_out[name],
                                                text_encoder_fp8_exclude_patterns(fam.name, name,
                                                                                  manifest["pipeline"]),
                                                TEXT_ENCODER_HIGH_PRECISION, progress, opts.accept_low_fidelity)
            current = calibrate.with_component(current, name, f"{name}_fp8/model.onnx")
    if opts.precision == "fp8":
        feeds = calibrate.capture(current, "transformer", prompts, opts.calibration_count,
                                  opts.calibration_size, progress, opts.calibration_steps)
        k = max(1, len(feeds) // 8)  # the last sampler steps are held out of calibration
        calib, held_out = (feeds[:-k], feeds[-k:]) if len(feeds) > k else (feeds, feeds)
        cosines["transformer"] = _quantize_component(root, manifest, "transformer", calib, held_out,
                                                     fp8_exclude_patterns(fam.name), "fp16", progress,
                                                     opts.accept_low_fidelity)
        current = calibrate.with_component(current, "transformer", "transformer_fp8/model.onnx")
    progress("[fidelity] FP8 vs FP32 images on fixed prompts and seeds")
    ref = calibrate.images(fp32, opts.calibration_size, opts.calibration_steps)
    fp8 = calibrate.images(current, opts.calibration_size, opts.calibration_steps)
    image_psnr = [psnr(a, b) for a, b in zip(ref, fp8)]
    for name in cosines:  # the FP8 files replace the FP32 ones only now: the reference images needed those
        shutil.rmtree(root / name)
        (root / f"{name}_fp8").rename(root / name)
    half = manifest.pop("fidelity", None)  # the BF16 parts' image check (half_images), kept under "half"
    manifest["fidelity"] = {"image_psnr_vs_fp32_db": min(image_psnr),
                            "image_psnr_per_case_db": [round(p, 2) for p in image_psnr],
                            "image_cases": [list(c) for c in calibrate.FIDELITY_CASES],
                            "fp8_components": list(cosines), "output_cosine_min": cosines}
    if "transformer" in cosines:
        manifest["fidelity"]["transformer_cosine"] = cosines["transformer"]
    if half:
        manifest["fidelity"]["half"] = half
        manifest["fidelity"]["reference"] = ("the bundle before FP8: its BF16 parts as FP32 twins (their own image "
                                             "PSNR vs FP32 is under half)")
    progress(f"[fidelity] image PSNR vs FP32 {min(image_psnr):.1f} dB with "
             f"{', '.join(cosines)} in FP8")


def _quantize_component(root: Path, manifest: dict, name: str, calibration: list, held_out: list,
                        patterns: tuple[str, ...], high_precision: str, progress: Progress,
                        accept_low_fidelity: bool = False) -> float:
    """Quantize one exported component to `<name>_fp8/`, record what and how well in its manifest entry;
    returns its worst output cosine vs FP32 on `held_out`."""
    from export.fp8 import fidelity, quantize_fp8

    src, dst = root / name / "model.onnx", root / f"{name}_fp8" / "model.onnx"
    dst.parent.mkdir()
    import onnxruntime as ort

    # ModelOpt calibrates on the GPU when this ONNX Runtime has CUDA (onnxruntime-gpu), else on the CPU.
    eps = ("cuda:0", "cpu") if "CUDAExecutionProvider" in ort.get_available_providers() else ("cpu",)
    report = quantize_fp8(src, dst, calibration, patterns, progress=lambda m: progress(f"[{name}] {m}"),
                          high_precision=high_precision, calibration_eps=eps)
    cos = fidelity(src, dst, held_out)
    entry = manifest["components"][name]
    entry["precision"] = "fp8"
    entry["runs_on"] = ["tensorrt-rtx (sm89+)", "tensorrt (sm89+)", "onnxruntime (reference speed only)"]
    entry["fp8"] = {k: v for k, v in report.items() if k not in ("quantized_nodes", "excluded_nodes")}
    entry["fp8"].update(quantized=len(report["quantized_nodes"]), excluded_nodes=report["excluded_nodes"],
                        exclude_patterns=list(patterns),
                        size_ratio_vs_fp32=round(report["bytes_fp8"] / report["bytes_fp32"], 3))
    entry["fidelity_fp8"] = {"output_cosine_min": cos["cosine_min"], "output_cosine_mean": cos["cosine_mean"],
                             "max_abs_err": cos["max_abs_error"], "held_out_samples": cos["samples"],
                             "outputs": cos["outputs"]}
    if not cos["finite"]:
        raise EdgegenError(f"the FP8 {name} produced NaN or Inf on held-out inputs; export it with "
                           f"{'--precision' if name == 'transformer' else '--text-encoder-precision'} fp32")
    entry["fp8_fidelity_gate"] = gate(name, "fp8", cos["cosine_min"], cos["max_rel_error"], accept_low_fidelity)
    progress(f"[fidelity] {name} output cosine {cos['cosine_min']:.5f} (held-out, vs FP32), "
             f"{len(report['quantized_nodes'])} layers FP8, file {report['bytes_fp8'] / 2**20:.1f} MiB vs "
             f"{report['bytes_fp32'] / 2**20:.1f} MiB FP32")
    return cos["cosine_min"]


def build_engines(opts: ExportOptions, fam, manifest: dict, root: Path, progress: Progress) -> list[dict]:
    """One engine per component and compute capability, from the ONNX just written, under engines/."""
    from export.engines import build_engine
    from export.profiles import profile_desc, profiles_for

    sms = opts.sms or ((None,) if opts.target == "tensorrt" else ())
    if not sms:
        raise UsageError("--target tensorrt-rtx needs --sm, e.g. --sm 89,120 (see: edgegen plan)")
    records = []
    for name, entry in manifest["components"].items():
        profiles = profiles_for(fam, name, entry, manifest["size_range"], manifest["defaults"], manifest["pipeline"])
        for sm in sms:
            tmp = root / "engines" / f"{name}.building"
            tmp.parent.mkdir(exist_ok=True)
            rec = build_engine(root / entry["onnx"], tmp, flavour=opts.target, sm=sm, profiles=profiles,
                               refit=opts.target == "tensorrt" and opts.precision in ("fp16", "bf16"),
                               progress=lambda m, n=name: progress(f"[{n}] {m}"),
                               profile_desc=profile_desc(fam, name, manifest["size_range"], manifest["pipeline"]))
            final = root / "engines" / f"{name}-{rec['key']}.engine"
            tmp.rename(final)
            rec.update(component=name, file=final.relative_to(root).as_posix())
            records.append(rec)
    return records


def export_one(folder: ModelFolder, spec, out_dir: Path, loras=(), progress: Progress = print,
               precision: str = "fp32", runtime_lora: int = 0, controlnet: dict | None = None) -> tuple[dict, list]:
    """Load, export and check one component; returns its manifest entry and the LoRA records (if fused here).
    `controlnet`: the manifest record of the ControlNet `spec` is (export --controlnet).

    `precision` fp32, or bf16/fp16: the module is loaded in that dtype (no FP32 copy), traced as is, with
    FP32 islands (export/bf16_policy.py), and checked through its FP32 twin (export/bf16.py).

    Memory: one copy of the component (in the precision it is exported in) plus one tensor at any time. The
    PyTorch reference outputs are computed first, then the module is dropped, so the graph is the weights'
    only holder while it is written (transposes deferred, tensor by tensor), and it is gone before ONNX
    Runtime maps the file to check it."""
    from export.bf16 import TORCH_DTYPES

    t0 = time.monotonic()
    fam = folder.family
    half = precision in ("bf16", "fp16")
    dtype = TORCH_DTYPES[precision] if half else torch.float32
    progress(f"[{spec.name}] loading {spec.source} from {folder.path.name}"
             + (f" in {precision.upper()}" if half else ""))
    if spec.role == "controlnet":
        from app.models.loading import load_controlnet

        module = load_controlnet(spec.source, folder, controlnet["shares_transformer_pos_embed"], dtype)
    else:
        module = load_component(folder, spec.source, dtype)
    lora_records: list = []
    if spec.role == "transformer" and loras:
        progress(f"[{spec.name}] fusing {len(loras)} LoRA(s)")
        lora_records = fuse_loras(module, folder.index["_class_name"], loras)
    slots = None
    if spec.role == "transformer" and runtime_lora:
        from app.bundle.families import with_lora_slots
        from app.models.wrappers import lora_slots

        slots = lora_slots(module)
        spec = with_lora_slots(spec, slots)
        progress(f"[{spec.name}] run-time LoRA inputs on {len(slots)} layers (rank up to {runtime_lora})")
    if half:
        from app.models.wrappers import wrap_in_dtype
        from export.bf16_policy import FP32_INPUTS

        wrapped = wrap_in_dtype(spec, module, dtype, FP32_INPUTS.get(fam.name, frozenset()), slots=slots)
    else:
        wrapped = wrap(spec, module, slots)
    owner = SimpleNamespace(**{"controlnet" if spec.role == "controlnet" else spec.source: module})
    if spec.role == "transformer":
        owner.transformer = module
    (r0, c0), (r1, c1) = fam.trace_grids
    samples = [sample_inputs(fam.name, owner, spec.name, TRACE_BATCH, r0, c0, TRACE_TEXT, spec),
               sample_inputs(fam.name, owner, spec.name, CHECK_BATCH, r1, c1, CHECK_TEXT, spec)]
    if slots:  # non-zero branches, of two ranks (2: rank 1 would be specialised away), checked like the rest
        samples = [{**s, **lora_sample_inputs(slots, rank, seed)} for s, rank, seed in zip(samples, (2, 3), (0, 1))]
    half_compute = None
    if half:
        from export.bf16 import fp32_compute

        progress(f"[{spec.name}] PyTorch references: FP32 and {precision.upper()} compute on the same weights")
        wrapped.dtype_ = torch.float32
        with fp32_compute(module):
            references = [_reference(spec, wrapped, s) for s in samples]
        wrapped.dtype_ = dtype
        half_compute = _worst([compare(r, _reference(spec, wrapped, s)) for r, s in zip(references, samples)])
        _trim()  # the widened weights were freed one by one; give their pages back before tracing
    else:
        references = [_reference(spec, wrapped, s) for s in samples]
    parameters = sum(p.numel() for p in module.parameters())
    external = needs_external_data(module)
    weights = [*module.parameters(), *module.buffers()]
    cached = export_cache.lookup(folder, spec, precision, samples[0], loras, out_dir)  # off unless opted in
    progress(f"[{spec.name}] " + ("ONNX graph from the export cache" if cached.hit else "exporting to ONNX (dynamo)"))
    program = None if cached.hit else trace_component(spec, wrapped, samples[0])
    del module, wrapped, owner
    gc.collect()
    fp32_ops = frozenset()
    if half:
        from export.bf16_policy import fp32_ops as policy_ops

        fp32_ops = policy_ops(fam.name)
    onnx_path = cached.path if cached.hit else save_component(program, spec, out_dir, external, fp32_ops)
    cached.store()
    del program
    # Free the weights' storage explicitly: onnxscript's module-level rewrite rules keep the last graph they
    # matched (and through it the exported tensors) alive, so dropping our references alone frees nothing.
    for t in weights:
        t.data = torch.empty(0, dtype=t.dtype)
    del weights
    _trim()
    if half:
        from export.bf16 import fp32_twin, twin_session

        progress(f"[{spec.name}] checking the graph's FP32 twin in ONNX Runtime against PyTorch on two shapes")
        twin = fp32_twin(onnx_path)
        fidelity = _check(spec, twin, samples, references, twin_session(twin))
    else:
        progress(f"[{spec.name}] checking ONNX Runtime against PyTorch on two shapes")
        fidelity = _check(spec, onnx_path, samples, references)
    entry = {
        "role": spec.role, "source": "controlnet" if spec.role == "controlnet" else spec.source,
        "class": "SD3ControlNetModel" if spec.role == "controlnet" else folder.index[spec.source][1],
        "onnx": f"{spec.name}/model.onnx", "precision": precision,
        "runs_on": (["tensorrt-rtx (sm80+)", "tensorrt (sm80+)", "onnxruntime (CUDA only)"] if precision == "bf16"
                    else ["tensorrt-rtx", "tensorrt", "onnxruntime (CUDA only)"] if half
                    else ["onnxruntime", "tensorrt-rtx", "tensorrt"]),
        **_io(spec, onnx_path), "fidelity": fidelity,
        "parameters": parameters, "export_seconds": round(time.monotonic() - t0, 2),
    }
    if half:
        entry["fidelity"]["checked"] = ("the graph's FP32 twin (every BF16 tensor widened) in ONNX Runtime vs "
                                        "PyTorch in FP32 on the same rounded weights")
        entry["fidelity_" + precision] = {**half_compute, "checked": f"PyTorch {precision.upper()} compute vs "
                                          "PyTorch FP32 compute on the same rounded weights"}
        entry["fp32_ops"] = sorted(fp32_ops)
    if slots:
        entry["lora"] = {"slots": slots, "max_rank": int(runtime_lora),
                         "how": "y = W x + B (A x) on each slot's nn.Linear; inputs lora_a_<i> (rank x in), "
                                "lora_b_<i> (out x rank) for slot i; no LoRA: rank 1 of zeros"}
    progress(f"[{spec.name}] done in {time.monotonic() - t0:.1f}s: max|err| {fidelity['max_abs_err']:.2e}, "
             f"cosine {fidelity['cosine']:.6f}"
             + (f"; {precision.upper()} compute cosine {half_compute['cosine']:.5f}" if half else ""))
    return entry, lora_records


def controlnet_precision(precision: str) -> str:
    """A ControlNet's graph precision: the transformer's, except BF16 beside an FP8 transformer (ControlNets
    are not FP8-calibrated: their residuals feed every block, so their error would add to the transformer's)."""
    return "bf16" if precision == "fp8" else precision


def check_controlnets(folder: ModelFolder, controlnets, dims: dict, with_encoder: bool) -> dict[str, dict]:
    """export --controlnet NAME=DIR, checked before the first weight is read: {name: manifest record}."""
    import re

    from app.bundle.families import controlnet_dims
    from app.bundle.files import sha256_file
    from app.errors import ModelFolderError

    if not controlnets:
        return {}
    if folder.family.name != "sd3.5":
        raise UsageError(f"--controlnet is for SD3.5 models; {folder.path} is {folder.family.name}")
    if not with_encoder:
        raise UsageError("--controlnet needs the VAE encoder (control images are VAE-encoded); drop --no-encoder")
    nets: dict[str, dict] = {}
    for name, path in controlnets:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", name) or name in nets:
            raise UsageError(f"--controlnet name {name!r} must be unique, lower-case letters, digits, - or _ "
                             "(e.g. canny=DIR)")
        path = Path(path).absolute()
        weights = sorted(path.glob("*.safetensors"))
        if not (path / "config.json").is_file() or not weights:
            raise ModelFolderError(f"--controlnet {name}={path} is not a diffusers ControlNet folder (config.json and "
                                   "safetensors); convert single-file nets with diffusers' "
                                   "scripts/convert_sd3_controlnet_to_diffusers.py")
        rec = controlnet_dims(path, folder.path, dims)
        kind = name.split("-")[0].split("_")[0]
        rec.update(component=f"controlnet_{name}", preprocessor=kind if kind in ("canny", "blur") else "none",
                   source={"path": str(path), "name": path.name,
                           "config_sha256": sha256_file(path / "config.json"),
                           "weights_sha256": {w.name: sha256_file(w) for w in weights}})
        first = next(iter(nets.values()), None)
        if first and (first["layers"], first["inner_dim"]) != (rec["layers"], rec["inner_dim"]):
            raise UsageError(f"--controlnet {name} has {rec['layers']} layers, {next(iter(nets))} has "
                             f"{first['layers']}: the nets of one bundle share one residual input, so they must "
                             "have the same num_layers; export a bundle per kind")
        nets[name] = rec
    return nets


def lora_sample_inputs(slots: list[dict], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Random side-branch inputs for tracing and checking a run-time LoRA transformer."""
    from app.bundle.families import lora_input_names

    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, slot in enumerate(slots):
        a, b = lora_input_names(i)
        out[a] = torch.randn(rank, slot["in"], generator=g) * 0.1
        out[b] = torch.randn(slot["out"], rank, generator=g) * 0.1
    return out


def _trim() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps freed blocks under its mmap threshold,
    up to 32 MiB each, in the process: the RSS of a checked-then-dropped model would stay)."""
    gc.collect()
    if platform.system() == "Linux":
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def _worst(figures: list[dict]) -> dict:
    """The worst of several compare() results (NaN wins, so no gate can pass it)."""
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "cosine": 1.0}
    for c in figures:
        for key, pick in (("max_abs_err", max), ("max_rel_err", max), ("cosine", min)):
            worst[key] = c[key] if math.isnan(c[key]) or math.isnan(worst[key]) else pick(worst[key], c[key])
    return worst


def _reference(spec, wrapped, sample: dict) -> dict[str, np.ndarray]:
    with torch.no_grad():
        ref = wrapped(*[sample[t.name] for t in spec.inputs])
    ref = ref if isinstance(ref, tuple) else (ref,)
    return {o.name: r.numpy() for o, r in zip(spec.outputs, ref)}


def _check(spec, onnx_path: Path, samples: list[dict], references: list[dict], sess=None) -> dict:
    """ONNX Runtime vs the PyTorch outputs on each sample. Prepacking is off: it would copy every weight
    (a second model in memory) to speed up a session that runs twice."""
    import onnxruntime as ort

    if sess is None:
        so = ort.SessionOptions()
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    worst = {"max_abs_err": 0.0, "max_rel_err": 0.0, "cosine": 1.0, "shapes": []}
    for sample, ref in zip(samples, references):
        got = sess.run(None, {k: v.numpy() for k, v in sample.items()})
        c = compare(ref, {o.name: np.asarray(g) for o, g in zip(spec.outputs, got)})
        for key, pick in (("max_abs_err", max), ("max_rel_err", max), ("cosine", min)):
            # NaN must survive: max/min would silently drop it and a broken graph would pass the gate
            worst[key] = c[key] if math.isnan(c[key]) or math.isnan(worst[key]) else pick(worst[key], c[key])
        worst["shapes"].append({k: list(v.shape) for k, v in sample.items()})
    return worst
