"""A reflecting upstream for tests: a real aiohttp server that records every
request it receives and answers with a description of it, plus a few special
paths for streaming, SSE, slow answers, cookies and WebSockets."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    body_size: int

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None

    def header_names(self) -> list[str]:
        return [k for k, _ in self.headers]


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]


RECORDER = web.AppKey("recorder", Recorder)
KEEP_BODY = 1024 * 1024  # bodies larger than this are counted (and hashed), not kept


async def reflect(request: web.Request) -> web.StreamResponse:
    recorder = request.app[RECORDER]
    # The last path segment picks a behaviour, whatever prefix the route added.
    path = request.path.rsplit("/", 1)[-1]
    if path == "download":
        return await download(request)
    if path == "events":
        return await events(request)
    # Read the body as a stream so a 1 GiB upload does not sit in this process either.
    size, kept, digest = 0, bytearray(), hashlib.sha256()
    async for chunk in request.content.iter_chunked(256 * 1024):
        size += len(chunk)
        digest.update(chunk)
        if len(kept) < KEEP_BODY:
            kept += chunk[: KEEP_BODY - len(kept)]
    seen = Seen(request.method, request.raw_path, list(request.headers.items()), bytes(kept), size)
    recorder.seen.append(seen)
    if path.startswith("slow"):
        await asyncio.sleep(float(request.query.get("delay", "5")))
    if path.startswith("status"):
        return web.Response(status=int(request.query.get("code", "200")), text="status")
    if path.startswith("cookies"):
        response = web.Response(text="cookies")
        response.headers.add("Set-Cookie", "a=1; Path=/")
        response.headers.add("Set-Cookie", "b=2; Path=/; HttpOnly")
        return response
    if path.startswith("hop"):
        response = web.Response(text="hop")
        response.headers["Connection"] = "X-Private-Hop"
        response.headers["X-Private-Hop"] = "secret"
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Proxy-Authenticate"] = "Basic"
        response.headers["X-Kept"] = "yes"
        return response
    if path.startswith("gzip"):
        return web.Response(
            body=b"\x1f\x8b\x08\x00not-really-gzip",
            headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
        )
    return web.json_response(
        {
            "method": seen.method,
            "path": seen.raw_path,
            "headers": seen.headers,
            "body_size": size,
            "body_sha256": digest.hexdigest(),
        }
    )


async def download(request: web.Request) -> web.StreamResponse:
    """`size` bytes, streamed in 1 MiB writes, with or without Content-Length."""
    size = int(request.query["size"])
    response = web.StreamResponse()
    if request.query.get("chunked") != "1":
        response.content_length = size
    await response.prepare(request)
    block = b"x" * (1024 * 1024)
    left = size
    while left > 0:
        piece = block[: min(left, len(block))]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events, one every `interval` seconds; the test checks that the
    first arrives long before the last is written."""
    count = int(request.query.get("n", "3"))
    interval = float(request.query.get("interval", "0.5"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(count):
        await response.write(f"data: event {i}\n\n".encode())
        await asyncio.sleep(interval)
    await response.write_eof()
    return response


async def websocket(request: web.Request) -> web.StreamResponse:
    recorder = request.app[RECORDER]
    recorder.seen.append(Seen("WS", request.raw_path, list(request.headers.items()), b"", 0))
    ws = web.WebSocketResponse(protocols=("chat", "superchat"))
    await ws.prepare(request)
    async for message in ws:
        if message.type is web.WSMsgType.TEXT:
            if message.data == "whoami":
                await ws.send_str(request.headers.get("X-OpenId", "<none>"))
            elif message.data == "close":
                await ws.close(code=4001, message=b"bye")
            else:
                await ws.send_str("echo:" + message.data)
        elif message.type is web.WSMsgType.BINARY:
            await ws.send_bytes(message.data[::-1])
    return ws


def create_upstream_app() -> web.Application:
    app = web.Application(client_max_size=1024**4)
    app[RECORDER] = Recorder()
    app.router.add_get("/ws", websocket)
    app.router.add_get("/api/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", reflect)
    return app
