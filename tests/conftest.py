"""Shared fixtures: tiny models of the real classes, saved as real folders, exported once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

# Exported bundles of the tiny models accept this pixel range (their VAEs have 2 blocks: 4 px per token).
TINY_SIZE_ARGS = ["--min-size", "32", "--max-size", "256"]


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path, monkeypatch):
    """Audit log and caches go to the test's own folder, never the developer's home."""
    monkeypatch.setenv("EDGEGEN_AUDIT_LOG", str(tmp_path / "audit" / "audit.jsonl"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Trust store and signing policy: a developer's own keys or a site's strict policy must not leak in.
    monkeypatch.setenv("EDGEGEN_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("EDGEGEN_SITE_CONFIG_DIR", str(tmp_path / "site-config"))
    monkeypatch.delenv("EDGEGEN_REQUIRE_SIGNED", raising=False)
    monkeypatch.delenv("EDGEGEN_REQUIRE_SIGNED_LORAS", raising=False)
    monkeypatch.setenv("EDGEGEN_LORAS", str(tmp_path / "loras"))  # each test's own LoRA library


def shared(tmp_path_factory, name: str, make) -> Path:
    """`make(out)` once for the whole run, in a folder every pytest-xdist worker sees (a file lock guards it):
    the tiny models and their bundles are exported once, not once per worker."""
    from filelock import FileLock

    if dev := _dev_copy(name):
        return dev
    out = _run_root(tmp_path_factory) / "shared" / name
    done = out.parent / f"{name}.done"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f"{name}.lock")):
        if not done.exists():
            if out.exists():  # a worker that failed half-way: start again
                shutil.rmtree(out)
            make(out)
            done.touch()
    return out


def _run_root(tmp_path_factory) -> Path:
    """The run's temporary folder that every pytest-xdist worker sees."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


# The run-wide export cache (export/cache.py, EDGEGEN_EXPORT_CACHE) is OFF for the suite until a failure is
# explained: with it on, the fresh-clone run of 2026-11-30 failed test_lora_is_fused_and_recorded (the LoRA's effect
# on the FP8 image 0.8 dB instead of > 3 dB; it passed in every run without the cache). Developers may still set
# EDGEGEN_EXPORT_CACHE themselves; tests/test_export_cache.py sets its own.


def _dev_copy(name: str) -> Path | None:
    """EDGEGEN_DEV_BUNDLES=DIR (developers only, never CI): reuse DIR/<name> exported earlier instead of
    exporting again; stale copies are the developer's problem, so CI never sets it."""
    d = os.environ.get("EDGEGEN_DEV_BUNDLES")
    return Path(d) / name if d and (Path(d) / name).is_dir() else None


@pytest.fixture(scope="session")
def klein_model(tmp_path_factory) -> Path:
    from export import synthetic

    return shared(tmp_path_factory, "klein-model", lambda out: synthetic.save(synthetic.build_klein(), out))


@pytest.fixture(scope="session")
def sd3_model(tmp_path_factory) -> Path:
    from export import synthetic

    return shared(tmp_path_factory, "sd3-model", lambda out: synthetic.save(synthetic.build_sd3(), out))


def export_via_cli(model: Path, out: Path, *extra: str) -> Path:
    from app.cli import main

    rc = main(["export", "--model", str(model), "--out", str(out), *TINY_SIZE_ARGS, *extra])
    assert rc == 0, f"export failed with {rc}"
    return out


# Held-out-style shapes: 8 and 16 latent channels (the real VAEs: 32, covered by the session bundle), three
# transformer heads, a grouped-query Qwen3 (4 query heads over 2 key/value heads), a Klein base model (CFG on);
# an SD3 with an odd, small position table (13 patches per side = 52 px), 8 latent channels, three heads. Their
# bundles carry run-time LoRA inputs (rank up to 16): tests/test_runtime_lora.py and test_config_variants.py.
def _variants():
    from export import synthetic

    return ({"lat8-heads3-gqa": synthetic.KleinSize(latent_channels=8, heads=3, text_heads=4, text_kv_heads=2),
             "lat16-base-cfg": synthetic.KleinSize(latent_channels=16, is_distilled=False)},
            synthetic.SD3Size(pos_embed_max_size=13, latent_channels=8, heads=3, t5_heads=4))


KLEIN_VARIANTS, SD3_ODD = _variants()
VARIANT_LORA_RANK = 16


def variant_bundle(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """(model folder, bundle) of a held-out variant (a KLEIN_VARIANTS key or "sd3-odd"), made once per run."""
    from export import synthetic

    def make(out):
        if name == "sd3-odd":
            model = synthetic.save(synthetic.build_sd3(size=SD3_ODD), out / "model")
            extra = ["--min-size", "32"]
        else:
            model = synthetic.save(synthetic.build_klein(KLEIN_VARIANTS[name]), out / "model")
            extra = TINY_SIZE_ARGS
        from app.cli import main

        rc = main(["export", "--model", str(model), "--out", str(out / "bundle"), *extra,
                   "--runtime-lora", str(VARIANT_LORA_RANK)])
        assert rc == 0, f"export of {name} failed with {rc}"

    root = shared(tmp_path_factory, f"variant-{name}", make)
    return root / "model", root / "bundle"


@pytest.fixture(scope="session")
def klein_bundle(klein_model, tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "klein", lambda out: export_via_cli(klein_model, out))


@pytest.fixture(scope="session")
def sd3_bundle(sd3_model, tmp_path_factory) -> Path:
    return shared(tmp_path_factory, "sd3", lambda out: export_via_cli(sd3_model, out))


@pytest.fixture(scope="session")
def klein_encoder_bundle(klein_model, klein_bundle, tmp_path_factory) -> Path:
    """A Klein bundle with the VAE encoder (export's default for Klein, so usually klein_bundle itself)."""
    from app.bundle.manifest import load_bundle

    if "vae_encoder" in load_bundle(klein_bundle, verify=False).components():
        return klein_bundle
    return shared(tmp_path_factory, "klein-encoder", lambda out: export_via_cli(klein_model, out, "--with-encoder"))


@pytest.fixture(scope="session")
def sd3_encoder_bundle(sd3_model, sd3_bundle, tmp_path_factory) -> Path:
    """An SD3 bundle with the VAE encoder (image-to-image): export's default, so sd3_bundle itself."""
    from app.bundle.manifest import load_bundle

    if "vae_encoder" in load_bundle(sd3_bundle, verify=False).components():
        return sd3_bundle
    return shared(tmp_path_factory, "sd3-encoder", lambda out: export_via_cli(sd3_model, out, "--with-encoder"))


def without_encoder(src: Path, out: Path) -> Path:
    """A copy of a bundle without its VAE encoder, manifest and files edited consistently, as `export
    --no-encoder` writes it (unsigned test bundles only)."""
    import json

    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    if "vae_encoder" in m["components"]:
        del m["components"]["vae_encoder"]
        m["files"] = {k: v for k, v in m["files"].items() if not k.startswith("vae_encoder/")}
        m["engines"] = [e for e in m.get("engines", []) if e.get("component") != "vae_encoder"]
        for key in ("max_images", "reference_max_pixels"):  # export writes these only with the encoder
            m["pipeline"].pop(key, None)
        shutil.rmtree(out / "vae_encoder")
        (out / "manifest.json").write_text(json.dumps(m, indent=2))
    return out


@pytest.fixture(scope="session")
def sd3_no_encoder_bundle(sd3_bundle, tmp_path_factory) -> Path:
    """The SD3 bundle as `export --no-encoder` leaves it: image-to-image refused with the command that adds it."""
    return shared(tmp_path_factory, "sd3-no-encoder", lambda out: without_encoder(sd3_bundle, out))


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """The shipped demo model exported exactly as `make demo` does (its own size range, FP32 ONNX), once per
    session for every test that needs it, in a folder named "demo" (the server's ckpt_name)."""
    from app.cli import main

    model = Path(__file__).resolve().parents[1] / "assets" / "demo-model"
    return shared(tmp_path_factory, "demo",
                  lambda out: main(["export", "--model", str(model), "--out", str(out)]) == 0 or pytest.fail("export"))


# ComfyUI's official templates draw at 1024 px, so their tiny stand-ins have a real VAE's 8x downscale (four VAE
# blocks, no mid-block attention, whose 128² latent would need 1 GiB) and a size range up to 1280: a held-out
# Klein base model (CFG on, 16 latent channels, 16-wide VAE) and an SD3 (three heads, 32-wide VAE, 64-patch table).
TEMPLATE_KLEIN = dict(vae_channels=(16, 16, 16, 16), vae_mid_attention=False, latent_channels=16, is_distilled=False)
TEMPLATE_SD3 = dict(vae_channels=(32, 32, 32, 32), vae_mid_attention=False, heads=3)


@pytest.fixture(scope="session")
def template_klein(tmp_path_factory) -> Path:
    """The Klein bundle sized for ComfyUI's templates, exported once per run (a folder of its own, so the SD3 one
    can be exported by the other worker at the same time)."""
    from export import synthetic

    def make(out):
        from app.cli import main

        k = synthetic.save(synthetic.build_klein(synthetic.KleinSize(**TEMPLATE_KLEIN)), out / "klein-model")
        assert main(["export", "--model", str(k), "--out", str(out / "klein-tpl"), "--min-size", "256",
                     "--max-size", "1280"]) == 0

    return shared(tmp_path_factory, "template-klein", make) / "klein-tpl"


@pytest.fixture(scope="session")
def template_sd3(tmp_path_factory) -> Path:
    """The SD3 bundle sized for ComfyUI's templates with an SD3.5 Large-style ControlNet named canny (the canny and
    blur templates' net names are aliased onto it); its plain templates run with the residual input at zeros."""
    from export import synthetic

    def make(out):
        from app.cli import main

        s = synthetic.save(synthetic.build_sd3(size=synthetic.SD3Size(**TEMPLATE_SD3)), out / "sd3-model")
        synthetic.build_sd3_controlnet(s, 1, "large", 11).save_pretrained(out / "canny", safe_serialization=True)
        assert main(["export", "--model", str(s), "--out", str(out / "sd3-tpl"), "--min-size", "256",
                     "--max-size", "1024", "--controlnet", f"canny={out / 'canny'}"]) == 0

    return shared(tmp_path_factory, "template-sd3", make) / "sd3-tpl"


# SD3.5 ControlNet (docs/CONTROLNET.md): a held-out-style SD3 (four blocks, 3 heads of 8, 8 latent channels, 40-wide
# T5, 24-wide CLIPs, a 40-patch position table) with three random 3-layer nets: two as SD3.5 Large's (single blocks,
# no text, the transformer's position table, zero pooled input) and one as InstantX's (joint blocks with the
# prompt, its own table, force_zeros_for_pooled_projection off). 4 blocks over 3 residuals: the per-block index
# int(i / (4/3)) is not i * 3 // 4 everywhere.
CONTROLNET_SD3 = dict(layers=4, heads=3, head_dim=8, latent_channels=8, t5_width=40, clip_hidden=24,
                      pos_embed_max_size=40)
CONTROLNETS = (("canny", "large", 1), ("depth", "large", 2), ("instantx", "instantx", 3))


@pytest.fixture(scope="session")
def controlnet_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(folder holding model/ and one folder per net, bundle with the three nets), made once per run."""
    from export import synthetic

    def make(out):
        from app.cli import main

        model = synthetic.save(synthetic.build_sd3(size=synthetic.SD3Size(**CONTROLNET_SD3)), out / "model")
        args = []
        for name, style, seed in CONTROLNETS:
            synthetic.build_sd3_controlnet(model, 3, style, seed).save_pretrained(out / name, safe_serialization=True)
            args += ["--controlnet", f"{name}={out / name}"]
        assert main(["export", "--model", str(model), "--out", str(out / "bundle"), "--min-size", "32",
                     "--max-size", "160", *args]) == 0

    root = shared(tmp_path_factory, "controlnet", make)
    return root, root / "bundle"
