"""What the client gets when an upstream fails: nothing listening (502), slower
than the route timeout (504, also for a WebSocket handshake), stalling or
resetting mid-body (the client's connection is cut, never a complete-looking
answer), resetting before answering (502); and a client that vanishes
mid-download leaves the gateway working. Real servers on loopback.
(Round robin over dead targets: test_balancing.py; limits: test_body_limits.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.errors import error_of
from tests.support.gateway import Running, StartGateway, free_port, route, url_of
from tests.support.rawupstream import RawUpstream, RawUpstreams
from tests.support.upstream import Recorder
from tests.support.waiting import PROMPT, within

MIB = 1024 * 1024


async def test_refused_upstream_is_502_upstream_unavailable(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(routes=[route("/dead/", dead, websocket=True)])
    async with http.get(gw.url + "/dead/x", headers={"X-Request-Id": "req-dead-1"}) as resp:
        assert resp.status == 502
        assert await error_of(resp) == "upstream_unavailable"
        assert resp.headers["X-Request-Id"] == "req-dead-1"
    async with http.post(gw.url + "/dead/x", data=b"payload") as resp:
        assert resp.status == 502
        assert await error_of(resp) == "upstream_unavailable"
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(gw.url + "/dead/ws")
    assert info.value.status == 502


async def test_upstream_slower_than_route_timeout_is_504(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer, seen: Recorder
) -> None:
    gw = await start_gateway(routes=[route("/slow/", url_of(upstream), timeout="1s")])
    loop = asyncio.get_running_loop()
    for method in ("GET", "POST"):
        started = loop.time()
        async with http.request(method, gw.url + "/slow/slow?delay=5", data=b"b" * 10) as resp:
            elapsed = loop.time() - started
            assert resp.status == 504
            assert await error_of(resp) == "upstream_timeout"
        # The upstream had the request (it records before sleeping). The 504 itself
        # shows the gateway gave up before the upstream's answer at 5 s (that would
        # be its 200); a busy machine may delay it, but never make it early.
        assert seen.last.method == method and seen.last.raw_path == "/slow/slow?delay=5"
        assert elapsed >= 0.9, f"504 after {elapsed:.2f} s, before the 1 s route timeout"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("fault", ["stall", "reset"])
async def test_upstream_failing_mid_body_cuts_the_client_connection(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    raw_upstream: RawUpstreams,
    framing: str,
    fault: str,
) -> None:
    """The head (and part of the body) is out when the upstream stalls or drops:
    the client must see an incomplete response, promptly, never a complete one."""

    async def handler(up: RawUpstream, reader: asyncio.StreamReader, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"p" * 1000)
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"p" * 1000
            )
            writer.write(b"\r\n")
        await writer.drain()
        if fault == "stall":
            await up.release.wait()  # the teardown releases it; the gateway must not wait
        else:
            writer.transport.abort()

    up = await raw_upstream(handler)
    gw = await start_gateway(routes=[route("/stall/", up.url, timeout="1s")])
    received = b""

    async def read_until_cut() -> None:
        nonlocal received
        async with http.get(gw.url + "/stall/x") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                async for chunk in resp.content.iter_any():
                    received += chunk

    # Promptly: the stalled upstream is only released at teardown, so a gateway
    # that waited on it would never cut the client.
    await within(read_until_cut(), "the cut of a stalled or reset upstream's answer")
    if fault == "stall":
        assert received == b"p" * 1000
    else:
        # The reset can overtake the last bytes inside the gateway: a prefix, never more.
        assert received == b"p" * len(received) and len(received) <= 1000
    # The gateway itself is fine afterwards.
    async with http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200


async def test_upstream_reset_before_the_response_is_502(
    start_gateway: StartGateway, http: aiohttp.ClientSession, raw_upstream: RawUpstreams
) -> None:
    async def handler(up: RawUpstream, reader: asyncio.StreamReader, writer: Any) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.transport.abort()

    up = await raw_upstream(handler)
    gw = await start_gateway(routes=[route("/reset/", up.url)])
    for method in ("GET", "POST"):
        async with http.request(method, gw.url + "/reset/x", data=b"body") as resp:
            assert resp.status == 502
            assert await error_of(resp) == "upstream_unavailable"
    assert up.connections >= 2


async def test_websocket_handshake_slower_than_route_timeout_is_504(
    start_gateway: StartGateway, http: aiohttp.ClientSession, raw_upstream: RawUpstreams
) -> None:
    async def silent(
        up: RawUpstream, reader: asyncio.StreamReader, _: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await up.release.wait()  # accepts the connection, never answers the handshake

    up = await raw_upstream(silent)
    gw = await start_gateway(routes=[route("/ws/", up.url, websocket=True, timeout="800ms")])
    loop = asyncio.get_running_loop()
    started = loop.time()
    headers = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    # Bounded: before the fix the gateway never answered.
    async with http.get(
        gw.url + "/ws/x", headers=headers, timeout=aiohttp.ClientTimeout(total=PROMPT)
    ) as resp:
        elapsed = loop.time() - started
        assert resp.status == 504
        assert await error_of(resp) == "upstream_timeout"
    assert up.connections == 1
    # From the 800 ms route timeout: not before it, and nowhere near the next
    # timer that could answer (the 30 s default route timeout).
    assert 0.7 <= elapsed < 10.0, f"504 after {elapsed:.2f} s"


async def test_client_disconnecting_mid_download_leaves_the_gateway_working(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    for framing in ("", "&chunked=1"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
        writer.write(
            b"GET /public/download?size=%d%s HTTP/1.1\r\nHost: a\r\n\r\n"
            % (512 * MIB, framing.encode())
        )
        await writer.drain()
        got = 0
        while got < 2 * MIB:
            chunk = await asyncio.wait_for(reader.read(65536), PROMPT)
            assert chunk, "the download ended early"
            got += len(chunk)
        writer.transport.abort()  # gone mid-body, without a goodbye
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    # Later requests, on the same upstream pool, get whole and correct answers.
    for i in range(5):
        async with http.post(gw.url + f"/public/after/{i}", data=b"z" * 1000) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer["path"] == f"/public/after/{i}"
        assert answer["body_size"] == 1000
    async with http.get(gw.url + f"/public/download?size={8 * MIB}") as resp:
        assert resp.status == 200
        got = 0
        async for chunk in resp.content.iter_chunked(MIB):
            assert chunk.count(b"x") == len(chunk)
            got += len(chunk)
    assert got == 8 * MIB
    assert seen.last.raw_path == "/public/after/4"
