"""`edgegen doctor` and `edgegen selftest` on a machine without an NVIDIA GPU (NVML faked where a GPU is needed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _refs import tiny_references  # tests/ is on sys.path under pytest, as for _fp8_models
from PIL import Image

from app.cli import main
from app.planning import devices as gpu_mod
from app.planning.devices import fake_gpu


@pytest.fixture(autouse=True)
def no_gpu_no_repo_bundles(monkeypatch, tmp_path):
    """No GPU, and only the bundles a test names: the checkout's engines/ may hold a real demo bundle."""
    monkeypatch.setattr(gpu_mod.NvmlReader, "read", lambda self: [])
    monkeypatch.setattr("app.bundle.locations.REPO_ROOT", tmp_path / "no-repo")
    monkeypatch.delenv("EDGEGEN_ENGINES", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def tiny_refs(klein_model, tmp_path_factory) -> tuple[Path, Path]:
    return tiny_references(klein_model, tmp_path_factory.mktemp("selftest"))


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


def test_doctor_text_with_a_good_bundle(klein_bundle, capsys):
    assert main(["doctor", "--bundle", str(klein_bundle)]) == 0
    out = capsys.readouterr().out
    for text in ("no NVIDIA GPU/driver found", "ONNX Runtime", "TensorRT-RTX", "PyTorch", "CUDA (PyTorch build)",
                 "network guard active", "audit log:", "READY", "GiB free"):
        assert text in out, text
    assert "ONNX Runtime CPU: no NVIDIA GPU found" in out  # why this bundle runs where it runs


def test_doctor_json_with_a_good_bundle(klein_bundle, capsys, tmp_path):
    assert main(["doctor", "--bundle", str(klein_bundle), "--json"]) == 0
    r = _json(capsys)
    assert r["ready"] and r["problems"] == [] and r["gpus"] == []
    assert "CPUExecutionProvider" in r["software"]["onnxruntime"]["providers"]
    assert r["software"]["torch"]["version"] and "cuda" in r["software"]["torch"]
    assert {"tensorrt", "tensorrt_rtx"} <= set(r["software"])
    b = r["bundles"][0]
    assert b["ok"] and b["family"] == "flux2-klein" and b["backend"] == "onnxruntime-cpu"
    assert r["offline"]["active"] and r["audit_log"] == str(tmp_path / "audit" / "audit.jsonl")
    assert r["disk"] and r["disk"][0]["free_gib"] > 0
    assert "signing" in r


def test_doctor_fails_on_a_tampered_bundle(klein_bundle, tmp_path, capsys):
    bad = tmp_path / "tampered"
    shutil.copytree(klein_bundle, bad)
    with open(bad / "vae_decoder" / "model.onnx", "ab") as f:
        f.write(b"\0")
    assert main(["doctor", "--bundle", str(bad), "--json"]) == 1
    r = _json(capsys)
    assert not r["ready"] and not r["bundles"][0]["ok"]
    assert "sha256" in r["bundles"][0]["error"] and any("tampered" in p for p in r["problems"])
    assert main(["doctor", "--bundle", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "NOT READY" in out and "re-export with" in out


def test_doctor_fails_with_no_bundle(capsys):
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "no engine bundle found" in out and "edgegen export --model DIR" in out


def test_doctor_finds_bundles_in_the_engines_folders(klein_bundle, tmp_path, monkeypatch, capsys):
    engines = tmp_path / "site-engines"
    engines.mkdir()
    (engines / klein_bundle.name).symlink_to(klein_bundle, target_is_directory=True)
    monkeypatch.setenv("EDGEGEN_ENGINES", str(engines))
    assert main(["doctor", "--json"]) == 0
    r = _json(capsys)
    assert [Path(b["path"]).name for b in r["bundles"]] == [klein_bundle.name]
    assert r["bundles_searched"] == [str(engines)]


def test_doctor_shows_the_command_that_fixes_an_engine_for_another_gpu(klein_bundle, tmp_path, monkeypatch, capsys):
    b = tmp_path / "with-engine"
    shutil.copytree(klein_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    (b / "engines").mkdir()
    m["engines"] = []
    for c in m["components"]:  # placeholder plans, listed and hashed like real ones; never deserialised here
        (b / "engines" / f"{c}.engine").write_bytes(b"plan")
        m["files"][f"engines/{c}.engine"] = hashlib.sha256(b"plan").hexdigest()
        m["engines"].append({"component": c, "flavour": "tensorrt-rtx", "version": "1.7.1.116", "sm": "120",
                             "precision": "fp32", "file": f"engines/{c}.engine",
                             "sha256": hashlib.sha256(b"plan").hexdigest()})
    (b / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(gpu_mod.NvmlReader, "read", lambda self: [fake_gpu(sm="89")])
    assert main(["doctor", "--bundle", str(b), "--json"]) == 0  # still runs, on ONNX Runtime
    r = _json(capsys)
    eng = r["bundles"][0]["engines"][0]
    assert not eng["usable"] and "sm120" in eng["why"] and "sm89" in eng["why"]
    assert eng["fix"].startswith("edgegen export --model") and "--target tensorrt-rtx --sm 89" in eng["fix"]
    assert r["gpus"][0]["sm"] == "89" and r["gpus"][0]["vram_total_gib"] == 24.0
    assert any("fix: edgegen export" in w for w in r["warnings"])
    mem = r["bundles"][0]["memory"]  # the runtime's own plan from the bundle's bytes, at its default size
    assert mem["strategy"] == "all-resident" and mem["does"] == "all components stay loaded" and mem["peak_gib"] > 0


def test_selftest_passes_and_lists_what_it_did_not_cover(tiny_refs, klein_bundle, capsys):
    model, refs = tiny_refs
    rc = main(["selftest", "--model", str(model), "--references", str(refs), "--bundle", str(klein_bundle)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PyTorch reference" in out and "ONNX Runtime CPU" in out and out.count("PASS") >= 3
    assert "TensorRT-RTX engines: not run — no NVIDIA GPU" in out
    assert "TensorRT engines: not run — no NVIDIA GPU" in out
    assert "ONNX Runtime CUDA: not run" in out


def test_selftest_fails_on_a_wrong_reference_image(tiny_refs, klein_bundle, tmp_path, capsys):
    model, refs = tiny_refs
    bad = tmp_path / "refs"
    shutil.copytree(refs, bad)
    first = json.loads((bad / "index.json").read_text())[0]["file"]
    img = np.asarray(Image.open(bad / first).convert("RGB"))
    Image.fromarray(255 - img).save(bad / first)  # a valid PNG of the wrong picture
    rc = main(["selftest", "--model", str(model), "--references", str(bad), "--bundle", str(klein_bundle)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL" in out and "below 40 dB" in out


def test_selftest_without_references_names_the_command(tiny_refs, klein_bundle, tmp_path, capsys):
    model, _ = tiny_refs
    rc = main(["selftest", "--model", str(model), "--references", str(tmp_path / "none"), "--bundle",
               str(klein_bundle)])
    assert rc == 2
    assert "python -m tools.demo.references" in capsys.readouterr().err


def test_selftest_plan_on_an_rtx_gpu_without_engines(klein_bundle):
    from app.bundle.manifest import load_bundle
    from app.site.selftest_plan import plan

    b = load_bundle(klein_bundle, verify=False)
    cands = {c.name: c for c in plan(b, Path("/m"), [fake_gpu(sm="89")], ["CPUExecutionProvider"], False,
                                     {"tensorrt-rtx": "1.7.1.116", "tensorrt": None})}
    assert cands["torch"].skip and "model folder" in cands["torch"].skip  # /m is not here
    assert cands["onnxruntime-cpu"].skip is None
    assert "no CUDA provider" in cands["onnxruntime-cuda"].skip
    assert "--target tensorrt-rtx --sm 89" in cands["tensorrt-rtx"].skip
    assert "TensorRT is not installed" in cands["tensorrt"].skip


def test_selftest_exports_its_bundle_once_into_the_cache(tiny_refs, klein_bundle, monkeypatch):
    """With no engines/demo, the bundle is exported into the user cache and reused (export faked by a copy)."""
    import export.exporter
    from app.cli import _selftest_export
    from app.site.selftest_bundle import cache_dir, demo_bundle

    calls = []

    def fake_export(opts, progress=print):
        calls.append(opts)
        shutil.copytree(klein_bundle, opts.out, dirs_exist_ok=True)
        return opts.out

    monkeypatch.setattr(export.exporter, "export_bundle", fake_export)
    model, _ = tiny_refs
    env = {"gpus": [], "torch_cuda": False, "installed": {"tensorrt-rtx": None, "tensorrt": None}}
    b, how, notes = demo_bundle(model, None, env, _selftest_export)
    assert b.root == cache_dir().resolve() and "exported" in how and notes == []
    assert len(calls) == 1 and calls[0].target == "onnx" and calls[0].model == model
    b2, how2, _ = demo_bundle(model, None, env, _selftest_export)
    assert len(calls) == 1 and "cached" in how2 and b2.root == b.root


def test_selftest_covers_the_reference_image_case(tiny_refs, klein_encoder_bundle, tmp_path, capsys):
    """The shipped index has a reference-image case (VAE encoder); a bundle without the encoder says it was not run."""
    model, refs = tiny_refs
    index = json.loads((refs / "index.json").read_text())
    assert any(r.get("images") for r in index)  # written by tools.demo.references (IMAGE_REFERENCES)
    klein_bundle = klein_encoder_bundle
    rc = main(["selftest", "--model", str(model), "--references", str(refs), "--bundle", str(klein_bundle)])
    captured = capsys.readouterr()
    assert rc == 0, captured.out
    assert "references ref-0.png" in captured.err and "no VAE encoder" not in captured.out
    assert "inpainting ref-1.png with mask-0.png" in captured.err  # INPAINT_REFERENCES: the mask path too
    shipped = json.loads((Path(__file__).parents[1] / "assets" / "demo-references" / "index.json").read_text())
    assert any(r.get("images") for r in shipped) and any(r.get("mask") for r in shipped)
    # the same bundle without its encoder (manifest and files edited consistently; unsigned test bundle)
    from tests.conftest import without_encoder

    plain = without_encoder(klein_bundle, tmp_path / "no-encoder")
    rc = main(["selftest", "--model", str(model), "--references", str(refs), "--bundle", str(plain)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "not run: the bundle has no VAE encoder" in " ".join(out.split()) and "--with-encoder" in out
