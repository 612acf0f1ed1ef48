"""Shape profiles and I/O buffers: which profile admits a request, and every tensor's concrete size and dtype."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.errors import BundleError

# TensorRT DataType names -> (torch dtype attribute, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "FLOAT": ("float32", 4),
    "HALF": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "INT32": ("int32", 4),
    "INT64": ("int64", 8),
    "INT8": ("int8", 1),
    "UINT8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "FP8": ("float8_e4m3fn", 1),
}


Shape = tuple[int, ...]


def normalise_profiles(profiles: Sequence[Mapping[str, Any]]) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    """Accept the record's JSON form ({"min","opt","max"}) or build_engine's (min, opt, max) tuples."""
    out = []
    for p in profiles:
        q = {}
        for name, v in p.items():
            mn, op, mx = (v["min"], v["opt"], v["max"]) if isinstance(v, Mapping) else v
            q[name] = (tuple(mn), tuple(op), tuple(mx))
        out.append(q)
    return out


def select_profile(
    profiles: Sequence[Mapping[str, Any]], shapes: Mapping[str, Shape], *, component: str = "engine"
) -> int:
    """Index of the profile that admits every given shape, preferring the one whose opt shapes are nearest."""
    best: tuple[int, int] | None = None
    for i, p in enumerate(normalise_profiles(profiles)):
        fits, dist = True, 0
        for name, (mn, op, mx) in p.items():
            s = tuple(shapes.get(name, op))
            if len(s) != len(mn) or not all(a <= d <= b for a, d, b in zip(mn, s, mx, strict=True)):
                fits = False
                break
            dist += sum(abs(d - o) for d, o in zip(s, op, strict=True))
        if fits and (best is None or dist < best[0]):
            best = (dist, i)
    if best is None:
        ranges = "; ".join(
            ", ".join(f"{n} {list(mn)}..{list(mx)}" for n, (mn, _, mx) in p.items())
            for p in normalise_profiles(profiles)
        )
        got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise BundleError(
            f"The {component} engine accepts {ranges}, not {got}; choose a size inside that range or "
            "re-export with --min-size/--max-size covering it."
        )
    return best[1]


@dataclass(frozen=True)
class TensorBuffer:
    name: str
    mode: str  # "input" | "output"
    shape: Shape
    dtype: str  # torch dtype attribute name
    nbytes: int


def validate_inputs(io: Mapping[str, Any], shapes: Mapping[str, Shape]) -> None:
    """Check names, ranks and fixed dims of inputs against the engine's I/O (ValueError: a pipeline bug)."""
    want = io["inputs"]
    if set(shapes) != set(want):
        raise ValueError(f"engine inputs are {sorted(want)}, got {sorted(shapes)}")
    for name, spec in want.items():
        s, w = tuple(shapes[name]), tuple(spec["shape"])
        if len(s) != len(w) or any(d >= 0 and d != x for d, x in zip(w, s, strict=True)):
            raise ValueError(f"input {name} has shape {list(s)}; the engine expects {list(w)} (-1 = any)")


def plan_buffers(
    io: Mapping[str, Any], input_shapes: Mapping[str, Shape], output_shapes: Mapping[str, Shape]
) -> list[TensorBuffer]:
    """Every I/O tensor with its concrete shape, torch dtype and size, inputs first in engine order."""
    validate_inputs(io, input_shapes)
    out = []
    for mode, shapes in (("input", input_shapes), ("output", output_shapes)):
        for name, spec in io[mode + "s"].items():
            if name not in shapes:
                raise ValueError(f"no shape for {mode} {name}")
            s = tuple(int(d) for d in shapes[name])
            if any(d < 0 for d in s):  # data-dependent output sizes would need an IOutputAllocator
                raise ValueError(f"{mode} {name} has unresolved shape {list(s)}")
            if spec["dtype"] not in DTYPES:
                raise ValueError(f"{mode} {name} has unsupported dtype {spec['dtype']}")
            torch_name, size = DTYPES[spec["dtype"]]
            n = 1
            for d in s:
                n *= d
            out.append(TensorBuffer(name, mode, s, torch_name, n * size))
    return out

