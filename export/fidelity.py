"""The fidelity gate: how close an exported graph must be to its reference before it may become a bundle.

One table, per precision. Export measures every component (FP32 ONNX vs PyTorch on two shapes; FP8 ONNX vs
its FP32 ONNX on held-out inputs) and refuses one below these figures unless --accept-low-fidelity is given,
in which case the manifest records the override (docs/BAD_INPUT.md, "Fidelity gate").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from app.errors import UsageError


@dataclass(frozen=True)
class Threshold:
    cosine_min: float  # worst output cosine similarity over all checked inputs and outputs
    max_rel_err: float  # worst |got - ref| / max |ref|, over all outputs


# FP32 is the same computation in another runtime: measured cosine 1.000000 and max error <= 1e-5 relative on
# every component of both families, so 0.999 / 1 % only catches a wrong graph (a bad dynamic-shape translation,
# a dropped op), never rounding. FP8 is a real approximation: the demo transformer measures 0.99956 and the
# test models' text encoders > 0.98; below 0.97 images visibly change. FP8's largest element error can reach
# the size of the largest output (outliers), so only an error above it, i.e. a broken output, is refused.
# BF16/FP16 rows gate PyTorch's half arithmetic against FP32 arithmetic on the same rounded weights (the
# graph itself is gated by the fp32 row, through its FP32 twin: export/bf16.py). Measured on the test models of
# both families: BF16 cosine >= 0.9999 on every component, max relative error <= 2 %; BF16 has 8 mantissa bits
# (0.4 % per rounding), so 0.995 / 10 % passes honest BF16 and refuses a graph that lost an FP32 island
# (softmax or norm statistics in BF16) or overflowed.
THRESHOLDS: dict[str, Threshold] = {
    "fp32": Threshold(cosine_min=0.999, max_rel_err=1e-2),
    "bf16": Threshold(cosine_min=0.995, max_rel_err=0.1),
    "fp16": Threshold(cosine_min=0.998, max_rel_err=0.05),
    "fp8": Threshold(cosine_min=0.97, max_rel_err=1.0),
}

# Whole-image PSNR of a half-precision bundle vs FP32 on the fixed prompts and seeds (export.calibrate's
# FIDELITY_CASES), the worse of rounded weights (FP32 twins) and half arithmetic (PyTorch). Measured on the
# test models: see docs/PERFORMANCE.md "BF16". 30 dB is where differences start to be visible side by side.
IMAGE_PSNR_MIN_DB: dict[str, float] = {"bf16": 30.0, "fp16": 30.0}


class LowFidelityError(UsageError):
    """An exported component is too far from its reference (exit code 2; --accept-low-fidelity overrides)."""


def gate(component: str, precision: str, cosine: float, max_rel_err: float, accept: bool) -> dict:
    """Check one component's figures. Returns its gate record for the manifest; raises LowFidelityError when it
    falls below the precision's threshold and the user did not accept that."""
    t = THRESHOLDS[precision]
    failed = []
    if not cosine >= t.cosine_min:  # written so NaN fails too
        failed.append(f"cosine {cosine:.5f} < {t.cosine_min}")
    if not max_rel_err <= t.max_rel_err:
        failed.append(f"max relative error {max_rel_err:.3g} > {t.max_rel_err}")
    record = {"precision": precision, "cosine": cosine, "max_rel_err": max_rel_err, "thresholds": asdict(t),
              "passed": not failed}
    if failed and not accept:
        ref = {"fp32": "PyTorch", "fp8": "the graph it was quantized from"}.get(precision, "FP32 arithmetic on the same weights")
        raise LowFidelityError(
            f"the {precision.upper()} {component} is too far from {ref} ({'; '.join(failed)}), so no bundle was "
            f"written; report it, export another precision, or pass --accept-low-fidelity to keep it anyway")
    if failed:
        record["accepted_low_fidelity"] = True
    return record


def image_gate(precision: str, psnr_db: float, accept: bool) -> dict:
    """The whole-image check of a half-precision bundle: its worst PSNR vs FP32 on the fixed cases."""
    limit = IMAGE_PSNR_MIN_DB[precision]
    record = {"precision": precision, "image_psnr_db": psnr_db, "min_db": limit, "passed": psnr_db >= limit}
    if not record["passed"] and not accept:
        raise LowFidelityError(
            f"the {precision.upper()} bundle's images are too far from FP32 (PSNR {psnr_db:.1f} dB < {limit} dB "
            "on the fixed prompts and seeds), so no bundle was written; export --precision fp32, or pass "
            "--accept-low-fidelity to keep it anyway")
    if not record["passed"]:
        record["accepted_low_fidelity"] = True
    return record
