"""The server's settings as one frozen dataclass, and where its queue, inputs and outputs live by default."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_DATA_DIR = "EDGEGEN_DATA_DIR"  # the app's data folder (history.sqlite3); the server keeps its files beside it
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8188  # ComfyUI's port, so existing clients find it
MiB = 1024 * 1024


def default_data_dir() -> Path:
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edgegen", appauthor=False))


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    """Change with dataclasses.replace. Paths default to <data dir>/server/…; see `resolved()`."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = None  # every request must carry it (Authorization: Bearer, or ?token=)
    require_token: bool = False  # forced on for any non-loopback host
    bundles: tuple[Path, ...] = ()  # explicit bundle folders, or folders holding bundles
    search_default_engines: bool = True  # also $EDGEGEN_ENGINES, <repo>/engines, ./engines
    output_dir: Path | None = None
    input_dir: Path | None = None
    db_path: Path | None = None
    max_body_bytes: int = 2 * MiB  # a workflow graph is a few KB
    max_upload_bytes: int = 32 * MiB
    cors_origins: tuple[str, ...] = ()  # none unless configured
    redact_prompts: bool = False  # audit log keeps sha256 of prompts instead of their text
    audit_path: Path | None = None  # None: the audit log's own default ($EDGEGEN_AUDIT_LOG, user log dir)
    max_attempts: int = 2  # a job running when the server died is re-queued until it has run this often
    max_loaded_bundles: int = 2  # pipelines kept loaded in the worker (least recently used dropped)
    history_limit: int = 10_000  # finished jobs kept in the database
    # model file names mapped onto bundles ((name, bundle name), ...): ComfyUI templates' loaders name files such
    # as "flux-2-klein-4b.safetensors" / "qwen_3_4b.safetensors"; `serve --alias NAME=BUNDLE` lets them run as-is
    aliases: tuple[tuple[str, str], ...] = ()
    # step previews over /ws as ComfyUI's binary frames: "none" (ComfyUI's default; text-only clients such as
    # comfyui-utils break on binary frames) or "latent2rgb" (app/runtime/previews.py); "auto" means latent2rgb
    preview_method: str = "none"
    extra: dict = field(default_factory=dict, compare=False)

    def alias_map(self) -> dict[str, str]:
        return dict(self.aliases)

    def resolved(self) -> ServerConfig:
        from dataclasses import replace

        base = default_data_dir() / "server"
        output = Path(self.output_dir or base / "output").absolute()
        # The queue sits beside the output folder it describes (the default: beside the app's history.sqlite3),
        # never inside it, where /view could serve it.
        db = self.db_path or (default_data_dir() / "server-queue.sqlite3" if self.output_dir is None
                              else output.parent / f"{output.name}-queue.sqlite3")
        return replace(
            self,
            output_dir=output,
            input_dir=Path(self.input_dir or output.parent / f"{output.name}-input").absolute()
            if self.output_dir is not None else Path(self.input_dir or base / "input").absolute(),
            db_path=Path(db).absolute(),
            require_token=self.require_token or not is_loopback(self.host) or bool(self.token),
        )
