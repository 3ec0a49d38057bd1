"""Several instances as one (issue 16), measured the way tests/e2e/test_cluster.py
runs them: a real redis-server (AOF on), N ``gateway run`` instances
(``workers: 2`` each) and HAProxy round-robin in front, all on loopback.

1. Logout propagation: log in through HAProxy, log out through one instance
   directly, poll the two others until they refuse the token; p50/p99/max over
   ``--logouts`` logouts (200 by default), per refusing instance.
2. Throughput: wrk through HAProxy on a proxied route with a valid token, for
   one, two and three instances.

Everything (HAProxy, the 2N workers, Redis, the upstream, wrk) shares this
machine's cores: on a 2-core machine more instances add processes, not CPUs,
so the req/s column shows the cost of the extra hop and processes, not how the
gateway scales on more hosts. The output says how many cores it ran on.

    python -m bench.cluster [--logouts 200] [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.common import cpu_ticks, need_wrk, parse_wrk, steal_percent
from tests.support.cluster import Cluster, Settings, running_cluster

POLL = 0.005  # seconds between two probes of a refusing instance


async def login(http: aiohttp.ClientSession, base: str, code: str) -> str:
    async with http.post(base + "/auth/login", json={"code": code}) as resp:
        assert resp.status == 200, await resp.text()
        token: str = (await resp.json())["token"]
        return token


async def until_refused(http: aiohttp.ClientSession, url: str, token: str, since: float) -> float:
    headers = {"Authorization": f"Bearer {token}"}
    deadline = since + 30
    while time.monotonic() < deadline:
        async with http.get(url + "/api/probe", headers=headers) as resp:
            await resp.read()
            if resp.status == 401:
                return time.monotonic() - since
        await asyncio.sleep(POLL)
    raise SystemExit(f"{url} still accepts a logged-out token after 30 s")


async def propagation(cluster: Cluster, logouts: int) -> list[float]:
    delays: list[float] = []
    gateways = cluster.instances
    async with aiohttp.ClientSession() as http:
        for n in range(logouts):
            token = await login(http, cluster.front.url, f"bench-propagation-{n}")
            by = gateways[n % len(gateways)]
            async with http.post(
                by.url + "/auth/logout", headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 200, await resp.text()
            answered = time.monotonic()
            others = [g for g in gateways if g is not by]
            delays += await asyncio.gather(
                *(until_refused(http, g.url, token, answered) for g in others)
            )
    return delays


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def throughput(cluster: Cluster, seconds: int, connections: int) -> dict[str, float]:
    token = asyncio.run(_one_token(cluster))
    before = cpu_ticks()
    url = cluster.front.url + "/api/bench"
    wrk = [need_wrk(), "-t2", f"-c{connections}", f"-d{seconds}s", "--latency"]
    wrk += ["-H", f"Authorization: Bearer {token}", url]
    done = subprocess.run(wrk, capture_output=True, text=True, check=True)
    result = parse_wrk(done.stdout)
    result["steal"] = steal_percent(before, cpu_ticks())
    return result


async def _one_token(cluster: Cluster) -> str:
    async with aiohttp.ClientSession() as http:
        return await login(http, cluster.front.url, "bench-throughput")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logouts", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    need_wrk()
    print(f"# {os.cpu_count()} CPUs; every process of the cluster and wrk share them")
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for instances in (1, 2, 3):
            directory = Path(tmp) / f"n{instances}"
            directory.mkdir()
            with running_cluster(directory, Settings(instances=instances)) as cluster:
                if instances == 3:
                    delays = asyncio.run(propagation(cluster, args.logouts))
                    print(
                        f"logout propagation over {args.logouts} logouts "
                        f"({len(delays)} refusals by the two other instances): "
                        f"p50 {percentile(delays, 50) * 1000:.1f} ms, "
                        f"p99 {percentile(delays, 99) * 1000:.1f} ms, "
                        f"max {max(delays) * 1000:.1f} ms, "
                        f"mean {statistics.fmean(delays) * 1000:.1f} ms "
                        f"(probe every {POLL * 1000:.0f} ms)"
                    )
                rows.append((instances, throughput(cluster, args.seconds, args.connections)))
        print(
            "\n| instances (x2 workers) behind HAProxy | req/s | p50 ms | p99 ms | non-2xx | steal % |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for instances, r in rows:
            print(
                f"| {instances} | {r.get('rps', 0):.0f} | {r.get('p50', 0):.2f} | "
                f"{r.get('p99', 0):.2f} | {r['non2xx']:.0f} | {r['steal']:.1f} |"
            )


if __name__ == "__main__":
    main()
