"""Loading an unchanged bundle again reads none of its bytes; any change to a file's identity re-hashes it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from app.bundle import manifest as mf
from app.bundle import verified
from app.errors import BundleError


@pytest.fixture
def bundle(klein_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(verified, "RACY_NS", 0)  # the copy was just made; do not wait out the racy window
    return shutil.copytree(klein_bundle, tmp_path / "b")


@pytest.fixture
def reads(monkeypatch):
    """Paths whose bytes the loader hashed, in order."""
    seen: list[str] = []
    real_file, real_onnx = mf.sha256_file, mf.check_onnx_external_data

    def sha(path):
        seen.append(os.path.basename(os.path.dirname(path)) + "/" + os.path.basename(path))
        return real_file(path)

    def onnx(bundle, rel, data, listed):
        seen.append(rel)
        return real_onnx(bundle, rel, data, listed)

    monkeypatch.setattr(mf, "sha256_file", sha)
    monkeypatch.setattr(mf, "check_onnx_external_data", onnx)
    return seen


def _n_files(bundle) -> int:
    return len(json.loads((bundle / "manifest.json").read_text())["files"])


def test_second_load_reads_nothing(bundle, reads):
    mf.load_bundle(bundle)
    assert len(reads) == _n_files(bundle)  # first load: every file hashed
    reads.clear()
    mf.load_bundle(bundle)
    assert reads == []
    assert verified.cache_path().is_file()
    assert not [p for p in verified.cache_path().parent.iterdir() if p.name.endswith(".tmp")]


def test_edit_with_mtime_restored_is_caught(bundle, reads):
    """ctime moves on every write and utime(); restoring mtime and size does not hide the edit."""
    mf.load_bundle(bundle)
    target = bundle / "scheduler" / "scheduler_config.json"
    st = os.stat(target)
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01  # same size
    with open(target, "r+b") as f:
        f.write(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(target).st_mtime_ns == st.st_mtime_ns and os.stat(target).st_size == st.st_size
    with pytest.raises(BundleError, match="scheduler/scheduler_config.json does not match its sha256"):
        mf.load_bundle(bundle)


def test_touch_rehashes_that_file_only(bundle, reads):
    mf.load_bundle(bundle)
    reads.clear()
    os.utime(bundle / "scheduler" / "scheduler_config.json")
    mf.load_bundle(bundle)
    assert reads == ["scheduler/scheduler_config.json"]
    reads.clear()
    mf.load_bundle(bundle)
    assert reads == []


def test_replaced_file_is_rehashed(bundle, reads):
    """Same bytes through a new inode (copy + rename over): identity changed, so it is read again."""
    mf.load_bundle(bundle)
    reads.clear()
    target = bundle / "scheduler" / "scheduler_config.json"
    tmp = bundle.parent / "sc.json"
    shutil.copy2(target, tmp)
    os.replace(tmp, target)
    mf.load_bundle(bundle)
    assert reads == ["scheduler/scheduler_config.json"]


def test_corrupt_cache_is_ignored(bundle, reads):
    mf.load_bundle(bundle)
    verified.cache_path().write_bytes(b"\x00not json{")
    reads.clear()
    mf.load_bundle(bundle)
    assert len(reads) == _n_files(bundle)
    verified.cache_path().write_text(json.dumps({"format": 1, "bundles": {str(bundle.resolve()): {
        "manifest_sha256": "x", "files": {"a": "garbage"}}}}))
    reads.clear()
    mf.load_bundle(bundle)
    assert len(reads) == _n_files(bundle)


def test_other_manifest_means_full_hash(bundle, reads):
    mf.load_bundle(bundle)
    m = json.loads((bundle / "manifest.json").read_text())
    m["defaults"]["steps"] = 3
    (bundle / "manifest.json").write_text(json.dumps(m))
    reads.clear()
    mf.load_bundle(bundle)
    assert len(reads) == _n_files(bundle)


def test_signing_policy_is_checked_every_time(bundle, reads, monkeypatch):
    mf.load_bundle(bundle)
    monkeypatch.setenv("EDGEGEN_REQUIRE_SIGNED", "1")
    with pytest.raises(BundleError, match="not signed"):
        mf.load_bundle(bundle)


def test_full_verification_can_be_forced(bundle, reads, monkeypatch):
    mf.load_bundle(bundle)
    monkeypatch.setenv(verified.ENV_FULL, "1")
    reads.clear()
    mf.load_bundle(bundle)
    assert len(reads) == _n_files(bundle)
    monkeypatch.delenv(verified.ENV_FULL)
    site = tmp_site = os.environ["EDGEGEN_SITE_CONFIG_DIR"]
    os.makedirs(site, exist_ok=True)
    with open(os.path.join(tmp_site, "policy.json"), "w") as f:
        json.dump({"full_verification": True}, f)
    reads.clear()
    mf.load_bundle(bundle)
    assert len(reads) == _n_files(bundle)


def test_unlisted_file_is_refused_even_when_cached(bundle, reads):
    """The cheap checks (tree, paths) run on every load; only hashing is skipped."""
    mf.load_bundle(bundle)
    (bundle / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match="extra.bin"):
        mf.load_bundle(bundle)
