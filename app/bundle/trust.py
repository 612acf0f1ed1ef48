"""Bundle signatures and the trust store: Ed25519 keys, manifest.sig, trusted public keys and the signing policy.

An engine plan is executable code (FACTS.md, TensorRT security), so a bundle is only as trustworthy as whoever
wrote it. The manifest lists every file's sha256; an Ed25519 signature over the exact manifest.json bytes
therefore covers the whole bundle. All cryptography comes from the `cryptography` package (extra [trust]).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from app.bundle.files import atomic_write_bytes
from app.errors import BundleError, UsageError

ALGORITHM = "ed25519"
SIG_NAME = "manifest.sig"
SIG_FORMAT = "edgegen-manifest-signature"
SIG_MAX_BYTES = 64 * 1024  # a signature file is a few hundred bytes; never read an arbitrarily large one
ENV_CONFIG = "EDGEGEN_CONFIG_DIR"
ENV_SITE_CONFIG = "EDGEGEN_SITE_CONFIG_DIR"
ENV_REQUIRE = "EDGEGEN_REQUIRE_SIGNED"
ENV_REQUIRE_LORAS = "EDGEGEN_REQUIRE_SIGNED_LORAS"
LORA_POLICY_KEY = "require_signed_loras"
ENV_PASSPHRASE = "EDGEGEN_KEY_PASSPHRASE"
POLICY_NAME = "policy.json"
KEYS_DIR = "trusted_keys"
INSTALL_HINT = "pip install 'edgegen[trust]'"
_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no", ""}


# ---------------------------------------------------------------- where things live


def config_dir() -> Path:
    """This user's edgegen settings (EDGEGEN_CONFIG_DIR overrides, for tests and portable installs)."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    from platformdirs import user_config_dir

    return Path(user_config_dir("edgegen"))


def site_config_dir() -> Path:
    """Machine-wide settings an administrator controls (/etc/xdg/edgegen, C:\\ProgramData\\edgegen)."""
    if os.environ.get(ENV_SITE_CONFIG):
        return Path(os.environ[ENV_SITE_CONFIG])
    from platformdirs import site_config_dir as _site

    return Path(_site("edgegen"))


def _crypto():
    """The primitives we use, imported late so unsigned bundles load without the [trust] extra."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    except ImportError:
        return None
    return Ed25519PrivateKey, Ed25519PublicKey, serialization, InvalidSignature


def _need_crypto(what: str):
    c = _crypto()
    if c is None:
        raise UsageError(f"{what} needs the 'cryptography' package, which is not installed; run: {INSTALL_HINT}")
    return c


# ---------------------------------------------------------------- keys


def key_id_of(raw_public: bytes) -> str:
    """First 16 hex digits of sha256 over the 32 raw public-key bytes: short, stable, derived not claimed."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _raw_public(pub) -> bytes:
    _, _, ser, _ = _need_crypto("reading a public key")
    return pub.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)


def _comments(text: str) -> dict[str, str]:
    """'# name: X' header lines of our key files (PEM readers skip text before -----BEGIN)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"#\s*([a-z-]+):\s*(.*?)\s*$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._@-]", "_", name).strip(".") or "edgegen"


def _default_name() -> str:
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers; the name is only a label
        user = "edgegen"
    return f"{user}@{socket.gethostname()}"


def _public_pem(pub, name: str) -> bytes:
    _, _, ser, _ = _need_crypto("writing a public key")
    raw = _raw_public(pub)
    head = f"# edgegen public key\n# key-id: {key_id_of(raw)}\n# name: {name}\n".encode()
    return head + pub.public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)


def generate_keypair(out_dir: Path, name: str | None = None) -> tuple[Path, Path]:
    """Write NAME.key (private, PEM PKCS#8, mode 0600) and NAME.pub (public, PEM) into out_dir."""
    priv_cls, _, ser, _ = _need_crypto("edgegen keys generate")
    name = (name or _default_name()).strip().replace("\n", " ")
    out_dir = Path(out_dir)
    stem = _safe_stem(name)
    priv_path, pub_path = out_dir / f"{stem}.key", out_dir / f"{stem}.pub"
    for p in (priv_path, pub_path):
        if p.exists():  # never overwrite a key: losing a site's signing key is not undoable
            raise UsageError(f"{p} already exists; choose another --out or --name")
    key = priv_cls.generate()
    pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    out_dir.mkdir(parents=True, exist_ok=True)
    # atomic_write_bytes writes through mkstemp, which creates the file 0600, so the key is never readable by
    # others even for an instant; the chmod states the intent and survives umask quirks.
    atomic_write_bytes(priv_path, f"# edgegen private signing key -- keep secret\n# name: {name}\n".encode() + pem)
    os.chmod(priv_path, 0o600)
    atomic_write_bytes(pub_path, _public_pem(key.public_key(), name))
    os.chmod(pub_path, 0o644)
    return priv_path, pub_path


def _key_bytes(path: Path, missing: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{missing} {path} does not exist" + ("; create one with: edgegen keys generate --out DIR"
                                                              if missing == "signing key" else ""))
    return path.read_bytes()


def _load_private(path: Path):
    priv_cls, _, ser, _ = _need_crypto("signing")
    data = _key_bytes(path, "signing key")
    pw = os.environ.get(ENV_PASSPHRASE)
    try:
        key = ser.load_pem_private_key(data, password=pw.encode() if pw else None)
    except TypeError:
        raise UsageError(f"{path} is encrypted; put its passphrase in {ENV_PASSPHRASE}") from None
    except ValueError:
        raise UsageError(f"{path} is not a PEM private key (or the passphrase is wrong); "
                         "create one with: edgegen keys generate --out DIR") from None
    if not isinstance(key, priv_cls):
        raise UsageError(f"{path} is not an Ed25519 key; edgegen signs with Ed25519 "
                         "(edgegen keys generate --out DIR)")
    return key, _comments(data.decode("utf-8", "replace")).get("name")


def load_signing_key(path: Path):
    """Check a private key is usable (call before long work such as an export); returns (key, name)."""
    return _load_private(path)


def _load_public(path: Path):
    """A public key from our .pub (PEM with comments), a plain PEM, or an OpenSSH 'ssh-ed25519' line."""
    _, pub_cls, ser, _ = _need_crypto("edgegen trust add")
    data = _key_bytes(path, "public key file")
    try:
        key = (ser.load_ssh_public_key(data.strip()) if data.lstrip().startswith(b"ssh-")
               else ser.load_pem_public_key(data))
    except (ValueError, TypeError):
        raise UsageError(f"{path} is not a public key (expected the .pub file from: edgegen keys generate)") from None
    if not isinstance(key, pub_cls):
        raise UsageError(f"{path} is not an Ed25519 public key")
    text = data.decode("utf-8", "replace")
    name = _comments(text).get("name")
    if name is None and data.lstrip().startswith(b"ssh-"):
        parts = text.split(None, 2)
        name = parts[2].strip() if len(parts) > 2 else None
    return key, name


@dataclass(frozen=True)
class TrustedKey:
    key_id: str
    name: str
    scope: str  # "user" or "site"
    path: Path
    public_key: bytes  # 32 raw bytes


def _store_dirs() -> list[tuple[str, Path]]:
    return [("site", site_config_dir() / KEYS_DIR), ("user", config_dir() / KEYS_DIR)]


def trusted_keys(problems: list[str] | None = None) -> list[TrustedKey]:
    """Every readable key in the site and user stores. Unreadable files are skipped (they only remove trust)."""
    if _crypto() is None:
        return []
    out = []
    for scope, d in _store_dirs():
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if not p.is_file() or p.suffix not in (".pub", ".pem"):
                continue
            try:
                key, name = _load_public(p)
            except UsageError as e:
                if problems is not None:
                    problems.append(str(e))
                continue
            raw = _raw_public(key)
            out.append(TrustedKey(key_id_of(raw), name or "", scope, p, raw))
    return out


def add_trusted_key(pubkey_path: Path, name: str | None = None) -> TrustedKey:
    """Copy a public key into this user's trust store as <key-id>.pub (the id is recomputed, never taken)."""
    key, claimed = _load_public(pubkey_path)
    raw = _raw_public(key)
    kid = key_id_of(raw)
    label = (name or claimed or Path(pubkey_path).stem).strip().replace("\n", " ")
    dest = config_dir() / KEYS_DIR / f"{kid}.pub"
    atomic_write_bytes(dest, _public_pem(key, label))
    return TrustedKey(kid, label, "user", dest, raw)


def remove_trusted_key(key_id: str) -> TrustedKey:
    """Remove a key (by id or unique id prefix) from this user's store; site keys belong to the administrator."""
    key_id = key_id.strip().lower()
    matches = [k for k in trusted_keys() if k.key_id.startswith(key_id)] if len(key_id) >= 4 else []
    if not matches:
        raise UsageError(f"no trusted key has id {key_id!r}; see: edgegen trust list")
    if len({k.key_id for k in matches}) > 1:
        raise UsageError(f"key id {key_id!r} matches several keys; give more digits (see: edgegen trust list)")
    users = [k for k in matches if k.scope == "user"]
    if not users:
        raise UsageError(f"key {matches[0].key_id} is trusted by the site configuration ({matches[0].path}); "
                         "only an administrator can remove it")
    for k in users:
        k.path.unlink()
    return users[0]


# ---------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    require_signed_bundles: bool  # (for load_lora_policy: signed LoRAs required)
    sources: tuple[str, ...]  # which settings turned it on, for messages and doctor


def _read_policy_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        # Fail closed: a damaged policy might have been the one that required signatures.
        raise UsageError(f"{path} is not a valid edgegen policy (JSON object); fix it or delete it") from None
    return data


def load_policy(key: str = "require_signed_bundles", env_name: str = ENV_REQUIRE) -> Policy:
    """Signed bundles (or, with key/env_name for LoRAs, signed LoRAs) are required if the site file, the user file
    or the environment variable says so.

    Any source can turn the requirement on and none can turn off another, so a user setting or an unset
    variable never weakens what a site administrator configured."""
    sources = []
    for label, d in (("site", site_config_dir()), ("user", config_dir())):
        path = d / POLICY_NAME
        if _read_policy_file(path).get(key) is True:
            sources.append(f"{label} policy {path}")
    env = os.environ.get(env_name, "").strip().lower()
    if env not in _TRUE | _FALSE:
        raise UsageError(f"{env_name}={os.environ[env_name]!r} is not on/off; use 1 or 0")
    if env in _TRUE:
        sources.append(f"environment {env_name}")
    return Policy(bool(sources), tuple(sources))


def load_lora_policy() -> Policy:
    """Whether the LoRA library may only serve LoRAs whose record a trusted key signed (require_signed_loras)."""
    return load_policy(LORA_POLICY_KEY, ENV_REQUIRE_LORAS)


def set_require_signed(on: bool, key: str = "require_signed_bundles") -> tuple[Path, Policy]:
    """Write the user's policy file; refuses to claim 'off' while the site or environment keeps it on."""
    path = config_dir() / POLICY_NAME
    data = _read_policy_file(path)
    data[key] = bool(on)
    atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())
    policy = load_lora_policy() if key == LORA_POLICY_KEY else load_policy()
    if not on and policy.require_signed_bundles:
        raise UsageError(f"signed {'LoRAs' if key == LORA_POLICY_KEY else 'bundles'} stay required by "
                         f"{', '.join(policy.sources)}; only that setting can turn it off")
    return path, policy


# ---------------------------------------------------------------- signing and verifying


@dataclass(frozen=True)
class SignatureState:
    """What load_bundle found: whether the manifest is signed, by which key, and whether we trust that key."""

    signed: bool
    key_id: str | None = None
    signer: str | None = None  # the trust store's name when trusted, else the name the signature claims
    trusted: bool = False
    checked: bool = False  # the Ed25519 signature was verified (False only when cryptography is missing)

    def describe(self) -> str:
        if not self.signed:
            return "unsigned bundle"
        who = f"{self.signer} (key {self.key_id})" if self.signer else f"key {self.key_id}"
        if not self.checked:
            return f"signed by {who}, NOT checked: cryptography is not installed ({INSTALL_HINT})"
        if self.trusted:
            return f"signed by {who}, trusted"
        return f"signed by {who}, a key not in this machine's trust store"

    def to_dict(self) -> dict:
        return asdict(self)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text, what: str, sig_path: Path) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise BundleError(f"{sig_path} has a malformed {what}; re-sign it") from None


def sign_bundle(bundle_dir: Path, private_key_path: Path, signer: str | None = None) -> SignatureState:
    """Verify the bundle's files against its manifest, then write manifest.sig over the exact manifest bytes."""
    from app.bundle import manifest as mf

    root = Path(bundle_dir)
    raw = mf.read_manifest_bytes(root)
    # Check contents before signing: a signature is a statement that these files are good.
    mf.check_bundle(root, raw)
    return sign_bytes(raw, root / SIG_NAME, private_key_path, signer)


def sign_bytes(raw: bytes, sig_path: Path, private_key_path: Path, signer: str | None = None) -> SignatureState:
    """Write an Ed25519 signature over these exact bytes to sig_path (a bundle's manifest, a LoRA's record)."""
    key, key_name = _load_private(private_key_path)
    pub_raw = _raw_public(key.public_key())
    signer = (signer or key_name or "").strip().replace("\n", " ") or None
    doc = {
        "format": SIG_FORMAT, "version": 1, "algorithm": ALGORITHM, "key_id": key_id_of(pub_raw),
        "public_key": _b64(pub_raw), "signer": signer, "manifest_sha256": hashlib.sha256(raw).hexdigest(),
        "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "signature": _b64(key.sign(raw)),
    }
    atomic_write_bytes(sig_path, (json.dumps(doc, indent=2) + "\n").encode())
    trusted = {k.key_id: k for k in trusted_keys()}.get(doc["key_id"])
    return SignatureState(True, doc["key_id"], (trusted.name if trusted else None) or signer, trusted is not None,
                          True)


def _read_sig(sig_path: Path, resign: str) -> dict:
    if sig_path.is_symlink() or not sig_path.is_file():
        raise BundleError(f"{sig_path} is not a regular file; {resign}")
    if sig_path.stat().st_size > SIG_MAX_BYTES:
        raise BundleError(f"{sig_path} is too large to be an edgegen signature; {resign}")
    try:
        doc = json.loads(sig_path.read_bytes())
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != SIG_FORMAT:
        raise BundleError(f"{sig_path} is not an edgegen signature; {resign}")
    if doc.get("algorithm") != ALGORITHM:
        raise BundleError(f"{sig_path} uses algorithm {doc.get('algorithm')!r}; edgegen accepts only {ALGORITHM}")
    return doc


def verify_signature(bundle_dir: Path, manifest_bytes: bytes, policy: Policy | None = None) -> SignatureState:
    """Check manifest.sig against these exact manifest bytes and apply the policy. Raises BundleError on a bad
    signature always, and on an unsigned or untrusted bundle when signed bundles are required."""
    root = Path(bundle_dir)
    policy = policy or load_policy()
    return verify_bytes(
        manifest_bytes, root / SIG_NAME, policy.require_signed_bundles, policy.sources,
        subject=f"bundle {root}", resign=f"re-sign the bundle with: edgegen sign --bundle {root} --key KEY",
        target="manifest.json", changed="the manifest was changed after signing; do not use this bundle, re-export or re-sign it from a "
                "trusted copy", what="signed bundles")


def verify_bytes(raw: bytes, sig_path: Path, strict: bool, sources: tuple[str, ...], *, subject: str, resign: str,
                 target: str, changed: str, what: str) -> SignatureState:
    """Check a detached signature over `raw` and apply a signing policy (`strict`, turned on by `sources`)."""
    if not sig_path.exists() and not sig_path.is_symlink():
        if strict:
            raise BundleError(f"{subject} is not signed and {sources[0]} requires {what}; {resign}")
        return SignatureState(False)
    doc = _read_sig(sig_path, resign)
    key_id, claimed = str(doc.get("key_id", "")), doc.get("signer")
    claimed = str(claimed) if claimed else None
    crypto = _crypto()
    if crypto is None:
        if strict:
            raise BundleError(f"{what} are required here but the signature of {subject} cannot be checked "
                              f"because cryptography is not installed; run: {INSTALL_HINT}")
        return SignatureState(True, key_id, claimed, False, False)
    _, pub_cls, _, invalid = crypto
    embedded = _unb64(doc.get("public_key", ""), "public key", sig_path)
    if len(embedded) != 32 or key_id_of(embedded) != key_id:
        raise BundleError(f"{sig_path} names key {key_id} but carries a different public key; the signature is "
                          f"forged or damaged, {resign}")
    trusted = {k.key_id: k for k in trusted_keys()}.get(key_id)
    # Verify with the trust store's copy when we have one: the embedded key only lets us detect damage in
    # files signed by keys we do not know.
    pub = pub_cls.from_public_bytes(trusted.public_key if trusted else embedded)
    signature = _unb64(doc.get("signature", ""), "signature", sig_path)
    try:
        pub.verify(signature, raw)
    except invalid:
        raise BundleError(f"the signature in {sig_path} does not match {target} (key {key_id}): {changed}") from None
    if trusted is None and strict:
        who = f"'{claimed}' (key {key_id})" if claimed else f"key {key_id}"
        raise BundleError(f"{subject} is signed by {who}, which this machine does not trust, and "
                          f"{sources[0]} requires trusted signatures; trust the site key with: "
                          "edgegen trust add PUBKEY")
    return SignatureState(True, key_id, (trusted.name if trusted else None) or claimed, trusted is not None, True)


# ---------------------------------------------------------------- for `edgegen doctor`


def trust_report(bundle_dir: Path | None = None) -> dict:
    """Policy, trusted keys and (given a bundle) its signature state, as plain data. Never raises for a bundle
    problem: `bundle.error` holds the one-line reason instead."""
    problems: list[str] = []
    report: dict = {"cryptography": _crypto() is not None, "user_config": str(config_dir()),
                    "site_config": str(site_config_dir())}
    try:
        p = load_policy()
        report["policy"] = {"require_signed_bundles": p.require_signed_bundles, "sources": list(p.sources)}
    except UsageError as e:
        report["policy"] = {"require_signed_bundles": None, "error": str(e)}
    report["trusted_keys"] = [{"key_id": k.key_id, "name": k.name, "scope": k.scope, "path": str(k.path)}
                              for k in trusted_keys(problems)]
    report["problems"] = problems
    if bundle_dir is not None:
        from app.bundle.manifest import read_manifest_bytes

        entry: dict = {"path": str(bundle_dir)}
        try:
            state = verify_signature(Path(bundle_dir), read_manifest_bytes(Path(bundle_dir)))
            entry.update(state.to_dict(), summary=state.describe())
        except (BundleError, UsageError) as e:
            entry["error"] = str(e)
        report["bundle"] = entry
    return report
