"""Every user mistake: one line on stderr naming the problem and the fix, exit code 2, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from app.cli import main


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    # progress lines ([preflight] ..., [component] ...) and the generate header may precede the one error line
    lines = [l for l in err.splitlines() if not l.startswith(("signature:", "backend:", "warning:", "["))]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err


def test_model_folder_missing(capsys, tmp_path):
    rc, err = run(capsys, "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert_one_line(rc, err, "does not exist")


def test_folder_that_is_not_diffusers(capsys, tmp_path):
    rc, err = run(capsys, "export", "--model", str(tmp_path), "--out", str(tmp_path / "b"))
    assert_one_line(rc, err, "model_index.json")


def test_unknown_family(capsys, tmp_path, klein_model):
    rc, err = run(capsys, "export", "--model", str(klein_model), "--out", str(tmp_path / "b"), "--family", "sdxl")
    assert_one_line(rc, err, "unknown family", "flux2-klein")
    other = tmp_path / "m"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    rc, err = run(capsys, "export", "--model", str(other), "--out", str(tmp_path / "b"))
    assert_one_line(rc, err, "StableDiffusionXLPipeline", "--family")


def test_pickle_only_weights_are_refused(capsys, tmp_path, klein_model):
    m = shutil.copytree(klein_model, tmp_path / "m")
    for f in (m / "transformer").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    rc, err = run(capsys, "export", "--model", str(m), "--out", str(tmp_path / "b"))
    assert_one_line(rc, err, "pickle", "safetensors")


def test_missing_component(capsys, tmp_path, klein_model):
    m = shutil.copytree(klein_model, tmp_path / "m")
    shutil.rmtree(m / "vae")
    rc, err = run(capsys, "export", "--model", str(m), "--out", str(tmp_path / "b"))
    assert_one_line(rc, err, "vae")


def test_unknown_precision(capsys, tmp_path, klein_model):
    rc, err = run(capsys, "export", "--model", str(klein_model), "--out", str(tmp_path / "b"), "--precision", "int3")
    assert_one_line(rc, err, "int3")


@pytest.mark.parametrize("w,h,needle", [(62, 64, "multiple of 4"), (512, 64, "outside"), (64, 16, "outside")])
def test_bad_sizes(capsys, tmp_path, klein_bundle, w, h, needle):
    rc, err = run(capsys, "generate", "--bundle", str(klein_bundle), "--prompt", "x", "--width", str(w),
                  "--height", str(h), "--out", str(tmp_path / "a.png"))
    assert_one_line(rc, err, needle)
    assert not (tmp_path / "a.png").exists()


def test_long_prompt_is_truncated_with_a_warning(capsys, tmp_path, klein_bundle):
    prompt = " ".join(["a red circle on a blue background"] * 120)
    rc = main(["generate", "--bundle", str(klein_bundle), "--prompt", prompt, "--width", "32", "--height", "32",
               "--out", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "a.png").is_file()
    assert "warning:" in err and "only the first 512" in err


def test_tampered_bundle_file_is_refused(capsys, tmp_path, klein_bundle):
    b = shutil.copytree(klein_bundle, tmp_path / "b")
    onnx = b / "vae_decoder" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    rc, err = run(capsys, "generate", "--bundle", str(b), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert_one_line(rc, err, "vae_decoder/model.onnx", "sha256", "edgegen export")


def test_unknown_schema_version(capsys, tmp_path, klein_bundle):
    b = shutil.copytree(klein_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    rc, err = run(capsys, "generate", "--bundle", str(b), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert_one_line(rc, err, "schema version 99", "edgegen export")


def test_partial_bundle_without_manifest(capsys, tmp_path):
    (tmp_path / "b").mkdir()
    rc, err = run(capsys, "generate", "--bundle", str(tmp_path / "b"), "--prompt", "x", "--out", str(tmp_path / "a.png"))
    assert_one_line(rc, err, "manifest.json")


def test_real_entry_point_exit_code_and_no_traceback(tmp_path):
    """The installed console script, not just main(): argparse mistakes included."""
    for argv in (["generate", "--bundle", str(tmp_path)], ["export", "--model", str(tmp_path / "x"), "--out", "y"]):
        proc = subprocess.run([sys.executable, "-m", "app.cli", *argv], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("value,path,scale", [
    ("C:\\brand.safetensors:0.8", "C:\\brand.safetensors", 0.8),  # Windows drive letter + scale
    ("C:\\brand.safetensors", "C:\\brand.safetensors", 1.0),  # drive letter, no scale
    ("dir/a:b.safetensors", "dir/a:b.safetensors", 1.0),  # a colon in the name, no scale
    ("dir/a:b.safetensors:-0.5", "dir/a:b.safetensors", -0.5),  # split at the LAST colon
    ("brand.safetensors:1e-1", "brand.safetensors", 0.1),
])
def test_lora_argument_splits_at_the_last_colon(value, path, scale):
    from pathlib import Path

    from app.cli import _lora

    assert _lora(value) == (Path(path), scale)
