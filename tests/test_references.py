"""Images as input: FLUX.2 Klein references and SD3.5 image-to-image through the CLI, against diffusers' own
Flux2KleinPipeline(image=...) and StableDiffusion3Img2ImgPipeline in FP32 with the same seed."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from app.cli import main
from app.runtime.images import psnr, read_metadata


def make_image(path, w: int, h: int, seed: int, mode: str = "RGB"):
    """A picture with structure (gradient, shapes, noise) so a wrong crop or resize shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) * 127 / max(w + h, 1)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.ellipse([w // 5, h // 4, w // 2, h // 2 + h // 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    d.rectangle([w // 2, h // 8, w - w // 8, h // 3], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    img.convert(mode).save(path)
    return path


@lru_cache(maxsize=2)
def _pipe(model: str, cls: str):
    import diffusers

    return getattr(diffusers, cls).from_pretrained(model, local_files_only=True)


def _np(out) -> np.ndarray:
    return (out.images[0] * 255).round().astype(np.uint8)


def klein_reference(model, refs, prompt, seed, steps=4, guidance=1.0, width=None, height=None) -> np.ndarray:
    from diffusers.utils import load_image

    pipe = _pipe(str(model), "Flux2KleinPipeline")
    return _np(pipe(image=[load_image(str(p)) for p in refs] or None, prompt=prompt, num_inference_steps=steps,
                    guidance_scale=guidance, width=width, height=height, output_type="np",
                    generator=torch.Generator("cpu").manual_seed(seed)))


def sd3_img2img_reference(model, init, prompt, seed, strength, steps, guidance, width, height, negative):
    from diffusers.utils import load_image

    pipe = _pipe(str(model), "StableDiffusion3Img2ImgPipeline")
    return _np(pipe(image=load_image(str(init)), prompt=prompt, negative_prompt=negative, strength=strength,
                    num_inference_steps=steps, guidance_scale=guidance, width=width, height=height,
                    output_type="np", generator=torch.Generator("cpu").manual_seed(seed)))


def _generate(bundle, out, prompt, seed, *extra) -> np.ndarray:
    rc = main(["generate", "--bundle", str(bundle), "--prompt", prompt, "--seed", str(seed), "--out", str(out),
               "--backend", "onnxruntime", *extra])
    assert rc == 0
    return np.asarray(Image.open(out).convert("RGB"))


# 1, 2 and 3 references of different sizes; sizes that are not multiples of the 4-px cell are cropped;
# an RGBA reference is read as diffusers' load_image reads it
KLEIN_CASES = [
    ("one", [(96, 64, "RGB")], None),
    ("two", [(80, 112, "RGBA"), (64, 64, "RGB")], (64, 48)),
    ("three", [(70, 90, "RGB"), (128, 72, "RGB"), (66, 130, "L")], None),
]


@pytest.mark.parametrize("name,refs,size", KLEIN_CASES, ids=[c[0] for c in KLEIN_CASES])
def test_klein_references_reproduce_diffusers(klein_model, klein_encoder_bundle, tmp_path, name, refs, size):
    paths = [make_image(tmp_path / f"ref{i}.png", w, h, seed=10 * i + 3, mode=mode)
             for i, (w, h, mode) in enumerate(refs)]
    args = [a for p in paths for a in ("--image", str(p))]
    if size:
        args += ["--width", str(size[0]), "--height", str(size[1])]
    prompt = "a red circle on a blue background"
    ours = _generate(klein_encoder_bundle, tmp_path / "k.png", prompt, 7, *args)
    ref = klein_reference(klein_model, paths, prompt, 7, width=size and size[0], height=size and size[1])
    first = refs[0]
    expect = size or (first[0] // 4 * 4, first[1] // 4 * 4)  # the first reference's size, cropped to the cell
    assert ours.shape == ref.shape == (expect[1], expect[0], 3)
    assert ours.std() > 5
    value = psnr(ours, ref)
    print(f"klein {name} references: PSNR {value:.1f} dB")
    assert value >= 60
    # the references matter: without them (same seed and size) the image differs
    plain = klein_reference(klein_model, [], prompt, 7, width=expect[0], height=expect[1]) if name == "one" else None
    if plain is not None:
        assert psnr(ours, plain) < value - 15, (psnr(ours, plain), value)
    meta = read_metadata(tmp_path / "k.png")
    assert [r["name"] for r in meta["references"]] == [p.name for p in paths]
    assert [r["sha256"] for r in meta["references"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert "strength" not in meta
    with Image.open(tmp_path / "k.png") as im:
        assert f"Reference{'' if len(paths) == 1 else ' 1'}: {paths[0].name}" in im.text["parameters"]


@pytest.mark.parametrize("strength,size", [(0.6, (80, 64)), (0.3, (48, 72))])
def test_sd3_image_to_image_reproduces_diffusers(sd3_model, sd3_encoder_bundle, tmp_path, strength, size):
    init = make_image(tmp_path / "init.png", 90, 70, seed=5)
    w, h = size
    prompt, negative = "a watercolor painting of a harbour at dawn", "blurry"
    ours = _generate(sd3_encoder_bundle, tmp_path / "s.png", prompt, 11, "--image", str(init), "--strength",
                     str(strength), "--steps", "5", "--guidance", "4.5", "--negative-prompt", negative,
                     "--width", str(w), "--height", str(h))
    ref = sd3_img2img_reference(sd3_model, init, prompt, 11, strength, 5, 4.5, w, h, negative)
    assert ours.shape == ref.shape == (h, w, 3)
    value = psnr(ours, ref)
    print(f"sd3 img2img strength {strength}: PSNR {value:.1f} dB")
    assert value >= 60
    other = sd3_img2img_reference(sd3_model, init, prompt, 12, strength, 5, 4.5, w, h, negative)
    assert psnr(ours, other) < 40  # the seed matters: the comparison above proves something
    meta = read_metadata(tmp_path / "s.png")
    assert meta["strength"] == strength and meta["references"][0]["name"] == "init.png"
    assert meta["references"][0]["sha256"] == hashlib.sha256(init.read_bytes()).hexdigest()


def test_sd3_image_to_image_size_defaults_to_the_init_image(sd3_encoder_bundle, tmp_path):
    init = make_image(tmp_path / "init.png", 90, 70, seed=5)
    out = _generate(sd3_encoder_bundle, tmp_path / "s.png", "a cat", 1, "--image", str(init), "--steps", "2")
    assert out.shape == (68, 88, 3)  # 90x70 cut down to the bundle's 4-px multiple
    assert read_metadata(tmp_path / "s.png")["strength"] == 0.6  # diffusers' default


# ---------------------------------------------------------------- bad input: one line, exit 2


def _bad(capsys, *argv) -> str:
    rc = main(["generate", "--prompt", "x", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_image_inputs_are_one_line(capsys, tmp_path, klein_encoder_bundle, sd3_no_encoder_bundle,
                                       sd3_encoder_bundle):
    ok = make_image(tmp_path / "ok.png", 64, 64, seed=1)
    out = ["--out", str(tmp_path / "o.png")]
    kb = ["--bundle", str(klein_encoder_bundle), *out]
    assert "no such file" in _bad(capsys, *kb, "--image", str(tmp_path / "missing.png"))
    (tmp_path / "notes.png").write_text("not a picture")
    assert "not an image" in _bad(capsys, *kb, "--image", str(tmp_path / "notes.png"))
    assert "at most 4" in _bad(capsys, *kb, *[a for _ in range(5) for a in ("--image", str(ok))])
    assert "FLUX.2 Klein inpainting (--mask)" in _bad(capsys, *kb, "--image", str(ok), "--strength", "0.5")
    sb = ["--bundle", str(sd3_encoder_bundle), *out]
    for s in ("0", "1.5", "-0.2"):
        assert "(0, 1]" in _bad(capsys, *sb, "--image", str(ok), "--strength", s)
    assert "needs an init image" in _bad(capsys, *sb, "--strength", "0.5")
    assert "at most 1" in _bad(capsys, *sb, "--image", str(ok), "--image", str(ok))
    # a bundle exported without the encoder: the exact command that adds it
    err = _bad(capsys, "--bundle", str(sd3_no_encoder_bundle), *out, "--image", str(ok))
    assert "no VAE encoder" in err and "edgegen export --model" in err and "--with-encoder --overwrite" in err
    small = make_image(tmp_path / "small.png", 40, 80, seed=2)
    assert "at least 64 px" in _bad(capsys, *kb, "--image", str(small))


def test_missing_image_is_refused_before_the_bundle_is_read(capsys, tmp_path):
    err = _bad(capsys, "--bundle", str(tmp_path / "no-bundle"), "--out", str(tmp_path / "o.png"),
               "--image", str(tmp_path / "missing.png"))
    assert "missing.png" in err


# ---------------------------------------------------------------- bundles, profiles, plan


def test_encoder_bundles_record_the_encoder_and_its_limits(klein_encoder_bundle, sd3_encoder_bundle):
    from app.bundle.manifest import load_bundle

    k = load_bundle(klein_encoder_bundle)
    enc = k.components()["vae_encoder"]
    assert enc["role"] == "vae_encoder" and enc["fidelity"]["cosine"] > 0.9999
    assert [i["name"] for i in enc["inputs"]] == ["image"] and k.manifest["pipeline"]["max_images"] == 4
    s = load_bundle(sd3_encoder_bundle)
    assert [i["name"] for i in s.components()["vae_encoder"]["inputs"]] == ["image", "noise"]
    assert s.manifest["pipeline"]["max_images"] == 1


def test_export_encoder_defaults(klein_bundle, sd3_bundle):
    from app.bundle.families import FAMILIES
    from app.bundle.manifest import load_bundle

    assert FAMILIES["flux2-klein"].encoder_by_default and FAMILIES["sd3.5"].encoder_by_default
    assert "vae_encoder" in load_bundle(sd3_bundle, verify=False).components()  # SD3 too (issue 29)


def test_transformer_profile_covers_reference_tokens(klein_encoder_bundle):
    from app.bundle.manifest import load_bundle
    from export.profiles import dim_ranges, profiles_for

    b = load_bundle(klein_encoder_bundle, verify=False)
    m = b.manifest
    r = dim_ranges(b.family, "transformer", m["size_range"], m["defaults"], m["pipeline"])
    per_side = m["size_range"]["max"] // 4  # tiny Klein: 4 px per packed token
    assert r["img_seq"][2] == per_side**2 * (1 + 4)  # the largest image plus four largest references
    no_refs = dim_ranges(b.family, "transformer", m["size_range"], m["defaults"],
                         {k: v for k, v in m["pipeline"].items() if k != "max_images"})
    assert no_refs["img_seq"][2] == per_side**2
    enc = profiles_for(b.family, "vae_encoder", m["components"]["vae_encoder"], m["size_range"], m["defaults"],
                       m["pipeline"])[0]["image"]
    assert enc[0] == (1, 3, 4, 4) and enc[2] == (1, 3, m["size_range"]["max"], m["size_range"]["max"])


def test_plan_grows_with_references(klein_encoder_bundle, capsys):
    from app.bundle.manifest import load_bundle
    from app.planning.components import bundle_plan
    from app.planning.gpus import parse_gpu_option

    b = load_bundle(klein_encoder_bundle, verify=False)
    gpu = parse_gpu_option("RTX 4090")
    plans = [bundle_plan(b, gpu, 1024, 1024, references=n) for n in (0, 1, 4)]
    tr = [next(c for c in p.components if c.kind == "transformer").activation_bytes for p in plans]
    assert tr[0] < tr[1] < tr[2]
    assert [c.kind for c in plans[0].components] == ["text_encoder", "vae_encoder", "transformer", "vae_decoder"]
    assert main(["plan", "--bundle", str(klein_encoder_bundle), "--gpu", "RTX 4090", "--references", "9"]) == 2


def test_reference_larger_than_the_bundle_is_scaled_not_refused(klein_model, klein_encoder_bundle, tmp_path, capsys):
    """A reference with a side longer than the bundle's encoder takes (1.5 x its largest side, 4:3) is scaled by
    the longer side to exactly that side with diffusers' resampling (LANCZOS) and crop, and said so in one line;
    the image equals diffusers' Klein pipeline given that scaled picture (diffusers itself would not scale below
    1 MP, and the bundle cannot encode it unscaled)."""
    from app.bundle.manifest import load_bundle

    largest = load_bundle(klein_encoder_bundle, verify=False).manifest["size_range"]["max"]
    W, H = largest * 3 // 2, largest * 9 // 8
    big = make_image(tmp_path / "big.png", W, H, seed=21)
    prompt = "a red circle on a blue background"
    capsys.readouterr()
    ours = _generate(klein_encoder_bundle, tmp_path / "k.png", prompt, 7, "--image", str(big), "--steps", "1")
    w, h = largest, largest * 3 // 4
    assert f"reference big.png {W}x{H} scaled to {w}x{h} (this bundle encodes at most {largest} px a side)" \
        in capsys.readouterr().err.splitlines()
    Image.open(big).convert("RGB").resize((w, h), Image.Resampling.LANCZOS).save(tmp_path / "scaled.png")
    ref = klein_reference(klein_model, [tmp_path / "scaled.png"], prompt, 7, steps=1)
    assert ours.shape == ref.shape == (h, w, 3)
    assert psnr(ours, ref) >= 60
    # a second reference the same way, next to one that fits: only the large one is scaled
    capsys.readouterr()
    small = make_image(tmp_path / "small.png", 64, 80, seed=22)
    _generate(klein_encoder_bundle, tmp_path / "k2.png", prompt, 7, "--image", str(small), "--image", str(big),
              "--steps", "1")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reference ")]
    assert notes == [f"reference big.png {W}x{H} scaled to {w}x{h} (this bundle encodes at most {largest} px a side)"]


def test_reference_scaling_rule():
    """diffusers' 1 MP rule where it binds (its own arithmetic), the bundle's side where that binds, none below."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    from app.runtime.references import reference_size, scaled_size

    pipe = {"vae_scale_factor": 8, "reference_max_pixels": 1024 * 1024}
    assert scaled_size((1000, 1000), pipe, 2048) is None and reference_size((1000, 1000), pipe, 2048) == (992, 992)
    big = Image.new("RGB", (3000, 2000))
    assert scaled_size(big.size, pipe, 2048) == Flux2ImageProcessor._resize_to_target_area(big).size
    assert scaled_size((4000, 500), pipe, 2048) == (2048, 256)  # 1 MP leaves 2828 px: the bundle's side binds
    assert scaled_size((192, 144), pipe, 128) == (128, 96) and scaled_size((144, 192), pipe, 128) == (96, 128)
    assert reference_size((192, 144), pipe, 128) == (128, 96)
