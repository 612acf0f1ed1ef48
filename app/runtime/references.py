"""Images as input, on the host: read, hash and check reference / init images before any model work.

Images are read as diffusers' own `load_image` reads them (EXIF orientation applied, converted to RGB), so the
same files give the same pixels here and in `Flux2KleinPipeline(image=...)` / `StableDiffusion3Img2ImgPipeline`.
The bytes are read once: the sha256 recorded in the PNG is the hash of exactly what was decoded.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path

from app.errors import UsageError

# Flux2ImageProcessor.check_image_input: references smaller than this or more elongated are refused by diffusers.
MIN_SIDE, MAX_ASPECT = 64, 8


@dataclass(frozen=True)
class InputImage:
    path: str
    name: str
    sha256: str
    image: object  # PIL.Image.Image, RGB

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def record(self) -> dict:
        """What the PNG metadata and the gallery keep about it."""
        w, h = self.size
        return {"name": self.name, "sha256": self.sha256, "path": str(Path(self.path).absolute()),
                "width": w, "height": h}


def read_image(path: str | Path, option: str = "--image") -> InputImage:
    """One image file as diffusers.utils.load_image reads it; UsageError (one line) when it is not one."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option} {p}: no such file; check the path")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{option} {p}: cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        im = Image.open(io.BytesIO(data))
        im = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise UsageError(f"{option} {p}: not an image PIL can read (PNG, JPEG, WebP, ...); convert it first") from None
    return InputImage(str(p), p.name, hashlib.sha256(data).hexdigest(), im)


# Flux2KleinInpaintPipeline: the image inpainted plus at most one image_reference (several references it stacks at
# the first one's size, a rule edgegen's per-reference sizes do not follow), and its default strength.
MAX_INPAINT_IMAGES, INPAINT_STRENGTH = 2, 0.8


def check_count_and_strength(bundle, images: tuple, strength: float | None, mask=None) -> None:
    """The checks that need only the bundle's manifest: no model work, no image read."""
    family = bundle.manifest["family"]
    pipe = bundle.manifest["pipeline"]
    if mask is not None:
        if family != "flux2-klein":
            raise UsageError("--mask is FLUX.2 Klein inpainting; for SD3.5 use --image with --strength "
                             "(image-to-image)")
        if not images:
            raise UsageError("--mask needs the image to inpaint: add --image FILE (the first --image is inpainted, "
                             "a second one is a reference)")
        if len(images) > MAX_INPAINT_IMAGES:
            raise UsageError(f"{len(images)} --image given with --mask; inpainting takes the image and at most one "
                             "reference, as diffusers' Flux2KleinInpaintPipeline")
    if strength is not None:
        if family != "sd3.5" and mask is None:
            raise UsageError("--strength applies to SD3.5 image-to-image and FLUX.2 Klein inpainting (--mask); "
                             "FLUX.2 Klein uses --image as references without a strength")
        if not images:
            raise UsageError("--strength needs an init image: add --image FILE")
        check_strength(strength)
    if not images:
        return
    if "vae_encoder" not in bundle.components():
        raise UsageError(f"the bundle {bundle.root} has no VAE encoder, so it cannot take --image; re-export it "
                         f"with: {encoder_export_command(bundle)}")
    limit = int(pipe.get("max_images", 1))
    if len(images) > limit:
        what = "reference images" if family == "flux2-klein" else "init image"
        raise UsageError(f"{len(images)} --image given; this bundle takes at most {limit} {what}")


def check_strength(strength: float) -> None:
    if not (isinstance(strength, (int, float)) and math.isfinite(strength) and 0 < strength <= 1):
        raise UsageError(f"--strength {strength} must be in (0, 1]: 1 redraws everything, small values keep "
                         "more of the init image")


def check_cli_images(paths, family: str | None, strength: float | None, max_images: int | None) -> None:
    """The --image/--strength checks the CLI makes before a bundle is loaded (files exist and are images)."""
    if strength is not None:
        check_strength(strength)
        if not paths:
            raise UsageError("--strength needs an init image: add --image FILE")
    if max_images is not None and len(paths) > max_images:
        raise UsageError(f"{len(paths)} --image given; this bundle takes at most {max_images}")
    for p in paths:
        read_image(p)


def encoder_export_command(bundle) -> str:
    """The exact export command that rebuilds `bundle` with the VAE encoder (same options, in place)."""
    m = bundle.manifest
    r = m.get("size_range", {})
    cmd = bundle.rebuild_hint().removesuffix(" --overwrite")
    if r:
        cmd += f" --min-size {r['min']} --max-size {r['max']}"
    engines = m.get("engines") or []
    if engines:
        sms = sorted({str(e["sm"]) for e in engines if e.get("sm") is not None})
        cmd += f" --target {engines[0]['flavour']}" + (f" --sm {','.join(sms)}" if sms else "")
    return cmd + " --with-encoder --overwrite"


def scaled_size(size: tuple[int, int], pipeline: dict, largest: int | None = None) -> tuple[int, int] | None:
    """The size a FLUX.2 Klein reference is resized to (LANCZOS) before the crop, or None when it is not resized.
    Above the reference area (1 MP), diffusers' rule: Flux2ImageProcessor._resize_to_target_area's arithmetic.
    Where that still leaves a side longer than the bundle's VAE encoder takes (`largest`, the bundle's size_range
    max), the longer side is scaled to exactly `largest` and the other by the same factor (rounded down), so a
    float rounding never costs a latent cell."""
    w, h = size
    area = pipeline.get("reference_max_pixels", 1024 * 1024)
    out = None
    if w * h > area:
        scale = math.sqrt(area / (w * h))
        out = (int(w * scale), int(h * scale))
    if largest and max(out or size) > largest:
        long, short = max(w, h), min(w, h)
        fit = (largest, short * largest // long)
        out = fit if w >= h else fit[::-1]
    return out


def reference_size(size: tuple[int, int], pipeline: dict, largest: int | None = None) -> tuple[int, int]:
    """A FLUX.2 Klein reference's size after preprocessing (scaled_size), cut down to a multiple of
    vae_scale_factor * 2 as diffusers crops it."""
    w, h = scaled_size(size, pipeline, largest) or size
    m = pipeline["vae_scale_factor"] * 2
    return (w // m) * m, (h // m) * m


def scaling_note(name: str, size: tuple[int, int], pipeline: dict, largest: int) -> str | None:
    """The one status line for a reference that preprocessing scaled down, or None when it was not."""
    scaled = scaled_size(size, pipeline, largest)
    if scaled is None:
        return None
    w, h = reference_size(size, pipeline, largest)
    why = (f"this bundle encodes at most {largest} px a side" if scaled != scaled_size(size, pipeline)
           else "references above 1 MP are scaled to 1 MP, as diffusers does")  # the bundle's side bound it
    return f"reference {name} {size[0]}x{size[1]} scaled to {w}x{h} ({why})"


def check_images(bundle, inputs: list[InputImage]) -> None:
    """Per-image checks that need the bundle's manifest but no model (CLI: before the bundle is hashed)."""
    if bundle.manifest["family"] != "flux2-klein":
        return
    for img in inputs:
        largest = bundle.manifest["size_range"]["max"]
        w, h = reference_size(img.size, bundle.manifest["pipeline"], largest)
        check_reference_size(img, w, h, bundle.manifest["pipeline"])


def check_reference_size(img: InputImage, w: int, h: int, pipeline: dict) -> None:
    """Flux2ImageProcessor.check_image_input's limits (diffusers refuses these too), and a scaled size that still
    has a latent cell each way. A reference larger than the bundle encodes is scaled (reference_area), not
    refused."""
    W, H = img.size
    if W < MIN_SIDE or H < MIN_SIDE:
        raise UsageError(f"--image {img.name} is {W}x{H}; references must be at least {MIN_SIDE} px on each side")
    if max(W / H, H / W) > MAX_ASPECT:
        raise UsageError(f"--image {img.name} is {W}x{H}; references may be at most {MAX_ASPECT}:1 wide or tall")
    if min(w, h) < 1:
        m = pipeline["vae_scale_factor"] * 2
        raise UsageError(f"--image {img.name} is {W}x{H}; scaled to fit this bundle its short side is under {m} px "
                         "(one latent cell): crop it less elongated, or re-export with a larger --max-size")
