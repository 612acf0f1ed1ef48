"""`make bundle`: an offline installer archive (wheelhouse, edgegen wheel, assets, models, bundles, SHA256SUMS).

    python -m installer.build_bundle --out dist [--model DIR]... [--bundle DIR]... [--target cpu|cuda]

writes dist/edgegen-offline-<version>-<platform>.tar plus install.sh, install.ps1 and INSTALL.md beside it.
Run it on a connected machine; installer/install.sh installs the archive on one with no network.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import sysconfig
import tarfile
import tempfile
import time
from pathlib import Path

import tomllib

from installer.wheelhouse import REPO, BuildError, PipOptions, fill, pins, project_wheel

HERE = Path(__file__).resolve().parent
# fp8 (ModelOpt and its ONNX tools) only matters for *exporting* FP8 bundles, which needs the full model and
# is done on a connected build machine; FP8 bundles run without it. Sites that export offline add it with
# --extras cpu,rtx,ui,trust,fp8.
TARGET_EXTRAS = {"cpu": "cpu,rtx,ui,trust", "cuda": "gpu,rtx,ui,trust"}
# On Linux, PyPI's torch is the CUDA build (several GB of nvidia-* wheels); a CPU site wants this index.
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
NVIDIA_INDEX = "https://pypi.nvidia.com"  # tensorrt-cu13's libraries (FACTS.md)
SKIP = {"__pycache__", ".DS_Store"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m installer.build_bundle", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the archive (created)")
    ap.add_argument("--model", type=Path, action="append", default=[], help="a diffusers model folder to ship")
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="an engine bundle to ship")
    ap.add_argument("--target", choices=sorted(TARGET_EXTRAS), default="cpu")
    ap.add_argument("--extras", help="edgegen extras to install (default: cpu,rtx,ui,trust or gpu,rtx,ui,trust)")
    ap.add_argument("--requirements", type=Path,
                    help="ship exactly these requirements instead of edgegen's dependencies (reduced bundles, tests)")
    ap.add_argument("--torch-index", default="auto",
                    help="extra index for torch: a URL, 'none', or 'auto' (the CPU index for a Linux cpu bundle)")
    ap.add_argument("--find-links", type=Path, action="append", default=[], help="local wheel folders for pip")
    ap.add_argument("--no-index", action="store_true", help="pip uses only --find-links (a fully offline build)")
    ap.add_argument("--pip-platform", help="build for another platform, e.g. win_amd64 (wheels must exist)")
    ap.add_argument("--python-version", help="with --pip-platform: the target's Python, e.g. 3.11")
    ap.add_argument("--no-assets", action="store_true", help="ship only assets/icons (no demo model, references)")
    return ap.parse_args(argv)


def platform_name(a: argparse.Namespace) -> tuple[str, str]:
    """('linux-x86_64-py3.11-cpu', '3.11'): what the wheelhouse was resolved for."""
    py = a.python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    plat = a.pip_platform.replace("_", "-") if a.pip_platform else sysconfig.get_platform()
    return f"{plat}-py{py}-{a.target}", py


def _gpu_ort_requirement() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    return next(d for d in deps if d.startswith("onnxruntime-gpu"))


def collect_wheels(a: argparse.Namespace, wh: Path) -> dict:
    """Fill wh; returns the BUNDLE_INFO fields that say how install.sh must install from it."""
    wheel = project_wheel(wh)
    extra_index = []
    torch_index = a.torch_index
    if torch_index == "auto":
        linux_cpu = a.target == "cpu" and not a.pip_platform and sys.platform.startswith("linux")
        torch_index = CPU_TORCH_INDEX if linux_cpu and not a.requirements else "none"
    if torch_index != "none":
        extra_index.append(torch_index)
    if a.target == "cuda" and not a.no_index:
        extra_index.append(NVIDIA_INDEX)
    opts = PipOptions(tuple(a.find_links), a.no_index, tuple(extra_index), a.pip_platform, a.python_version)
    if a.requirements:
        fill(wh, ["-r", str(a.requirements)], opts)
        return {"MODE": "partial", "EXTRAS": "", "EXTRA_REQUIREMENTS": "", "WHEEL": wheel.name}
    extras = a.extras or TARGET_EXTRAS[a.target]
    try:
        fill(wh, [f"{wheel}[{extras}]"], opts)
        return {"MODE": "full", "EXTRAS": extras, "EXTRA_REQUIREMENTS": "", "WHEEL": wheel.name}
    except BuildError:
        if a.target != "cuda" or "gpu" not in extras.split(","):
            raise
    # TensorRT's libraries come from NVIDIA's own index; without it ship ONNX Runtime CUDA and TensorRT-RTX.
    rest = ",".join(e for e in extras.split(",") if e != "gpu")
    ort = _gpu_ort_requirement()
    print(f"warning: TensorRT (extra [gpu]) could not be collected; shipping {ort} and [{rest}] instead", flush=True)
    fill(wh, [f"{wheel}[{rest}]", ort], opts)
    return {"MODE": "full", "EXTRAS": rest, "EXTRA_REQUIREMENTS": ort, "WHEEL": wheel.name}


def _tree(src: Path, arc: str) -> list[tuple[Path, str]]:
    """Every file under src (symlinks followed, as model caches use them) as (path, archive name)."""
    out = []
    for root, dirs, files in os.walk(src, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in SKIP)
        for f in sorted(files):
            if f in SKIP or f.endswith(".pyc"):
                continue
            p = Path(root) / f
            rel = p.relative_to(src).as_posix()
            if "\n" in rel or "\\" in rel:
                raise BuildError(f"{p}: file names with newlines or backslashes cannot be shipped")
            out.append((p, f"{arc}/{rel}"))
    return out


def payload(a: argparse.Namespace) -> list[tuple[Path, str]]:
    """Assets, models (checked as diffusers folders) and bundles (verified) to ship, with archive names."""
    from app.bundle.manifest import load_bundle
    from app.bundle.modelfolder import inspect_folder

    assets = REPO / "assets"
    out = _tree(assets / "icons", "assets/icons") if a.no_assets else _tree(assets, "assets")  # icons: menu entry
    names: set[str] = set()
    for kind, paths in (("models", a.model), ("engines", a.bundle)):
        for p in paths:
            p = Path(p).resolve()
            if f"{kind}/{p.name}" in names:
                raise BuildError(f"two {kind} are both named {p.name}; rename one folder")
            names.add(f"{kind}/{p.name}")
            inspect_folder(p) if kind == "models" else load_bundle(p)  # refuse pickles / tampered bundles here
            out += _tree(p, f"{kind}/{p.name}")
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_archive(dest: Path, top: str, members: list[tuple[Path, str]]) -> Path:
    """SHA256SUMS over every member, then an uncompressed tar (wheels are zips already), renamed into place."""
    sums = "".join(f"{sha256(p)}  {arc}\n" for p, arc in members)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    with tempfile.TemporaryDirectory() as t:
        sums_file = Path(t) / "SHA256SUMS"
        sums_file.write_text(sums)
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, dereference=True) as tar:
            for p, arc in [*members, (sums_file, "SHA256SUMS")]:
                info = tar.gettarinfo(str(p), arcname=f"{top}/{arc}")
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o755 if arc.endswith(".sh") else 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
    tmp.replace(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    plat, py = platform_name(a)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="edgegen-bundle-", dir=a.out) as work:
            work = Path(work)
            wh = work / "wheelhouse"
            info = collect_wheels(a, wh)
            version = info["WHEEL"].split("-")[1]
            top = f"edgegen-offline-{version}-{plat}"
            shipped = payload(a)
            info = {"NAME": "edgegen", "VERSION": version, "PLATFORM": plat, "TARGET": a.target, "PYTHON": py,
                    **info, "MODELS": " ".join(p.name for p in a.model),
                    "BUNDLES": " ".join(p.name for p in a.bundle),
                    "BUILT": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (work / "BUNDLE_INFO").write_text("".join(f"{k}={v}\n" for k, v in info.items()))
            (work / "requirements.txt").write_text("\n".join(pins(wh)) + "\n")
            from installer.install_doc import install_md

            (work / "INSTALL.md").write_text(install_md(info, top))
            members = [(p, f"wheelhouse/{p.name}") for p in sorted(wh.glob("*.whl"))]
            members += [(work / n, n) for n in ("BUNDLE_INFO", "requirements.txt", "INSTALL.md")]
            members += [(HERE / n, n) for n in ("install.sh", "install.ps1")] + shipped
            archive = write_archive(a.out / f"{top}.tar", top, members)
            for n in ("install.sh", "install.ps1"):
                shutil.copy2(HERE / n, a.out / n)
            shutil.copy2(work / "INSTALL.md", a.out / "INSTALL.md")
    except BuildError as e:
        print(f"build_bundle: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        from app.errors import EdgegenError

        if not isinstance(e, EdgegenError):
            raise
        print(f"build_bundle: error: {e}", file=sys.stderr)
        return e.exit_code
    size = archive.stat().st_size / 1024**2
    print(f"{len(members)} files, {size:.0f} MiB, in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    print(archive)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
