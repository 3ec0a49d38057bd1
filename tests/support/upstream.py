"""A reflecting upstream for tests: a real aiohttp server that records every
request it receives and answers with a description of it, plus a few special
paths for streaming, SSE, slow answers, cookies and WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.headers import HeaderLines


@dataclass
class Seen(HeaderLines):
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes
    body_size: int

    def header_names(self) -> list[str]:
        return [k for k, _ in self.headers]


@dataclass
class Recorder:
    seen: list[Seen] = field(default_factory=list)
    # Gated event streams (/events?gated=1): event i+1 is written once the test
    # sets gates[i], after it has read event i at the client.
    gates: defaultdict[int, asyncio.Event] = field(
        default_factory=lambda: defaultdict(asyncio.Event)
    )

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
    """`n` server-sent events, one every `interval` seconds; with `gated=1`, each
    after the test has seen the one before (so a gateway that held events back
    until the end would never deliver the first: no timing involved)."""
    recorder = request.app[RECORDER]
    count = int(request.query.get("n", "3"))
    interval = float(request.query.get("interval", "0.5"))
    gated = request.query.get("gated") == "1"
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    pieces = [f"data: event {i}\n\n".encode() for i in range(count)]
    await write_paced(response, pieces, interval, recorder.gates if gated else None)
    await response.write_eof()
    return response


Gates = Sequence[asyncio.Event] | defaultdict[int, asyncio.Event]


async def write_paced(
    response: web.StreamResponse, pieces: Sequence[bytes], interval: float, gates: Gates | None
) -> None:
    """Write ``pieces`` one at a time: ``interval`` seconds apart or, with
    ``gates``, piece i+1 once the test has set ``gates[i]`` (having seen piece i
    at the client: a gateway holding pieces back then never delivers the first)."""
    for i, piece in enumerate(pieces):
        if gates is not None and i:
            await asyncio.wait_for(gates[i - 1].wait(), 60)
        await response.write(piece)
        if gates is None:
            await asyncio.sleep(interval)


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


@contextlib.asynccontextmanager
async def served(app: web.Application, **kwargs: Any) -> AsyncIterator[TestServer]:
    """``app`` as a real server on a loopback port, for the length of the block."""
    server = TestServer(app, host="127.0.0.1", **kwargs)
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()
