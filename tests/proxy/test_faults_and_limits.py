"""Upstream faults, balancing, body limits and bounded memory for 1 GiB streams."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.conftest import StartGateway, base_config, free_port
from tests.support.procs import GatewayProcess, peak_rss_kib, wait_healthy, write_config
from tests.support.upstream import RECORDER, Recorder, create_upstream_app


async def test_refused_upstream_is_502(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        routes=[{"prefix": "/d/", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "public"}]
    )
    async with http.get(gw.url + "/d/x") as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream_unavailable"


async def test_slow_upstream_is_504_at_the_route_timeout(
    start_gateway: StartGateway, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    url = str(upstream.make_url("")).rstrip("/")
    gw = await start_gateway(
        routes=[{"prefix": "/s/", "upstream": url, "auth": "public", "timeout": "0.5s"}]
    )
    started = time.monotonic()
    async with http.get(gw.url + "/s/slow?delay=3") as resp:
        assert resp.status == 504
        assert (await resp.json())["error"] == "upstream_timeout"
    assert time.monotonic() - started < 2.5


async def test_round_robin_skips_a_dead_target(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    servers = [TestServer(create_upstream_app(), host="127.0.0.1") for _ in range(2)]
    for server in servers:
        await server.start_server()
    try:
        dead = f"http://127.0.0.1:{free_port()}"
        urls = [str(s.make_url("")).rstrip("/") for s in servers]
        gw = await start_gateway(
            routes=[{"prefix": "/rr/", "upstream": [urls[0], dead, urls[1]], "auth": "public"}]
        )
        for i in range(12):
            async with http.post(gw.url + f"/rr/{i}", data=b"body-%d" % i) as resp:
                assert resp.status == 200
        counts = [len(s.app[RECORDER].seen) for s in servers]
        assert sum(counts) == 12 and min(counts) >= 4  # both live targets share the load
        bodies = sorted(seen.body for s in servers for seen in s.app[RECORDER].seen)
        assert bodies == sorted(b"body-%d" % i for i in range(12))  # no body lost to the dead one
    finally:
        for server in servers:
            await server.close()


async def test_strip_prefix_and_base_path(
    start_gateway: StartGateway, upstream: TestServer, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    url = str(upstream.make_url("")).rstrip("/")
    gw = await start_gateway(
        routes=[
            {"prefix": "/svc", "upstream": url, "auth": "public", "strip_prefix": True},
            {
                "prefix": "/based/",
                "upstream": url + "/base",
                "auth": "public",
                "strip_prefix": True,
            },
        ]
    )
    for path, expected in (("/svc/x?q=1", "/x?q=1"), ("/svc", "/"), ("/based/y", "/base/y")):
        async with http.get(gw.url + path) as resp:
            assert resp.status == 200
        assert seen.last.raw_path == expected


async def test_body_limits(
    start_gateway: StartGateway, upstream: TestServer, seen: Recorder, http: aiohttp.ClientSession
) -> None:
    url = str(upstream.make_url("")).rstrip("/")
    gw = await start_gateway(
        server={"max_body": 1000},
        routes=[
            {"prefix": "/small/", "upstream": url, "auth": "public"},
            {"prefix": "/big/", "upstream": url, "auth": "public", "max_body": 5000},
        ],
    )
    async with http.post(gw.url + "/small/x", data=b"a" * 1001) as resp:
        assert resp.status == 413 and (await resp.json())["error"] == "body_too_large"
    assert seen.seen == []  # a Content-Length over the limit is refused before anything is sent
    async with http.post(gw.url + "/big/x", data=b"a" * 4000) as resp:
        assert resp.status == 200

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(20):
            yield b"b" * 500

    async with http.post(gw.url + "/big/x", data=chunks()) as resp:
        assert resp.status == 413


async def test_one_gib_each_way_with_bounded_memory(
    tmp_path: Path, upstream: TestServer, wechat: TestServer
) -> None:
    """The gateway as its own process, so its peak RSS is its own."""
    port = free_port()
    raw = base_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), str(wechat.make_url("")).rstrip("/")
    )
    raw["server"]["port"] = port
    raw["routes"][2]["max_body"] = "2GiB"
    gateway = GatewayProcess(["run", "-c", str(write_config(tmp_path / "gw.yaml", raw))])
    url = f"http://127.0.0.1:{port}"
    gib = 1 << 30
    block = b"z" * (1 << 20)
    try:
        await asyncio.to_thread(wait_healthy, url, gateway.proc)

        async def body():  # type: ignore[no-untyped-def]
            for _ in range(gib // len(block)):
                yield block

        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/public/upload", data=body()) as resp:
                assert resp.status == 200
                assert (await resp.json())["body_size"] == gib
            received = 0
            async with http.get(url + f"/public/download?size={gib}") as resp:
                assert resp.status == 200 and resp.content_length == gib
                async for chunk in resp.content.iter_chunked(1 << 20):
                    received += len(chunk)
            assert received == gib
        peak_mib = peak_rss_kib(gateway.pid) / 1024
        print(f"gateway peak RSS over 1 GiB up + 1 GiB down: {peak_mib:.1f} MiB")
        assert peak_mib < 150, f"peak RSS {peak_mib:.1f} MiB"
    finally:
        assert gateway.stop() == 0, gateway.output()
