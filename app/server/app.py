"""The aiohttp routes, in ComfyUI's request and response shapes, plus the checks every request passes first."""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import sys
import uuid
from pathlib import Path

from aiohttp import WSMsgType, web

from app import __version__
from app.server.config import ServerConfig
from app.server.events import Hub
from app.server.graph import GraphError, parse_prompt
from app.server.workflow import is_ui_workflow, to_api
from app.server.queue import FINISHED, PENDING, RUNNING, SUCCESS, JobQueue
from app.server.security import PathRefused, confined, origin_allowed, token_ok
from app.server.worker import Worker

log = logging.getLogger("edgegen.server")
KEYS = {k: web.AppKey(k, object) for k in ("config", "queue", "worker", "hub", "bundles")}
IMAGE_TYPES = ("output", "input", "temp")
VIEWABLE = ("png", "jpg", "jpeg", "webp")


def error_body(type_: str, message: str, details: str = "") -> dict:
    return {"error": {"type": type_, "message": message, "details": details, "extra_info": {}}, "node_errors": {}}


def fail(status: int, type_: str, message: str, details: str = "") -> web.Response:
    return web.json_response(error_body(type_, message, details), status=status)


# ----- middlewares ------------------------------------------------------------------------------------------

@web.middleware
async def errors_as_json(request: web.Request, handler):
    try:
        return await handler(request)
    except PathRefused as e:
        return fail(e.status, "path_refused", str(e), "give a file name relative to the folder, without '..'")
    except web.HTTPRequestEntityTooLarge as e:
        return fail(413, "body_too_large", "Request body is too large", e.text or "")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return fail(e.status, e.reason.lower().replace(" ", "_"), e.reason, "")
    except Exception as e:  # a bug of ours: say so without a traceback, log the traceback
        log.exception("%s %s", request.method, request.path)
        return fail(500, "internal_error", f"Internal server error: {type(e).__name__}",
                    "the server log has the details; please report it")


@web.middleware
async def guard(request: web.Request, handler):
    cfg: ServerConfig = request.app[KEYS["config"]]
    if cfg.require_token and not token_ok(cfg.token, request.headers, request.query):
        return fail(401, "unauthorized", "This server needs a token",
                    "send the header 'Authorization: Bearer <token>' (the token in the server's --token-file)")
    if not origin_allowed(request.headers.get("Origin"), request.headers.get("Host"), cfg.cors_origins):
        return fail(403, "origin_refused", "Requests from a web page on another origin are refused",
                    "start the server with the page's origin allowed, or call it from a script")
    limit = cfg.max_upload_bytes if request.path.rstrip("/").endswith("/upload/image") else cfg.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return fail(413, "body_too_large", f"Request body of {request.content_length} bytes is over the "
                    f"{limit}-byte limit", "send a smaller workflow or image")
    response = await handler(request)
    origin = request.headers.get("Origin")
    if origin and (origin in cfg.cors_origins or "*" in cfg.cors_origins):
        response.headers["Access-Control-Allow-Origin"] = origin
    return response


async def _json(request: web.Request, limit: int, type_: str = "invalid_request") -> dict:
    """The body as a JSON object ({} when empty); raises _BadJson, whose `response` is ComfyUI's 400 for it."""
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    if not body:
        return {}
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _BadJson(type_, str(e)) from None
    if not isinstance(data, dict):
        raise _BadJson(type_, "the body must be a JSON object")
    return data


class _BadJson(Exception):
    def __init__(self, type_: str, details: str):
        super().__init__(details)
        self.response = fail(400, type_, "The body is not valid JSON", details)


# ----- handlers ---------------------------------------------------------------------------------------------

def _ctx(request: web.Request):
    a = request.app
    return a[KEYS["config"]], a[KEYS["queue"]], a[KEYS["worker"]], a[KEYS["hub"]], a[KEYS["bundles"]]


def _queue_remaining(queue: JobQueue) -> int:
    return queue.count(PENDING) + queue.count(RUNNING)


async def post_prompt(request: web.Request) -> web.Response:
    cfg, queue, worker, hub, bundles = _ctx(request)
    try:
        body = await _json(request, cfg.max_body_bytes, "invalid_prompt")
    except _BadJson as e:
        return e.response
    try:
        if is_ui_workflow(body.get("prompt")):  # an edgegen extension: a workflow saved from ComfyUI's canvas
            body["prompt"] = to_api(body["prompt"], _object_info(bundles, cfg))
        plan = parse_prompt(body.get("prompt"), bundles, cfg.input_dir, cfg.alias_map())
    except GraphError as e:
        return web.json_response(e.body(), status=400)
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        return fail(400, "invalid_prompt", "client_id must be a string")
    extra = dict(body.get("extra_data")) if isinstance(body.get("extra_data"), dict) else {}
    if client_id is not None:
        extra["client_id"] = client_id  # ComfyUI keeps it in the queue/history item's extra_data
    job_id = body.get("prompt_id")
    if job_id is not None:
        try:
            job_id = str(uuid.UUID(str(job_id)))
        except ValueError:
            return fail(400, "invalid_prompt", "prompt_id must be a UUID", f"got {job_id!r}")
    notes = [["edgegen_note", {"message": n}] for n in plan.notes]
    try:
        job_id, number = queue.submit(body["prompt"], plan.to_json(), client_id, extra, job_id, notes)
    except KeyError:
        return fail(400, "invalid_prompt", "prompt_id is already in use", "leave it out to get a fresh one")
    worker.wake()
    hub.publish("status", {"status": {"exec_info": {"queue_remaining": _queue_remaining(queue)}}})
    return web.json_response({"prompt_id": job_id, "number": number, "node_errors": {}})


async def get_prompt(request: web.Request) -> web.Response:
    _, queue, *_ = _ctx(request)
    return web.json_response({"exec_info": {"queue_remaining": _queue_remaining(queue)}})


def _history_entry(queue: JobQueue, job) -> dict:
    outputs = {node: {"images": imgs} for node, imgs in queue.images(job.id).items()}
    return {
        "prompt": job.comfy_prompt(),
        "outputs": outputs,
        "status": {"status_str": "success" if job.status == SUCCESS else "error",
                   "completed": job.status == SUCCESS, "messages": job.messages},
        "meta": {node: {"node_id": node, "display_node": node, "parent_node": _parent(node), "real_node_id": node}
                 for node in outputs},
    }


def _parent(node: str) -> str | None:
    """A subgraph's inner node "75:9" has parent "75" (ComfyUI's meta.parent_node); a top-level node none."""
    return node.rpartition(":")[0] or None


async def get_history(request: web.Request) -> web.Response:
    _, queue, *_ = _ctx(request)
    try:
        limit = int(request.query["max_items"]) if "max_items" in request.query else None
    except ValueError:
        return fail(400, "invalid_query", "max_items must be a whole number")
    jobs = queue.jobs(FINISHED, limit=limit, newest_first=True)
    return web.json_response({j.id: _history_entry(queue, j) for j in reversed(jobs)})


async def get_history_one(request: web.Request) -> web.Response:
    _, queue, *_ = _ctx(request)
    job = queue.get(request.match_info["prompt_id"])
    if job is None or job.status not in FINISHED:
        return web.json_response({})  # ComfyUI's answer until the job is done; clients poll on it
    return web.json_response({job.id: _history_entry(queue, job)})


async def post_history(request: web.Request) -> web.Response:
    cfg, queue, *_ = _ctx(request)
    try:
        body = await _json(request, cfg.max_body_bytes)
    except _BadJson as e:
        return e.response
    if body.get("clear"):
        queue.delete_history()
    if isinstance(body.get("delete"), list):
        queue.delete_history([str(i) for i in body["delete"]])
    return web.json_response({})


async def get_queue(request: web.Request) -> web.Response:
    _, queue, *_ = _ctx(request)
    return web.json_response({"queue_running": [j.comfy_prompt() for j in queue.jobs((RUNNING,))],
                              "queue_pending": [j.comfy_prompt() for j in queue.jobs((PENDING,))]})


async def post_queue(request: web.Request) -> web.Response:
    cfg, queue, worker, hub, _ = _ctx(request)
    try:
        body = await _json(request, cfg.max_body_bytes)
    except _BadJson as e:
        return e.response
    deleted = 0
    if body.get("clear"):
        deleted += queue.delete_pending()
    if isinstance(body.get("delete"), list):
        ids = [str(i) for i in body["delete"]]
        deleted += queue.delete_pending(ids)
        for i in ids:  # ComfyUI: deleting the running prompt interrupts it
            worker.interrupt(i)
    hub.publish("status", {"status": {"exec_info": {"queue_remaining": _queue_remaining(queue)}}})
    return web.json_response({"deleted": deleted})


async def post_interrupt(request: web.Request) -> web.Response:
    cfg, _, worker, *_ = _ctx(request)
    try:
        body = await _json(request, cfg.max_body_bytes)
    except _BadJson:
        body = {}
    pid = body.get("prompt_id")
    return web.json_response({"interrupted": worker.interrupt(str(pid) if pid else None)})


def _folder(cfg: ServerConfig, type_: str):
    if type_ == "output":
        return cfg.output_dir
    if type_ == "input":
        return cfg.input_dir
    return cfg.output_dir.parent / "temp"


async def get_view(request: web.Request) -> web.Response:
    cfg, *_ = _ctx(request)
    q = request.query
    filename, subfolder, type_ = q.get("filename", ""), q.get("subfolder", ""), q.get("type", "output") or "output"
    if not filename:  # ComfyUI: 404
        return fail(404, "invalid_query", "filename is required", "GET /view?filename=NAME&subfolder=&type=output")
    if type_ not in IMAGE_TYPES:
        return fail(400, "invalid_query", f"type {type_!r} is not one of {', '.join(IMAGE_TYPES)}")
    try:
        confined(_folder(cfg, type_), subfolder)
    except PathRefused as e:  # a subfolder outside the folder: ComfyUI answers 403
        raise PathRefused(str(e), status=403) from None
    if "/" in filename:
        raise PathRefused(f"{filename!r} is not a plain file name; put folders in subfolder")
    if filename.startswith(".") or filename.rpartition(".")[2].lower() not in VIEWABLE:
        return fail(400, "invalid_query", f"{filename!r} is not an image this server serves",
                    f"/view serves {', '.join(VIEWABLE)} files")
    path = confined(_folder(cfg, type_), subfolder, filename)
    if not path.is_file():
        return fail(404, "not_found", f"No {type_} file {filename!r} in subfolder {subfolder!r}",
                    "use the filename and subfolder that /history reported")
    preview = q.get("preview", "")
    if preview:  # ComfyUI's "webp;90" / "jpeg;90": a smaller copy for a thumbnail, same name
        fmt, _, quality = preview.partition(";")
        if fmt not in ("webp", "jpeg") or (quality and not quality.isdigit()):
            return fail(400, "invalid_query", f"preview {preview!r} is not webp;QUALITY or jpeg;QUALITY")
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(path) as im:
            im.convert("RGB").save(buf, format=fmt.upper(), quality=min(100, int(quality or 90)))
        return web.Response(body=buf.getvalue(), content_type=f"image/{fmt}",
                            headers={"Content-Disposition": f'filename="{path.name}"'})
    return web.FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})


async def post_upload_image(request: web.Request) -> web.Response:
    from PIL import Image

    from app.bundle.files import atomic_write_bytes

    cfg, *_ = _ctx(request)
    if not request.content_type.startswith("multipart/"):
        return fail(400, "invalid_request", "Upload as multipart/form-data with a file field named 'image'")
    reader = await request.multipart()
    fields: dict[str, str] = {}
    data = name = None
    while (part := await reader.next()) is not None:
        if part.name == "image" and part.filename is not None:
            name = part.filename
            buf = bytearray()
            while chunk := await part.read_chunk(64 * 1024):
                buf += chunk
                if len(buf) > cfg.max_upload_bytes:
                    return fail(413, "body_too_large", f"Image is over the {cfg.max_upload_bytes}-byte limit",
                                "upload a smaller image")
            data = bytes(buf)
        elif part.name in ("subfolder", "type", "overwrite"):
            fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")[:256]
    if data is None or not name:
        return fail(400, "invalid_request", "No file field named 'image' in the upload")
    type_ = fields.get("type") or "input"
    if type_ != "input":
        return fail(400, "invalid_request", f"Uploads go to the input folder, not {type_!r}", "send type=input")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise PathRefused(f"{name!r} is not a plain file name")
    subfolder = fields.get("subfolder", "")
    path = confined(cfg.input_dir, subfolder, name)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception:
        return fail(400, "invalid_image", f"{name} is not an image Pillow can read", "upload a PNG, JPEG or WebP")
    if path.exists() and fields.get("overwrite", "").lower() not in ("true", "1"):
        stem, suffix, i = path.stem, path.suffix, 1
        while path.exists():
            path = path.with_name(f"{stem} ({i}){suffix}")
            i += 1
    atomic_write_bytes(path, data)
    return web.json_response({"name": path.name, "subfolder": subfolder, "type": "input"})


async def get_system_stats(request: web.Request) -> web.Response:
    from app.planning.devices import read_gpus

    ram_total, ram_free = _ram("SC_PHYS_PAGES"), _ram("SC_AVPHYS_PAGES")
    devices = [{"name": f"cuda:{g.index} {g.name}", "type": "cuda", "index": g.index, "vram_total": g.total_bytes,
                "vram_free": g.free_bytes, "torch_vram_total": g.total_bytes, "torch_vram_free": g.free_bytes,
                "uuid": g.uuid, "compute_capability": g.sm} for g in read_gpus()]
    if not devices:  # as ComfyUI lists a CPU-only machine: the CPU, with RAM as its memory
        devices = [{"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total, "vram_free": ram_free,
                    "torch_vram_total": ram_total, "torch_vram_free": ram_free}]
    torch = sys.modules.get("torch")
    return web.json_response({
        "system": {"os": os.name, "platform": platform.platform(), "python_version": sys.version,
                   "embedded_python": False, "edgegen_version": __version__, "comfyui_version": None,
                   "required_frontend_version": None, "installed_templates_version": None,
                   "required_templates_version": None,
                   "pytorch_version": getattr(torch, "__version__", None) if torch else _dist_version("torch"),
                   "ram_total": ram_total, "ram_free": ram_free, "argv": ["edgegen", "serve"]},
        "devices": devices,
    })


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _ram(name: str) -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(name)
    except (ValueError, OSError, AttributeError):
        return None


async def get_ws(request: web.Request) -> web.WebSocketResponse:
    _, queue, _, hub, _ = _ctx(request)
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
    await ws.prepare(request)
    sid = request.query.get("clientId") or uuid.uuid4().hex
    client = hub.attach(sid, ws)
    hub.send_to(client, "status", {"status": {"exec_info": {"queue_remaining": _queue_remaining(queue)}},
                                   "sid": sid})
    import asyncio

    pump = asyncio.ensure_future(client.pump())
    try:
        async for msg in ws:  # clients send nothing we act on; reading keeps pings and close frames flowing
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        hub.detach(client)
        pump.cancel()
    return ws


def _object_info(bundles, cfg) -> dict:
    from app.bundle.loras import names as lora_names
    from app.server.nodes import object_info

    return object_info(bundles.names(), lora_names(), input_images(cfg.input_dir), [a for a, _ in cfg.aliases],
                       controlnet_names(bundles))


def controlnet_names(bundles) -> list[str]:
    """The served bundles' ControlNets by name (ControlNetLoader's choices, /models/controlnet)."""
    nets = set()
    for path in bundles.all().values():
        try:
            nets.update((bundles.manifest(path).get("controlnets") or {}))
        except Exception:  # noqa: BLE001 - a damaged bundle lists no nets; loading it says what is wrong
            continue
    return sorted(nets)


def input_images(folder: Path) -> list[str]:
    """The input folder's files, as LoadImage's choices (ComfyUI lists its input folder the same way)."""
    try:
        return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return []


async def get_object_info(request: web.Request) -> web.Response:
    """ComfyUI's node schemas for the node types edgegen accepts; installed bundles and library LoRAs as choices."""
    cfg, *_, bundles = _ctx(request)
    return web.json_response(_object_info(bundles, cfg))


async def get_object_info_node(request: web.Request) -> web.Response:
    cfg, *_, bundles = _ctx(request)
    info = _object_info(bundles, cfg)
    name = request.match_info["node_class"]
    return web.json_response({name: info[name]} if name in info else {})  # ComfyUI: {} for a node it lacks


async def get_models(request: web.Request) -> web.Response:
    from app.server.nodes import MODEL_FOLDERS

    return web.json_response(list(MODEL_FOLDERS))


async def get_models_folder(request: web.Request) -> web.Response:
    from app.bundle.loras import names as lora_names
    from app.server.nodes import MODEL_FOLDERS

    folder = request.match_info["folder"]
    if folder not in MODEL_FOLDERS:
        return web.Response(status=404, text="404: Not Found")  # as ComfyUI answers an unknown folder
    if folder == "checkpoints":
        return web.json_response(_ctx(request)[4].names())
    if folder == "loras":
        return web.json_response([f"{n}.safetensors" for n in lora_names()])
    if folder == "controlnet":
        return web.json_response(controlnet_names(_ctx(request)[4]))
    return web.json_response([])


async def get_embeddings(request: web.Request) -> web.Response:
    return web.json_response([])  # textual-inversion embeddings: none (edgegen's text encoders are compiled)


async def get_features(request: web.Request) -> web.Response:
    cfg = _ctx(request)[0]
    # no preview frames over /ws yet, so no preview metadata either
    return web.json_response({"supports_preview_metadata": False, "max_upload_size": cfg.max_upload_bytes})


async def get_root(request: web.Request) -> web.Response:
    _, _, _, _, bundles = _ctx(request)
    return web.json_response({"edgegen": __version__, "bundles": bundles.names(),
                              "api": "ComfyUI-compatible: /prompt /history /view /queue /interrupt "
                                     "/system_stats /upload/image /ws /object_info /models /embeddings "
                                     "/features"})


async def _close_sockets(app: web.Application) -> None:
    hub: Hub = app[KEYS["hub"]]
    for group in list(hub.clients.values()):
        for c in list(group):
            await c.ws.close(code=1001, message=b"server shutting down")


def make_app(config: ServerConfig, queue: JobQueue, worker: Worker, hub: Hub, bundles) -> web.Application:
    app = web.Application(middlewares=[errors_as_json, guard],
                          client_max_size=max(config.max_body_bytes, config.max_upload_bytes) + 64 * 1024)
    for key, value in (("config", config), ("queue", queue), ("worker", worker), ("hub", hub), ("bundles", bundles)):
        app[KEYS[key]] = value
    routes = [
        ("POST", "/prompt", post_prompt), ("GET", "/prompt", get_prompt),
        ("GET", "/history", get_history), ("POST", "/history", post_history),
        ("GET", "/history/{prompt_id}", get_history_one),
        ("GET", "/queue", get_queue), ("POST", "/queue", post_queue),
        ("POST", "/interrupt", post_interrupt), ("GET", "/view", get_view),
        ("POST", "/upload/image", post_upload_image), ("GET", "/system_stats", get_system_stats),
        ("GET", "/ws", get_ws), ("GET", "/object_info", get_object_info),
        ("GET", "/object_info/{node_class}", get_object_info_node), ("GET", "/models", get_models),
        ("GET", "/models/{folder}", get_models_folder), ("GET", "/embeddings", get_embeddings),
        ("GET", "/features", get_features),
    ]
    for prefix in ("", "/api"):  # newer ComfyUI frontends call the same routes under /api
        for method, path, handler in routes:
            app.router.add_route(method, prefix + path, handler)
    app.router.add_get("/", get_root)
    app.on_shutdown.append(_close_sockets)
    return app
