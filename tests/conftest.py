"""Shared fixtures: tiny models of the real classes, saved as real folders, exported once per session."""

from __future__ import annotations

import os
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


def _dev_copy(name: str) -> Path | None:
    """EDGEGEN_DEV_BUNDLES=DIR (developers only, never CI): reuse DIR/<name> exported earlier instead of
    exporting again; stale copies are the developer's problem, so CI never sets it."""
    d = os.environ.get("EDGEGEN_DEV_BUNDLES")
    return Path(d) / name if d and (Path(d) / name).is_dir() else None


@pytest.fixture(scope="session")
def klein_model(tmp_path_factory) -> Path:
    from export import synthetic

    if dev := _dev_copy("klein-model"):
        return dev
    return synthetic.save(synthetic.build_klein(), tmp_path_factory.mktemp("models") / "tiny-klein")


@pytest.fixture(scope="session")
def sd3_model(tmp_path_factory) -> Path:
    from export import synthetic

    if dev := _dev_copy("sd3-model"):
        return dev
    return synthetic.save(synthetic.build_sd3(), tmp_path_factory.mktemp("models") / "tiny-sd3")


def export_via_cli(model: Path, out: Path, *extra: str) -> Path:
    from app.cli import main

    rc = main(["export", "--model", str(model), "--out", str(out), *TINY_SIZE_ARGS, *extra])
    assert rc == 0, f"export failed with {rc}"
    return out


@pytest.fixture(scope="session")
def klein_bundle(klein_model, tmp_path_factory) -> Path:
    return _dev_copy("klein") or export_via_cli(klein_model, tmp_path_factory.mktemp("bundles") / "klein-fp32")


@pytest.fixture(scope="session")
def sd3_bundle(sd3_model, tmp_path_factory) -> Path:
    return _dev_copy("sd3") or export_via_cli(sd3_model, tmp_path_factory.mktemp("bundles") / "sd3-fp32")


@pytest.fixture(scope="session")
def klein_encoder_bundle(klein_model, klein_bundle, tmp_path_factory) -> Path:
    """A Klein bundle with the VAE encoder (export's default for Klein, so usually klein_bundle itself)."""
    from app.bundle.manifest import load_bundle

    if "vae_encoder" in load_bundle(klein_bundle, verify=False).components():
        return klein_bundle
    return _dev_copy("klein-encoder") or export_via_cli(
        klein_model, tmp_path_factory.mktemp("bundles") / "klein-encoder", "--with-encoder")


@pytest.fixture(scope="session")
def sd3_encoder_bundle(sd3_model, tmp_path_factory) -> Path:
    """An SD3 bundle exported with --with-encoder (image-to-image)."""
    return _dev_copy("sd3-encoder") or export_via_cli(
        sd3_model, tmp_path_factory.mktemp("bundles") / "sd3-encoder", "--with-encoder")


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory) -> Path:
    """The shipped demo model exported exactly as `make demo` does (its own size range, FP32 ONNX), once per
    session for every test that needs it, in a folder named "demo" (the server's ckpt_name)."""
    from app.cli import main

    if dev := _dev_copy("demo"):
        return dev
    out = tmp_path_factory.mktemp("demo-bundle") / "demo"
    assert main(["export", "--model", str(Path(__file__).resolve().parents[1] / "assets" / "demo-model"),
                 "--out", str(out)]) == 0
    return out
