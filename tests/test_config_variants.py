"""Model folders the other tests never build: shapes come from the folder's configs, or the export is refused in
one line naming the unsupported field (issue 17)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from tests.conftest import TINY_SIZE_ARGS

from tests.conftest import KLEIN_VARIANTS, variant_bundle


def _stderr_one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if not ln.startswith("[")]  # progress lines start with [component]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(params=sorted(KLEIN_VARIANTS))
def klein_variant(request, tmp_path_factory):
    """(name, model, bundle): the held-out Klein shapes, exported once per run with run-time LoRA inputs (their
    no-LoRA images below are then also the proof that the zero branch changes nothing)."""
    return (request.param, *variant_bundle(tmp_path_factory, request.param))


@pytest.fixture
def sd3_odd(tmp_path_factory):
    return variant_bundle(tmp_path_factory, "sd3-odd")


def test_klein_variant_exports_with_its_own_channel_count(klein_variant):
    name, _, bundle = klein_variant
    m = json.loads((bundle / "manifest.json").read_text())
    latent = KLEIN_VARIANTS[name].latent_channels
    p = m["pipeline"]
    assert p["latent_channels"] == latent and p["packed_channels"] == p["transformer_in_channels"] == 4 * latent
    assert p["text_encoder_layers"] == [9, 18, 27] and p["last_tapped_layer"] == 26
    assert p["is_distilled"] == KLEIN_VARIANTS[name].is_distilled
    vae_in = m["components"]["vae_decoder"]["inputs"][0]["shape"]
    tr_in = m["components"]["transformer"]["inputs"][0]["shape"]
    assert vae_in[1] == tr_in[2] == 4 * latent
    for c in m["components"].values():
        assert c["fidelity_gate"]["passed"], c["fidelity_gate"]


def test_klein_variant_reproduces_diffusers(klein_variant, tmp_path):
    from tests.test_spine import diffusers_image

    name, model, bundle = klein_variant
    guidance = 1.0 if KLEIN_VARIANTS[name].is_distilled else 3.0
    out = tmp_path / "k.png"
    rc = main(["generate", "--bundle", str(bundle), "--prompt", "a red circle", "--seed", "3", "--steps", "3",
               "--guidance", str(guidance), "--width", "64", "--height", "48", "--out", str(out)])
    assert rc == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    ref = diffusers_image(model, "a red circle", 3, 3, guidance, 64, 48)
    from app.runtime.images import psnr

    assert psnr(ours, ref) >= 60


def test_sd3_position_table_caps_the_size_range(sd3_odd):
    _, bundle = sd3_odd
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["pipeline"]["pos_embed_max_size"] == 13 and m["pipeline"]["max_size_px"] == 52
    assert m["size_range"]["max"] == 52 and m["pipeline"]["latent_channels"] == 8
    assert m["defaults"]["width"] <= 52


def test_sd3_odd_table_reproduces_diffusers(sd3_odd, tmp_path):
    from app.runtime.images import psnr
    from tests.test_spine import diffusers_image

    model, bundle = sd3_odd
    out = tmp_path / "s.png"
    rc = main(["generate", "--bundle", str(bundle), "--prompt", "a red circle", "--negative-prompt", "blurry",
               "--seed", "5", "--steps", "3", "--guidance", "4.5", "--width", "48", "--height", "36",
               "--out", str(out)])
    assert rc == 0
    ours = np.asarray(Image.open(out).convert("RGB"))
    assert psnr(ours, diffusers_image(model, "a red circle", 5, 3, 4.5, 48, 36, negative="blurry")) >= 60


def test_sd3_sizes_beyond_the_position_table_are_refused(sd3_odd, tmp_path, capsys):
    model, _ = sd3_odd
    rc = main(["export", "--model", str(model), "--out", str(tmp_path / "b"), "--max-size", "256"])
    line = _stderr_one_line(capsys)
    assert rc == 2 and "pos_embed_max_size 13" in line and "52" in line
    rc = main(["export", "--model", str(model), "--out", str(tmp_path / "b"), "--precision", "fp8",
               "--calibration-size", "64"])
    line = _stderr_one_line(capsys)
    assert rc == 2 and "--calibration-size 64" in line and "52" in line
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def _edit(folder, sub, **changes):
    path = folder / sub / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("family,sub,changes,needle", [
    ("klein", "text_encoder", {"num_hidden_layers": 20}, "text_encoder/config.json num_hidden_layers = 20"),
    ("klein", "transformer", {"in_channels": 64}, "transformer/config.json in_channels = 64"),
    ("klein", "vae", {"patch_size": [1, 1]}, "vae/config.json patch_size"),
    ("klein", "transformer", {"joint_attention_dim": 100}, "joint_attention_dim = 100"),
    ("klein", "transformer", {"patch_size": 2}, "transformer/config.json patch_size = 2"),
    ("sd3", "transformer", {"in_channels": 4}, "transformer/config.json in_channels = 4"),
    ("sd3", "transformer", {"joint_attention_dim": 48}, "joint_attention_dim = 48"),
    ("sd3", "transformer", {"pooled_projection_dim": 7}, "pooled_projection_dim = 7"),
    ("sd3", "transformer", {"pos_embed_max_size": -3}, "pos_embed_max_size = -3"),
    ("sd3", "vae", {"latent_channels": "x"}, "latent_channels"),
])
def test_unsupported_config_is_refused_in_one_line(family, sub, changes, needle, klein_model, sd3_model, tmp_path,
                                                   capsys):
    m = shutil.copytree(klein_model if family == "klein" else sd3_model, tmp_path / "m")
    _edit(m, sub, **changes)
    rc = main(["export", "--model", str(m), "--out", str(tmp_path / "b"), *TINY_SIZE_ARGS])
    line = _stderr_one_line(capsys)
    assert rc == 2 and needle in line, line
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))
