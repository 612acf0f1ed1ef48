"""Size presets (square, portrait, landscape) and custom-size checks from a bundle's size_range."""

from __future__ import annotations


def _snap(value: float, multiple: int, lo: int, hi: int) -> int:
    v = int(round(value / multiple)) * multiple
    return max(lo, min(hi, v))


def presets(defaults: dict, size_range: dict) -> dict[str, tuple[int, int]]:
    """{'Square': (w, h), 'Portrait': …, 'Landscape': …} inside the range, on its multiple."""
    m, lo, hi = size_range["multiple"], size_range["min"], size_range["max"]
    side = _snap(max(defaults["width"], defaults["height"]), m, lo, hi)
    short = _snap(side * 3 / 4, m, lo, hi)
    return {"Square": (side, side), "Portrait": (short, side), "Landscape": (side, short)}


def size_error(width: int, height: int, size_range: dict) -> str:
    """'' if the bundle can draw width x height, else what is wrong and what would work."""
    m, lo, hi = size_range["multiple"], size_range["min"], size_range["max"]
    for axis, v in (("Width", width), ("Height", height)):
        if not lo <= v <= hi:
            return f"{axis} {v} px is outside this model's range {lo}–{hi} px."
        if v % m:
            return f"{axis} {v} px is not a multiple of {m}; try {_snap(v, m, lo, hi)}."
    return ""
