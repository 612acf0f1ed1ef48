"""The self-test's bundle: the one given, else engines/demo when it verifies, else an export into the user cache.

On a machine with an NVIDIA GPU and the matching TensorRT flavour installed, the cache export also builds
engines for that GPU, so the self-test covers them; if that build fails the ONNX-only export is used and
the failure is reported as not covered.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from app.bundle.manifest import MANIFEST_NAME, Bundle, load_bundle
from app.errors import EdgegenError, UsageError
from app.progress import say

CACHE_NAME = "selftest-bundle"

# (model folder, output bundle, engine target or None, SMs) -> None: writes a bundle (the CLI passes the exporter)
Exporter = Callable[[Path, Path, "str | None", tuple], None]


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("edgegen")) / CACHE_NAME


def _matches(bundle: Bundle, model_sha: str | None) -> bool:
    return model_sha is None or bundle.manifest.get("source", {}).get("model_index_sha256") == model_sha


def _try_load(path: Path) -> Bundle | None:
    if not (path / MANIFEST_NAME).is_file():
        return None
    try:
        return load_bundle(path)
    except EdgegenError as e:
        say(f"not using {path}: {e}")
        return None


def engine_target(env: dict) -> tuple[str, tuple[str, ...]] | None:
    """(flavour, sms) to build engines for this machine's first GPU, or None when they could not run here."""
    from app.planning.policy import engine_flavour_for_sm

    gpus = env["gpus"]
    if not gpus or not env["torch_cuda"]:
        return None
    flavour = engine_flavour_for_sm(gpus[0].sm)
    if env["installed"].get(flavour) is None:
        return None
    return flavour, ((gpus[0].sm,) if flavour == "tensorrt-rtx" else ())


def _has_engines(bundle: Bundle, flavour: str) -> bool:
    return any(r.get("flavour") == flavour for r in bundle.manifest.get("engines", []))


def demo_bundle(model_dir: Path, bundle_dir: Path | None, env: dict,
                export: Exporter | None = None) -> tuple[Bundle, str, list[tuple[str, str]]]:
    """(verified bundle, how it was found, [(what, why not covered)] from the export)."""
    from app.bundle.files import sha256_file
    from app.bundle.locations import engine_dirs

    if bundle_dir is not None:
        return load_bundle(bundle_dir), "given with --bundle", []
    index = Path(model_dir) / "model_index.json"
    sha = sha256_file(index) if index.is_file() else None
    for d in engine_dirs():
        b = _try_load(d / "demo")
        if b is not None and _matches(b, sha):
            return b, "the demo bundle", []
    target = engine_target(env)
    cached = _try_load(cache_dir())
    if cached is not None and _matches(cached, sha) and (target is None or _has_engines(cached, target[0])):
        return cached, "cached self-test export", []
    if sha is None:
        raise UsageError(f"the demo model {model_dir} is not here and no demo bundle was found; pass --bundle DIR "
                         "and --model DIR, or run from an edgegen checkout or install that ships assets/")
    if export is None:
        raise UsageError(f"no demo bundle was found; write one with: edgegen export --model {model_dir} "
                         "--out engines/demo")
    return _export(Path(model_dir), target, export)


def _export(model_dir: Path, target, export: Exporter) -> tuple[Bundle, str, list[tuple[str, str]]]:
    out = cache_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    if target is not None:
        flavour, sms = target
        say(f"exporting {model_dir} with {flavour} engines for this GPU into {out} (once; later runs reuse it)")
        try:
            export(model_dir, out, flavour, sms)
            return load_bundle(out), f"exported into the cache with {flavour} engines", []
        except Exception as e:  # still test the ONNX backends; the engine failure is reported
            from app.runtime.engine.trt import LABELS

            note = (f"{LABELS[flavour]} engines", f"not run — building them failed: {e}")
    else:
        note = None
    say(f"exporting {model_dir} into {out} (once; later runs reuse it)")
    export(model_dir, out, None, ())
    return load_bundle(out), "exported into the cache", [note] if note else []
