"""What a request must pass before a handler runs: token, origin, body size, and paths kept inside their folder."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from urllib.parse import urlsplit

from app.errors import UsageError

TOKEN_HEADER = "Authorization"  # "Bearer <token>"; websockets from browsers may use ?token= instead


class PathRefused(Exception):
    """A client-supplied file name that is absolute, holds '..', or resolves outside its folder.

    `status` is 400 for a malformed name and 403 for one that escapes through a link."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def confined(root: Path, *parts: str) -> Path:
    """root/parts..., refusing absolute parts, '..', backslashes and NULs (400) and symlink escapes (403)."""
    rel = Path()
    for part in parts:
        if not part:
            continue
        if not isinstance(part, str) or "\x00" in part or "\\" in part:
            raise PathRefused(f"{part!r} is not a plain file name")
        if os.path.isabs(part) or part.startswith("~"):
            raise PathRefused(f"{part!r} is an absolute path; give a name relative to the folder")
        if ".." in Path(part).parts:
            raise PathRefused(f"{part!r} contains '..'; give a name inside the folder")
        rel = rel / part
    base = Path(root).resolve()
    full = (base / rel).resolve()
    if full != base and base not in full.parents:
        raise PathRefused(f"{rel} resolves outside the folder", status=403)
    return full


def read_token_file(path: Path) -> str:
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UsageError(f"--token-file {path} cannot be read ({e.strerror}); create it with a long random "
                         "secret, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE") from None
    if len(token) < 16:
        raise UsageError(f"--token-file {path} holds a token of {len(token)} characters; use at least 16 "
                         "random characters")
    return token


def token_ok(expected: str | None, headers, query) -> bool:
    if not expected:
        return False
    given = ""
    auth = headers.get(TOKEN_HEADER, "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    elif query.get("token"):
        given = query.get("token", "")
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Browsers send Origin on cross-site requests: a page on another site must not drive a loopback server
    (ComfyUI checks the same). Non-browser clients send none."""
    if not origin:
        return True
    if origin in allowed or "*" in allowed:
        return True
    try:
        o = urlsplit(origin)
    except ValueError:
        return False
    return bool(host) and o.netloc.lower() == str(host).lower()
