"""Rate limits across instances on one real redis-server (tests/support/redis.py).

Each "instance" is its own RedisStorage (its own connection pool) and its own
limiter object, as separate gateway processes have. Route limits are driven by
calling ``sync()`` by hand, and time is injected: nothing here sleeps.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.config import Rate, build_config
from gateway.errors import RateLimited
from gateway.proxy.routing import Route, Router
from gateway.ratelimit import LoginLimiter
from gateway.ratelimit_shared import STALE_AFTER, RouteLimits
from gateway.storage import Storage, StorageError
from gateway.storage.redis import RedisStorage
from gateway.storage.sqlite import SQLiteStorage
from tests.support.gateway import base_config, route
from tests.support.redis import RedisServer, own_redis, redis_server, unique_prefix

__all__ = ["own_redis", "redis_server"]  # fixtures: imported for pytest to find

UPSTREAM = "http://127.0.0.1:9"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[list[RedisStorage]]:
    """Three instances' stores on one Redis, under one prefix (one gateway)."""
    prefix = unique_prefix()
    opened = [RedisStorage(redis_server.url, prefix=prefix) for _ in range(3)]
    for store in opened:
        await store.open()
    yield opened
    for store in opened:
        await store.close()


def limited_route(tmp_path: Path, rate: str = "100/s") -> Route:
    raw = base_config(
        tmp_path, UPSTREAM, UPSTREAM, routes=[route("/r/", UPSTREAM, rate_limit=rate)]
    )
    config = build_config(raw)
    return Router(config.routes, config.server.max_body).routes[0]


def passes(limits: RouteLimits, route: Route, key: str, tries: int) -> int:
    passed = 0
    for _ in range(tries):
        try:
            limits.check(route, key)
        except RateLimited:
            continue
        passed += 1
    return passed


# -- login_per_ip ----------------------------------------------------------------


async def test_login_limit_is_exact_across_instances(stores: list[RedisStorage]) -> None:
    rate = Rate(5, 60.0)
    limiters = [LoginLimiter(rate, store, ipv6_prefix=64) for store in stores]
    # Five logins in total, spread over three instances; the sixth is refused
    # whichever instance it reaches, and so is every one after it.
    for limiter in itertools.islice(itertools.cycle(limiters), 5):
        await limiter.check_client("203.0.113.7")
    for limiter in limiters:
        with pytest.raises(RateLimited) as info:
            await limiter.check_client("203.0.113.7")
        # One login back every 12 s at 5/m.
        assert 1 <= int(info.value.headers()["Retry-After"]) <= 12
    # Another client has its own budget; an IPv6 /64 is one client.
    await limiters[0].check_client("203.0.113.8")
    for n in range(5):
        await limiters[n % 3].check_client(f"2001:db8:1:2::{n + 1}")
    with pytest.raises(RateLimited):
        await limiters[1].check_client("2001:db8:1:2:ffff::1")


async def test_login_limit_refills_at_its_rate(stores: list[RedisStorage]) -> None:
    # 20 per 10 s: one token every 0.5 s, slow enough that draining the bucket
    # (20 Redis calls) cannot refill it even on a loaded machine. Drain it, then
    # poll until one comes back (the store's clock moves, not ours): it does, and
    # only one at a time.
    limiter = LoginLimiter(Rate(20, 10.0), stores[0], ipv6_prefix=64)
    for _ in range(20):
        await limiter.check_client("198.51.100.1")
    with pytest.raises(RateLimited):
        await limiter.check_client("198.51.100.1")
    other = LoginLimiter(Rate(20, 10.0), stores[1], ipv6_prefix=64)
    while True:
        try:
            await other.check_client("198.51.100.1")
            break
        except RateLimited:
            continue
    with pytest.raises(RateLimited):
        await limiter.check_client("198.51.100.1")


async def test_login_limit_on_sqlite_is_per_process(tmp_path: Path) -> None:
    # Two stores on one SQLite file are two processes: each counts its own.
    stores: list[Storage] = [SQLiteStorage(tmp_path / "g.db") for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        limiters = [LoginLimiter(Rate(2, 60.0), store, ipv6_prefix=64) for store in stores]
        for limiter in limiters:
            await limiter.check_client("192.0.2.1")
            await limiter.check_client("192.0.2.1")
            with pytest.raises(RateLimited):
                await limiter.check_client("192.0.2.1")
    finally:
        for store in stores:
            await store.close()


async def test_login_limit_with_redis_down_is_a_storage_error(own_redis: RedisServer) -> None:
    store = RedisStorage(own_redis.url, prefix=unique_prefix(), timeout=0.5)
    await store.open()
    try:
        limiter = LoginLimiter(Rate(5, 60.0), store, ipv6_prefix=64)
        await limiter.check_client("192.0.2.9")
        own_redis.stop()
        # A 503 storage_unavailable for the login (it needs the store anyway), not a hang:
        # the store's own deadline bounds the call.
        with pytest.raises(StorageError):
            await limiter.check_client("192.0.2.9")
        own_redis.start()
        await limiter.check_client("192.0.2.9")  # back by itself, same objects
    finally:
        await store.close()


# -- route rate_limit ------------------------------------------------------------


@pytest.fixture
def route_of(tmp_path: Path) -> Iterator[Route]:
    yield limited_route(tmp_path)


async def three_workers(
    stores: list[RedisStorage], route: Route, clock: Clock
) -> list[RouteLimits]:
    workers = [RouteLimits([route], s, ipv6_prefix=64, clock=clock) for s in stores]
    for _ in range(2):  # the second round sees all three live
        for worker in workers:
            assert await worker.sync()
    assert [w.live for w in workers] == [3, 3, 3]
    return workers


async def test_route_limit_evenly_spread_stays_near_the_limit(
    stores: list[RedisStorage], route_of: Route
) -> None:
    clock = Clock(1_000_000.25)
    workers = await three_workers(stores, route_of, clock)
    totals = []
    for _ in range(20):  # twenty windows of 1 s
        clock.now += 1.0
        passed = 0
        for _ in range(10):  # ten syncs a window, every worker hammered alike
            for worker in workers:
                passed += passes(worker, route_of, "ip:192.0.2.1", 40)
            for worker in workers:
                await worker.sync()
        totals.append(passed)
    # Per window: the shares are random roundings of 100/3, and what is left after
    # a sync is shared again, so a window passes 100 give or take a few, never
    # three times the limit (per process counting would pass 3 x 100 = 300).
    assert all(97 <= total <= 103 for total in totals), totals
    assert 99 <= sum(totals) / len(totals) <= 101, totals


async def test_a_client_seen_by_one_worker_gets_its_whole_budget(
    stores: list[RedisStorage], route_of: Route
) -> None:
    clock = Clock(2_000_000.5)
    workers = await three_workers(stores, route_of, clock)
    passed = 0
    for _ in range(30):
        passed += passes(workers[0], route_of, "o:app:openid", 200)
        for worker in workers:
            await worker.sync()
    # A share of what is left at each sync: it reaches the limit, never beyond.
    assert 95 <= passed <= 100, passed
    with pytest.raises(RateLimited) as info:
        workers[0].check(route_of, "o:app:openid")
    assert info.value.headers()["Retry-After"] == "1"  # the window ends within a second


async def test_route_limit_on_sqlite_is_the_per_process_bucket(
    tmp_path: Path, route_of: Route
) -> None:
    store = SQLiteStorage(tmp_path / "g.db")
    limits = RouteLimits([route_of], store, ipv6_prefix=64)
    await limits.start()  # nothing to sync: no task
    try:
        started = time.monotonic()
        passed = passes(limits, route_of, "ip:192.0.2.1", 150)
        # The bucket's burst, plus what refilled at 100/s if the loop was
        # descheduled on a loaded machine (none when it runs at full speed).
        refilled = int((time.monotonic() - started) * 100)
        assert 100 <= passed <= 100 + refilled, (passed, refilled)
    finally:
        await limits.close()


async def test_redis_outage_falls_back_to_per_process_then_recovers(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    route = limited_route(tmp_path, "10/s")
    store = RedisStorage(own_redis.url, prefix=unique_prefix(), timeout=0.5)
    await store.open()
    clock, monotonic = Clock(3_000_000.5), Clock(100.0)
    limits = RouteLimits([route], store, ipv6_prefix=64, clock=clock, monotonic=monotonic)
    try:
        assert await limits.sync()
        assert passes(limits, route, "ip:a", 15) == 10  # shared: the window's 10
        own_redis.stop()
        assert not await limits.sync()  # bounded: it returns, it does not hang
        # Still within STALE_AFTER of the last good sync: the shares hold.
        assert limits.syncing
        assert passes(limits, route, "ip:a", 5) == 0
        # Past it: the route's own per-process bucket (10 deep, fresh for this key).
        monotonic.now += STALE_AFTER + 0.1
        assert not limits.syncing
        assert passes(limits, route, "ip:a", 15) == 10
        own_redis.start()
        assert await limits.sync()
        assert limits.syncing
        clock.now += 1.0  # a new window, counted across instances again
        assert passes(limits, route, "ip:a", 15) == 10
    finally:
        await store.close()
