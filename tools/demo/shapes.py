"""Synthetic training data for the demo model: one coloured shape on a plain background, with a caption."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 128

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 220, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS = list(PALETTE)
SHAPES = ["circle", "square", "triangle"]
POSITIONS = ["center", "left", "right", "top", "bottom"]
# Centre of the shape for each position, in pixels of a 128x128 image.
ANCHORS: dict[str, tuple[int, int]] = {
    "center": (64, 64), "left": (32, 64), "right": (96, 64), "top": (64, 32), "bottom": (64, 96),
}
HALF = 22  # half the side of the shape's bounding box, before jitter
# Pixels of size and position jitter. Small on purpose: a caption then has one picture up to a pixel, which a
# 4-step sampler can draw crisply. (+-3 pixels made the model paint the average of the jittered drawings.)
JITTER = 1

# Position phrases per template family; every phrasing names the colours and shape with the same words.
_POS_ON = {"center": "in the center", "left": "on the left", "right": "on the right",
           "top": "at the top", "bottom": "at the bottom"}
_POS_AT = {"center": "in the middle", "left": "at the left", "right": "at the right",
           "top": "at the top", "bottom": "at the bottom"}
TEMPLATES = [
    "{ac} {s} on {ab} background, {on}",
    "{b} background with a small {c} {s} {at}",
    "{ac} {s} {on} of {ab} background",
    "{c} {s}, {b} background, {p}",
    "{ac} {s} on {ab} background",  # no position: drawn in the center (a single answer a few-step sampler can learn)
    "{b} background with {ac} {s}",
]
POSITIONLESS = {4, 5}


def caption(attrs: dict, template: int) -> str:
    """The caption for attributes {shape_color, background, shape, position} in one of TEMPLATES."""
    p, c, b = attrs["position"], attrs["shape_color"], attrs["background"]
    return TEMPLATES[template].format(
        c=c, s=attrs["shape"], b=b, ac=_article(c), ab=_article(b), on=_POS_ON[p], at=_POS_AT[p], p=p
    )


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def draw(attrs: dict, rng: np.random.Generator | None = None) -> Image.Image:
    """Render the attributes; rng adds a little size and position jitter (None: the canonical image)."""
    jx, jy, jh = (0, 0, 0) if rng is None else (int(v) for v in rng.integers(-JITTER, JITTER + 1, size=3))
    cx, cy = ANCHORS[attrs["position"]]
    cx, cy, h = cx + jx, cy + jy, HALF + jh
    img = Image.new("RGB", (SIZE, SIZE), PALETTE[attrs["background"]])
    d = ImageDraw.Draw(img)
    fill = PALETTE[attrs["shape_color"]]
    box = (cx - h, cy - h, cx + h, cy + h)
    if attrs["shape"] == "circle":
        d.ellipse(box, fill=fill)
    elif attrs["shape"] == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)], fill=fill)
    return img


def attributes(rng: np.random.Generator) -> dict:
    """A random attribute set; shape and background colours always differ."""
    c, b = rng.choice(len(COLORS), size=2, replace=False)
    return {
        "shape_color": COLORS[c], "background": COLORS[b],
        "shape": SHAPES[int(rng.integers(len(SHAPES)))], "position": POSITIONS[int(rng.integers(len(POSITIONS)))],
    }


def sample(seed: int, positionless: bool = True) -> tuple[Image.Image, str, dict]:
    """(image, caption, attributes) for a seed, deterministically. Positionless captions only if allowed."""
    rng = np.random.default_rng([seed, 0x5EED])
    attrs = attributes(rng)
    # About one caption in seven leaves the position out (when allowed).
    weights = np.array([0.0 if (t in POSITIONLESS and not positionless) else (1.0 if t in POSITIONLESS else 3.0)
                        for t in range(len(TEMPLATES))])
    template = int(rng.choice(len(TEMPLATES), p=weights / weights.sum()))
    attrs = dict(attrs, template=template, positioned=template not in POSITIONLESS)
    if not attrs["positioned"]:
        # A caption that names no position is drawn in the center, as a person would expect. (Drawing it at a
        # random place made the 4-step sampler paint the average of five places: a haze.)
        attrs["position"] = "center"
    return draw(attrs, rng), caption(attrs, template), attrs


def variant(attrs: dict, seed: int, k: int) -> Image.Image:
    """The k-th redrawing of a caption's attributes (new size and position jitter)."""
    return draw(attrs, np.random.default_rng([seed, k, 0xD1CE]))
