"""The hot-path upstream client: keep-alive reuse, and the one retry it allows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.conftest import StartGateway


class RawUpstream:
    """A raw HTTP/1.1 upstream on loopback: ``handle`` serves each connection."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serving(self) -> AsyncIterator[None]:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        yield
        self.server.close()
        for writer in self.writers:
            writer.close()
        await asyncio.sleep(0.1)  # let closing handlers finish
        await self.server.wait_closed()


class ClosingUpstream(RawUpstream):
    """Answers each connection's first request with a keep-alive response and then
    closes the connection after `linger` seconds, like a backend whose keep-alive
    timeout is shorter than the gateway's."""

    def __init__(self, linger: float) -> None:
        super().__init__()
        self.linger = linger
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(self.linger)
        writer.close()


@pytest.fixture
async def closing_upstream() -> AsyncIterator[ClosingUpstream]:
    upstream = ClosingUpstream(linger=0.05)
    async for _ in upstream.serving():
        yield upstream


async def test_keep_alive_connections_are_reused(start_gateway: StartGateway) -> None:
    connections = 0
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections, served
        connections += 1
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            served += 1
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        gw = await start_gateway(routes=[{"prefix": "/k/", "upstream": url, "auth": "public"}])
        async with aiohttp.ClientSession() as http:
            for _ in range(10):
                async with http.get(gw.url + "/k/x") as resp:
                    assert resp.status == 200 and await resp.read() == b"ok"
        assert served == 10
        assert connections == 1  # sequential requests share one pooled connection
    finally:
        server.close()
        await gw.listener.stop()
        await server.wait_closed()


async def test_idle_connection_closed_by_upstream_is_retried_for_get(
    start_gateway: StartGateway, closing_upstream: ClosingUpstream
) -> None:
    gw = await start_gateway(
        routes=[{"prefix": "/c/", "upstream": closing_upstream.url, "auth": "public"}]
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/c/one") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
        await asyncio.sleep(0.3)  # the upstream has closed the pooled connection by now
        async with http.get(gw.url + "/c/two") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
    assert closing_upstream.connections == 2
    assert [r.split(b" ")[1] for r in closing_upstream.requests] == [b"/c/one", b"/c/two"]


async def test_post_on_a_connection_closed_by_upstream_is_not_retried(
    start_gateway: StartGateway, closing_upstream: ClosingUpstream
) -> None:
    closing_upstream.linger = 0.0  # close right after each response
    gw = await start_gateway(
        routes=[{"prefix": "/c/", "upstream": closing_upstream.url, "auth": "public"}]
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/c/one") as resp:
            assert resp.status == 200
            await resp.read()
        await asyncio.sleep(0.2)
        async with http.post(gw.url + "/c/two", data=b"payload") as resp:
            status = resp.status
            body = await resp.json() if status != 200 else None
    # Either the pool noticed the close before reusing (a fresh connection, 200),
    # or the POST failed as 502 — but it was never sent twice.
    posts = [r for r in closing_upstream.requests if r.startswith(b"POST")]
    assert len(posts) <= 1
    if status != 200:
        assert status == 502 and body is not None and body["error"] == "upstream_unavailable"


class KeepAliveUpstream(RawUpstream):
    """Keeps every connection open for as long as the client does, and records
    when the client (the gateway) closes one."""

    def __init__(self) -> None:
        super().__init__()
        self.opened: list[float] = []
        self.closed: list[float] = []  # the loop time of each EOF from the gateway

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        self.opened.append(loop.time())
        self.writers.append(writer)
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        self.closed.append(loop.time())
        writer.close()


@pytest.fixture
async def keepalive_upstream() -> AsyncIterator[KeepAliveUpstream]:
    upstream = KeepAliveUpstream()
    async for _ in upstream.serving():
        yield upstream


async def test_an_idle_upstream_connection_is_closed_after_upstream_idle_timeout(
    start_gateway: StartGateway, keepalive_upstream: KeepAliveUpstream
) -> None:
    gw = await start_gateway(
        server={"upstream_idle_timeout": "600ms"},
        routes=[{"prefix": "/k/", "upstream": keepalive_upstream.url, "auth": "public"}],
    )
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/k/one") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
        answered = loop.time()
        for _ in range(40):  # the gateway, not the upstream, ends the idle connection
            if keepalive_upstream.closed:
                break
            await asyncio.sleep(0.05)
        assert len(keepalive_upstream.closed) == 1, "the idle connection was never closed"
        idle = keepalive_upstream.closed[0] - answered
        assert 0.25 <= idle <= 1.0, idle  # between half and all of 600 ms, plus slack
        # The next request opens a new connection and is served.
        async with http.get(gw.url + "/k/two") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
    assert len(keepalive_upstream.opened) == 2


async def test_an_upstream_connection_in_steady_use_is_kept(
    start_gateway: StartGateway, keepalive_upstream: KeepAliveUpstream
) -> None:
    gw = await start_gateway(
        server={"upstream_idle_timeout": "400ms"},
        routes=[{"prefix": "/k/", "upstream": keepalive_upstream.url, "auth": "public"}],
    )
    async with aiohttp.ClientSession() as http:
        for _ in range(12):  # 1.2 s of requests, each well within the idle timeout
            async with http.get(gw.url + "/k/x") as resp:
                assert resp.status == 200 and await resp.read() == b"ok"
            await asyncio.sleep(0.1)
    # Three idle timeouts passed, but the connection never sat idle that long.
    assert len(keepalive_upstream.opened) == 1
    assert keepalive_upstream.closed == []
