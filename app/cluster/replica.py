"""One generation replica (a Ray actor, one per GPU): verifies and loads bundles on its own node, generates.

It returns pixels, metadata and audit fields; the server writes the PNG atomically on its own disk and only
then records the image, so a replica dying at any point loses nothing and completes nothing twice.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
from pathlib import Path

from app.errors import EdgegenError, GenerationCancelled


class Replica:
    """Constructed by Ray in its own process (`ray.remote(Replica)`), with `max_concurrency=2` so `cancel` and
    `info` are answered while `generate` runs."""

    def __init__(self, bundle_paths: tuple[str, ...] = (), redact_prompts: bool = False,
                 audit_path: str | None = None, lora_library: str | None = None):
        from app.cluster.guard import install

        install()  # also where the node was started without edgegen's boot folder
        if lora_library:  # the server's LoRA library (a shared folder): every file's sha256 is checked here
            from app.bundle.loras import ENV_LORAS

            os.environ[ENV_LORAS] = lora_library
        self.bundle_paths = tuple(Path(p) for p in bundle_paths)
        self.redact_prompts = redact_prompts
        self.audit_path = audit_path
        self._loaded: dict[tuple, object] = {}
        self._cancel = None
        self._lock = threading.Lock()
        self._audit = None
        self.gpu = self._gpu()

    @staticmethod
    def _gpu():
        from app.planning.devices import current_cuda_gpu

        return current_cuda_gpu(0)  # Ray sets CUDA_VISIBLE_DEVICES: device 0 is this replica's GPU

    def info(self) -> dict:
        import ray

        from app import offline
        from app.bundle.loras import library_dir

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "gpu": f"{self.gpu.name} (sm{self.gpu.sm})" if self.gpu else "CPU",
                "guard": offline.guard_status().active, "loaded": sorted(k[0] for k in self._loaded),
                "lora_library": str(library_dir())}

    def cancel(self) -> None:
        with self._lock:
            if self._cancel is not None:
                self._cancel.set()

    def _load(self, name: str, wanted: dict):
        key = (name, tuple(sorted((k, str(v)) for k, v in wanted.items())))
        if key not in self._loaded:
            import onnxruntime as ort

            from app.cluster.bundles import local_bundles, pick_bundle
            from app.runtime.engine.trt import installed_versions
            from app.server.worker import Loaded

            path, _why = pick_bundle(name, wanted, local_bundles(self.bundle_paths), self.gpu,
                                    installed=installed_versions(), ort_providers=ort.get_available_providers(),
                                    torch_cuda=self.gpu is not None)
            self._loaded.clear()  # one model resident per replica: GPUs hold one large model at a time
            self._loaded[key] = Loaded(path)  # load_bundle: signature policy and every hash, on this node
        return self._loaded[key]

    def generate(self, name: str, wanted: dict, request, references: dict[str, bytes] | None = None):
        """A generator (Ray streams its items): ("progress", step, total)..., then ("done", image, meta, audit,
        warnings), or ("cancelled",), or ("error", type name, message) for a failure a person can act on."""
        from app.runtime.pipelines import Cancel

        cancel = Cancel()
        with self._lock:
            self._cancel = cancel
        events: queue.Queue = queue.Queue()
        with tempfile.TemporaryDirectory(prefix="edgegen-refs-") as tmp:
            if references:  # the job's input files travel with it; the server's input folder is not here
                request = localised(request, references, Path(tmp))
            worker = threading.Thread(target=self._run, args=(name, wanted, request, cancel, events), daemon=True)
            worker.start()
            while True:
                item = events.get()
                yield item
                if item[0] != "progress":
                    break
            worker.join()

    def _run(self, name, wanted, request, cancel, events) -> None:
        try:
            loaded = self._load(name, wanted)
            result = loaded.pipeline.generate(request, on_step=lambda s, t: events.put(("progress", s, t)),
                                              cancel=cancel)
            meta, audit = self._describe(loaded, result)
            events.put(("done", result.image, meta, audit, [*result.notes, *result.warnings]))
        except GenerationCancelled:
            events.put(("cancelled",))
        except EdgegenError as e:
            events.put(("error", type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - reported to the server as an internal error, not a lost replica
            events.put(("error", type(e).__name__, f"internal error on replica {os.getpid()}: {type(e).__name__}: {e}"))

    def _describe(self, loaded, result) -> tuple[dict, dict]:
        import ray

        from app.runtime.audit import AuditLog
        from app.runtime.generate import image_metadata, lora_metadata

        meta = image_metadata(loaded.bundle, loaded.backend, result)
        r, b = result.request, loaded.bundle
        audit = dict(model=b.manifest["source"]["name"], family=b.manifest["family"], bundle_sha=b.manifest_sha256,
                     seed=r.seed, steps=r.steps, guidance=r.guidance, width=r.width, height=r.height,
                     backend=loaded.backend.name, precision=b.precision, bundle=str(b.root),
                     node=ray.get_runtime_context().get_node_id(), replica_pid=os.getpid(),
                     gpu=f"{self.gpu.name} (sm{self.gpu.sm})" if self.gpu else "CPU", **lora_metadata(result))
        if self._audit is None:  # this node's own audit log: what ran here, whichever server asked
            self._audit = AuditLog(self.audit_path, redact_prompts=self.redact_prompts)
        self._audit.record(**audit, prompt=r.prompt, negative_prompt=r.negative_prompt, source="cluster-replica",
                           output=None)
        return meta, audit


def input_files(request) -> dict[str, bytes]:
    """Every file a request reads (reference / init images, the inpainting mask, ControlNet images), by the path
    the request names, read on the server for the replica."""
    paths = [*request.images, *([request.mask] if request.mask else []), *(c.image for c in request.controls)]
    return {p: Path(p).read_bytes() for p in paths}


def localised(request, files: dict[str, bytes], folder: Path):
    """The request with each input path replaced by its copy under `folder` (numbered: two inputs may share a name)."""
    from dataclasses import replace

    local = {}
    for i, (path, data) in enumerate(files.items()):
        p = folder / f"{i}-{Path(path).name}"
        p.write_bytes(data)
        local[path] = str(p)
    return replace(request, images=tuple(local[p] for p in request.images),
                   mask=local[request.mask] if request.mask else None,
                   controls=tuple(replace(c, image=local[c.image]) for c in request.controls))
