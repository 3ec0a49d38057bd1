"""The gateway's memory while 1 GiB streams through it, each way.

Starts a sink/source upstream and one gateway worker, measures the worker's RSS
idle, then its peak RSS (VmHWM) across a 1 GiB upload and a 1 GiB download.

    python -m bench.stream_rss [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web

from bench.common import free_port, rss_kib, start, stop, wait_http
from gateway.auth.tokens import TokenCodec
from gateway.config import Secret, TokenConfig

SECRET = "bench-token-secret-0123456789abcdef0123456789"
BLOCK = b"x" * (1024 * 1024)


async def sink(request: web.Request) -> web.Response:
    size = 0
    async for chunk in request.content.iter_chunked(1 << 20):
        size += len(chunk)
    return web.json_response({"received": size})


async def source(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    response = web.StreamResponse()
    response.content_length = size
    await response.prepare(request)
    for _ in range(size // len(BLOCK)):
        await response.write(BLOCK)
    await response.write_eof()
    return response


async def run(size_mib: int) -> None:
    app = web.Application(client_max_size=1 << 40)
    app.router.add_post("/up", sink)
    app.router.add_get("/down", source)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    up_port, gw_port = free_port(), free_port()
    await web.TCPSite(runner, "127.0.0.1", up_port).start()
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "server": {"host": "127.0.0.1", "port": gw_port},
            "wechat": {"appid": "wxbench", "secret": "x", "fake": True},
            "token": {"secret": SECRET},
            "storage": {"url": f"sqlite:///{tmp}/rss.db"},
            "routes": [
                {"prefix": "/", "upstream": f"http://127.0.0.1:{up_port}", "max_body": "2GiB"}
            ],
        }
        Path(tmp, "rss.yaml").write_text(yaml.safe_dump(config))
        gateway = start(["run", "-c", f"{tmp}/rss.yaml"])
        try:
            await asyncio.to_thread(wait_http, f"http://127.0.0.1:{gw_port}/healthz")
            await asyncio.sleep(1)
            idle = rss_kib(gateway.pid)
            token = TokenCodec(TokenConfig(secret=Secret(SECRET)), ["wxbench"]).issue(
                "o-rss", None, time.time()
            )[0]
            headers = {"Authorization": f"Bearer {token}"}
            base = f"http://127.0.0.1:{gw_port}"

            async def body() -> AsyncIterator[bytes]:
                for _ in range(size_mib):
                    yield BLOCK

            async with aiohttp.ClientSession() as http:
                started = time.monotonic()
                async with http.post(base + "/up", data=body(), headers=headers) as resp:
                    received = (await resp.json())["received"]
                up_s = time.monotonic() - started
                peak_up = rss_kib(gateway.pid, "VmHWM")
                started = time.monotonic()
                got = 0
                async with http.get(base + f"/down?size={size_mib << 20}", headers=headers) as resp:
                    async for chunk in resp.content.iter_chunked(1 << 20):
                        got += len(chunk)
                down_s = time.monotonic() - started
                peak_down = rss_kib(gateway.pid, "VmHWM")
        finally:
            stop(gateway)
    await runner.cleanup()
    assert received == got == size_mib << 20, (received, got)
    print(f"gateway RSS idle: {idle / 1024:.1f} MiB")
    print(
        f"peak RSS after {size_mib} MiB upload (chunked): {peak_up / 1024:.1f} MiB, {size_mib / up_s:.0f} MiB/s"
    )
    print(
        f"peak RSS after {size_mib} MiB download: {peak_down / 1024:.1f} MiB, {size_mib / down_s:.0f} MiB/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mib", type=int, default=1024)
    asyncio.run(run(parser.parse_args().size_mib))


if __name__ == "__main__":
    main()
