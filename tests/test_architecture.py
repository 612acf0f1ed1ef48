"""The package's shape holds: imports flow one way (docs/ARCHITECTURE.md), and the bundle part needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# part -> the parts it may import (itself always allowed). "core" is app/__init__, errors, offline, progress.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "bundle": {"core"},
    "planning": {"core", "bundle"},
    "models": {"core", "bundle"},
    "runtime": {"core", "bundle", "planning", "models"},
    "site": {"core", "bundle", "planning", "models", "runtime"},
    "ui": {"core", "bundle", "planning", "runtime"},
    "server": {"core", "bundle", "planning", "runtime"},
    "cluster": {"core", "bundle", "planning", "runtime", "server"},
    "export": {"core", "bundle", "planning", "models", "runtime"},
    "cli": {"core", "bundle", "planning", "models", "runtime", "site", "ui", "server", "cluster", "export"},
}
CORE = {"app", "app.argtypes", "app.atomic", "app.errors", "app.offline", "app.progress"}


def part_of(module: str) -> str | None:
    """The part a dotted module name belongs to; None for anything outside app/ and export/."""
    if module in CORE:
        return "core"
    if module == "app.cli":
        return "cli"
    top, _, rest = module.partition(".")
    if top == "export":
        return "export"
    if top == "app":
        sub = rest.partition(".")[0]
        return sub if sub in ALLOWED else f"unknown:{sub}"
    return None


def _module_or_package(base: str, name: str) -> str:
    """`from app import cli` imports the module app.cli; `from app.errors import X` imports app.errors."""
    candidate = ROOT / f"{base}.{name}".replace(".", "/")
    return f"{base}.{name}" if candidate.with_suffix(".py").exists() or candidate.is_dir() else base


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """Every absolute and relative import in a file, including lazy ones inside functions."""
    out = []
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out += [(node.lineno, _module_or_package(base, a.name)) for a in node.names]
    return out


def violations(roots=("app", "export")) -> list[str]:
    bad = []
    for top in roots:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            mine = part_of(module)
            for line, target in imports_of(path, module):
                theirs = part_of(target)
                if theirs is None or theirs == mine:
                    continue
                if mine.startswith("unknown") or theirs.startswith("unknown") or theirs not in ALLOWED[mine]:
                    bad.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target} ({theirs})")
    return bad


def test_imports_flow_one_way():
    assert violations() == []


def test_the_check_sees_lazy_imports_against_the_direction(tmp_path, monkeypatch):
    """The walker must catch an arrow hidden inside a function (the old runtime -> export cycle was lazy)."""
    fake = tmp_path / "app" / "runtime"
    fake.mkdir(parents=True)
    (tmp_path / "app" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "x.py").write_text("def f():\n    from export.engines import import_trt\n    from app.ui import window\n")
    (tmp_path / "export").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = violations()
    assert len(found) == 2 and "runtime imports export.engines" in found[0], found


@pytest.mark.parametrize("module", ["app.bundle.manifest", "app.bundle.trust", "app.bundle.locations",
                                    "app.bundle.modelfolder", "app.planning.plan", "app.planning.components"])
def test_bundle_and_planning_parts_import_no_torch_or_onnxruntime(module):
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'onnxruntime', 'onnx', 'diffusers') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
