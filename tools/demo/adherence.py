"""Prompt adherence of shape images: parse a prompt's attributes, measure them in an image, score agreement."""

from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tools.demo import shapes

_POSITION_WORDS = {"center": "center", "centre": "center", "middle": "center",
                   "left": "left", "right": "right", "top": "top", "bottom": "bottom"}
_PAL = np.array([shapes.PALETTE[c] for c in shapes.COLORS], dtype=np.float64)
ATTRIBUTES = ("shape_color", "background", "shape", "position")


def parse(prompt: str) -> dict:
    """The attributes a prompt asks for; None where it names none."""
    words = re.findall(r"[a-z]+", prompt.lower())
    out = dict.fromkeys(ATTRIBUTES)
    shape_at = next((i for i, w in enumerate(words) if w in shapes.SHAPES), None)
    if shape_at is not None:
        out["shape"] = words[shape_at]
        before = [i for i in range(max(0, shape_at - 3), shape_at) if words[i] in shapes.PALETTE]
        if before:
            out["shape_color"] = words[before[-1]]
    for i, w in enumerate(words):
        if w in shapes.PALETTE and (words[i + 1 : i + 2] == ["background"] or words[i + 1 : i + 2] == ["backdrop"]):
            out["background"] = w
        if w in _POSITION_WORDS and out["position"] is None:
            out["position"] = _POSITION_WORDS[w]
    return out


def nearest_color(rgb) -> str:
    """The palette colour nearest to an RGB triple."""
    return shapes.COLORS[int(np.argmin(((_PAL - np.asarray(rgb, dtype=np.float64)) ** 2).sum(axis=1)))]


def _template(kind: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    img = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if kind == "circle":
        d.ellipse(box, fill=1)
    elif kind == "square":
        d.rectangle(box, fill=1)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=1)
    return np.asarray(img, dtype=bool)


BAND = 4  # pixels along each edge that sample the background


def analyse(image) -> dict:
    """The attributes an image shows: background from its border, the shape from what differs from it."""
    a = np.asarray(Image.fromarray(np.asarray(image)).convert("RGB").resize((shapes.SIZE, shapes.SIZE)), np.float64)
    n = shapes.SIZE
    border = np.concatenate([a[:BAND].reshape(-1, 3), a[-BAND:].reshape(-1, 3), a[:, :BAND].reshape(-1, 3),
                             a[:, -BAND:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    out = dict.fromkeys(ATTRIBUTES)
    out["background"] = nearest_color(bg_rgb)
    raw = np.sqrt(((a - bg_rgb) ** 2).sum(axis=2)) > 60  # half the closest palette pair's distance
    # The border band is where the background is read, and no shape reaches it (9+ px away): a 1-px line that
    # a VAE decoder draws along an image edge would otherwise survive the median filter (the filter extends
    # edge pixels) and stretch the shape's bounding box to the corner.
    raw[:BAND], raw[-BAND:], raw[:, :BAND], raw[:, -BAND:] = False, False, False, False
    mask = np.asarray(Image.fromarray(raw.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(5))) > 127
    if mask.sum() < 40:  # nothing drawn
        return out
    core = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))) > 127
    pix = a[core] if core.sum() >= 20 else a[mask]
    out["shape_color"] = nearest_color(np.median(pix, axis=0))
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    ious = {}
    for kind in shapes.SHAPES:
        t = _template(kind, box, n)
        ious[kind] = (t & mask).sum() / max(1, (t | mask).sum())
    out["shape"] = max(ious, key=ious.get)
    cx, cy = xs.mean(), ys.mean()
    out["position"] = min(shapes.ANCHORS, key=lambda p: (shapes.ANCHORS[p][0] - cx) ** 2 + (shapes.ANCHORS[p][1] - cy) ** 2)
    return out


def score(items) -> dict:
    """Percent of prompts whose named attribute the image shows, per attribute, over (prompt, image) pairs."""
    hits = dict.fromkeys(ATTRIBUTES, 0)
    asked = dict.fromkeys(ATTRIBUTES, 0)
    details = []
    for prompt, image in items:
        want, got = parse(prompt), analyse(image)
        for k in ATTRIBUTES:
            if want[k] is not None:
                asked[k] += 1
                hits[k] += int(want[k] == got[k])
        details.append({"prompt": prompt, "want": want, "got": got})
    result = {k: (100.0 * hits[k] / asked[k] if asked[k] else None) for k in ATTRIBUTES}
    result["n"] = len(details)
    result["details"] = details
    return result
