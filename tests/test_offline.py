"""Network guard: non-loopback access is refused and names its caller; loopback and AF_UNIX still work.

Audit hooks are permanent and process-wide, so every guard check runs in a child Python. Every check that
attempts a non-loopback address runs inside an empty network namespace (`unshare -n`), where even a broken
guard cannot get a packet out; those tests are skipped where no namespace can be made.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from app import offline
from app.errors import NetworkBlockedError

ROOT = Path(__file__).resolve().parents[1]
# TEST-NET-1 and the .invalid TLD are reserved for documentation: harmless even if something leaked.
REMOTE_IP = "192.0.2.1"
REMOTE_NAME = "updates.example.invalid"
FALLBACK_TUNNELS = {
    "sit0", "tunl0", "ip6tnl0", "gre0", "gretap0", "erspan0", "ip6gre0", "ip_vti0", "ip6_vti0",
}


def run_child(code: str, prefix: list[str] | None = None, cwd: Path | None = None) -> dict:
    """Run `code` in a fresh Python (under `prefix`, e.g. unshare, if given); return its last JSON line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(cwd or ROOT)])}
    proc = subprocess.run(
        [*(prefix or []), sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def netns() -> list[str]:
    """A command prefix that runs its argument in a new network namespace holding only a downed loopback."""
    exe = shutil.which("unshare")
    if exe is None:
        pytest.skip("unshare (util-linux) not found: non-loopback guard tests need a network namespace")
    probe = "import json, socket; print(json.dumps(sorted(n for _, n in socket.if_nameindex())))"
    reasons = []
    for flags in (["-n"], ["-rn"]):  # -n needs root/CAP_SYS_ADMIN; -rn needs unprivileged user namespaces
        try:
            cmd = [exe, *flags, sys.executable, "-c", probe]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            reasons.append(f"unshare {' '.join(flags)}: {err}")
            continue
        if proc.returncode == 0:
            # Besides lo, a new namespace may hold only the kernel's always-down fallback tunnel devices.
            extra = set(json.loads(proc.stdout)) - {"lo"} - FALLBACK_TUNNELS
            assert not extra, f"new network namespace is not empty: {sorted(extra)}"
            return [exe, *flags]
        reasons.append(f"unshare {' '.join(flags)}: {proc.stderr.strip() or proc.returncode}")
    pytest.skip(f"no network namespace ({'; '.join(reasons)}): non-loopback guard tests need one")


ATTEMPT = """
import json, socket
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "allowed"
    except Exception as err:
        out[name] = type(err).__name__
        out[name + ".msg"] = str(err)
"""


def test_blocks_real_connection_attempts(netns):
    result = run_child(ATTEMPT + f"""
import asyncio, urllib.request
IP = {REMOTE_IP!r}
# Without the guard the namespace itself refuses: proves the later refusals come from the guard.
attempt("unguarded", lambda: socket.create_connection((IP, 80), timeout=2))
from app import offline
logged = []
offline.install_guard(log=logged.append)
udp = lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
attempt("create_connection", lambda: socket.create_connection((IP, 443), timeout=2))
attempt("connect", lambda: socket.socket().connect((IP, 80)))
attempt("connect_ex", lambda: socket.socket().connect_ex((IP, 80)))
attempt("connect_v6", lambda: socket.socket(socket.AF_INET6).connect(("2001:db8::1", 80, 0, 0)))
attempt("mapped_v6", lambda: socket.socket(socket.AF_INET6).connect(("::ffff:192.0.2.1", 80, 0, 0)))
attempt("sendto", lambda: udp().sendto(b"x", (IP, 53)))
attempt("sendto_flags", lambda: udp().sendto(b"x", 0, (IP, 53)))
attempt("sendmsg", lambda: udp().sendmsg([b"x"], [], 0, (IP, 53)))
attempt("bind_wildcard", lambda: socket.socket().bind(("0.0.0.0", 0)))
attempt("urlopen", lambda: urllib.request.urlopen("http://" + IP + "/", timeout=2))
attempt("asyncio", lambda: asyncio.run(asyncio.wait_for(asyncio.open_connection(IP, 80), 2)))
# The C-level method bypasses the Python pre-check: the audit hook alone must still refuse.
import _socket
attempt("raw_c_connect", lambda: _socket.socket.connect(socket.socket(), (IP, 80)))
out["logged"] = len(logged)
out["blocked"] = offline.guard_status().blocked
print(json.dumps(out))
""", prefix=netns)
    assert result["unguarded"] == "OSError", result  # network unreachable in the empty namespace
    names = ["create_connection", "connect", "connect_ex", "connect_v6", "mapped_v6", "sendto",
             "sendto_flags", "sendmsg", "bind_wildcard", "urlopen", "asyncio", "raw_c_connect"]
    assert {n: result[n] for n in names} == dict.fromkeys(names, "NetworkBlockedError")
    assert REMOTE_IP in result["connect.msg"] and "2001:db8::1" in result["connect_v6.msg"]
    assert result["logged"] == result["blocked"] >= len(names)


def test_refuses_name_lookups_before_they_reach_a_resolver(netns):
    result = run_child(ATTEMPT + f"""
NAME = {REMOTE_NAME!r}
from app import offline
offline.install_guard(log=lambda m: None)
attempt("getaddrinfo", lambda: socket.getaddrinfo(NAME, 443))
attempt("getaddrinfo_bytes", lambda: socket.getaddrinfo(NAME.encode(), 443))
attempt("gethostbyname", lambda: socket.gethostbyname(NAME))
attempt("gethostbyname_ex", lambda: socket.gethostbyname_ex(NAME))
attempt("gethostbyaddr", lambda: socket.gethostbyaddr({REMOTE_IP!r}))
attempt("getnameinfo", lambda: socket.getnameinfo(({REMOTE_IP!r}, 80), 0))
attempt("create_connection", lambda: socket.create_connection((NAME, 443), timeout=2))
# CPython resolves these addresses before their audit event fires; the pre-check must catch the name first.
attempt("connect_by_name", lambda: socket.socket().connect((NAME, 80)))
attempt("sendto_by_name", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (NAME, 53)))
attempt("localhost", lambda: socket.getaddrinfo("localhost", 80))
attempt("loopback_ip", lambda: socket.getaddrinfo("127.0.0.1", 80))
print(json.dumps(out))
""", prefix=netns)
    refused = ["getaddrinfo", "getaddrinfo_bytes", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
               "getnameinfo", "create_connection", "connect_by_name", "sendto_by_name"]
    assert {n: result[n] for n in refused} == dict.fromkeys(refused, "NetworkBlockedError")
    assert REMOTE_NAME in result["getaddrinfo.msg"]
    assert result["localhost"] == result["loopback_ip"] == "allowed"


def test_loopback_and_unix_sockets_still_work(tmp_path):
    # Only loopback and AF_UNIX traffic here, so no namespace is needed.
    result = run_child(ATTEMPT + f"""
import asyncio, http.server, threading, urllib.request
from app import offline
offline.set_offline_env()  # also drops proxy settings, which would send even loopback URLs elsewhere
offline.install_guard(log=lambda m: None)
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"hello")
    def log_message(self, *a): pass
server = http.server.HTTPServer(("127.0.0.1", 0), Hello)
threading.Thread(target=server.serve_forever, daemon=True).start()
port = server.server_address[1]
out["http_ip"] = urllib.request.urlopen(f"http://127.0.0.1:{{port}}/", timeout=5).read().decode()
out["http_localhost"] = urllib.request.urlopen(f"http://localhost:{{port}}/", timeout=5).read().decode()
def echo_v6():
    srv = socket.socket(socket.AF_INET6); srv.bind(("::1", 0)); srv.listen()
    cli = socket.create_connection(("::1", srv.getsockname()[1]), timeout=5)
    conn, _ = srv.accept(); cli.sendall(b"ping"); assert conn.recv(4) == b"ping"
if socket.has_ipv6:
    attempt("ipv6_loopback", echo_v6)
def unix():
    path = {str(tmp_path / "s.sock")!r}
    srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen()
    cli = socket.socket(socket.AF_UNIX); cli.connect(path)
    conn, _ = srv.accept(); cli.sendall(b"ping"); assert conn.recv(4) == b"ping"
attempt("unix", unix)
attempt("asyncio_loop", lambda: asyncio.run(asyncio.sleep(0)))
out["blocked"] = offline.guard_status().blocked
print(json.dumps(out))
""")
    assert result["http_ip"] == result["http_localhost"] == "hello"
    # OSError: this host has no IPv6 loopback; anything else would be the guard.
    assert result.get("ipv6_loopback", "allowed") in ("allowed", "OSError"), result
    assert result["unix"] == result["asyncio_loop"] == "allowed"
    assert result["blocked"] == 0


def test_refusal_names_the_calling_function(netns, tmp_path):
    (tmp_path / "vendorlib.py").write_text(textwrap.dedent(f"""\
        import socket, urllib.request

        def fetch_weights():
            return urllib.request.urlopen("http://{REMOTE_IP}/model.safetensors", timeout=2)

        def phone_home():
            return socket.create_connection(("{REMOTE_NAME}", 443), timeout=2)
        """))
    result = run_child(ATTEMPT + """
import vendorlib
from app import offline
offline.install_guard(log=lambda m: None)
attempt("urlopen", vendorlib.fetch_weights)
attempt("socket", vendorlib.phone_home)
# Code running as an edgegen module is named as the path that led to the third-party caller.
scope = {"__name__": "app.fake_loader", "vendorlib": vendorlib}
exec(compile("def load():\\n    vendorlib.fetch_weights()\\n", "fake_loader.py", "exec"), scope)
attempt("via_app", scope["load"])
print(json.dumps(out))
""", prefix=netns, cwd=tmp_path)
    assert result["urlopen"] == result["socket"] == "NetworkBlockedError"
    assert "vendorlib.fetch_weights (" in result["urlopen.msg"] and "vendorlib.py:4)" in result["urlopen.msg"]
    assert "vendorlib.phone_home (" in result["socket.msg"] and "vendorlib.py:7)" in result["socket.msg"]
    assert "socket.create_connection" not in result["socket.msg"]
    assert "reached from app.fake_loader.load (fake_loader.py:2)" in result["via_app.msg"]


def test_real_hub_client_is_blocked_and_named(netns, tmp_path):
    # The offline switches are left off on purpose: the guard must stop the library on its own.
    result = run_child(ATTEMPT + f"""
import os
for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
    os.environ.pop(k, None)
os.environ["HF_HOME"] = {str(tmp_path)!r}  # keep the hub's marker files out of the real home
from app import offline
offline.install_guard(log=lambda m: None)
import huggingface_hub
download = huggingface_hub.hf_hub_download
attempt("download", lambda: download("org/model", "model_index.json", cache_dir={str(tmp_path)!r}))
print(json.dumps(out))
""", prefix=netns)
    assert result["download"] == "NetworkBlockedError", result
    assert "huggingface_hub.file_download." in result["download.msg"]
    assert "huggingface.co" in result["download.msg"]


def test_install_is_idempotent_and_reported():
    # No network access attempted here.
    result = run_child("""
import json, socket, sys
hooks = []
real_add = sys.addaudithook
sys.addaudithook = lambda hook: (hooks.append(hook), real_add(hook))[1]
from app import offline
out = {"before": offline.guard_status().active}
offline.install_guard()
connect = socket.socket.connect
status = offline.install_guard(log=print)
out.update(after=status.active, hooks=len(hooks), same_patch=socket.socket.connect is connect,
           summary=status.summary(), sinks=len(offline._STATE.sinks))
print(json.dumps(out))
""")
    assert result == {"before": False, "after": True, "hooks": 1, "same_patch": True,
                      "summary": result["summary"], "sinks": 1}
    assert "network guard active" in result["summary"]


def test_set_offline_env_forces_switches_and_drops_proxies(monkeypatch):
    for name in offline.OFFLINE_ENV:
        monkeypatch.setenv(name, "0")  # registers the original for restore; "0" proves values are forced
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.invalid:3128")
    offline.set_offline_env()
    assert {k: os.environ[k] for k in offline.OFFLINE_ENV} == offline.OFFLINE_ENV
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert "HTTPS_PROXY" not in os.environ
    assert offline.guard_status().offline_env


def test_refusal_is_not_an_oserror():
    # Libraries treat OSError as "offline, fall back"; a refusal must surface instead.
    assert not issubclass(NetworkBlockedError, OSError)


def test_listening_on_an_operator_chosen_address_allows_bind_only(monkeypatch):
    """`serve --host 0.0.0.0 --token-file F`: the guard lets the server listen there, never connect out."""
    import socket

    from app import offline
    from app.errors import NetworkBlockedError

    monkeypatch.setattr(offline, "_LISTEN_ALLOWED", set())
    # The refusals below count in this process's guard status (the app shows it): put the counts back after.
    monkeypatch.setattr(offline._STATE, "blocked", offline._STATE.blocked)
    monkeypatch.setattr(offline._STATE, "last_blocked", offline._STATE.last_blocked)
    offline.install_guard()
    with socket.socket() as s, pytest.raises(NetworkBlockedError):
        s.bind(("0.0.0.0", 0))
    offline.allow_listening_on("0.0.0.0")
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # allowed now
    with socket.socket() as s, pytest.raises(NetworkBlockedError):
        s.connect(("192.0.2.1", 80))  # still no way out
    with pytest.raises(NetworkBlockedError, match="IP addresses"):
        offline.allow_listening_on("example.com")
