"""Per-GPU rules: compute capabilities, which engine flavour targets them, which precisions they support."""

from __future__ import annotations

import re

from app.errors import UsageError

GIB = 1024**3

# Compute capabilities TensorRT-RTX 1.7 can build for (its ComputeCapability enum); no Hopper/datacentre
# Blackwell, which need full TensorRT 11 built on the GPU itself (FACTS.md, TensorRT section).
RTX_TARGET_SMS: tuple[str, ...] = ("75", "80", "86", "89", "120", "121")


FP8_MIN_SM = 89  # FP8 tensor cores arrive with Ada (8.9); TensorRT-RTX refuses FP8 for sm80/86.


BF16_MIN_SM = 80  # Ampere and newer.


PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.1}  # fp8: ~10% of layers stay in bf16


def normalise_sm(value: str | int) -> str:
    """'89', 'sm89', 'SM_89', '8.9', 89 -> '89'. Raises UsageError on anything else."""
    s = str(value).strip().lower().removeprefix("sm").lstrip("_")
    if re.fullmatch(r"\d+\.\d", s):
        s = s.replace(".", "")
    if not re.fullmatch(r"\d{2,3}", s) or int(s) < 50:
        raise UsageError(f"'{value}' is not a compute capability; write it like sm89 or 8.9.")
    return s


def parse_sm_list(value: str) -> list[str]:
    """`--sm 89,120` -> ['89', '120'] (order kept, duplicates dropped)."""
    out: list[str] = []
    for part in value.split(","):
        if part.strip():
            sm = normalise_sm(part)
            if sm not in out:
                out.append(sm)
    if not out:
        raise UsageError("--sm is empty; give compute capabilities like --sm 89,120.")
    return out


def engine_flavour_for_sm(sm: str | int) -> str:
    """TensorRT-RTX where it can target the SM (portable, builds with no GPU); full TensorRT 11 elsewhere."""
    return "tensorrt-rtx" if normalise_sm(sm) in RTX_TARGET_SMS else "tensorrt"


def precision_supported(precision: str, sm: str | int) -> bool:
    s = int(normalise_sm(sm))
    if precision == "fp8":
        return s >= FP8_MIN_SM
    if precision == "bf16":
        return s >= BF16_MIN_SM
    return precision in ("fp16", "fp32")


def choose_precision(kind: str, sm: str | int | None) -> str:
    """Per-component precision for a GPU (None = CPU).

    FP8 only for the transformer and only on sm89+ (calibrated Q/DQ; text encoders are not calibrated);
    text encoders never FP16 (T5/Qwen overflow), VAE never FP8/FP16 (FACTS.md upstream practice).
    """
    if sm is None:
        return "fp32"
    s = int(normalise_sm(sm))
    if kind == "transformer":
        if s >= FP8_MIN_SM:
            return "fp8"
        return "bf16" if s >= BF16_MIN_SM else "fp16"
    if kind == "controlnet":  # never FP8: export keeps the nets BF16 beside an FP8 transformer
        return "bf16" if s >= BF16_MIN_SM else "fp16"
    return "bf16" if s >= BF16_MIN_SM else "fp32"

