"""How exact a route ``rate_limit`` is across instances (issue 16): N ``gateway run``
processes on one real redis-server, a public route with ``rate_limit: 100/s``,
hammered evenly (every client connection sends to each instance in turn), all
from one client address, so every request spends the same budget.

Each answer is put in the wall-clock second it came back in (the limiter's
windows are wall-clock seconds); the first and last seconds are partial and
dropped. Printed: passes (200) per second, mean / min / max / p5 / p95, and what
was asked. ``--store sqlite`` runs the same with one SQLite file, where each
process counts on its own (the rate times the processes is the expected answer).

Everything shares this machine's cores (on a 2-core machine the instances, Redis
and the load generator compete), which changes how many requests are asked,
not what passes.

    python -m bench.ratelimit_cluster [--instances 3] [--workers 1] [--rate 100/s]
                                      [--seconds 10] [--connections 24] [--store redis]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.gateway import base_config, free_port
from tests.support.procs import GatewayProcess, write_config
from tests.support.redis import RedisServer


async def upstream() -> tuple[web.AppRunner, str]:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def instance_config(
    directory: Path, name: str, upstream_url: str, store_url: str, rate: str, workers: int
) -> tuple[Path, int]:
    raw = base_config(directory, upstream_url, "http://127.0.0.1:9")
    port = free_port()
    raw["server"].update({"port": port, "workers": workers})
    raw["wechat"]["fake"] = True
    raw["storage"] = {"url": store_url, "prefix": "bench:"}
    raw["routes"] = [
        {"prefix": "/limited/", "upstream": upstream_url, "auth": "public", "rate_limit": rate}
    ]
    return write_config(directory / f"{name}.yaml", raw), port


async def hammer(urls: list[str], seconds: float, connections: int) -> dict[int, Counter[int]]:
    """Answers per wall-clock second: {second: {status: count}}."""
    per_second: dict[int, Counter[int]] = defaultdict(Counter)
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client(offset: int) -> None:
            # Each connection goes round the instances, starting at its own.
            for url in itertools.islice(itertools.cycle(urls), offset, None):
                if time.monotonic() > deadline:
                    return
                async with http.get(url) as resp:
                    await resp.read()
                    per_second[int(time.time())][resp.status] += 1

        await asyncio.gather(*(client(n % len(urls)) for n in range(connections)))
    return per_second


def report(per_second: dict[int, Counter[int]], rate: str, instances: int, workers: int) -> None:
    seconds = sorted(per_second)[1:-1]  # the first and last are partial
    passed = [per_second[s][200] for s in seconds]
    asked = [sum(per_second[s].values()) for s in seconds]
    others = Counter[int]()
    for s in seconds:
        others.update({k: v for k, v in per_second[s].items() if k not in (200, 429)})
    cuts = (
        statistics.quantiles(passed, n=20, method="inclusive")
        if len(passed) >= 2
        else [passed[0]] * 19
    )
    print(
        f"{instances} instances x {workers} workers, rate_limit {rate}, "
        f"{len(seconds)} full seconds, {os.cpu_count()} cores"
    )
    print(
        f"  passed/s: mean {statistics.mean(passed):.1f}  min {min(passed)}  max {max(passed)}"
        f"  p5 {cuts[0]:.0f}  p95 {cuts[-1]:.0f}"
    )
    print(f"  asked/s:  mean {statistics.mean(asked):.0f}  (other statuses: {dict(others)})")
    print(f"  per second: {passed}")


async def run(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench-ratelimit-"))
    redis = RedisServer(directory / "redis").start() if args.store == "redis" else None
    store_url = redis.url if redis else f"sqlite:///{directory}/gateway.db"
    runner, upstream_url = await upstream()
    gateways: list[GatewayProcess] = []
    try:
        for n in range(args.instances):
            config, port = instance_config(
                directory, f"gw{n}", upstream_url, store_url, args.rate, args.workers
            )
            gateways.append(GatewayProcess(["run", "-c", str(config)], port=port))
        for gateway in gateways:
            await gateway.healthy()
        await asyncio.sleep(1.0)  # a few syncs: every worker knows how many are live
        urls = [gw.url + "/limited/x" for gw in gateways]
        report(await hammer(urls, args.seconds, args.connections), args.rate, args.instances,
               args.workers)  # fmt: skip
    finally:
        for gateway in gateways:
            gateway.stop()
        await runner.cleanup()
        if redis is not None:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", default="100/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=24)
    parser.add_argument("--store", choices=("redis", "sqlite"), default="redis")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
