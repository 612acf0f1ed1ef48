"""Draw the edgegen icon (assets/icons/edgegen.svg, .png 256 px, .ico) from one shape list: run to regenerate."""

from __future__ import annotations

import argparse
from pathlib import Path

SIZE = 256
BG_TOP, BG_BOTTOM = (30, 41, 59), (79, 70, 229)  # slate to indigo
# The demo model's world: a circle, a square and a triangle on a plain background, in a rounded tile.
CIRCLE = ((96, 104), 52, (239, 68, 68))
SQUARE = ((138, 118, 214, 194), (250, 204, 21))
TRIANGLE = (((60, 212), (104, 140), (148, 212)), (34, 197, 94))


def svg() -> str:
    (cx, cy), r, c = CIRCLE
    (x0, y0, x1, y1), s = SQUARE
    pts, t = TRIANGLE

    def rgb(v):
        return "#{:02x}{:02x}{:02x}".format(*v)

    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{SIZE}" height="{SIZE}" viewBox="0 0 {SIZE} {SIZE}">
  <defs><linearGradient id="bg" x1="0" y1="0" x2="0" y2="1">
    <stop offset="0" stop-color="{rgb(BG_TOP)}"/><stop offset="1" stop-color="{rgb(BG_BOTTOM)}"/>
  </linearGradient></defs>
  <rect x="8" y="8" width="{SIZE - 16}" height="{SIZE - 16}" rx="48" fill="url(#bg)"/>
  <circle cx="{cx}" cy="{cy}" r="{r}" fill="{rgb(c)}"/>
  <rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" rx="6" fill="{rgb(s)}"/>
  <polygon points="{' '.join(f'{x},{y}' for x, y in pts)}" fill="{rgb(t)}"/>
</svg>
"""


def png(scale: int = 4):
    """The same drawing rasterised with PIL, supersampled for smooth edges."""
    from PIL import Image, ImageDraw

    n = SIZE * scale
    img = Image.new("RGBA", (n, n), (0, 0, 0, 0))
    grad = Image.new("RGBA", (n, n))
    gd = ImageDraw.Draw(grad)
    for y in range(n):
        f = y / (n - 1)
        gd.line([(0, y), (n, y)], fill=tuple(round(a + (b - a) * f) for a, b in zip(BG_TOP, BG_BOTTOM)) + (255,))
    mask = Image.new("L", (n, n), 0)
    ImageDraw.Draw(mask).rounded_rectangle([8 * scale, 8 * scale, n - 8 * scale, n - 8 * scale], 48 * scale, fill=255)
    img.paste(grad, (0, 0), mask)
    d = ImageDraw.Draw(img)
    (cx, cy), r, c = CIRCLE
    d.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=c)
    box, s = SQUARE
    d.rounded_rectangle([v * scale for v in box], 6 * scale, fill=s)
    pts, t = TRIANGLE
    d.polygon([(x * scale, y * scale) for x, y in pts], fill=t)
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "edgegen.svg").write_text(svg())
    image = png()
    image.save(out / "edgegen.png", optimize=True)
    image.save(out / "edgegen.ico", sizes=[(16, 16), (32, 32), (48, 48), (256, 256)])
    return [out / n for n in ("edgegen.svg", "edgegen.png", "edgegen.ico")]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "assets" / "icons")
    for p in write(ap.parse_args().out):
        print(p, p.stat().st_size)
