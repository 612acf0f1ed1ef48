"""The self-test's run-time LoRA check: every backend here, with a LoRA, against the first reference backend.

For a bundle exported with --runtime-lora. A synthetic LoRA (seeded, rank 4, on every attention and feed-forward
layer of the bundle's transformer) is written into a temporary library; the first reference request is drawn with it by the
reference backend (the PyTorch reference, else ONNX Runtime CPU) and by every other backend that ran, and each
must match within its threshold. The reference's own LoRA image must differ from the plain reference PNG, so a
branch that adds nothing cannot pass. This is how a site proves the LoRA inputs on its GPU and engines.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from app.errors import EdgegenError
from app.progress import say

RANK, SEED, NAME = 4, 1234, "selftest-lora"
REFERENCE_BACKENDS = ("torch", "onnxruntime-cpu")
CHANGED_BELOW_DB = 40.0  # the LoRA image vs the plain reference: a live branch changes the picture


def synthetic_lora(slots: list[dict], path: Path) -> Path:
    """A diffusers-layout LoRA on the bundle's attention and feed-forward layers, A ~ N(0, 1/in), B ~ N(0, 4/rank):
    a change of the order of the layers' own weights, so a live branch visibly changes the picture."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(SEED)
    state = {}
    for s in slots:
        if any(part in f".{s['module']}." for part in (".attn.", ".ff.", ".ff_context.")):
            a = torch.randn(RANK, s["in"], generator=g) / s["in"] ** 0.5
            state[f"transformer.{s['module']}.lora_A.weight"] = a
            state[f"transformer.{s['module']}.lora_B.weight"] = torch.randn(s["out"], RANK, generator=g) * 2 / RANK ** 0.5
    save_file(state, str(path))
    return path


def lora_outcomes(bundle, cands, ran: list, refs: list[dict], ref_dir: Path):
    """(outcomes, skipped) for the run-time LoRA check; `ran` are the backends' outcomes from the plain check."""
    from app.bundle.trust import load_lora_policy
    from app.runtime.loras import add_to_library, bundle_lora
    from app.site.selftest import Outcome

    lora = bundle_lora(bundle.manifest)
    label = "run-time LoRA"
    if lora is None:
        return [], [(label, "not run — the self-test bundle has no LoRA inputs (export it with --runtime-lora 16 "
                            "to cover LoRAs)")]
    if load_lora_policy().require_signed_bundles:
        return [], [(label, "not run — this site requires signed LoRAs and the self-test's synthetic LoRA is "
                            "unsigned")]
    passed = {o.name for o in ran if o.passed}
    by_name = {c.name: c for c in cands if c.skip is None and c.name in passed}
    ref_name = next((n for n in REFERENCE_BACKENDS if n in by_name), None)
    if ref_name is None:
        return [], [(label, "not run — neither the PyTorch reference nor ONNX Runtime CPU passed here")]
    case = next(r for r in refs if not r.get("images"))
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="edgegen-selftest-lora-") as tmp:
        folder = Path(tmp)
        add_to_library(synthetic_lora(lora["slots"], folder / "in.safetensors"), NAME, bundle=bundle,
                       folder=folder / "library")
        want = None
        for name in [ref_name, *[n for n in by_name if n != ref_name]]:
            cand = by_name[name]
            t0 = time.monotonic()
            try:
                got = _draw(bundle, cand, case, folder / "library")
            except EdgegenError as e:
                outcomes.append(Outcome(f"{name}-lora", f"{cand.label} + LoRA", False, None, cand.threshold_db,
                                        time.monotonic() - t0, str(e)))
                continue
            except Exception as e:  # a backend crash is that backend's FAIL
                outcomes.append(Outcome(f"{name}-lora", f"{cand.label} + LoRA", False, None, cand.threshold_db,
                                        time.monotonic() - t0, f"{type(e).__name__}: {e}"))
                continue
            outcomes.append(_judge(name, cand, got, want, case, ref_dir, time.monotonic() - t0))
            if want is None:
                want = got
    return outcomes, []


def _draw(bundle, cand, case: dict, library: Path):
    import gc

    from app.runtime.pipelines import GenerationRequest, make_pipeline

    say(f"[{cand.label} + LoRA] {case['prompt']} (seed {case['seed']}, synthetic rank-{RANK} LoRA)")
    backend = cand.make()
    try:
        pipe = make_pipeline(bundle, backend, lora_library=library)
        req = GenerationRequest(prompt=case["prompt"], seed=int(case["seed"]), steps=int(case["steps"]),
                                guidance=float(case["guidance"]), width=int(case["width"]),
                                height=int(case["height"]), loras=((NAME, 1.0),))
        return pipe.generate(req).image
    finally:
        close = getattr(backend, "close", None)
        if close is not None:
            close()
        del backend
        gc.collect()


def _judge(name, cand, got, want, case, ref_dir: Path, seconds: float):
    import numpy as np
    from PIL import Image

    from app.runtime.images import psnr
    from app.site.selftest import Outcome

    if want is None:  # the reference backend: its LoRA image must differ from the plain reference PNG
        with Image.open(ref_dir / case["file"]) as im:
            plain = np.asarray(im.convert("RGB"))
        db = psnr(got, plain)
        ok = db < CHANGED_BELOW_DB
        return Outcome(f"{name}-lora", f"{cand.label} + LoRA (reference)", ok, db, CHANGED_BELOW_DB, seconds,
                       "" if ok else f"the LoRA did not change the image ({db:.1f} dB from the plain one): its "
                                     "inputs are not reaching the transformer",
                       needs=f"< {CHANGED_BELOW_DB:.0f} dB from plain")
    db = psnr(got, want)
    ok = db >= cand.threshold_db
    return Outcome(f"{name}-lora", f"{cand.label} + LoRA", ok, db, cand.threshold_db, seconds,
                   "" if ok else f"{db:.1f} dB from the reference backend's LoRA image, below "
                                 f"{cand.threshold_db:.0f} dB")
