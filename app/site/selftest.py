"""`edgegen selftest`: the demo model through every backend here, each image checked against reference PNGs.

The references (assets/demo-references, written by `python -m tools.demo.references`) are diffusers' own FP32
images; every backend must reproduce them within THRESHOLD_DB. What cannot run on this machine is listed
with the reason, so a PASS says exactly what it covered.
"""

from __future__ import annotations

import gc
import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from app.errors import BundleError, EdgegenError, UsageError
from app.progress import say

if TYPE_CHECKING:  # imported lazily: a broken install gets a sentence, not an ImportError traceback

    from app.bundle.manifest import Bundle
    from app.site.selftest_bundle import Exporter
    from app.site.selftest_plan import Candidate

REQUIRED = ("numpy", "torch", "diffusers", "transformers", "PIL")
INDEX_KEYS = ("prompt", "seed", "steps", "guidance", "width", "height", "file")


@dataclass
class Outcome:
    name: str
    label: str
    passed: bool
    worst_db: float | None
    threshold_db: float
    seconds: float
    detail: str = ""
    cost: object = None  # app.site.measure.Cost: ms per step, peak VRAM (torch and NVML)
    needs: str = ""  # the "needs" cell when it is not "≥ threshold" (the LoRA check's "< 40 dB from plain")


def load_references(folder: Path) -> list[dict]:
    """index.json's entries, each with its PNG present; UsageError naming the command that writes them."""
    folder = Path(folder)
    index = folder / "index.json"
    hint = f"write them with: python -m tools.demo.references --model MODEL_DIR --out {folder}"
    if not index.is_file():
        raise UsageError(f"no reference images in {folder} (index.json is missing); {hint}")
    try:
        rows = json.loads(index.read_text())
    except ValueError:
        raise UsageError(f"{index} is not valid JSON; {hint}") from None
    if not isinstance(rows, list) or not rows:
        raise UsageError(f"{index} lists no reference images; {hint}")
    for r in rows:
        if not isinstance(r, dict) or any(k not in r for k in INDEX_KEYS):
            raise UsageError(f"{index}: every entry needs {', '.join(INDEX_KEYS)}; {hint}")
        if not (folder / r["file"]).is_file():
            raise UsageError(f"reference image {folder / r['file']} is missing; {hint}")
    return rows


def _model_sha(model_dir: Path) -> str | None:
    from app.bundle.files import sha256_file

    index = Path(model_dir) / "model_index.json"
    return sha256_file(index) if index.is_file() else None


def run_candidate(bundle: Bundle, cand: Candidate, refs: list[dict], ref_dir: Path) -> Outcome:
    """Generate every reference request with one backend; pass when the worst PSNR reaches the threshold."""
    import numpy as np
    from PIL import Image

    from app.runtime.images import psnr  # numpy: imported after the dependency check, not at module load
    from app.runtime.pipelines import GenerationRequest, make_pipeline

    from app.site.measure import DeviceMeter, StepClock

    t0 = time.monotonic()
    worst, backend, meter, clock = None, None, None, None
    skipped: list[str] = []
    try:
        backend = cand.make()
        pipe = make_pipeline(bundle, backend)
        meter, clock = DeviceMeter(pipe.device).__enter__(), StepClock(pipe.device)
        for i, r in enumerate(refs, 1):
            images = tuple(str(ref_dir / f) for f in r.get("images", ()))  # reference-image (VAE encoder) cases
            if images and "vae_encoder" not in bundle.components():
                skipped.append(r["file"])
                continue
            mask = str(ref_dir / r["mask"]) if r.get("mask") else None  # inpainting cases
            inputs = (f", inpainting {r['images'][0]} with {r['mask']}" if mask else
                      f", references {', '.join(r['images'])}" if images else "")
            say(f"[{cand.label}] {i}/{len(refs)}: {r['prompt']} (seed {r['seed']}{inputs})")
            req = GenerationRequest(prompt=r["prompt"], seed=int(r["seed"]), steps=int(r["steps"]),
                                    guidance=float(r["guidance"]), width=int(r["width"]), height=int(r["height"]),
                                    images=images, mask=mask, strength=r.get("strength"))
            got = pipe.generate(req, on_step=clock).image
            with Image.open(ref_dir / r["file"]) as im:
                want = np.asarray(im.convert("RGB"))
            if got.shape != want.shape:
                return Outcome(cand.name, cand.label, False, worst, cand.threshold_db, time.monotonic() - t0,
                               f"{r['file']}: image is {got.shape[1]}x{got.shape[0]}, reference "
                               f"{want.shape[1]}x{want.shape[0]}")
            db = psnr(got, want)
            worst = db if worst is None else min(worst, db)
    except EdgegenError as e:
        return Outcome(cand.name, cand.label, False, worst, cand.threshold_db, time.monotonic() - t0, str(e))
    except Exception as e:  # a backend crash is a FAIL of that backend, not of the whole self-test
        return Outcome(cand.name, cand.label, False, worst, cand.threshold_db, time.monotonic() - t0,
                       f"{type(e).__name__}: {e}")
    finally:
        if meter is not None:
            try:
                meter.__exit__(None, None, None)
                meter.cost.ms_per_step = clock.ms_per_step
            except Exception as e:  # measuring must never turn a pass into a crash
                say(f"[{cand.label}] measuring memory failed: {e}")
        close = getattr(backend, "close", None)
        if close is not None:
            try:
                close()
            except Exception as e:
                say(f"[{cand.label}] closing the backend failed: {e}")
        del backend
        gc.collect()
    ok = worst is not None and worst >= cand.threshold_db
    detail = "" if ok else f"worst image {worst:.1f} dB, below {cand.threshold_db:.0f} dB"
    if skipped:  # a bundle exported before the encoder existed, or with --no-encoder: say what was not covered
        from app.runtime.references import encoder_export_command

        detail = (f"{detail}; " if detail else "") + (
            f"reference-image case {', '.join(skipped)} not run: the bundle has no VAE encoder "
            f"(re-export: {encoder_export_command(bundle)})")
    return Outcome(cand.name, cand.label, ok, worst, cand.threshold_db, time.monotonic() - t0, detail,
                   meter.cost if meter else None)


def _environment() -> dict:
    from app.planning.devices import read_gpus
    from app.runtime.engine.trt import installed_versions

    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    except ImportError:
        providers = None
    try:
        import torch

        torch_cuda = bool(torch.cuda.is_available())
    except Exception:
        torch_cuda = False
    return {"gpus": read_gpus(), "ort_providers": providers, "torch_cuda": torch_cuda,
            "installed": installed_versions()}


def selftest(model_dir: Path | None = None, references_dir: Path | None = None, bundle_dir: Path | None = None,
             console=None, export: Exporter | None = None) -> int:
    """Run every backend available here against the references; 0 when all that ran passed, else 1.

    `export(model_dir, out, target, sms)` writes the demo bundle when none is found; the CLI wires in the
    exporter, so site code never imports it."""
    for module in REQUIRED:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise EdgegenError(f"the self-test needs {module}, which does not import here ({e}); reinstall "
                               "edgegen with its dependencies (pip install 'edgegen[cpu]')") from None
    from app.bundle.locations import assets_dir
    from app.site.selftest_bundle import demo_bundle
    from app.site.selftest_plan import plan
    from app.site.selftest_view import render

    model_dir = Path(model_dir) if model_dir else assets_dir() / "demo-model"
    references_dir = Path(references_dir) if references_dir else assets_dir() / "demo-references"
    refs = load_references(references_dir)
    env = _environment()
    bundle, how, notes = demo_bundle(model_dir, bundle_dir, env, export)
    want = _model_sha(model_dir)
    if want and bundle.manifest["source"].get("model_index_sha256") != want:
        raise BundleError(f"bundle {bundle.root} was exported from {bundle.manifest['source'].get('path')}, not from "
                          f"{model_dir}, so it cannot match the references; pass the matching --bundle or --model")
    say(f"self-test bundle: {bundle.root} ({how})")
    cands = plan(bundle, model_dir, env["gpus"], env["ort_providers"], env["torch_cuda"], env["installed"])
    outcomes = [run_candidate(bundle, c, refs, references_dir) for c in cands if c.skip is None]
    from app.site.selftest_lora import lora_outcomes

    with_lora, lora_skipped = lora_outcomes(bundle, cands, outcomes, refs, references_dir)
    outcomes += with_lora
    why_not = dict(notes)  # an engine build that failed explains better than "the bundle has no engines"
    skipped = [(c.label, why_not.pop(c.label, c.skip)) for c in cands if c.skip is not None]
    skipped += list(why_not.items()) + lora_skipped
    render(outcomes, skipped, bundle, len(refs), console)
    return 0 if outcomes and all(o.passed for o in outcomes) else 1
