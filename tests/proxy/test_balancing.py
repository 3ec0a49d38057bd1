"""Round robin over a route's upstreams, and what a dead target costs: nothing.
A refused target is skipped (the request, body included, goes to the next one)
and left out of the rotation for 10 s. Real aiohttp upstreams on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.support.gateway import StartGateway, free_port, route, url_of
from tests.support.upstream import RECORDER, Recorder, create_upstream_app, served


@pytest.fixture
async def upstream_b() -> AsyncIterator[TestServer]:
    async with served(create_upstream_app()) as server:
        yield server


def which(before: tuple[int, int], a: Recorder, b: Recorder) -> str:
    grew = (len(a.seen) - before[0], len(b.seen) - before[1])
    assert grew in ((1, 0), (0, 1)), f"one request reached {grew} upstreams"
    return "A" if grew == (1, 0) else "B"


async def test_round_robin_alternates_between_upstreams(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: TestServer,
    upstream_b: TestServer,
    seen: Recorder,
) -> None:
    seen_b = upstream_b.app[RECORDER]
    gw = await start_gateway(routes=[route("/rr/", [url_of(upstream), url_of(upstream_b)])])
    order = []
    for i in range(8):
        before = (len(seen.seen), len(seen_b.seen))
        async with http.post(gw.url + f"/rr/item/{i}", data=f"body-{i}".encode()) as resp:
            assert resp.status == 200
            assert (await resp.json())["path"] == f"/rr/item/{i}"
        order.append(which(before, seen, seen_b))
    assert order in (["A", "B"] * 4, ["B", "A"] * 4), order
    bodies = sorted(s.body for s in seen.seen + seen_b.seen)
    assert bodies == sorted(f"body-{i}".encode() for i in range(8))


async def test_dead_target_among_live_ones_is_skipped(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: TestServer,
    upstream_b: TestServer,
    seen: Recorder,
) -> None:
    seen_b = upstream_b.app[RECORDER]
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(routes=[route("/rr/", [url_of(upstream), dead, url_of(upstream_b)])])
    for i in range(12):
        async with http.post(gw.url + f"/rr/{i}", data=b"body-%d" % i) as resp:
            assert resp.status == 200, await resp.text()
    counts = [len(seen.seen), len(seen_b.seen)]
    assert sum(counts) == 12 and min(counts) >= 4  # both live targets share the load
    bodies = sorted(s.body for s in seen.seen + seen_b.seen)
    assert bodies == sorted(b"body-%d" % i for i in range(12))  # no body lost to the dead one


async def test_dead_target_is_not_retried_for_10_seconds(
    start_gateway: StartGateway, http: aiohttp.ClientSession, upstream: TestServer, seen: Recorder
) -> None:
    """[dead, alive]: every request succeeds. The dead port then comes to life,
    counting what it receives: within 10 s of the refusal the gateway sends it
    nothing; after the 10 s it is back in the rotation."""
    dead_port = free_port()
    gw = await start_gateway(
        routes=[route("/rr/", [f"http://127.0.0.1:{dead_port}", url_of(upstream)])]
    )
    for i in range(6):
        async with http.get(gw.url + f"/rr/first/{i}") as resp:
            assert resp.status == 200, await resp.text()
    refused_by = time.monotonic()  # every refusal happened before this instant
    assert len(seen.seen) == 6
    revived = TestServer(create_upstream_app(), host="127.0.0.1", port=dead_port)
    await revived.start_server()
    try:
        seen_revived = revived.app[RECORDER]
        for i in range(10):
            async with http.get(gw.url + f"/rr/second/{i}") as resp:
                assert resp.status == 200
        within = time.monotonic() - refused_by
        if within < 9.0:  # on a machine slow enough to pass 10 s, there is nothing to check
            assert seen_revived.seen == [], "the dead target was retried within 10 s"
            assert len(seen.seen) == 16
        await asyncio.sleep(max(0.0, refused_by + 10.5 - time.monotonic()))
        for i in range(4):
            async with http.get(gw.url + f"/rr/third/{i}") as resp:
                assert resp.status == 200
        assert [s.raw_path for s in seen_revived.seen][:1] in (["/rr/third/0"], ["/rr/third/1"])
        assert len(seen_revived.seen) == 2  # back in the alternation
    finally:
        await revived.close()


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_post_body_is_not_lost_when_the_first_target_refuses(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    upstream: TestServer,
    seen: Recorder,
    framing: str,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = await start_gateway(routes=[route("/rr/", [dead, url_of(upstream)])])
    blocks = [i.to_bytes(4, "big") + os.urandom(256 * 1024 - 4) for i in range(12)]
    payload = b"".join(blocks)

    async def gen() -> AsyncIterator[bytes]:
        for block in blocks:
            yield block

    data: Any = io.BytesIO(payload) if framing == "content-length" else gen()
    # The first request of a fresh gateway goes to the first target: the dead one.
    async with http.post(gw.url + "/rr/upload", data=data) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer["body_size"] == len(payload)
    assert answer["body_sha256"] == hashlib.sha256(payload).hexdigest()
    assert len(seen.seen) == 1
    if framing == "chunked":
        assert seen.last.header("Transfer-Encoding") == "chunked"
    else:
        assert seen.last.header("Content-Length") == str(len(payload))
