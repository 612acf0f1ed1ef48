"""Model folder -> engine bundle: export each component, check it against PyTorch, write the manifest."""

from __future__ import annotations

import gc
import json
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal

import numpy as np
import torch

from app.errors import UsageError
from app.runtime.families import DYNAMIC_DIMS
from app.runtime.modelfolder import ModelFolder, inspect_folder, load_component
from app.runtime.wrappers import wrap
from export.bundle_writer import BundleWriter
from export.lora import check_loras, fuse_loras
from export.onnx_export import compare, export_component

Precision = Literal["fp32", "bf16", "fp16", "fp8"]
Target = Literal["onnx", "tensorrt-rtx", "tensorrt"]
Progress = Callable[[str], None]

# Trace at batch 2 (batch 1 gets specialised away) and a short text; validate on a second, odd-sized shape
# so a wrong dynamic-shape translation cannot hide behind the trace shape.
TRACE_BATCH, TRACE_TEXT = 2, 16
CHECK_BATCH, CHECK_TEXT = 1, 24


def vae_scale_factor(folder: ModelFolder) -> int:
    """Pixels per latent cell, as diffusers derives it: 2 ** (len(block_out_channels) - 1)."""
    cfg = json.loads((folder.path / "vae" / "config.json").read_text())
    return 2 ** (len(cfg["block_out_channels"]) - 1)


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
    loras: tuple[tuple[Path, float], ...] = ()
    overwrite: bool = False
    extra: dict = field(default_factory=dict)


def _versions() -> dict:
    import diffusers
    import onnx
    import transformers

    from app import __version__

    return {"edgegen": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__, "python": platform.python_version()}


def _source_identity(folder: ModelFolder) -> dict:
    from app.runtime.files import sha256_file

    return {"path": str(folder.path), "name": folder.path.name, "pipeline": folder.index.get("_class_name"),
            "model_index_sha256": sha256_file(folder.path / "model_index.json")}


def _defaults_and_range(folder: ModelFolder, opts: ExportOptions) -> tuple[dict, dict]:
    fam = folder.family
    d = fam.defaults(folder.index, folder.path)
    defaults = {"steps": d.steps, "guidance": d.guidance, "width": d.width, "height": d.height}
    lo, hi = fam.size_range
    own = folder.path / "edgegen_defaults.json"  # a model may carry its own (the demo model does)
    if own.is_file():
        extra = json.loads(own.read_text())
        defaults.update({k: extra[k] for k in ("steps", "guidance", "width", "height") if k in extra})
        lo, hi = extra.get("min_size", lo), extra.get("max_size", hi)
    lo, hi = opts.min_size or lo, opts.max_size or hi
    m = vae_scale_factor(folder) * fam.patch
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


def export_bundle(opts: ExportOptions, progress: Progress = print) -> Path:
    folder = inspect_folder(opts.model, opts.family)
    fam = folder.family
    if opts.precision == "fp8":
        from export.calibrate import read_prompts

        prompts = read_prompts(opts.calibration_prompts)  # fail on a bad file before hours of export
    if opts.precision not in ("fp32", "fp8"):
        raise UsageError(f"--precision {opts.precision} is not available yet; use fp32 (ONNX Runtime/TensorRT-RTX) "
                         "or fp8")
    defaults, size_range = _defaults_and_range(folder, opts)
    if opts.loras:
        check_loras(folder.path / fam.component("transformer").source, folder.index["_class_name"], opts.loras)
    components: dict[str, dict] = {}
    lora_records: list[dict] = []
    started = time.monotonic()
    with BundleWriter(opts.out, overwrite=opts.overwrite) as w:
        for spec in fam.components:
            if not folder.present(spec.source):
                continue
            t0 = time.monotonic()
            progress(f"[{spec.name}] loading {spec.source} from {folder.path.name}")
            module = load_component(folder, spec.source)
            if spec.role == "transformer" and opts.loras:
                progress(f"[{spec.name}] fusing {len(opts.loras)} LoRA(s)")
                lora_records = fuse_loras(module, folder.index["_class_name"], opts.loras)
            wrapped = wrap(spec, module)
            owner = SimpleNamespace(**{spec.source: module})
            progress(f"[{spec.name}] exporting to ONNX (dynamo)")
            (r0, c0), (r1, c1) = fam.trace_grids
            trace = fam.sample_inputs(owner, spec.name, TRACE_BATCH, r0, c0, TRACE_TEXT)
            check = fam.sample_inputs(owner, spec.name, CHECK_BATCH, r1, c1, CHECK_TEXT)
            onnx_path = export_component(spec, wrapped, trace, w.tmp / spec.name)
            progress(f"[{spec.name}] checking ONNX Runtime against PyTorch on two shapes")
            fidelity = _check(spec, wrapped, onnx_path, [trace, check])
            components[spec.name] = {
                "role": spec.role, "source": spec.source, "class": folder.index[spec.source][1],
                "onnx": f"{spec.name}/model.onnx", "precision": "fp32", "runs_on": ["onnxruntime", "tensorrt-rtx", "tensorrt"],
                **_io(spec, onnx_path), "fidelity": fidelity,
                "parameters": sum(p.numel() for p in module.parameters()), "export_seconds": round(time.monotonic() - t0, 2),
            }
            progress(f"[{spec.name}] done in {time.monotonic() - t0:.1f}s: max|err| {fidelity['max_abs_err']:.2e}, "
                     f"cosine {fidelity['cosine']:.6f}")
            del module, wrapped, owner
            gc.collect()
        for name in fam.tokenizers + ("scheduler",):
            if folder.present(name):
                shutil.copytree(folder.path / name, w.tmp / name)
        manifest = {
            "family": fam.name,
            "source": _source_identity(folder),
            "precision": opts.precision,
            "pipeline": {"is_distilled": bool(folder.index.get("is_distilled", False)),
                         "vae_scale_factor": vae_scale_factor(folder), "patch": fam.patch},
            "components": components,
            "loras": lora_records,
            "tokenizers": [t for t in fam.tokenizers if folder.present(t)],
            "scheduler": "scheduler/scheduler_config.json",
            "defaults": defaults,
            "size_range": size_range,
            "engines": [],
            "exporter": _versions(),
            "export_seconds": round(time.monotonic() - started, 2),
        }
        if opts.precision == "fp8":
            quantize_transformer(opts, fam, manifest, w.tmp, prompts, progress)
        if opts.target != "onnx":
            manifest["engines"] = build_engines(opts, fam, manifest, w.tmp, progress)
        return w.commit(manifest)


def quantize_transformer(opts: ExportOptions, fam, manifest: dict, root: Path, prompts: list[str],
                         progress: Progress) -> None:
    """Calibrate on the real sampler, quantize the transformer to FP8 with ModelOpt, measure what it cost."""
    from app.runtime.manifest import Bundle
    from export import calibrate
    from export.fp8 import fidelity, quantize_fp8
    from export.fp8_policy import fp8_exclude_patterns

    fp32 = Bundle(root, manifest, "provisional")
    size = opts.calibration_size
    feeds = calibrate.capture(fp32, "transformer", prompts, opts.calibration_count, size, progress)
    held_out = feeds[-max(1, len(feeds) // 8):]
    src, dst = root / "transformer" / "model.onnx", root / "transformer_fp8" / "model.onnx"
    dst.parent.mkdir()
    report = quantize_fp8(src, dst, feeds, fp8_exclude_patterns(fam.name),
                          progress=lambda m: progress(f"[transformer] {m}"))
    cos = fidelity(src, dst, held_out)
    progress("[fidelity] FP8 vs FP32 images on fixed prompts and seeds")
    ref = calibrate.images(fp32, size)
    fp8 = calibrate.images(calibrate.with_component(fp32, "transformer", "transformer_fp8/model.onnx"), size)
    image_psnr = [calibrate.psnr(a, b) for a, b in zip(ref, fp8)]
    shutil.rmtree(root / "transformer")
    dst.parent.rename(root / "transformer")
    entry = manifest["components"]["transformer"]
    entry["precision"] = "fp8"
    entry["runs_on"] = ["tensorrt-rtx (sm89+)", "tensorrt (sm89+)", "onnxruntime (reference speed only)"]
    entry["fp8"] = {k: v for k, v in report.items() if k not in ("quantized_nodes", "excluded_nodes")}
    entry["fp8"].update(quantized=len(report["quantized_nodes"]), excluded_nodes=report["excluded_nodes"],
                        exclude_patterns=list(fp8_exclude_patterns(fam.name)),
                        size_ratio_vs_fp32=round(report["bytes_fp8"] / report["bytes_fp32"], 3))
    entry["fidelity_fp8"] = {"output_cosine_min": cos["cosine_min"], "output_cosine_mean": cos["cosine_mean"],
                             "max_abs_err": cos["max_abs_error"], "held_out_samples": cos["samples"],
                             "image_psnr_vs_fp32_db": [round(p, 2) for p in image_psnr],
                             "image_cases": [list(c) for c in calibrate.FIDELITY_CASES]}
    manifest["fidelity"] = {"image_psnr_vs_fp32_db": min(image_psnr), "transformer_cosine": cos["cosine_min"]}
    progress(f"[fidelity] transformer output cosine {cos['cosine_min']:.5f} (held-out), image PSNR vs FP32 "
             f"{min(image_psnr):.1f} dB, file {report['bytes_fp8'] / 2**20:.1f} MiB vs {report['bytes_fp32'] / 2**20:.1f}"
             " MiB FP32")


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
                               profile_desc=profile_desc(fam, name, manifest["size_range"]))
            final = root / "engines" / f"{name}-{rec['key']}.engine"
            tmp.rename(final)
            rec.update(component=name, file=final.relative_to(root).as_posix())
            records.append(rec)
    return records


def _check(spec, wrapped, onnx_path: Path, samples: list[dict]) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = {"max_abs_err": 0.0, "cosine": 1.0, "shapes": []}
    for sample in samples:
        with torch.no_grad():
            ref = wrapped(*[sample[t.name] for t in spec.inputs])
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {k: v.numpy() for k, v in sample.items()})
        c = compare({o.name: r.numpy() for o, r in zip(spec.outputs, ref)},
                    {o.name: np.asarray(g) for o, g in zip(spec.outputs, got)})
        worst["max_abs_err"] = max(worst["max_abs_err"], c["max_abs_err"])
        worst["cosine"] = min(worst["cosine"], c["cosine"])
        worst["shapes"].append({k: list(v.shape) for k, v in sample.items()})
    return worst
