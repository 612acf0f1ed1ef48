"""`edgegen plan` end to end: sizes read from a real model folder / bundle, decisions for known GPUs."""

from __future__ import annotations

import json

from app.cli import main


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_from_model_folder_for_rtx_4090(capsys, sd3_model):
    p = plan_json(capsys, "--model", str(sd3_model), "--gpu", "RTX 4090")
    by = {c["name"]: c for c in p["components"]}
    assert by["transformer"]["precision"] == "fp8" and by["transformer"]["engine"] == "tensorrt-rtx"
    assert by["vae_decoder"]["precision"] not in ("fp8", "fp16")
    assert by["transformer"]["profile"]["batch"][-1] == 2  # SD3's CFG doubles the batch
    assert by["transformer"]["weights_bytes"] > 0 and p["cfg"] is True


def test_plan_from_bundle_for_h100_and_ampere(capsys, klein_bundle):
    h100 = plan_json(capsys, "--bundle", str(klein_bundle), "--gpu", "H100")
    assert {c["engine"] for c in h100["components"]} == {"tensorrt"}  # TensorRT-RTX has no SM90 target
    ampere = plan_json(capsys, "--bundle", str(klein_bundle), "--gpu", "sm86:24")
    tr = next(c for c in ampere["components"] if c["name"] == "transformer")
    # A bundle is planned as exported (its real bytes and precision), with what the GPU would prefer noted.
    assert tr["precision"] == "fp32" and tr["weights_bytes"] == plan_bytes(klein_bundle, "transformer")
    assert any("would export bf16" in n for n in tr["notes"])  # no FP8 before SM 8.9


def plan_bytes(bundle, name):
    return sum(f.stat().st_size for f in (bundle / name).iterdir())


def test_plan_table_and_bad_gpu(capsys, klein_bundle):
    assert main(["plan", "--bundle", str(klein_bundle), "--gpu", "RTX 4090"]) == 0
    assert "transformer" in capsys.readouterr().out
    assert main(["plan", "--bundle", str(klein_bundle), "--gpu", "Voodoo 5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Voodoo" in err
