"""WebSocket fan-out: any thread publishes {"type", "data"}; the event loop delivers to connected clients.

Step previews go out as ComfyUI sends them: binary frames (`preview_frame`), dropped first when a client lags.
As in ComfyUI, a message for a job submitted with a client_id goes only to that client's sockets, and one
without (status updates, jobs with no client_id) goes to every socket. A client that cannot keep up loses
progress messages first; the other kinds are kept until its buffer is full.
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct

log = logging.getLogger("edgegen.server")
BUFFER = 512  # messages queued per socket
LOSSY = frozenset({"progress", "progress_state", "status", "preview"})
PREVIEW_IMAGE, JPEG = 1, 1  # ComfyUI's binary frame: >I event type (1: preview image), >I image type (1: JPEG), bytes


class Client:
    def __init__(self, sid: str, ws):
        self.sid, self.ws = sid, ws
        self.queue: asyncio.Queue[str | bytes] = asyncio.Queue(maxsize=BUFFER)
        self.dropped = 0

    def offer(self, kind: str, text: str | bytes) -> None:
        if kind in LOSSY and self.queue.qsize() >= BUFFER // 2:
            self.dropped += 1
            return
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.dropped += 1

    async def pump(self) -> None:
        """Send queued messages in order until the socket closes."""
        while True:
            item = await self.queue.get()
            if self.ws.closed:
                return
            if isinstance(item, bytes):
                await self.ws.send_bytes(item)
            else:
                await self.ws.send_str(item)


class Hub:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.clients: dict[str, set[Client]] = {}

    # event-loop side
    def attach(self, sid: str, ws) -> Client:
        c = Client(sid, ws)
        self.clients.setdefault(sid, set()).add(c)
        return c

    def detach(self, c: Client) -> None:
        group = self.clients.get(c.sid)
        if group is not None:
            group.discard(c)
            if not group:
                del self.clients[c.sid]

    def send_to(self, c: Client, kind: str, data: dict) -> None:
        c.offer(kind, json.dumps({"type": kind, "data": data}))

    def _deliver(self, kind: str, data: dict | bytes, sid: str | None) -> None:
        text = data if isinstance(data, bytes) else json.dumps({"type": kind, "data": data})
        targets = [c for g in self.clients.values() for c in g] if sid is None else self.clients.get(sid, ())
        for c in list(targets):
            c.offer(kind, text)

    # any thread
    def publish(self, kind: str, data: dict | bytes, sid: str | None = None) -> None:
        """A JSON message {"type": kind, "data": data}, or a binary frame when `data` is bytes (previews)."""
        try:
            self.loop.call_soon_threadsafe(self._deliver, kind, data, sid)
        except RuntimeError:  # loop closed: the server is shutting down, nobody is listening
            pass


def preview_frame(jpeg: bytes) -> bytes:
    """ComfyUI's binary preview message: event type 1 (PREVIEW_IMAGE), image type 1 (JPEG), then the image."""
    return struct.pack(">II", PREVIEW_IMAGE, JPEG) + jpeg
