"""Fill a wheelhouse with pip: the project's own wheel, then every dependency, as wheels only.

Natively `pip wheel` is used (it also builds any sdist-only dependency into a wheel, so the air-gapped machine
never compiles); for another platform `pip download --only-binary=:all: --platform ...` (wheels must exist).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the project wheel is built from (pyproject's packages.find includes app* and export*).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "app", "export")


class BuildError(Exception):
    """A pip step failed; the message says which and what to try."""


@dataclass(frozen=True)
class PipOptions:
    find_links: tuple[Path, ...] = ()
    no_index: bool = False
    extra_index_urls: tuple[str, ...] = ()
    platform: str | None = None  # a pip platform tag such as win_amd64: cross-download, wheels only
    python_version: str | None = None  # "3.11"; with platform
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def args(self) -> list[str]:
        out = ["--no-index"] if self.no_index else []
        for d in self.find_links:
            out += ["--find-links", str(d)]
        for u in self.extra_index_urls:
            out += ["--extra-index-url", u]
        if self.platform:
            out += ["--only-binary=:all:", "--platform", self.platform, "--implementation", "cp"]
            if self.python_version:
                out += ["--python-version", self.python_version]
        return out + list(self.extra_args)


def run_pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print(f"+ {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd, check=False).returncode != 0:
        raise BuildError(f"pip failed while {what}; see its output above")


def _has_build_backend() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def project_wheel(dest: Path, repo: Path = REPO) -> Path:
    """`pip wheel --no-deps` of a clean copy of the sources (the checkout gets no build/ folder)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgegen-src-") as tmp:
        src = Path(tmp) / "edgegen"
        src.mkdir()
        for name in SOURCES:
            p = repo / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif p.is_file():
                shutil.copy2(p, src / name)
        before = set(dest.glob("edgegen-*.whl"))
        # Build with the setuptools already here when it is new enough; else pip fetches one (needs the index).
        isolation = ["--no-build-isolation"] if _has_build_backend() else []
        run_pip(["wheel", "--no-deps", *isolation, "-w", str(dest), str(src)], "building the edgegen wheel")
    built = sorted(set(dest.glob("edgegen-*.whl")) - before) or sorted(dest.glob("edgegen-*.whl"))
    if not built:
        raise BuildError("pip reported success but wrote no edgegen wheel")
    return built[-1]


def fill(dest: Path, requirements: list[str], opts: PipOptions) -> None:
    """Put wheels for `requirements` (pip requirement strings or `-r FILE`) and all their dependencies in dest."""
    if opts.platform:
        run_pip(["download", "-d", str(dest), *opts.args(), *requirements], "downloading wheels")
    else:
        run_pip(["wheel", "-w", str(dest), "--prefer-binary", *opts.args(), *requirements],
                "collecting wheels")
    sdists = [p.name for p in dest.iterdir() if not p.name.endswith(".whl")]
    if sdists:
        raise BuildError(f"these are not wheels and would need compiling offline: {', '.join(sdists)}")


_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def pins(wheelhouse: Path, exclude: tuple[str, ...] = ("edgegen",)) -> list[str]:
    """name==version for every wheel, from the file names (PEP 427), sorted: the exact set that installs."""
    out = []
    for p in sorted(wheelhouse.glob("*.whl")):
        m = _WHEEL.match(p.name)
        if m is None:
            raise BuildError(f"{p.name} is not a wheel file name")
        name = m["name"].replace("_", "-").lower()
        if name not in exclude:
            out.append(f"{name}=={m['version']}")
    return out
