"""FLUX.2 Klein inpainting (--mask) against diffusers' own Flux2KleinInpaintPipeline in FP32, same folder and seed:
the distilled tiny Klein (CFG off) and a held-out base variant (16 latent channels, CFG on) with a reference."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from app.runtime.images import psnr, read_metadata
from tests.test_references import _bad, _generate, _np, _pipe, make_image

PROMPT = "a red circle on a blue background"


def make_mask(path, w: int, h: int, box, blur: float = 0.0):
    """White (repaint) inside `box` (fractions of the size), black elsewhere; a blur moves the 0.5 edge."""
    m = Image.new("L", (w, h), 0)
    x0, y0, x1, y1 = box
    ImageDraw.Draw(m).ellipse([x0 * w, y0 * h, x1 * w, y1 * h], fill=255)
    if blur:
        m = m.filter(ImageFilter.GaussianBlur(blur))
    m.save(path)
    return path


def diffusers_inpaint(model, init, mask, seed, strength, steps, guidance, reference=None) -> np.ndarray:
    from diffusers.utils import load_image

    pipe = _pipe(str(model), "Flux2KleinInpaintPipeline")
    return _np(pipe(prompt=PROMPT, image=load_image(str(init)), mask_image=load_image(str(mask)),
                    image_reference=load_image(str(reference)) if reference else None, strength=strength,
                    num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(seed)))


# (case, init size, mask blur, strength (None: diffusers' 0.8), steps, guidance, with a reference)
CASES = [("distilled-default-strength", (96, 64), 0.0, None, 4, 1.0, False),
         ("distilled-blurred-mask", (70, 90), 3.0, 0.5, 5, 1.0, False),
         ("base-cfg-reference", (80, 64), 0.0, 0.6, 4, 4.0, True)]


@pytest.mark.parametrize("case,size,blur,strength,steps,guidance,with_ref", CASES, ids=[c[0] for c in CASES])
def test_klein_inpainting_reproduces_diffusers(case, size, blur, strength, steps, guidance, with_ref, klein_model,
                                               klein_encoder_bundle, tmp_path_factory, tmp_path):
    if case.startswith("base"):
        from tests.conftest import variant_bundle

        model, bundle = variant_bundle(tmp_path_factory, "lat16-base-cfg")
    else:
        model, bundle = klein_model, klein_encoder_bundle
    init = make_image(tmp_path / "init.png", *size, seed=31)
    mask = make_mask(tmp_path / "mask.png", size[0] // 2, size[1] // 2, (0.2, 0.25, 0.75, 0.8), blur)  # other size
    ref = make_image(tmp_path / "ref.png", 64, 72, seed=32) if with_ref else None
    args = ["--image", str(init), "--mask", str(mask), "--steps", str(steps), "--guidance", str(guidance)]
    args += ["--image", str(ref)] if ref else []
    args += ["--strength", str(strength)] if strength is not None else []
    ours = _generate(bundle, tmp_path / "o.png", PROMPT, 7, *args)
    expect = diffusers_inpaint(model, init, mask, 7, 0.8 if strength is None else strength, steps, guidance, ref)
    m = 4  # tiny Klein: 2x2 patches of a 2x VAE
    assert ours.shape == expect.shape == (size[1] // m * m, size[0] // m * m, 3)
    value = psnr(ours, expect)
    print(f"klein inpainting {case}: PSNR {value:.1f} dB")
    assert value >= 60
    if case == CASES[0][0]:  # the mask matters: another mask (same seed, image, strength) gives another image
        other = make_mask(tmp_path / "other.png", *size, (0.0, 0.0, 0.4, 0.4))
        moved = diffusers_inpaint(model, init, other, 7, 0.8, steps, guidance, ref)
        assert psnr(ours, moved) < value - 15
    meta = read_metadata(tmp_path / "o.png")
    assert meta["mask"]["name"] == "mask.png"
    assert meta["mask"]["sha256"] == hashlib.sha256(mask.read_bytes()).hexdigest()
    assert meta["strength"] == (0.8 if strength is None else strength)
    assert [r["name"] for r in meta["references"]] == ["init.png"] + (["ref.png"] if ref else [])


def test_bad_mask_inputs_are_one_line(capsys, tmp_path, klein_encoder_bundle, sd3_encoder_bundle):
    ok = make_image(tmp_path / "ok.png", 64, 64, seed=1)
    mask = make_mask(tmp_path / "m.png", 64, 64, (0.2, 0.2, 0.8, 0.8))
    out = ["--out", str(tmp_path / "o.png")]
    kb = ["--bundle", str(klein_encoder_bundle), *out]
    assert "--mask" in _bad(capsys, *kb, "--image", str(ok), "--mask", str(tmp_path / "none.png"))
    (tmp_path / "t.png").write_text("text")
    assert "--mask" in _bad(capsys, *kb, "--image", str(ok), "--mask", str(tmp_path / "t.png"))
    assert "needs the image to inpaint" in _bad(capsys, *kb, "--mask", str(mask))
    assert "at most one reference" in _bad(capsys, *kb, "--mask", str(mask),
                                           *[a for _ in range(3) for a in ("--image", str(ok))])
    assert "(0, 1]" in _bad(capsys, *kb, "--image", str(ok), "--mask", str(mask), "--strength", "1.5")
    assert "SD3.5 use --image with --strength" in _bad(capsys, "--bundle", str(sd3_encoder_bundle), *out,
                                                      "--image", str(ok), "--mask", str(mask))
