"""The one generation thread: claims jobs from the queue in order, runs them on loaded pipelines, saves PNGs.

One job at a time per server (one GPU), as in the app. Pipelines stay loaded per bundle (least recently used
dropped beyond `max_loaded_bundles`). Progress goes out through `publish`, which is thread-safe.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from app.errors import EdgegenError, GenerationCancelled
from app.server.config import ServerConfig
from app.server.graph import Plan, Task
from app.server.queue import ERROR, INTERRUPTED, SUCCESS, Job, JobQueue

log = logging.getLogger("edgegen.server")
Publish = Callable[[str, "dict | bytes", "str | None"], None]
MAX_PREVIEW = 512  # px a side of a preview frame (ComfyUI's --preview-size default)


def _ms() -> int:
    return int(time.time() * 1000)


class WorkerLost(Exception):
    """The process generating a job died under it (a cluster replica): the job may run again on another one."""


class Loaded:
    """A verified bundle with its backend and pipeline."""

    def __init__(self, bundle_dir: Path):
        from app.bundle.manifest import load_bundle
        from app.runtime.backend import make_backend
        from app.runtime.pipelines import make_pipeline

        self.bundle = load_bundle(bundle_dir)  # signature policy, checksums: as the CLI and the app
        self.backend, self.reason = make_backend(self.bundle, "auto")
        self.pipeline = make_pipeline(self.bundle, self.backend)


class Worker(threading.Thread):
    def __init__(self, queue: JobQueue, config: ServerConfig, publish: Publish, name: str = "edgegen-generation"):
        super().__init__(name=name, daemon=True)
        self.queue, self.config, self.publish = queue, config, publish
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._current: tuple[str, object] | None = None  # (prompt_id, Cancel)
        self._nodes: dict[str, dict] = {}  # the running job's progress_state (ComfyUI's per-node progress)
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._audit = None
        self.jobs_run = 0

    # ----- control, from any thread -----------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self.interrupt()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def interrupt(self, prompt_id: str | None = None) -> bool:
        with self._lock:
            if self._current is None or (prompt_id and self._current[0] != prompt_id):
                return False
            self._current[1].set()
            return True

    def running(self) -> str | None:
        with self._lock:
            return self._current[0] if self._current else None

    # ----- the thread -------------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Whether this worker may claim a job now (a cluster replica may be restarting or its node draining)."""
        return True

    def run(self) -> None:
        while not self._stopping.is_set():
            job = self.queue.claim_next() if self.ready() else None
            if job is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._status(claimed=1)  # ComfyUI counts the job it is starting (comfy-api-simplified stops at 0)
            try:
                self.execute(job)  # ends with status, then executing null, as ComfyUI ends a prompt
            except Exception:  # never let one job take the worker down
                log.exception("job %s failed unexpectedly", job.id)
                self._status()
            self.jobs_run += 1

    def _status(self, claimed: int = 0) -> None:
        pending = self.queue.count("pending") + (1 if claimed or self.running() else 0)
        self.publish("status", {"status": {"exec_info": {"queue_remaining": pending}}}, None)

    def execute(self, job: Job) -> None:
        from app.runtime.pipelines import Cancel

        sid = job.client_id
        plan = Plan.from_json(job.plan)
        cancel = Cancel()
        with self._lock:
            self._current = (job.id, cancel)
        start = {"prompt_id": job.id, "timestamp": _ms()}
        self.queue.add_message(job.id, "execution_start", start)
        self.publish("execution_start", start, sid)
        cached = {"nodes": [], "prompt_id": job.id, "timestamp": _ms()}  # edgegen caches no node outputs
        self.queue.add_message(job.id, "execution_cached", cached)
        self.publish("execution_cached", cached, sid)
        self._nodes = {}  # this job's progress_state so far
        task: Task | None = None
        done: list[str] = []
        try:
            offset = 0
            for task in plan.tasks:
                self._run_task(job, task, offset, cancel)
                offset += len(task.requests)
                done.append(task.node)
            if self._stopping.is_set() and cancel.is_set():
                raise GenerationCancelled("server stopping")
        except GenerationCancelled:
            if self._stopping.is_set():
                self.queue.release(job.id)  # back to pending, its finished images kept; the next start resumes it
                return
            data = {"prompt_id": job.id, "node_id": task.sampler_node if task else None,
                    "node_type": self._node_type(job, task), "executed": done, "timestamp": _ms()}
            self.queue.finish(job.id, INTERRUPTED, "execution_interrupted", data, error="interrupted")
            self.publish("execution_interrupted", data, sid)
        except WorkerLost as e:
            if not self.queue.retry(job.id, str(e)):
                failed = self.queue.get(job.id)
                data = {"prompt_id": job.id, "node_id": task.sampler_node if task else None,
                        "node_type": self._node_type(job, task), "executed": done,
                        "exception_message": failed.error if failed else str(e), "exception_type": "WorkerLost",
                        "traceback": [], "current_inputs": {}, "current_outputs": {}, "timestamp": _ms()}
                self.publish("execution_error", data, sid)
        except Exception as e:  # EdgegenError is a sentence for the user; anything else is our bug
            message = str(e) if isinstance(e, EdgegenError) else f"internal error: {type(e).__name__}: {e}"
            if not isinstance(e, EdgegenError):
                log.exception("job %s", job.id)
            data = {"prompt_id": job.id, "node_id": task.sampler_node if task else None,
                    "node_type": self._node_type(job, task), "executed": done, "exception_message": message,
                    "exception_type": type(e).__name__, "traceback": [], "current_inputs": {},
                    "current_outputs": {}, "timestamp": _ms()}
            self.queue.finish(job.id, ERROR, "execution_error", data, error=message)
            self.publish("execution_error", data, sid)
        else:
            data = {"prompt_id": job.id, "timestamp": _ms()}
            self.queue.finish(job.id, SUCCESS, "execution_success", data)
            self.publish("execution_success", data, sid)
        finally:
            with self._lock:
                self._current = None
            self._status()
            if not self._stopping.is_set():
                self.publish("executing", {"node": None, "prompt_id": job.id}, sid)

    @staticmethod
    def _node_type(job: Job, task: Task | None) -> str | None:
        if task is None:
            return None
        return (job.graph.get(task.sampler_node) or {}).get("class_type")

    def _run_task(self, job: Job, task: Task, offset: int, cancel) -> None:
        from app.runtime.pipelines import GenerationRequest

        sid = job.client_id
        n = len(task.requests)
        steps = n * max(1, int(task.requests[0].get("steps") or 1)) if task.requests else 1
        self._progress_state(job, task.sampler_node, 0, steps, "running")
        self.publish("executing", {"node": task.sampler_node, "display_node": task.sampler_node,
                                   "prompt_id": job.id}, sid)
        loaded = self._pipeline(task.bundle_dir)
        already = self.queue.recorded(job.id)
        subfolder, base = _split_prefix(task.filename_prefix)
        images = []
        scaled = self._scaled_references(task)
        mask = {"mask": str(mask_file(Path(task.mask[0]), task.mask[1], self.config.input_dir / ".masks"))} \
            if task.mask else {}
        for idx, fields in enumerate(task.requests):
            filename = f"{base}_{job.number:05d}_{job.id[:8]}_{offset + idx:02d}.png"
            entry = {"filename": filename, "subfolder": subfolder, "type": "output"}
            path = self.config.output_dir / subfolder / filename
            if (task.node, idx) in already and path.is_file():  # written before a restart: not drawn twice
                images.append(entry)
                continue
            if cancel.is_set():
                raise GenerationCancelled("interrupted")
            extra = {"images": scaled, **mask} if scaled else {}
            if task.controls:
                extra["controls"] = self._controls(task, fields)
            req = GenerationRequest(**fields, **extra)

            def on_step(step: int, total: int, idx=idx) -> None:
                self.publish("progress", {"value": idx * total + step, "max": n * total, "prompt_id": job.id,
                                          "node": task.sampler_node}, sid)
                self._progress_state(job, task.sampler_node, idx * total + step, n * total, "running")

            previews = {"on_preview": self._previewer(sid)} if self.config.preview_method != "none" else {}
            result = loaded.pipeline.generate(req, on_step=on_step, cancel=cancel, **previews)
            self._save(job, loaded, result, path)
            self.queue.record_image(job.id, task.node, idx, filename, subfolder, "output")
            for w in (*result.notes, *result.warnings):  # a scaled reference, then the real warnings
                self.queue.add_message(job.id, "warning", {"prompt_id": job.id, "node": task.sampler_node,
                                                           "message": w})
            images.append(entry)
        done = self._nodes.get(task.sampler_node, {}).get("max", steps)
        self._progress_state(job, task.sampler_node, done, done, "finished", publish=False)
        self._progress_state(job, task.node, 0, 1, "running")
        self.publish("executing", {"node": task.node, "display_node": task.node, "prompt_id": job.id}, sid)
        self.publish("executed", {"node": task.node, "display_node": task.node, "output": {"images": images},
                                  "prompt_id": job.id}, sid)
        self._progress_state(job, task.node, 1, 1, "finished")

    def _progress_state(self, job: Job, node: str, value: float, total: float, state: str,
                        publish: bool = True) -> None:
        """ComfyUI's progress_state: every node of the prompt seen so far, with value/max and running|finished."""
        self._nodes[node] = {"value": float(value), "max": float(total), "state": state, "node_id": node,
                             "prompt_id": job.id, "display_node_id": node, "parent_node_id": node.rpartition(":")[0]
                             or None, "real_node_id": node}
        if publish:
            self.publish("progress_state", {"prompt_id": job.id, "nodes": dict(self._nodes)}, job.client_id)

    def _previewer(self, sid: str | None):
        """on_preview for the pipeline: each step's picture as ComfyUI's binary preview frame (JPEG, at most
        MAX_PREVIEW px a side as ComfyUI's default), to the job's client (or every client, as ComfyUI sends)."""
        from PIL import Image

        from app.server.events import preview_frame

        def on_preview(step: int, total: int, rgb) -> None:
            im = Image.fromarray(rgb)
            im.thumbnail((MAX_PREVIEW, MAX_PREVIEW))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=95)
            self.publish("preview", preview_frame(buf.getvalue()), sid)

        return on_preview

    def _scaled_references(self, task: Task) -> tuple[str, ...]:
        """The task's reference / init images, scaled first where the graph scaled them (ImageScaleToTotalPixels),
        written once per content and size beside the input folder's files."""
        scales = task.reference_scales or (None,) * len(task.references)
        out = []
        for path, scale in zip(task.references, scales):
            if scale is None:
                out.append(path)
                continue
            method, w, h, *crop = scale
            out.append(str(scale_image(Path(path), method, int(w), int(h), self.config.input_dir / ".scaled",
                                       *crop)))
        return tuple(out)

    def _controls(self, task: Task, fields: dict) -> tuple:
        """The task's ControlNet images prepared as ComfyUI prepares them: the graph's ImageScale and Canny, then
        the ControlNet's own fit to the output size (common_upscale nearest-exact, centre crop), as files."""
        from app.runtime.controls import Control

        folder = self.config.input_dir / ".controls"
        out = []
        for name, path, scale, canny, strength, start, end in task.controls:
            if scale:
                method, w, h, *crop = scale
                path = str(scale_image(Path(path), method, int(w), int(h), folder, *crop))
            if canny:
                path = str(canny_file(Path(path), float(canny[0]), float(canny[1]), folder))
            path = str(scale_image(Path(path), "nearest-exact", int(fields["width"]), int(fields["height"]), folder,
                                   "center"))
            out.append(Control(name, path, float(strength), float(start), float(end), preprocess=False))
        return tuple(out)

    def _save(self, job: Job, loaded: Loaded, result, path: Path) -> None:
        from app.runtime.audit import AuditLog
        from app.runtime.generate import image_metadata, lora_metadata
        from app.runtime.images import save_png

        meta = image_metadata(loaded.bundle, loaded.backend, result)
        save_png(path, result.image, meta)  # atomic: a crash leaves the old file or none, never half a PNG
        if self._audit is None:
            self._audit = AuditLog(self.config.audit_path, redact_prompts=self.config.redact_prompts)
        r, b = result.request, loaded.bundle
        self._audit.record(
            model=b.manifest["source"]["name"], family=b.manifest["family"], bundle_sha=b.manifest_sha256,
            seed=r.seed, steps=r.steps, guidance=r.guidance, width=r.width, height=r.height,
            backend=loaded.backend.name, precision=b.precision, output=str(path.absolute()), prompt=r.prompt,
            negative_prompt=r.negative_prompt, source="api", prompt_id=job.id, client_id=job.client_id,
            **lora_metadata(result),
        )

    def _pipeline(self, bundle_dir: str) -> Loaded:
        key = str(bundle_dir)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        while len(self._loaded) >= max(1, self.config.max_loaded_bundles):
            self._loaded.popitem(last=False)
        loaded = Loaded(Path(bundle_dir))
        log.info("loaded %s: %s (%s)", bundle_dir, loaded.backend.describe(), loaded.reason)
        self._loaded[key] = loaded
        return loaded


def scale_image(src: Path, method: str, width: int, height: int, folder: Path, crop: str = "disabled") -> Path:
    """`src` scaled to width x height as ComfyUI's common_upscale does (crop "center": first cut to the target's
    aspect, centred; then torch interpolation on [0, 1] pixels, lanczos through PIL), saved as PNG (rounded to 8
    bits) under `folder`, named by content, size and crop. The same size with no crop is `src` itself."""
    import hashlib
    import io

    import numpy as np
    import torch
    from PIL import Image

    from app.bundle.files import atomic_write_bytes
    from app.runtime.references import read_image

    img = read_image(src)
    if img.size == (width, height) and crop == "disabled":
        return Path(src)
    digest = hashlib.sha256(f"{img.sha256}:{method}:{width}x{height}:{crop}".encode()).hexdigest()[:24]
    out = folder / f"{Path(src).stem}_{width}x{height}_{digest}.png"
    if out.is_file():
        return out
    picture = img.image
    if crop == "center":  # comfy.utils.common_upscale's centre crop to the new aspect
        ow, oh = picture.size
        old, new = ow / oh, width / height
        x0 = round((ow - ow * (new / old)) / 2) if old > new else 0
        y0 = round((oh - oh * (old / new)) / 2) if old < new else 0
        picture = picture.crop((x0, y0, ow - x0, oh - y0))
    if picture.size == (width, height):
        pixels = np.asarray(picture)
    elif method == "lanczos":
        pixels = np.asarray(picture.resize((width, height), Image.Resampling.LANCZOS))
    else:
        x = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1)[None].float() / 255
        y = torch.nn.functional.interpolate(x, size=(height, width), mode=method)
        pixels = (y[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    atomic_write_bytes(out, buf.getvalue())
    return out


def canny_file(src: Path, low: float, high: float, folder: Path) -> Path:
    """ComfyUI's Canny node on an input image (kornia.filters.canny on [0, 1] pixels, white edges), as a PNG file
    written once per content and thresholds."""
    import hashlib

    from app.bundle.files import atomic_write_bytes
    from app.runtime.controls import canny
    from app.runtime.references import read_image

    img = read_image(src)
    digest = hashlib.sha256(f"{img.sha256}:canny:{low!r}:{high!r}".encode()).hexdigest()[:24]
    out = folder / f"{Path(src).stem}_canny_{digest}.png"
    if not out.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        canny(img.image, low, high).save(buf, format="PNG")
        atomic_write_bytes(out, buf.getvalue())
    return out


def mask_file(src: Path, channel: str, folder: Path) -> Path:
    """ComfyUI's mask of an input image as a mask file generate --mask reads (white repaints), written once per
    content and channel: LoadImage's MASK and LoadImageMask "alpha" are 1 - alpha (ComfyUI's LoadImage: a
    64x64 zero mask when the image has no alpha), LoadImageMask "red"/"green"/"blue" the channel itself."""
    import hashlib

    import numpy as np
    from PIL import Image, ImageOps

    from app.bundle.files import atomic_write_bytes

    data = src.read_bytes()
    digest = hashlib.sha256(data + channel.encode()).hexdigest()[:24]
    out = folder / f"{src.stem}_mask_{channel}_{digest}.png"
    if out.is_file():
        return out
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if channel == "alpha":
        if "A" in im.getbands():
            mask = 255 - np.asarray(im.getchannel("A"), dtype=np.uint8)
        else:
            mask = np.zeros((64, 64), dtype=np.uint8)
    else:
        mask = np.asarray(im.convert("RGBA").getchannel(channel[0].upper()), dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")  # 2-D uint8: mode L
    atomic_write_bytes(out, buf.getvalue())
    return out


def _split_prefix(prefix: str) -> tuple[str, str]:
    """ComfyUI's filename_prefix may name a subfolder: "products/shoe" -> ("products", "shoe")."""
    p = Path(prefix)
    return ("" if str(p.parent) == "." else p.parent.as_posix()), p.name or "edgegen"
