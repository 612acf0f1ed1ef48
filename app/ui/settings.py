"""The app's settings: a frozen dataclass stored as JSON in the per-user config folder, plus where data lives."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from app.bundle.files import atomic_write_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
# Tests and portable installs point these elsewhere; otherwise platformdirs decides.
ENV_CONFIG_DIR = "EDGEGEN_CONFIG_DIR"
ENV_DATA_DIR = "EDGEGEN_DATA_DIR"
SETTINGS_NAME = "app-settings.json"


@dataclass(frozen=True)
class AppPaths:
    """Where settings and the history database live."""

    config_dir: Path
    data_dir: Path

    @classmethod
    def default(cls) -> AppPaths:
        import platformdirs

        config = os.environ.get(ENV_CONFIG_DIR) or platformdirs.user_config_dir("edgegen", appauthor=False)
        data = os.environ.get(ENV_DATA_DIR) or platformdirs.user_data_dir("edgegen", appauthor=False)
        return cls(Path(config), Path(data))

    @property
    def settings_file(self) -> Path:
        return self.config_dir / SETTINGS_NAME

    @property
    def history_db(self) -> Path:
        return self.data_dir / "history.sqlite3"


def default_output_folder() -> Path:
    import platformdirs

    return Path(platformdirs.user_pictures_dir()) / "edgegen"


@dataclass(frozen=True)
class Settings:
    """Change with dataclasses.replace and save(); unknown keys in the file are ignored."""

    output_folder: str = ""
    engines_folder: str = ""
    last_model: str = ""
    backend: str = "auto"
    geometry: str = ""  # QMainWindow.saveGeometry() as hex
    window_state: str = ""

    @property
    def output_path(self) -> Path:
        return Path(self.output_folder) if self.output_folder else default_output_folder()

    @property
    def engines_path(self) -> Path:
        """The folder shown in Settings: the chosen one, else the first default engines folder."""
        return self.engines_folders()[0]

    def engines_folders(self) -> list[Path]:
        """Where the model picker looks: the chosen folder, else the shared defaults ($EDGEGEN_ENGINES set by
        an offline install, <repo>/engines, ./engines)."""
        if self.engines_folder:
            return [Path(self.engines_folder)]
        from app.bundle.locations import engine_dirs

        return engine_dirs() or [REPO_ROOT / "engines"]

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **changes)


def load_settings(paths: AppPaths) -> Settings:
    """The saved settings, or defaults when there are none or the file is unreadable (never an error)."""
    try:
        raw = json.loads(paths.settings_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return Settings()
    if not isinstance(raw, dict):
        return Settings()
    known = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: str(v) for k, v in raw.items() if k in known})


def save_settings(paths: AppPaths, settings: Settings) -> None:
    paths.config_dir.mkdir(parents=True, exist_ok=True)
    data = json.dumps(dataclasses.asdict(settings), indent=2, sort_keys=True).encode("utf-8")
    atomic_write_bytes(paths.settings_file, data)
