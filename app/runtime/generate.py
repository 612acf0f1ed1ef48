"""Headless generation to PNG files: load a verified bundle once, draw N seeds, write metadata atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from app import __version__
from app.bundle.manifest import load_bundle
from app.runtime.backend import make_backend
from app.runtime.images import save_png
from app.runtime.pipelines import GenerationRequest, make_pipeline


MAX_COUNT = 10_000  # images per generate command: hours of work on a fast GPU; a catalogue uses edgegen batch


def output_paths(out: Path, seed: int, count: int):
    """The PNG paths, one per seed, made as they are needed (never a list of `count` paths up front)."""
    if count == 1:
        yield out
        return
    for i in range(count):
        yield out.with_name(f"{out.stem}-{seed + i}{out.suffix or '.png'}")


def image_metadata(bundle, backend, result) -> dict:
    r = result.request
    return {
        "prompt": r.prompt, "negative_prompt": r.negative_prompt, "seed": r.seed, "steps": r.steps,
        "guidance": r.guidance, "width": r.width, "height": r.height, "model": bundle.manifest["source"]["name"],
        "family": bundle.manifest["family"], "bundle_sha256": bundle.manifest_sha256, "backend": backend.name,
        "precision": bundle.precision, "edgegen": __version__, **({"zero_negative": True} if r.zero_negative else {}),
        **image_inputs_metadata(result), **lora_metadata(result), **control_metadata(result),
    }


def control_metadata(result) -> dict:
    """SD3.5 ControlNet: each control image (name, sha256, path), its net, scale and window, only when used."""
    controls = getattr(result, "controls", None) or []
    keys = ("controlnet", "name", "sha256", "path", "scale", "start", "end", "preprocessed")
    return {"controls": [{k: c[k] for k in keys} for c in controls]} if controls else {}


def lora_metadata(result) -> dict:
    """The run-time LoRAs of the request (name, strength, sha256), only when it had any."""
    loras = getattr(result, "loras", None) or []
    return {"loras": [{"name": r["name"], "strength": r["strength"], "sha256": r["sha256"]} for r in loras]} \
        if loras else {}


def image_inputs_metadata(result) -> dict:
    """Input images (Klein references, or SD3.5's init image) as file names + sha256 + the path they were read
    from, and the strength (image-to-image), only when the request had images."""
    refs = getattr(result, "references", None) or []
    if not refs:
        return {}
    meta = {"references": [{"name": r["name"], "sha256": r["sha256"], "path": r["path"]} for r in refs]}
    mask = getattr(result, "mask", None)
    if mask:  # Klein inpainting: the first reference is the image inpainted
        meta["mask"] = {"name": mask["name"], "sha256": mask["sha256"], "path": mask["path"]}
    if result.request.strength is not None:
        meta["strength"] = result.request.strength
    return meta


def generate_files(*, bundle_dir: Path, prompt: str, out: Path, negative_prompt: str = "", seed: int = 0,
                   steps=None, guidance=None, width=None, height=None, backend: str = "auto", model=None,
                   count: int = 1, say: Callable[[str], None] = print, step_bar=None, device: str = "auto",
                   low_vram: bool | None = None, images: tuple = (), strength: float | None = None,
                   loras: tuple = (), mask: Path | None = None, controls: tuple = (),
                   zero_negative: bool = False) -> list[Path]:
    from app.errors import UsageError
    from app.runtime.references import check_cli_images, check_count_and_strength, check_images, read_image

    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must end in .png")
    if not 1 <= count <= MAX_COUNT:
        raise UsageError(f"--count {count} must be between 1 and {MAX_COUNT}; for more images, run edgegen batch "
                         "over a CSV (resumable)")
    if seed + count - 1 >= 2**63:
        raise UsageError(f"--seed {seed} with --count {count} passes the largest seed 2**63-1; pick a smaller seed")
    from app.runtime.images import check_output_folder

    check_output_folder(out.parent, "--out", count, width or 1024, height or 1024)
    from app.runtime.device import parse_device

    where = parse_device(device)  # a bad --device is refused before the bundle is hashed
    check_cli_images(images, None, strength, None)  # files exist and are images, strength in (0, 1]
    if mask is not None:
        read_image(mask, "--mask")
    from app.runtime.controls import check_controls, read_controls

    read_controls(list(controls))  # the control files exist and are images
    if images or strength is not None or loras or mask is not None or controls:  # from the manifest, before hashing
        from app.errors import EdgegenError

        try:
            unverified = load_bundle(bundle_dir, verify=False)
        except EdgegenError:
            unverified = None  # the verified load below says what is wrong with the bundle
        if unverified is not None:
            check_count_and_strength(unverified, tuple(images), strength, mask)
            check_controls(unverified, controls, images)
            check_images(unverified, [read_image(p) for p in images])
            from app.runtime.loras import check_choices

            check_choices(unverified.manifest, loras, bundle=f"bundle {bundle_dir}")
    bundle = load_bundle(bundle_dir)
    say(f"signature: {bundle.signature.describe()}")
    be, reason = make_backend(bundle, backend, model, device=where)
    say(f"backend: {be.describe()} ({reason})")
    pipe = make_pipeline(bundle, be, low_vram=low_vram)
    if pipe.device.type == "cuda":
        say(f"memory: {'low-VRAM staging' if pipe.low_vram else 'all components stay loaded'}")
    written = []
    for path, s in zip(output_paths(out, seed, count), range(seed, seed + count)):
        req = GenerationRequest(prompt=prompt, negative_prompt=negative_prompt, seed=s, steps=steps,
                                guidance=guidance, width=width, height=height, images=tuple(map(str, images)),
                                strength=strength, loras=tuple(loras), mask=str(mask) if mask else None,
                                controls=tuple(controls), zero_negative=zero_negative)
        if step_bar is None:
            result = pipe.generate(req)
        else:
            with step_bar(f"seed {s}") as on_step:
                result = pipe.generate(req, on_step=on_step)
        for note in result.notes:
            say(note)
        for w in result.warnings:
            say(f"warning: {w}")
        try:
            written.append(save_png(path, result.image, image_metadata(bundle, be, result)))
        except OSError as e:  # disk full, folder removed or read-only meanwhile: nothing half-written stays
            from app.errors import EnvironmentProblem

            raise EnvironmentProblem(f"cannot write {path}: {e.strerror or e}; free space or choose another "
                                     "--out") from None
        _audit(bundle, be, result, path)
    return written


def _audit(bundle, backend, result, path: Path) -> None:
    from app.runtime.audit import AuditLog

    r = result.request
    AuditLog().record(
        model=bundle.manifest["source"]["name"], family=bundle.manifest["family"],
        bundle_sha=bundle.manifest_sha256, seed=r.seed, steps=r.steps, guidance=r.guidance, width=r.width,
        height=r.height, backend=backend.name, precision=bundle.precision, output=str(Path(path).absolute()),
        prompt=r.prompt, negative_prompt=r.negative_prompt, **lora_metadata(result),
    )
