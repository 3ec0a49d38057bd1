"""The hot-path upstream client: keep-alive reuse, idle connections closed after
`server.upstream_idle_timeout`, and the one retry it allows."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.support.gateway import StartGateway, route
from tests.support.rawupstream import RawUpstream, RawUpstreams, ok
from tests.support.waiting import until


class Served:
    """What a raw upstream saw: each request's head, and when (loop time) each of
    its connections opened and was closed by the gateway."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.opened: list[float] = []
        self.closed: list[float] = []


def keep_alive(served: Served) -> Any:
    """Answer every request on a connection for as long as the gateway keeps it."""

    async def handler(_: RawUpstream, reader: asyncio.StreamReader, writer: Any) -> None:
        loop = asyncio.get_running_loop()
        served.opened.append(loop.time())
        while True:
            try:
                served.requests.append(await reader.readuntil(b"\r\n\r\n"))
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(ok(b"ok"))
            await writer.drain()
        served.closed.append(loop.time())

    return handler


def one_answer_then_close(served: Served, linger: float) -> Any:
    """Answer a connection's first request with a keep-alive response, then close
    it after ``linger`` seconds: a backend whose keep-alive timeout is shorter
    than the gateway's."""

    async def handler(_: RawUpstream, reader: asyncio.StreamReader, writer: Any) -> None:
        served.requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(ok(b"ok"))
        await writer.drain()
        await asyncio.sleep(linger)

    return handler


async def test_keep_alive_connections_are_reused(
    start_gateway: StartGateway, raw_upstream: RawUpstreams
) -> None:
    served = Served()
    up = await raw_upstream(keep_alive(served))
    gw = await start_gateway(routes=[route("/k/", up.url)])
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            async with http.get(gw.url + "/k/x") as resp:
                assert resp.status == 200 and await resp.read() == b"ok"
    assert len(served.requests) == 10
    assert up.connections == 1  # sequential requests share one pooled connection


async def test_idle_connection_closed_by_upstream_is_retried_for_get(
    start_gateway: StartGateway, raw_upstream: RawUpstreams
) -> None:
    served = Served()
    up = await raw_upstream(one_answer_then_close(served, linger=0.05))
    gw = await start_gateway(routes=[route("/c/", up.url)])
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/c/one") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
        # The upstream has closed the pooled connection.
        await until(lambda: up.open == 0, "the upstream closing its connection")
        async with http.get(gw.url + "/c/two") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
    assert up.connections == 2
    assert [r.split(b" ")[1] for r in served.requests] == [b"/c/one", b"/c/two"]


async def test_post_on_a_connection_closed_by_upstream_is_not_retried(
    start_gateway: StartGateway, raw_upstream: RawUpstreams
) -> None:
    served = Served()
    up = await raw_upstream(one_answer_then_close(served, linger=0.0))  # close at once
    gw = await start_gateway(routes=[route("/c/", up.url)])
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/c/one") as resp:
            assert resp.status == 200
            await resp.read()
        await until(lambda: up.open == 0, "the upstream closing its connection")
        async with http.post(gw.url + "/c/two", data=b"payload") as resp:
            status = resp.status
            body = await resp.json() if status != 200 else None
    # Either the pool noticed the close before reusing (a fresh connection, 200),
    # or the POST failed as 502 — but it was never sent twice.
    posts = [r for r in served.requests if r.startswith(b"POST")]
    assert len(posts) <= 1
    if status != 200:
        assert status == 502 and body is not None and body["error"] == "upstream_unavailable"


async def test_an_idle_upstream_connection_is_closed_after_upstream_idle_timeout(
    start_gateway: StartGateway, raw_upstream: RawUpstreams
) -> None:
    served = Served()
    up = await raw_upstream(keep_alive(served))
    gw = await start_gateway(
        server={"upstream_idle_timeout": "600ms"}, routes=[route("/k/", up.url)]
    )
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/k/one") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
        answered = loop.time()
        # The gateway, not the upstream, ends the idle connection.
        await until(lambda: bool(served.closed), "the idle connection being closed")
        idle = served.closed[0] - answered
        # Between half and all of 600 ms plus slack for a busy machine, and well
        # before the 4 s default would have closed it.
        assert 0.25 <= idle < 3.0, idle
        # The next request opens a new connection and is served.
        async with http.get(gw.url + "/k/two") as resp:
            assert resp.status == 200 and await resp.read() == b"ok"
    assert len(served.opened) == 2


async def test_an_upstream_connection_in_steady_use_is_kept(
    start_gateway: StartGateway, raw_upstream: RawUpstreams
) -> None:
    served = Served()
    up = await raw_upstream(keep_alive(served))
    gw = await start_gateway(server={"upstream_idle_timeout": "1s"}, routes=[route("/k/", up.url)])
    async with aiohttp.ClientSession() as http:
        # About 3 s of requests, 0.1 s apart: a gap would have to stretch tenfold
        # on a busy machine before the connection sat idle for the timeout.
        for _ in range(30):
            async with http.get(gw.url + "/k/x") as resp:
                assert resp.status == 200 and await resp.read() == b"ok"
            await asyncio.sleep(0.1)
    # Three idle timeouts passed, but the connection never sat idle that long.
    assert len(served.opened) == 1
    assert served.closed == []
