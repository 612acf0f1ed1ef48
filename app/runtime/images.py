"""PNG output with A1111-style `parameters` and a JSON `edgegen` text chunk, written atomically."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from app.bundle.files import atomic_write_bytes


def a1111_parameters(meta: dict) -> str:
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    lines.append(
        f"Steps: {meta['steps']}, Sampler: Euler (flow matching), CFG scale: {meta['guidance']}, "
        f"Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, Model: {meta['model']}, "
        f"Model hash: {meta['bundle_sha256'][:10]}, Backend: {meta['backend']}, Precision: {meta['precision']}, "
        f"Version: edgegen {meta.get('edgegen', '')}"
    )
    refs = meta.get("references") or []
    if refs:
        label = "Init image" if meta.get("strength") is not None else "Reference"
        lines[-1] += "".join(f", {label}{'' if len(refs) == 1 else f' {i + 1}'}: {r['name']} ({r['sha256'][:10]})"
                             for i, r in enumerate(refs))
    if meta.get("strength") is not None:
        lines[-1] += f", Denoising strength: {meta['strength']}"
    return "\n".join(lines)


def save_png(path: Path, image: np.ndarray, meta: dict) -> Path:
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", a1111_parameters(meta))
    info.add_itxt("edgegen", json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def check_output_folder(folder: Path, what: str, images: int = 1, width: int = 1024, height: int = 1024) -> None:
    """Refuse, before any work, an output folder that is missing, not writable (a read-only mount, /proc) or too
    full for one image: a temporary file is created and removed there, the way save_png will write. The space
    asked for is one image's raw pixels (a PNG is at most about that); more images only warn in the caller."""
    import os
    import shutil
    import tempfile

    from app.errors import UsageError

    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"the folder {folder} for {what} does not exist; create it first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edgegen-write-check-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"cannot write into {folder} ({e.strerror or e}) for {what}; choose a writable folder")
    free = shutil.disk_usage(folder).free
    need = width * height * 3 + (1 << 20)
    if free < need:
        raise UsageError(f"{folder} has {free // 2**20} MiB free, less than one {width}x{height} image needs; free "
                         f"space or choose another folder for {what}")


def read_metadata(path: Path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["edgegen"])


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when identical)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
