"""Scratch settings and data folders for a test window: output and engines folders inside the test's own tree."""

from __future__ import annotations

from pathlib import Path


def make_paths(root: Path):
    from app.ui.settings import AppPaths, Settings, save_settings

    paths = AppPaths(root / "config", root / "data")
    if not paths.settings_file.exists():  # a restart keeps what the first window saved
        save_settings(paths, Settings(output_folder=str(root / "out"), engines_folder=str(root / "engines")))
    return paths
