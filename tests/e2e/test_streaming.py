"""Streaming through `gateway run` as a real subprocess, so its memory can be
measured alone: 1 GiB each way with the peak RSS bounded, chunked and SSE
responses passed on as written, and WebSocket relays.

Every gateway here is a fresh process, so its VmHWM (peak resident set) covers
exactly one transfer. Run with `pytest -s` to see the measured peaks.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.auth.tokens import TokenCodec
from gateway.config import build_config
from tests.support.gateway import base_config, url_of
from tests.support.procs import GatewayProcess, peak_rss_kib, rss_kib
from tests.support.procs import spawn as spawn_process
from tests.support.upstream import Recorder, served, write_paced

GIB = 1024**3
MIB = 1024**2
RSS_LIMIT_MIB = 150
# Generous bound for one read in the streaming tests: a gateway that buffered a
# gated stream would never deliver the next piece, so this only catches hangs.
READ_WAIT = 20.0
# No overall deadline for a 1 GiB transfer (shared machines can be slow); a read
# that stalls this long means the transfer is stuck.
TRANSFER_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_read=120)


# -- an auxiliary upstream for behaviours tests/support/upstream.py does not offer ------------


@dataclass
class Aux:
    """State shared between the test and the auxiliary upstream's handlers."""

    gates: list[asyncio.Event] = field(default_factory=lambda: [asyncio.Event() for _ in range(3)])
    ws_closed: asyncio.Event = field(default_factory=asyncio.Event)
    ws_close_code: int | None = None
    ws_messages: list[str | bytes] = field(default_factory=list)


AUX = web.AppKey("aux", Aux)


async def gated_stream(request: web.Request) -> web.StreamResponse:
    """Four pieces of a chunked body; piece i+1 is written only once the test has
    seen piece i at the client (so a buffering gateway deadlocks this stream)."""
    aux = request.app[AUX]
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    await write_paced(response, [f"part-{i}\n".encode() for i in range(4)], 0, aux.gates)
    await response.write_eof()
    return response


async def recording_ws(request: web.Request) -> web.StreamResponse:
    """Echo, and record how the connection was closed from the other side."""
    aux = request.app[AUX]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        aux.ws_messages.append(message.data)
        if message.type is web.WSMsgType.TEXT:
            await ws.send_str(message.data)
    aux.ws_close_code = ws.close_code
    aux.ws_closed.set()
    return ws


@pytest.fixture
async def aux_upstream() -> AsyncIterator[tuple[TestServer, Aux]]:
    app = web.Application()
    app[AUX] = aux = Aux()
    app.router.add_get("/x/gated", gated_stream)
    app.router.add_get("/x/wsrec", recording_ws)
    async with served(app) as server:
        yield server, aux
        for gate in aux.gates:
            gate.set()


# -- the gateway as a subprocess ---------------------------------------------------------


@dataclass
class GatewayProc:
    url: str
    process: GatewayProcess
    codec: TokenCodec

    @property
    def pid(self) -> int:
        return self.process.pid

    def auth(self, openid: str = "o-stream") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.codec.issue(openid, None, time.time())[0]}"}

    def peak_mib(self) -> float:
        return peak_rss_kib(self.pid) / 1024

    def rss_mib(self) -> float:
        return rss_kib(self.pid) / 1024


SpawnGateway = Callable[..., Awaitable[GatewayProc]]


@pytest.fixture
async def spawn(
    tmp_path: Path, upstream: TestServer, aux_upstream: tuple[TestServer, Aux]
) -> AsyncIterator[SpawnGateway]:
    """Start `python -m gateway run -c <yaml>`; `api` overrides keys of the /api/ route."""
    started: list[GatewayProcess] = []
    aux_server, _ = aux_upstream

    async def start(**api: Any) -> GatewayProc:
        # No test here logs in: the WeChat base only has to be a valid URL.
        raw = base_config(tmp_path, url_of(upstream), "http://127.0.0.1:9")
        raw["server"]["shutdown_grace"] = "1s"
        raw["routes"][0].update(api)
        raw["routes"].append(
            {"prefix": "/x/", "upstream": url_of(aux_server), "auth": "public", "websocket": True}
        )
        process = await spawn_process(tmp_path, raw, name=f"gateway-{len(started)}")
        started.append(process)
        return GatewayProc(process.url, process, TokenCodec.for_config(build_config(raw, env={})))

    yield start
    for process in started:
        code = await asyncio.to_thread(process.stop)
        assert code == 0, process.output()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False, timeout=TRANSFER_TIMEOUT) as session:
        yield session


# -- 1 GiB each way, memory bounded ---------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_1gib_upload_streams_with_bounded_memory(
    spawn: SpawnGateway, http: aiohttp.ClientSession, seen: Recorder, framing: str
) -> None:
    gw = await spawn(max_body="2GiB")
    idle = gw.rss_mib()
    base = os.urandom(MIB)
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        # Each MiB is numbered, so a lost, repeated or reordered block changes the hash.
        for i in range(GIB // MIB):
            block = i.to_bytes(8, "big") + base[8:]
            sent.update(block)
            yield block

    headers = gw.auth()
    if framing == "content-length":
        headers["Content-Length"] = str(GIB)
    async with http.post(gw.url + "/api/upload", data=body(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    peak = gw.peak_mib()
    print(f"\n1 GiB upload ({framing}): gateway idle RSS {idle:.1f} MiB, peak RSS {peak:.1f} MiB")
    assert answer["body_size"] == GIB
    assert answer["body_sha256"] == sent.hexdigest()
    assert seen.last.body_size == GIB
    if framing == "content-length":
        assert seen.last.header("Content-Length") == str(GIB)
        assert seen.last.header("Transfer-Encoding") is None
    else:
        assert seen.last.header("Content-Length") is None
        assert seen.last.header("Transfer-Encoding") == "chunked"
    assert peak < RSS_LIMIT_MIB, (
        f"gateway peak RSS {peak:.1f} MiB during a 1 GiB {framing} upload (limit {RSS_LIMIT_MIB})"
    )


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_1gib_download_streams_with_bounded_memory(
    spawn: SpawnGateway, http: aiohttp.ClientSession, framing: str
) -> None:
    gw = await spawn()
    idle = gw.rss_mib()
    query = f"size={GIB}" + ("&chunked=1" if framing == "chunked" else "")
    got = 0
    async with http.get(gw.url + "/api/download?" + query, headers=gw.auth()) as resp:
        assert resp.status == 200
        if framing == "chunked":
            assert "Content-Length" not in resp.headers
            assert resp.headers.get("Transfer-Encoding") == "chunked"
        else:
            assert resp.headers["Content-Length"] == str(GIB)
        async for chunk in resp.content.iter_chunked(MIB):
            # The upstream sends b"x" only; count them without keeping anything.
            assert chunk.count(b"x") == len(chunk)
            got += len(chunk)
    peak = gw.peak_mib()
    print(f"\n1 GiB download ({framing}): gateway idle RSS {idle:.1f} MiB, peak RSS {peak:.1f} MiB")
    assert got == GIB
    assert peak < RSS_LIMIT_MIB, (
        f"gateway peak RSS {peak:.1f} MiB during a 1 GiB {framing} download (limit {RSS_LIMIT_MIB})"
    )


# -- chunked and server-sent events, as written ----------------------------------------------


async def test_chunked_response_pieces_reach_the_client_as_written(
    spawn: SpawnGateway, http: aiohttp.ClientSession, aux_upstream: tuple[TestServer, Aux]
) -> None:
    """The upstream writes piece i+1 only after the client has received piece i:
    a gateway that waits for more bytes (or for the end) before passing them on
    never delivers the first piece."""
    _, aux = aux_upstream
    gw = await spawn()
    async with http.get(gw.url + "/x/gated") as resp:
        assert resp.status == 200
        assert "Content-Length" not in resp.headers
        assert resp.headers.get("Transfer-Encoding") == "chunked"
        for i in range(4):
            line = await asyncio.wait_for(resp.content.readline(), READ_WAIT)
            assert line == f"part-{i}\n".encode()
            if i < 3:
                assert not resp.content.at_eof()
                aux.gates[i].set()
        assert await resp.read() == b""


async def test_sse_events_arrive_before_the_stream_ends(
    spawn: SpawnGateway, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    gw = await spawn()
    # Gated: the upstream writes event i+1 only once the client has read event i,
    # so a gateway that held events back until the stream ended would deliver none.
    async with http.get(gw.url + "/public/events?n=3&gated=1") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        lines = []
        for i in range(3):
            for _ in range(2):  # "data: event i", then the blank line that ends it
                lines.append(await asyncio.wait_for(resp.content.readline(), READ_WAIT))
            seen.gates[i].set()
        assert await resp.read() == b""
    assert lines == [
        b"data: event 0\n",
        b"\n",
        b"data: event 1\n",
        b"\n",
        b"data: event 2\n",
        b"\n",
    ]
    assert seen.seen == []  # /events is served without being recorded


# -- WebSocket relays ------------------------------------------------------------------------


async def test_websocket_text_and_binary_echo_with_identity(
    spawn: SpawnGateway, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    gw = await spawn()
    async with http.ws_connect(
        gw.url + "/api/ws", headers={**gw.auth("o-ws-sub"), "X-OpenId": "forged"}
    ) as ws:
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=READ_WAIT) == "echo:hello"
        await ws.send_str("ünïcødé ✓")
        assert await ws.receive_str(timeout=READ_WAIT) == "echo:ünïcødé ✓"
        await ws.send_bytes(b"\x00\x01\x02\xff")
        assert await ws.receive_bytes(timeout=READ_WAIT) == b"\xff\x02\x01\x00"
        await ws.send_str("whoami")
        assert await ws.receive_str(timeout=READ_WAIT) == "o-ws-sub"
    assert seen.last.method == "WS"
    assert seen.last.raw_path == "/api/ws"
    assert [v for k, v in seen.last.headers if k.lower() == "x-openid"] == ["o-ws-sub"]
    assert seen.last.header("Authorization") is None


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (("chat",), "chat"),
        (("superchat", "chat"), "superchat"),
        (("unknown", "chat"), "chat"),
        (("unknown",), None),
        ((), None),
    ],
)
async def test_websocket_subprotocol_is_negotiated_by_the_upstream(
    spawn: SpawnGateway,
    http: aiohttp.ClientSession,
    seen: Recorder,
    offered: tuple[str, ...],
    chosen: str | None,
) -> None:
    gw = await spawn()
    async with http.ws_connect(gw.url + "/api/ws", headers=gw.auth(), protocols=offered) as ws:
        assert ws.protocol == chosen
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=READ_WAIT) == "echo:ping"
    # The upstream was offered exactly the client's list, in the client's order.
    forwarded = seen.last.header("Sec-WebSocket-Protocol")
    if offered:
        assert forwarded is not None
        assert [p.strip() for p in forwarded.split(",")] == list(offered)
    else:
        assert forwarded is None


async def test_websocket_upstream_close_code_reaches_the_client(
    spawn: SpawnGateway, http: aiohttp.ClientSession
) -> None:
    gw = await spawn()
    async with http.ws_connect(gw.url + "/api/ws", headers=gw.auth()) as ws:
        await ws.send_str("close")
        message = await ws.receive(timeout=READ_WAIT)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == 4001
        assert ws.close_code == 4001


async def test_websocket_large_binary_message(
    spawn: SpawnGateway, http: aiohttp.ClientSession
) -> None:
    gw = await spawn()
    payload = os.urandom(MIB)
    async with http.ws_connect(gw.url + "/api/ws", headers=gw.auth()) as ws:
        await ws.send_bytes(payload)
        assert await ws.receive_bytes(timeout=READ_WAIT) == payload[::-1]
        # The relay still works after the big frame.
        await ws.send_str("after")
        assert await ws.receive_str(timeout=READ_WAIT) == "echo:after"


async def test_websocket_client_close_reaches_the_upstream(
    spawn: SpawnGateway, http: aiohttp.ClientSession, aux_upstream: tuple[TestServer, Aux]
) -> None:
    _, aux = aux_upstream
    gw = await spawn()
    ws = await http.ws_connect(gw.url + "/x/wsrec")
    try:
        await ws.send_str("one")
        assert await ws.receive_str(timeout=READ_WAIT) == "one"
        await ws.send_bytes(b"two")
        await ws.close(code=4321, message=b"client done")
    finally:
        await ws.close()
    await asyncio.wait_for(aux.ws_closed.wait(), READ_WAIT)
    assert aux.ws_messages == ["one", b"two"]
    assert aux.ws_close_code == 4321
    # The client's close handshake completed (aiohttp answers a close with 1000,
    # as a direct connection to an aiohttp upstream would; RFC 6455 leaves it open).
    assert ws.closed


async def test_websocket_on_a_route_without_websocket_is_400(
    spawn: SpawnGateway, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    gw = await spawn()
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(gw.url + "/public/ws")
    assert info.value.status == 400
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with http.get(gw.url + "/public/ws", headers=headers) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        assert (await resp.json())["error"] == "bad_request"
    assert seen.seen == []
