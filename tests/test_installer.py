"""The offline installer: build an archive here, install it with no network (unshare -n), run it, remove it.

The default test ships a reduced requirement set (`--requirements`: rich, platformdirs, nvidia-ml-py), so it
proves the archive, checksums, offline pip, launcher, menu entry and uninstall in well under a minute; the
`slow` test ships edgegen's full CPU dependency set (about 480 MB of wheels) plus a model and a bundle, and
runs doctor and the self-test from the installed copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REDUCED = ["rich>=13", "platformdirs>=4", "nvidia-ml-py>=12"]


def _offline_prefix() -> list[str]:
    """`unshare -n` (a network namespace with no interfaces), or skip saying why it cannot be used."""
    if not sys.platform.startswith("linux"):
        pytest.skip("install.sh is the Linux installer")
    for tool in ("bash", "tar", "sha256sum", "unshare"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not available, so the offline install cannot be checked")
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode != 0:
        if subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False).returncode != 0:
            pytest.skip("unshare -n is not permitted here (needs root or user namespaces), so 'no network' "
                        "cannot be enforced")
        return ["unshare", "-rn"]
    return ["unshare", "-n"]


def _env(home: Path) -> dict:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEGEN_", "XDG_"))}
    env.update(HOME=str(home), PYTHON=sys.executable, EDGEGEN_SKIP_DOCTOR="1",
               EDGEGEN_AUDIT_LOG=str(home / "audit.jsonl"), PATH=os.environ["PATH"])
    return env


def build(out: Path, *args: str) -> Path:
    cmd = [sys.executable, "-m", "installer.build_bundle", "--out", str(out), *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return Path(p.stdout.strip().splitlines()[-1])


def run(cmd: list, env: dict, offline: list[str], check: bool = True, timeout: int = 600):
    """Run with no network, from HOME (so no engines/ folder of the checkout is found)."""
    p = subprocess.run([*offline, *map(str, cmd)], env=env, capture_output=True, text=True, timeout=timeout,
                       cwd=env["HOME"], check=False)
    if check:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_reduced_archive_installs_offline_runs_and_uninstalls(tmp_path):
    offline = _offline_prefix()
    t0 = time.monotonic()
    req = tmp_path / "requirements.txt"
    req.write_text("\n".join(REDUCED) + "\n")
    archive = build(tmp_path / "dist", "--requirements", str(req), "--no-assets")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    assert archive.name == f"{top}.tar" and top.startswith("edgegen-offline-0.")
    for n in ("SHA256SUMS", "BUNDLE_INFO", "INSTALL.md", "install.sh", "install.ps1", "requirements.txt",
              "assets/icons/edgegen.svg"):
        assert f"{top}/{n}" in names, n
    assert any(n.startswith(f"{top}/wheelhouse/edgegen-") for n in names)
    assert (archive.parent / "install.sh").is_file() and (archive.parent / "INSTALL.md").is_file()
    built = time.monotonic() - t0

    prefix, env = tmp_path / "prefix", _env(tmp_path / "home")
    run(["bash", archive.parent / "install.sh", archive, prefix], env, offline)
    launcher = prefix / "bin" / "edgegen"
    assert os.access(launcher, os.X_OK)
    desktop = (prefix / "share" / "applications" / "edgegen.desktop").read_text()
    assert f'Exec="{prefix}/bin/edgegen" app' in desktop
    icon = Path(next(line for line in desktop.splitlines() if line.startswith("Icon="))[5:])
    assert icon.is_file() and (prefix / "share/icons/hicolor/scalable/apps/edgegen.svg").is_file()

    # The installed copy runs, offline. Its doctor reports the missing PyTorch/ONNX Runtime (reduced set).
    p = run([launcher, "doctor", "--json"], env, offline, check=False)
    assert p.returncode == 1, p.stderr
    report = json.loads(p.stdout)
    assert report["offline"]["active"] and report["software"]["onnxruntime"]["version"] is None
    assert any("PyTorch is not installed" in x for x in report["problems"])
    assert str(prefix / "lib" / "edgegen" / "venv") in report["python"]
    p = run([launcher, "selftest"], env, offline, check=False)
    assert p.returncode == 1 and "Traceback" not in p.stderr and "needs numpy" in p.stderr

    run(["bash", archive.parent / "install.sh", "--uninstall", prefix], env, offline)
    for gone in ("bin/edgegen", "lib/edgegen", "share/edgegen", "share/applications/edgegen.desktop",
                 "share/icons/hicolor/scalable/apps/edgegen.svg"):
        assert not (prefix / gone).exists(), gone
    print(f"reduced archive: built in {built:.0f}s, whole test {time.monotonic() - t0:.0f}s")


def test_a_changed_archive_is_refused(tmp_path):
    offline = _offline_prefix()
    req = tmp_path / "requirements.txt"
    req.write_text("platformdirs>=4\n")
    archive = build(tmp_path / "dist", "--requirements", str(req), "--no-assets")
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".whl"))
    with open(archive, "r+b") as f:  # flip one byte inside a wheel: the tar stays readable
        f.seek(member.offset_data + member.size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    prefix = tmp_path / "prefix"
    p = run(["bash", archive.parent / "install.sh", archive, prefix], _env(tmp_path / "home"), offline, check=False)
    assert p.returncode != 0 and "checksums do not match" in p.stderr
    assert not (prefix / "bin" / "edgegen").exists() and not (prefix / "lib" / "edgegen" / "venv").exists()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("EDGEGEN_SLOW_TESTS"),
                    reason="about 4-7 min on 2 cores and 2.5 GB of temporary disk; set EDGEGEN_SLOW_TESTS=1")
def test_full_cpu_archive_installs_offline_and_passes_its_selftest(klein_model, klein_bundle, tmp_path):
    """edgegen's whole CPU dependency set from the wheelhouse, then doctor and selftest from the install."""
    from _refs import tiny_references

    offline = _offline_prefix()
    t0 = time.monotonic()
    model, refs = tiny_references(klein_model, tmp_path / "src")
    archive = build(tmp_path / "dist", "--target", "cpu", "--torch-index", "none", "--no-assets",
                    "--model", str(model), "--bundle", str(klein_bundle))
    built = time.monotonic() - t0
    prefix, env = tmp_path / "prefix", _env(tmp_path / "home")
    run(["bash", archive.parent / "install.sh", archive, prefix], env, offline, timeout=900)
    installed = time.monotonic() - t0
    launcher, share = prefix / "bin" / "edgegen", prefix / "share" / "edgegen"
    p = run([launcher, "doctor", "--json"], env, offline)
    report = json.loads(p.stdout)
    assert report["ready"] and [Path(b["path"]).name for b in report["bundles"]] == [klein_bundle.name]
    run([launcher, "selftest", "--model", share / "models" / model.name, "--references", refs,
         "--bundle", share / "engines" / klein_bundle.name], env, offline)
    print(f"full archive: built {built:.0f}s, installed {installed - built:.0f}s, "
          f"total {time.monotonic() - t0:.0f}s, {archive.stat().st_size / 2**20:.0f} MiB")
