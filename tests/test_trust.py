"""Signed bundles and containment: what loads, what is refused (exit 2, one line), and that refusal comes first."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from app.bundle import trust
from app.bundle.files import sha256_file
from app.bundle.manifest import load_bundle
from app.cli import main
from app.errors import BundleError

GEN = ("--prompt", "x", "--steps", "1", "--width", "32", "--height", "32")


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out.strip(), out.err.strip()


def refused(capsys, bundle: Path, tmp_path: Path, *needles: str) -> str:
    """`edgegen generate` on the bundle must stop with exit 2 and exactly one line naming the problem."""
    rc, _, err = run(capsys, "generate", "--bundle", bundle, "--out", tmp_path / "x.png", *GEN)
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("edgegen: error: ") and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


@pytest.fixture
def no_ort(monkeypatch):
    """Refusals must happen before ONNX Runtime opens anything: any session is a test failure."""
    import onnxruntime

    def forbidden(*a, **k):
        raise AssertionError("an ONNX Runtime session was created before the bundle was refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", forbidden)


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    """A signing key pair whose public half this (test-isolated) user trusts."""
    priv, pub = trust.generate_keypair(tmp_path / "keys", "Test Signer")
    trust.add_trusted_key(pub)
    return priv, pub


@pytest.fixture
def bundle(sd3_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(sd3_bundle, tmp_path / "bundle"))


@pytest.fixture
def signed(bundle, keys) -> Path:
    trust.sign_bundle(bundle, keys[0])
    return bundle


def edit_manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


def flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    path.write_bytes(bytes(data))


def force_sign(bundle: Path, private_key: Path) -> None:
    """A trusted signer's valid signature over whatever manifest is there, without `edgegen sign`'s content
    checks (which refuse every crafted bundle below): load must not rely on signers being careful."""
    key, name = trust._load_private(private_key)
    raw = (bundle / "manifest.json").read_bytes()
    pub = trust._raw_public(key.public_key())
    doc = {"format": trust.SIG_FORMAT, "version": 1, "algorithm": "ed25519", "key_id": trust.key_id_of(pub),
           "public_key": base64.b64encode(pub).decode(), "signer": name,
           "signature": base64.b64encode(key.sign(raw)).decode()}
    (bundle / "manifest.sig").write_text(json.dumps(doc))


def add_file(bundle: Path, rel: str, data: bytes, key: Path | None = None) -> None:
    """Put a file in the bundle, list it in the manifest and (given a key) re-sign: a legitimate-looking bundle."""
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(data)
    edit_manifest(bundle, lambda m: m["files"].__setitem__(rel, sha256_file(bundle / rel)))
    if key:
        force_sign(bundle, key)


# ---------------------------------------------------------------- keys, store, policy


def test_keys_generate_trust_and_policy_commands(capsys, tmp_path):
    rc, out, err = run(capsys, "keys", "generate", "--out", tmp_path / "k", "--name", "Site A")
    assert rc == 0, err
    pub = Path(out)
    priv = pub.with_suffix(".key")
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    key, _ = trust._load_public(pub)
    kid = trust.key_id_of(trust._raw_public(key))
    assert f"key-id: {kid}" in pub.read_text() and len(kid) == 16
    assert "PRIVATE" in priv.read_text() and "PRIVATE" not in pub.read_text()
    assert run(capsys, "keys", "generate", "--out", tmp_path / "k", "--name", "Site A")[0] == 2  # never overwrites

    assert run(capsys, "trust", "add", pub)[0] == 0
    rc, out, _ = run(capsys, "trust", "list")
    assert kid in out and "Site A" in out and "require signed bundles: off" in out
    assert run(capsys, "trust", "policy", "--require-signed", "on")[0] == 0
    assert trust.load_policy().require_signed_bundles
    assert run(capsys, "trust", "policy", "--require-signed", "off")[0] == 0
    assert not trust.load_policy().require_signed_bundles
    rc, out, _ = run(capsys, "trust", "remove", kid[:8])
    assert rc == 0 and kid in out and trust.trusted_keys() == []


def test_site_policy_cannot_be_turned_off_by_the_user(capsys, tmp_path):
    site = Path(os.environ["EDGEGEN_SITE_CONFIG_DIR"])
    site.mkdir(parents=True)
    (site / "policy.json").write_text('{"require_signed_bundles": true}')
    rc, _, err = run(capsys, "trust", "policy", "--require-signed", "off")
    assert rc == 2 and "site policy" in err
    assert trust.load_policy().require_signed_bundles


def test_trust_report_for_doctor(signed, keys):
    r = trust.trust_report(signed)
    assert r["policy"]["require_signed_bundles"] is False
    assert [k["name"] for k in r["trusted_keys"]] == ["Test Signer"]
    assert r["bundle"]["signed"] and r["bundle"]["trusted"] and r["bundle"]["signer"] == "Test Signer"


# ---------------------------------------------------------------- what loads


def test_signed_bundle_loads_and_reports_signer(capsys, signed, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEGEN_REQUIRE_SIGNED", "1")  # strict policy, and it still loads
    state = load_bundle(signed).signature
    assert state.signed and state.trusted and state.checked and state.signer == "Test Signer"
    rc, out, err = run(capsys, "generate", "--bundle", signed, "--out", tmp_path / "ok.png", *GEN)
    assert rc == 0, err
    assert f"signature: signed by Test Signer (key {state.key_id}), trusted" in err.splitlines()


def test_unsigned_and_untrusted_bundles_load_when_signatures_are_optional(bundle, tmp_path):
    assert load_bundle(bundle).signature.signed is False
    other, _ = trust.generate_keypair(tmp_path / "other", "Stranger")
    trust.sign_bundle(bundle, other)
    state = load_bundle(bundle).signature
    assert state.signed and state.checked and not state.trusted and state.signer == "Stranger"


# ---------------------------------------------------------------- what is refused


def test_flipped_byte_in_engine_file(capsys, signed, keys, tmp_path, no_ort):
    blob = os.urandom(4096)
    add_file(signed, "engines/x.engine", blob)
    edit_manifest(signed, lambda m: m["engines"].append({
        "component": "transformer", "flavour": "tensorrt-rtx", "version": "1.7.1.116", "sm": "89",
        "file": "engines/x.engine", "sha256": sha256_file(signed / "engines/x.engine"),
        "host_code_allowed": False, "plugins": []}))
    trust.sign_bundle(signed, keys[0])
    assert load_bundle(signed).signature.trusted  # the crafted bundle is valid before the flip
    flip(signed / "engines/x.engine")
    refused(capsys, signed, tmp_path, "engines/x.engine", "sha256")


def test_engine_with_plugins_is_refused_and_never_signed(capsys, bundle, keys, tmp_path, no_ort):
    add_file(bundle, "engines/x.engine", b"plan")
    edit_manifest(bundle, lambda m: m["engines"].append({
        "component": "transformer", "file": "engines/x.engine", "sha256": sha256_file(bundle / "engines/x.engine"),
        "host_code_allowed": True, "plugins": ["libevil.so"]}))
    rc, _, err = run(capsys, "sign", "--bundle", bundle, "--key", keys[0])
    assert rc == 2 and "host code or plugins" in err and not (bundle / "manifest.sig").exists()
    force_sign(bundle, keys[0])
    refused(capsys, bundle, tmp_path, "host code or plugins")


def test_flipped_byte_in_onnx_file(capsys, signed, tmp_path, no_ort):
    flip(signed / "transformer" / "model.onnx")
    refused(capsys, signed, tmp_path, "transformer/model.onnx", "sha256")


def test_flipped_byte_in_manifest_breaks_the_signature(capsys, signed, tmp_path, no_ort):
    raw = (signed / "manifest.json").read_bytes()
    at = raw.index(b'"export_seconds": ') + len(b'"export_seconds": ')
    data = bytearray(raw)  # swap the leading digit for another non-zero one: one byte changed, still valid JSON
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    (signed / "manifest.json").write_bytes(bytes(data))
    json.loads((signed / "manifest.json").read_bytes())
    refused(capsys, signed, tmp_path, "signature", "does not match manifest.json")


def test_untrusted_signer_under_strict_policy(capsys, bundle, tmp_path, monkeypatch, no_ort):
    stranger, _ = trust.generate_keypair(tmp_path / "other", "Stranger")
    trust.sign_bundle(bundle, stranger)
    monkeypatch.setenv("EDGEGEN_REQUIRE_SIGNED", "1")
    refused(capsys, bundle, tmp_path, "Stranger", "does not trust", "edgegen trust add")


def test_unsigned_bundle_under_strict_policy(capsys, bundle, tmp_path, no_ort):
    assert run(capsys, "trust", "policy", "--require-signed", "on")[0] == 0
    refused(capsys, bundle, tmp_path, "not signed", f"edgegen sign --bundle {bundle} --key")


def test_file_on_disk_missing_from_the_list(capsys, signed, keys, tmp_path, no_ort):
    edit_manifest(signed, lambda m: m["files"].pop("tokenizer/tokenizer_config.json"))
    force_sign(signed, keys[0])  # even a validly signed manifest must cover every file
    refused(capsys, signed, tmp_path, "tokenizer/tokenizer_config.json", "does not list")


def test_signing_refuses_a_bundle_whose_files_do_not_match(capsys, bundle, keys, no_ort):
    flip(bundle / "vae_decoder" / "model.onnx")
    rc, _, err = run(capsys, "sign", "--bundle", bundle, "--key", keys[0])
    assert rc == 2 and "sha256" in err and not (bundle / "manifest.sig").exists()


def _onnx_with_external(location: str, in_subgraph: bool) -> bytes:
    """A tiny valid model whose one weight claims to live in `location` (optionally inside an If branch)."""
    w = numpy_helper.from_array(np.ones((2, 2), np.float32), "W")
    set_external_data(w, location=location, offset=0, length=16)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    if not in_subgraph:
        graph = helper.make_graph([helper.make_node("Add", ["x", "W"], ["y"])], "g", [x], [y], [w])
    else:
        branch = helper.make_graph([helper.make_node("Constant", [], ["c"], value=w)], "b", [],
                                   [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2, 2])])
        cond = numpy_helper.from_array(np.array(True), "cond")
        graph = helper.make_graph([helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)],
                                  "g", [x], [y], [cond])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("location,in_subgraph,needle", [
    ("../secret.bin", False, "outside the bundle"),
    ("../secret.bin", True, "outside the bundle"),
    ("/etc/passwd", False, "outside the bundle"),
    ("C:\\secret.bin", False, "outside the bundle"),
    ("weights.bin", False, "does not list"),  # inside, but not covered by any checksum
])
def test_onnx_external_data_must_stay_inside(capsys, signed, keys, tmp_path, location, in_subgraph, needle, no_ort):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    # Replace a real component's ONNX (listed, hashed, re-signed): only the location check can stop it.
    rel = "text_encoder/model.onnx"
    add_file(signed, rel, _onnx_with_external(location, in_subgraph), keys[0])
    refused(capsys, signed, tmp_path, rel, needle)


def test_symlink_that_escapes(capsys, signed, tmp_path, no_ort):
    target = signed / "tokenizer_3" / "tokenizer.json"
    outside = tmp_path / "outside.json"
    shutil.copy(target, outside)  # same bytes, so only the symlink check can refuse it
    target.unlink()
    target.symlink_to(outside)
    refused(capsys, signed, tmp_path, "tokenizer_3/tokenizer.json", "outside the bundle")


def test_symlinked_folder_inside_is_refused(capsys, signed, tmp_path, no_ort):
    (signed / "alias").symlink_to(signed / "scheduler", target_is_directory=True)
    refused(capsys, signed, tmp_path, "symlink alias")


@pytest.mark.parametrize("change,needle", [
    (lambda m: m["files"].__setitem__("../outside.txt", "0" * 64), "not a plain"),
    (lambda m: m["files"].__setitem__("/etc/passwd", "0" * 64), "not a plain"),
    (lambda m: m["components"]["transformer"].__setitem__("onnx", "../x/model.onnx"), "not a plain"),
    (lambda m: m.__setitem__("tokenizers", ["/usr/share"]), "not a plain"),
    (lambda m: m["engines"].append({"component": "vae_decoder", "file": "/tmp/evil.engine"}), "not a plain"),
    (lambda m: m["engines"].append({"component": "vae_decoder", "file": "engines/none.engine"}), "does not cover"),
])
def test_manifest_paths_must_stay_inside(capsys, bundle, tmp_path, change, needle, no_ort):
    edit_manifest(bundle, change)
    refused(capsys, bundle, tmp_path, needle)


def test_load_bundle_refuses_before_reading_further(signed):
    """The signature is checked on the manifest bytes before anything else (here: before JSON parsing)."""
    (signed / "manifest.json").write_bytes(b"{" + (signed / "manifest.json").read_bytes())
    with pytest.raises(BundleError, match="signature"):
        load_bundle(signed)


def test_export_sign_checks_the_key_first_then_signs(capsys, sd3_bundle, keys, tmp_path, monkeypatch):
    import export.exporter as exporter

    calls = []

    def fake_export(opts, progress=print):  # the real export is covered elsewhere; this is the --sign wiring
        calls.append(opts.out)
        return Path(shutil.copytree(sd3_bundle, opts.out))

    monkeypatch.setattr(exporter, "export_bundle", fake_export)
    args = ("export", "--model", tmp_path, "--out", tmp_path / "out", "--sign")
    rc, _, err = run(capsys, *args, tmp_path / "missing.key")
    assert rc == 2 and "missing.key" in err and calls == []  # refused before any export work
    rc, out, err = run(capsys, *args, keys[0])
    assert rc == 0, err
    assert "signature: signed by Test Signer" in err and out == str(tmp_path / "out")
    assert load_bundle(tmp_path / "out").signature.trusted
