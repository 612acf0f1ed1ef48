"""Keep edgegen offline: force the Hugging Face offline switches and refuse every non-loopback network access.

Call order matters (the CLI and the app must do this first, before importing diffusers, transformers,
huggingface_hub or anything that imports them, because those libraries read the switches once at import):

    from app import offline
    offline.enforce_offline(log=...)   # = set_offline_env() + install_guard(log)

`install_guard` adds a `sys.addaudithook` hook (process-wide, cannot be removed) that raises
`NetworkBlockedError` for any socket connect/send/bind/name lookup that is not loopback or AF_UNIX, plus a
pre-check on `socket.socket` methods so a hostname is refused before CPython resolves it (CPython resolves
the address of `connect`/`sendto`/`bind` *before* raising their audit event, which would leak a DNS query).
There is deliberately no way to allow the network.

Out of reach of any in-process Python guard, and so not covered: native code that opens sockets itself
(C/C++/Rust extensions, Qt networking, child processes), and loopback services that forward traffic.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import sys
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import urlsplit

from app.errors import NetworkBlockedError

# Forced to these values whatever the user set: there is no opt-out by design.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",  # older diffusers/transformers spelling
    "DO_NOT_TRACK": "1",
    # ONNX Runtime 1.32's native (C++) telemetry looks up mobile.events.data.microsoft.com when sessions run,
    # out of the Python guard's sight (seen with strace, tests/test_cluster.py); this switch stops it.
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    # hf_xet moves bytes in Rust where the audit hook cannot see it; without it the hub uses Python HTTP.
    "HF_HUB_DISABLE_XET": "1",
    # A loopback proxy would pass the guard and then forward the request out; make clients ignore proxies.
    "NO_PROXY": "*",
    "no_proxy": "*",
}
# diffusers has no DIFFUSERS_OFFLINE switch: it copies huggingface_hub's HF_HUB_OFFLINE at import time.
_PROXY_VARS = tuple(f"{p}_PROXY" for p in ("HTTP", "HTTPS", "ALL", "FTP")) + tuple(
    f"{p}_proxy" for p in ("http", "https", "all", "ftp")
)
_HUB_MODULES = ("huggingface_hub", "transformers", "diffusers", "datasets")

_LOG = logging.getLogger("edgegen.offline")


def set_offline_env() -> tuple[str, ...]:
    """Force the offline/telemetry switches in os.environ (inherited by child processes too).

    Returns the hub libraries that were already imported, for which the switches came too late (they
    read them once at import); the network guard still blocks them, but callers should import later.
    """
    for name in _PROXY_VARS:
        os.environ.pop(name, None)
    os.environ.update(OFFLINE_ENV)
    late = tuple(m for m in _HUB_MODULES if m in sys.modules)
    _STATE.late_imports = late
    return late


@dataclass(frozen=True)
class GuardStatus:
    """What `edgegen doctor` shows about offline enforcement."""

    active: bool
    installed_at: str | None
    blocked: int
    last_blocked: str | None
    offline_env: bool
    late_imports: tuple[str, ...]

    def summary(self) -> str:
        guard = f"active since {self.installed_at}" if self.active else "NOT active"
        env = "set" if self.offline_env else "NOT set"
        text = f"network guard {guard}, {self.blocked} attempt(s) blocked; offline switches {env}"
        if self.late_imports:
            text += f"; imported before the switches: {', '.join(self.late_imports)}"
        return text


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = False
        self.installed_at: str | None = None
        self.sinks: list[Callable[[str], None]] = []
        self.blocked = 0
        self.last_blocked: str | None = None
        self.late_imports: tuple[str, ...] = ()
        self.local = threading.local()


_STATE = _State()


def guard_status() -> GuardStatus:
    """Whether the guard is installed in this process, and what it has blocked so far."""
    env_ok = all(os.environ.get(k) == v for k, v in OFFLINE_ENV.items())
    s = _STATE
    return GuardStatus(s.active, s.installed_at, s.blocked, s.last_blocked, env_ok, s.late_imports)


def install_guard(log: Callable[[str], None] | None = None) -> GuardStatus:
    """Install the network guard once per process; later calls only add `log` as another sink.

    `log` receives each refusal message (also when a library swallows the exception); without one,
    refusals go to the `edgegen.offline` logger.
    """
    with _STATE.lock:
        if log is not None and log not in _STATE.sinks:
            _STATE.sinks.append(log)
        if not _STATE.active:
            _patch_socket_methods()
            sys.addaudithook(_audit_hook)
            _STATE.installed_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
            _STATE.active = True
    return guard_status()


def enforce_offline(log: Callable[[str], None] | None = None) -> GuardStatus:
    """`set_offline_env()` then `install_guard(log)`: the one call the CLI and the app make first."""
    set_offline_env()
    return install_guard(log)


# --- deciding what is local -------------------------------------------------------------------------

_LOCAL_NAMES = frozenset({"localhost"})
_LISTEN_ALLOWED: set[str] = set()  # addresses an operator chose for `edgegen serve --host`; listening only


def allow_listening_on(host: str) -> None:
    """Let this process accept connections on `host` (an IP literal the operator passed to `serve --host`).

    Only `bind` is allowed there: outgoing connections, sends and name lookups stay refused everywhere but
    loopback. Names are refused (they would need a resolver, which may ask a DNS server)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise NetworkBlockedError(f"edgegen listens only on IP addresses, not '{host}'; pass --host as an IP "
                                  "address such as 0.0.0.0 or 192.168.1.20") from None
    _LISTEN_ALLOWED.add(host)


def _bind_allowed(address: object) -> bool:
    return isinstance(address, tuple) and len(address) >= 2 and address[0] in _LISTEN_ALLOWED


def _is_loopback_host(host: object) -> bool:
    if isinstance(host, bytes):
        try:
            host = host.decode("ascii")
        except UnicodeDecodeError:
            return False
    if not isinstance(host, str):
        return False
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # any other name would need a resolver, which may ask a DNS server
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _sockaddr_refusal(family: int, address: object) -> str | None:
    """None if `address` is local; else how to name it in the refusal."""
    if family == getattr(socket, "AF_UNIX", object()):
        return None
    if family in (socket.AF_INET, socket.AF_INET6):
        if isinstance(address, tuple) and len(address) >= 2:
            if _is_loopback_host(address[0]):
                return None
            return f"{address[0]}:{address[1]}"
        return repr(address)
    try:
        fam = socket.AddressFamily(family).name
    except ValueError:
        fam = str(family)
    return f"{address!r} ({fam})"


def _url_refusal(url: object) -> str | None:
    try:
        parts = urlsplit(url if isinstance(url, str) else str(url))
    except ValueError:
        return repr(url)
    if parts.scheme.lower() in ("", "file", "data"):
        return None
    return None if _is_loopback_host(parts.hostname) else str(url)


def _refusal(event: str, args: tuple) -> tuple[str, str] | None:
    """(what was attempted, target) for a refused event, or None to allow it."""
    if event in ("socket.connect", "socket.sendto", "socket.bind"):
        sock, address = args
        if event == "socket.bind" and _bind_allowed(address):
            return None
        target = _sockaddr_refusal(sock.family, address)
        verb = {"socket.connect": "connect to", "socket.sendto": "send to", "socket.bind": "listen on"}[event]
        return (verb, target) if target else None
    if event == "socket.sendmsg":
        sock, address = args
        if address is None:  # already-connected socket: its connect was checked
            return None
        target = _sockaddr_refusal(sock.family, address)
        return ("send to", target) if target else None
    if event == "socket.getaddrinfo":
        host, port = args[0], args[1]
        if host is None or _is_loopback_host(host):  # None resolves to loopback/wildcard without a resolver
            return None
        return ("look up", f"{host!r} (port {port})")
    if event in ("socket.gethostbyname", "socket.gethostbyaddr"):
        return None if _is_loopback_host(args[0]) else ("look up", repr(args[0]))
    if event == "socket.getnameinfo":
        sockaddr = args[0]
        host = sockaddr[0] if isinstance(sockaddr, tuple) and sockaddr else sockaddr
        return None if _is_loopback_host(host) else ("look up", repr(sockaddr))
    if event in ("urllib.Request", "webbrowser.open"):
        target = _url_refusal(args[0])
        return ("open", target) if target else None
    return None


_EVENTS = frozenset({
    "socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "urllib.Request", "webbrowser.open",
})


# --- naming the caller -------------------------------------------------------------------------------

# Transport libraries and HTTP helpers: naming them says nothing about who wanted the network.
_PLUMBING = frozenset({
    "urllib3", "requests", "httpx", "httpx2", "httpcore", "httpcore2", "h11", "h2", "anyio", "sniffio",
    "aiohttp", "aiohappyeyeballs", "socks", "trio", "certifi", "idna", "websocket", "websockets",
})
_PLUMBING_MODULES = ("huggingface_hub.utils._http", "huggingface_hub.utils._validators")


def _norm(path: str) -> str:
    return os.path.normcase(os.path.abspath(path))


_HERE = _norm(__file__)
_STDLIB = tuple({_norm(os.path.dirname(os.__file__)) + os.sep, _norm(sysconfig.get_path("stdlib")) + os.sep})


def _is_machinery(frame) -> bool:
    filename = frame.f_code.co_filename
    if filename.startswith("<frozen"):
        return True
    path = _norm(filename)
    if path == _HERE:
        return True
    parts = path.split(os.sep)
    if path.startswith(_STDLIB) and "site-packages" not in parts and "dist-packages" not in parts:
        return True
    module = str(frame.f_globals.get("__name__", ""))
    return module.partition(".")[0] in _PLUMBING or module.startswith(_PLUMBING_MODULES)


def _describe(frame) -> str:
    code = frame.f_code
    module = frame.f_globals.get("__name__", "?")
    return f"{module}.{getattr(code, 'co_qualname', code.co_name)} ({code.co_filename}:{frame.f_lineno})"


def _caller() -> str:
    frame = sys._getframe(1)
    while frame is not None and _is_machinery(frame):
        frame = frame.f_back
    if frame is None:
        return "code outside Python (no Python caller on the stack)"
    text = _describe(frame)
    # Also name the edgegen code path that led there, if the caller is a third-party library.
    outer = frame.f_back
    if str(frame.f_globals.get("__name__", "")).partition(".")[0] not in ("app", "export"):
        while outer is not None:
            if str(outer.f_globals.get("__name__", "")).partition(".")[0] in ("app", "export"):
                return f"{text}, reached from {_describe(outer)}"
            outer = outer.f_back
    return text


# --- enforcing -------------------------------------------------------------------------------------


def _block(verb: str, target: str) -> None:
    message = (
        f"Network access blocked: {_caller()} tried to {verb} {target}. "
        "edgegen works fully offline and never contacts other machines; use a local --model folder "
        "or engine bundle, and report this caller if it happened during normal use."
    )
    local = _STATE.local
    if not getattr(local, "busy", False):  # a sink that itself touches the network must not recurse
        local.busy = True
        try:
            with _STATE.lock:
                _STATE.blocked += 1
                _STATE.last_blocked = message
                sinks = list(_STATE.sinks)
            for sink in sinks or [_LOG.error]:
                with contextlib.suppress(Exception):  # a broken sink must not replace the refusal
                    sink(message)
        finally:
            local.busy = False
    raise NetworkBlockedError(message)


def _audit_hook(event: str, args: tuple) -> None:
    if event not in _EVENTS:  # called for every audit event in the process: stay cheap
        return
    refused = _refusal(event, args)
    if refused:
        _block(*refused)


def _patch_socket_methods() -> None:
    """Check addresses before CPython resolves hostnames in them (its audit events fire after that)."""
    cls = socket.socket
    connect, connect_ex, sendto, bind = cls.connect, cls.connect_ex, cls.sendto, cls.bind
    sendmsg = getattr(cls, "sendmsg", None)  # absent on Windows

    def precheck(sock, verb: str, address) -> None:
        target = _sockaddr_refusal(sock.family, address)
        if target:
            _block(verb, target)

    def guarded_connect(self, address):
        precheck(self, "connect to", address)
        return connect(self, address)

    def guarded_connect_ex(self, address):
        precheck(self, "connect to", address)
        return connect_ex(self, address)

    def guarded_sendto(self, data, *rest):
        if rest:
            precheck(self, "send to", rest[-1])
        return sendto(self, data, *rest)

    def guarded_sendmsg(self, buffers, ancdata=(), flags=0, address=None):
        if address is not None:
            precheck(self, "send to", address)
            return sendmsg(self, buffers, ancdata, flags, address)
        return sendmsg(self, buffers, ancdata, flags)

    def guarded_bind(self, address):
        if not _bind_allowed(address):
            precheck(self, "listen on", address)
        return bind(self, address)

    wrappers = {"connect": guarded_connect, "connect_ex": guarded_connect_ex, "sendto": guarded_sendto,
                "sendmsg": guarded_sendmsg, "bind": guarded_bind}
    for name, fn in wrappers.items():
        if not hasattr(cls, name):
            continue
        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = getattr(cls, name).__doc__
        setattr(cls, name, fn)
