"""Rate limits across gateway processes on one real redis-server (contract section 10).

Each gateway is ``gateway run`` as its own process, all with one ``storage.url``
and prefix; the test talks to each directly. Windows of a route limit follow the
wall clock, so the route bounds are per window the run spanned (read from the
clock before and after), never a duration.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from tests.support.gateway import config_for, route, url_of
from tests.support.procs import GatewayProcess, RunGateway
from tests.support.redis import RedisServer, own_redis, redis_server, unique_prefix
from tests.support.waiting import eventually, until

__all__ = ["own_redis", "redis_server"]  # fixtures: imported for pytest to find

# A request never waits on Redis; this only turns a hang into a failure.
HANG = aiohttp.ClientTimeout(total=10)
# Per window, across the instances: the limit give or take the random rounding
# of the shares (docs/configuration.md, rate_limits).
SLACK = 3


def shared_config(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, redis: RedisServer, prefix: str,
    **sections: Any,
) -> dict[str, Any]:  # fmt: skip
    raw = config_for(tmp_path, upstream, wechat, **sections)
    raw["storage"] = {"url": redis.url, "prefix": prefix}
    return raw


async def statuses(http: aiohttp.ClientSession, urls: list[str]) -> Counter[int]:
    """One request to each URL in turn, as a balancer spreading evenly would."""
    seen: Counter[int] = Counter()
    for url in urls:
        async with http.get(url) as resp:
            await resp.read()
            seen[resp.status] += 1
    return seen


def windows_spanned(start: float, end: float, period: float) -> int:
    return int(end // period) - int(start // period) + 1


async def all_live(redis: RedisServer, prefix: str, count: int) -> None:
    """Until ``count`` workers sync, and each has synced since the last one joined:
    then every worker sizes its shares for ``count``."""
    import redis as redis_client

    client = redis_client.Redis(host="127.0.0.1", port=redis.port, decode_responses=True)
    try:
        key = prefix + "rl:live"
        await until(lambda: client.zcard(key) >= count, f"{count} live workers")
        joined = max(score for _, score in client.zrange(key, 0, -1, withscores=True))
        await until(
            lambda: min(s for _, s in client.zrange(key, 0, -1, withscores=True)) > joined,
            "every worker synced since the last joined",
        )
    finally:
        client.close()


async def test_login_per_ip_is_exact_across_two_gateways(
    tmp_path: Path,
    upstream: TestServer,
    wechat: TestServer,
    redis_server: RedisServer,
    run_gateway: RunGateway,
) -> None:
    raw = shared_config(
        tmp_path, upstream, wechat, redis_server, unique_prefix(),
        rate_limits={"login_per_ip": "5/m"},
    )  # fmt: skip
    one = await run_gateway(raw=raw, name="one")
    raw["server"]["port"] = 0
    two = await run_gateway(raw=raw, name="two")
    async with aiohttp.ClientSession(timeout=HANG) as http:

        async def login(gateway: GatewayProcess, n: int) -> int:
            body = {"code": f"limit-code-{n}"}
            async with http.post(gateway.url + "/auth/login", json=body) as resp:
                await resp.read()
                return resp.status

        # Five in total, whichever gateway each reaches; then 429 on both.
        assert [await login((one, two)[n % 2], n) for n in range(5)] == [200] * 5
        assert [await login(gw, 9) for gw in (two, one, two)] == [429] * 3


async def test_route_limit_holds_across_three_gateways(
    tmp_path: Path,
    upstream: TestServer,
    wechat: TestServer,
    redis_server: RedisServer,
    run_gateway: RunGateway,
) -> None:
    prefix = unique_prefix()
    limited = route("/limited/", url_of(upstream), rate_limit="30/m")
    raw = shared_config(tmp_path, upstream, wechat, redis_server, prefix, routes=[limited])
    gateways = []
    for name in ("a", "b", "c"):
        raw["server"]["port"] = 0
        gateways.append(await run_gateway(raw=raw, name=name))
    await all_live(redis_server, prefix, 3)
    urls = [gw.url + "/limited/x" for gw in gateways]
    async with aiohttp.ClientSession(timeout=HANG) as http:
        start = time.time()
        seen: Counter[int] = Counter()
        for _ in range(40):  # 120 requests, evenly spread
            seen += await statuses(http, urls)
        spanned = windows_spanned(start, time.time(), 60.0)
    assert set(seen) <= {200, 429}, seen
    # Counted per process, three gateways would pass 3 x 30 = 90 in a window.
    assert 30 - SLACK <= seen[200] <= spanned * (30 + SLACK), (seen, spanned)


async def test_a_redis_outage_falls_back_to_per_process_then_recovers(
    tmp_path: Path,
    upstream: TestServer,
    wechat: TestServer,
    own_redis: RedisServer,
    run_gateway: RunGateway,
) -> None:
    prefix = unique_prefix()
    limited = route("/limited/", url_of(upstream), rate_limit="10/m")
    raw = shared_config(tmp_path, upstream, wechat, own_redis, prefix, routes=[limited])
    gateways = []
    for name in ("a", "b"):
        raw["server"]["port"] = 0
        gateways.append(await run_gateway(raw=raw, name=name))
    await all_live(own_redis, prefix, 2)
    urls = [gw.url + "/limited/x" for gw in gateways]
    async with aiohttp.ClientSession(timeout=HANG) as http:
        start = time.time()
        shared = Counter[int]()
        for _ in range(15):
            shared += await statuses(http, urls)
        assert shared[200] <= windows_spanned(start, time.time(), 60.0) * (10 + SLACK), shared

        own_redis.stop()
        stopped = time.monotonic()
        # Documented rule: after a second without a sync, each process counts on its
        # own (its 10-deep bucket, untouched while shared), and no request waits on
        # Redis. Each gateway passes again once it has fallen back.
        for url in urls:

            async def passes(url: str = url) -> bool:
                return (await statuses(http, [url]))[200] == 1

            await eventually(passes, "per-process counting after the outage")
        alone = Counter[int]()
        for _ in range(15):
            alone += await statuses(http, urls)
        assert set(alone) <= {200, 429}, alone
        # Each bucket holds 10 (one taken by the probe above): 2 x 9 more, plus
        # what refilled at 10/m (one per 6 s per bucket) since Redis stopped: on a
        # loaded machine the probes and rounds take seconds.
        refilled = 2 * (int((time.monotonic() - stopped) * 10 / 60) + 1)
        assert 2 * 9 <= alone[200] <= 2 * 9 + refilled, (alone, refilled)

        own_redis.start()
        # Back by itself: every worker syncs again (a fresh Redis: the live set is
        # refilled by the workers, not by a restart).
        await all_live(own_redis, prefix, 2)
        start = time.time()
        again = Counter[int]()
        for _ in range(15):
            again += await statuses(http, urls)
        assert again[200] <= windows_spanned(start, time.time(), 60.0) * (10 + SLACK), again
