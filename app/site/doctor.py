"""`edgegen doctor`: what this machine has (GPU, CUDA, TensorRT, ONNX Runtime), which bundles can run, and why not.

`gather()` returns plain data (the `--json` output); `doctor()` prints it and returns 0 only when nothing
prevents generation: a usable bundle, the runtime packages, no bundle failing verification.
"""

from __future__ import annotations

import importlib
import json
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from app.errors import EdgegenError

GIB = 1024**3
LOW_DISK_GIB = 5.0  # an export or engine build of a real model writes several GB
# Distributions shown in the software table; the first of each group that is installed wins.
PACKAGES = {
    "diffusers": ("diffusers",), "transformers": ("transformers",), "onnx": ("onnx",),
    "PySide6 (desktop app)": ("PySide6-Essentials", "PySide6"), "cryptography (signatures)": ("cryptography",),
    "nvidia-ml-py (NVML)": ("nvidia-ml-py",),
}
NEEDED_FOR_GENERATION = ("diffusers", "transformers")


def _dist_version(*names: str) -> str | None:
    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return None


def _gpu_dict(g) -> dict:
    return {"index": g.index, "name": g.name, "sm": g.sm, "uuid": g.uuid, "driver": g.driver,
            "vram_total_gib": None if g.total_bytes is None else round(g.total_bytes / GIB, 1),
            "vram_free_gib": None if g.free_bytes is None else round(g.free_bytes / GIB, 1)}


def _torch() -> dict:
    try:
        import torch
    except Exception as e:  # ImportError, or a broken native library (OSError)
        return {"version": None, "cuda": None, "cuda_available": False, "error": str(e)}
    try:
        available = bool(torch.cuda.is_available())
    except Exception:
        available = False
    return {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": available}


def _onnxruntime() -> dict:
    dists = [d for d in ("onnxruntime", "onnxruntime-gpu") if _dist_version(d)]
    try:
        ort = importlib.import_module("onnxruntime")
        info = {"version": ort.__version__, "providers": list(ort.get_available_providers())}
    except Exception as e:
        info = {"version": None, "providers": [], "error": str(e)}
    info["distributions"] = dists
    return info


def _software() -> dict:
    from app.runtime.engine.trt import installed_versions

    trt = installed_versions()
    sw = {"python": platform.python_version(), "torch": _torch(), "onnxruntime": _onnxruntime(),
          "tensorrt": trt.get("tensorrt"), "tensorrt_rtx": trt.get("tensorrt-rtx")}
    sw["packages"] = {label: _dist_version(*names) for label, names in PACKAGES.items()}
    return sw


def _bundle_entry(path: Path, gpus: list, sw: dict) -> dict:
    """Verify one bundle, then say which backend it would use here and what each engine needs (gpus: GpuInfo)."""
    from app.runtime.backend import choose_backend
    from app.runtime.engine.compat import incompatibility, rebuild_command
    from app.runtime.engine.trt import LABELS

    entry: dict = {"path": str(path), "ok": False}
    try:
        from app.bundle.manifest import load_bundle
    except ImportError as e:  # a broken install: say so per bundle instead of a traceback
        entry["error"] = f"cannot be checked: {e}"
        return entry
    try:
        bundle = load_bundle(path)
    except EdgegenError as e:
        entry["error"] = str(e)
        return entry
    except OSError as e:
        entry["error"] = f"cannot read the bundle: {e}"
        return entry
    m = bundle.manifest
    source = m.get("source", {}).get("path", "MODEL_DIR")
    entry.update(ok=True, family=m["family"], precision=bundle.precision, model=m.get("source", {}).get("name"),
                 size_range=m.get("size_range"), defaults=m.get("defaults"), engines=[])
    installed = {"tensorrt": sw["tensorrt"], "tensorrt-rtx": sw["tensorrt_rtx"]}
    gpu = gpus[0] if gpus else None
    for rec in m.get("engines", []):
        e = {"component": rec.get("component"), "target": LABELS.get(rec.get("flavour"), rec.get("flavour")),
             "version": rec.get("version"), "sm": rec.get("sm"), "precision": rec.get("precision")}
        if gpu is None:
            e.update(usable=False, why="no NVIDIA GPU here")
        else:
            why = incompatibility(rec, gpu.sm, installed)
            e.update(usable=why is None, why=why)
            if why and why.endswith("is not installed"):
                e["fix"] = "pip install 'edgegen[rtx]'" if rec.get("flavour") == "tensorrt-rtx" else \
                    "install the [gpu] extra (TensorRT) from NVIDIA's index"
            elif why:
                e["fix"] = rebuild_command(source, bundle.root, gpu.sm, rec.get("precision"))
        entry["engines"].append(e)
    if gpu is not None:
        entry["memory"] = _memory(bundle, gpu)
    if gpu is not None and not m.get("engines"):
        entry["engine_hint"] = f"no engines yet; for {gpu.name} build them with: " + \
            rebuild_command(source, bundle.root, gpu.sm, bundle.precision)
    ort = sw["onnxruntime"]
    if ort["version"] is None:
        entry.update(backend=None, backend_reason="ONNX Runtime is not installed, so nothing can run this bundle")
        return entry
    by_comp: dict[str, list] = {}
    for rec in m.get("engines", []):
        by_comp.setdefault(rec["component"], []).append(rec)
    choice, reason = choose_backend("auto", gpus=gpus, engines=by_comp, installed=installed,
                                    ort_providers=ort["providers"], torch_cuda=sw["torch"]["cuda_available"],
                                    source=source, bundle=str(bundle.root))
    entry.update(backend=choice, backend_reason=reason)
    return entry


def _memory(bundle, gpu) -> dict:
    """What the runtime will do with this GPU's memory at the bundle's default size: the same plan (the bundle's
    real bytes per component) that decides low-VRAM staging when it generates."""
    from app.planning.components import bundle_plan
    from app.planning.gpus import gpu_spec_from_info

    d = bundle.defaults
    try:
        p = bundle_plan(bundle, gpu_spec_from_info(gpu), d["width"], d["height"])
    except EdgegenError as e:
        return {"error": str(e)}
    return {"size": f"{d['width']}x{d['height']}", "peak_gib": round(p.peak_bytes / GIB, 2),
            "usable_gib": round((p.usable_bytes or 0) / GIB, 2), "strategy": p.strategy, "does": p.staging_text(),
            "notes": list(p.notes)}


def _disk(paths: list[Path]) -> list[dict]:
    seen, out = set(), []
    for p in paths:
        p = Path(p).absolute()
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            dev = p.stat().st_dev
            usage = shutil.disk_usage(p)
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        out.append({"path": str(p), "free_gib": round(usage.free / GIB, 1), "total_gib": round(usage.total / GIB, 1)})
    return out


def _signing(bundles: list[Path]) -> dict:
    """The trust module's report, when that module is here (it belongs to the [trust] feature)."""
    try:
        from app.bundle import trust
    except ImportError as e:
        return {"available": False, "reason": f"signature support is not part of this build ({e})"}
    try:
        report = dict(trust.trust_report())
    except Exception as e:  # its failure must not hide the rest of the report
        return {"available": False, "reason": f"could not read the signing state: {e}"}
    report["bundles"] = []
    for b in bundles:
        try:
            report["bundles"].append(trust.trust_report(b).get("bundle", {"path": str(b)}))
        except Exception as e:
            report["bundles"].append({"path": str(b), "unavailable": f"could not check its signature: {e}"})
    report["available"] = True
    return report


def gather(bundles: list[Path] | None = None) -> dict:
    """Everything doctor shows, as JSON-able data, plus `problems` (blocking) and `warnings`."""
    from platformdirs import user_cache_dir

    from app import __version__, offline
    from app.bundle.locations import engine_dirs, find_bundles
    from app.planning.devices import read_gpus
    from app.runtime.audit import AuditLog

    searched = [str(d) for d in engine_dirs()]
    paths = [Path(b) for b in bundles] if bundles else find_bundles()
    infos = read_gpus()
    sw = _software()
    entries = [_bundle_entry(p, infos, sw) for p in paths]
    guard = offline.guard_status()
    report = {
        "edgegen": __version__, "platform": f"{platform.system()} {platform.machine()}", "python": sys.executable,
        "gpus": [_gpu_dict(g) for g in infos],
        "gpu_note": None if infos else "no NVIDIA GPU/driver found (NVML is not available)",
        "software": sw, "bundles_searched": [] if bundles else searched, "bundles": entries,
        "disk": _disk([Path.cwd(), Path(user_cache_dir("edgegen")), *paths]),
        "offline": {"active": guard.active, "offline_env": guard.offline_env, "blocked": guard.blocked,
                    "summary": guard.summary()},
        "audit_log": str(AuditLog().path),
        "signing": _signing([e_path for e_path, e in zip(paths, entries) if e["ok"]]),
    }
    report["problems"], report["warnings"] = _verdict(report, bool(bundles))
    report["ready"] = not report["problems"]
    return report


def _verdict(r: dict, explicit: bool) -> tuple[list[str], list[str]]:
    problems, warnings = [], []
    sw = r["software"]
    if sw["torch"]["version"] is None:
        problems.append("PyTorch is not installed (or fails to import); reinstall edgegen with its dependencies")
    if sw["onnxruntime"]["version"] is None:
        problems.append("ONNX Runtime is not installed; install it with: pip install 'edgegen[cpu]' "
                        "(or onnxruntime-gpu on an NVIDIA machine)")
    if len(sw["onnxruntime"]["distributions"]) > 1:
        warnings.append("both onnxruntime and onnxruntime-gpu are installed; they share one module, keep only one")
    for name in NEEDED_FOR_GENERATION:
        if sw["packages"][name] is None:
            problems.append(f"{name} is not installed; reinstall edgegen with its dependencies")
    for e in r["bundles"]:
        if not e["ok"]:
            problems.append(f"bundle {e['path']}: {e['error']}")
        by_fix: dict[tuple[str, str], list[str]] = {}
        for eng in e.get("engines", []):
            if eng.get("fix"):
                by_fix.setdefault((eng["why"], eng["fix"]), []).append(eng["component"])
        for (why, fix), comps in by_fix.items():
            warnings.append(f"bundle {e['path']}: the {', '.join(comps)} engine(s) cannot run here ({why}); "
                            f"fix: {fix}")
    if not r["bundles"]:
        where = ", ".join(r["bundles_searched"]) or "no engines/ folder found"
        problems.append(f"no engine bundle found ({where}); export one with: edgegen export --model DIR "
                        "--out engines/NAME (or run: make demo), or pass --bundle DIR")
    elif not any(e["ok"] for e in r["bundles"]) and not explicit:
        problems.append("no bundle here can be used")
    for b in r["signing"].get("bundles", []):
        if b.get("error"):
            problems.append(f"bundle {b['path']}: {b['error']}")
    if not r["offline"]["active"]:
        warnings.append("the network guard is not active in this process (edgegen's CLI and app turn it on)")
    if sw["packages"]["PySide6 (desktop app)"] is None:
        warnings.append("PySide6 is not installed, so `edgegen app` cannot start: pip install 'edgegen[ui]'")
    for d in r["disk"]:
        if d["free_gib"] < LOW_DISK_GIB:
            warnings.append(f"only {d['free_gib']} GiB free at {d['path']}; exports and engine builds need "
                            "several GB")
    return problems, warnings


def doctor(bundles: list[Path], as_json: bool = False) -> int:
    """Print the report (rich tables, or JSON) and return 0 when generation can work here, else 1."""
    report = gather(bundles)
    if as_json:
        print(json.dumps(report, indent=2, default=str))
    else:
        from app.site.doctor_view import render

        render(report)
    return 0 if report["ready"] else 1
