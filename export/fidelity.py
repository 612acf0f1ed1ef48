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
THRESHOLDS: dict[str, Threshold] = {
    "fp32": Threshold(cosine_min=0.999, max_rel_err=1e-2),
    "fp8": Threshold(cosine_min=0.97, max_rel_err=1.0),
}


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
        ref = "PyTorch" if precision == "fp32" else "its FP32 export"
        raise LowFidelityError(
            f"the {precision.upper()} {component} is too far from {ref} ({'; '.join(failed)}), so no bundle was "
            f"written; report it, export another precision, or pass --accept-low-fidelity to keep it anyway")
    if failed:
        record["accepted_low_fidelity"] = True
    return record
