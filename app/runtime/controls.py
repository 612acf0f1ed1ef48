"""SD3.5 ControlNet control images: the request's choices checked against the bundle, and their preprocessing.

A control is (net name, image file, conditioning scale, start, end, preprocess): StableDiffusion3ControlNetPipeline's
control_image, controlnet_conditioning_scale, control_guidance_start and control_guidance_end, for one of the
bundle's nets (export --controlnet NAME=DIR). The image is stretched to the output size (LANCZOS, as diffusers'
VaeImageProcessor does), then run through the net's preprocessor unless the request says it is already a map:
canny is kornia.filters.canny, the function ComfyUI's Canny node calls, at that node's default thresholds; blur
is a Gaussian blur; depth (and any other net) takes the map as given. See docs/CONTROLNET.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from app.errors import UsageError

# ComfyUI's Canny node defaults (low_threshold 0.4, high_threshold 0.8, on images in [0, 1])
CANNY_LOW, CANNY_HIGH = 0.4, 0.8
BLUR_RADIUS = 8  # px at the output size: the SD3.5 blur net repaints a blurred image (a tile/upscale control)
MAX_SCALE = 10.0  # ComfyUI's ControlNetApplyAdvanced strength limit
PREPROCESSORS = ("canny", "blur", "none")


@dataclass(frozen=True)
class Control:
    name: str
    image: str  # file path
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: bool = True  # False: the image is already the net's map (edges, blurred image, depth)

    @classmethod
    def of(cls, value) -> "Control":
        """From a Control, a tuple or a list (JSON: the cluster and the server send lists)."""
        if isinstance(value, Control):
            return value
        if isinstance(value, dict):
            return cls(**value)
        name, image, *rest = value
        scale, start, end, preprocess = (list(rest) + [1.0, 0.0, 1.0, True][len(rest):])[:4]
        return cls(str(name), str(image), float(scale), float(start), float(end), bool(preprocess))


def parse_control(value: str) -> Control:
    """`--control NAME:IMAGE[:SCALE[:START:END]]`, numbers taken from the end (an image path may hold ':')."""
    name, sep, rest = value.partition(":")
    if not sep or not name or not rest:
        raise UsageError(f"--control {value!r}: expected NAME:IMAGE[:SCALE[:START:END]], e.g. canny:edges.png:0.7")
    parts, numbers = rest.split(":"), []
    while len(parts) > 1 and len(numbers) < 3:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    if len(numbers) == 2:
        raise UsageError(f"--control {value!r}: give SCALE, or SCALE:START:END (START and END as fractions of the "
                         "steps, e.g. canny:edges.png:0.7:0:0.5)")
    scale, start, end = (numbers + [1.0, 0.0, 1.0][len(numbers):])[:3]
    return Control(name, ":".join(parts), scale, start, end)


def check_controls(bundle, controls, images=()) -> list[Control]:
    """The checks that need only the manifest: the bundle has these nets, the numbers are in range."""
    controls = [Control.of(c) for c in controls]
    if not controls:
        return []
    nets = bundle.manifest.get("controlnets") or {}
    if bundle.manifest["family"] != "sd3.5":
        raise UsageError("--control is SD3.5 ControlNet; FLUX.2 Klein takes reference images (--image) instead")
    if not nets:
        raise UsageError(f"bundle {bundle.root} has no ControlNets; re-export it with --controlnet NAME=DIR "
                         "(docs/CONTROLNET.md)")
    if images:
        raise UsageError("--control with --image: StableDiffusion3ControlNetPipeline draws from text; drop --image "
                         "(image-to-image) or the control")
    for c in controls:
        if c.name not in nets:
            raise UsageError(f"--control {c.name}: this bundle's ControlNets are {', '.join(nets)}")
        if not (math.isfinite(c.scale) and 0.0 <= c.scale <= MAX_SCALE):
            raise UsageError(f"--control {c.name}: scale {c.scale} must be between 0 and {MAX_SCALE:g}")
        if not (0.0 <= c.start < c.end <= 1.0):
            raise UsageError(f"--control {c.name}: start {c.start:g} and end {c.end:g} must satisfy "
                             "0 <= start < end <= 1 (fractions of the steps)")
    return controls


def keep(i: int, steps: int, start: float, end: float) -> float:
    """StableDiffusion3ControlNetPipeline's controlnet_keep for step i of `steps`: 1 inside [start, end], else 0."""
    return 1.0 - float(i / steps < start or (i + 1) / steps > end)


def control_picture(image, width: int, height: int, preprocessor: str, preprocess: bool = True):
    """The control image at the output size (PIL, RGB), through the net's preprocessor when asked."""
    from PIL import Image, ImageFilter

    picture = image.convert("RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), resample=Image.LANCZOS)
    if not preprocess or preprocessor == "none":
        return picture
    if preprocessor == "blur":
        return picture.filter(ImageFilter.GaussianBlur(radius=BLUR_RADIUS))
    return canny(picture)


def canny(picture, low: float = CANNY_LOW, high: float = CANNY_HIGH):
    """Edges as ComfyUI's Canny node draws them: kornia.filters.canny on the [0, 1] image, white edges on black."""
    import numpy as np
    import torch
    from kornia.filters import canny as kornia_canny
    from PIL import Image

    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
    edges = kornia_canny(x, low, high)[1][0, 0]
    return Image.fromarray((edges.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).convert("RGB")


def control_records(controls: list[Control], inputs: list) -> list[dict]:
    """What the PNG metadata and the gallery keep about each control."""
    return [{**i.record(), "controlnet": c.name, "scale": c.scale, "start": c.start, "end": c.end,
             "preprocessed": not c.preprocess} for c, i in zip(controls, inputs)]


def read_controls(controls: list[Control]) -> list:
    from app.runtime.references import read_image

    return [read_image(Path(c.image), f"--control {c.name}") for c in controls]
