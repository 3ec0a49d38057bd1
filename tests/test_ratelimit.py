"""Rate limits: login per client IP, and the optional per-route limit."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.config import Rate
from gateway.errors import RateLimited
from gateway.ratelimit import RateLimiter
from tests.support.gateway import StartGateway, url_of
from tests.support.upstream import Recorder


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_burst_then_refills() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(2, 1.0), clock)
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(RateLimited) as info:
        limiter.check("a")
    assert info.value.headers()["Retry-After"] == "1"
    limiter.check("b")  # keys are independent
    clock.now += 0.5
    limiter.check("a")  # half a second refills one token at 2/s
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_per_minute_rate_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(1, 60.0), clock)
    limiter.check("a")
    with pytest.raises(RateLimited) as info:
        limiter.check("a")
    assert info.value.retry_after == 60


async def test_login_is_limited_per_client_ip(start_gateway: StartGateway) -> None:
    gw = await start_gateway(rate_limits={"login_per_ip": "3/m"})
    async with aiohttp.ClientSession() as http:
        statuses = []
        for i in range(4):
            async with http.post(gw.url + "/auth/login", json={"code": f"code-{i}"}) as resp:
                statuses.append(resp.status)
                body = await resp.json()
        assert statuses == [200, 200, 200, 429]
        assert body["error"] == "rate_limited"
        assert int(resp.headers["Retry-After"]) >= 1


async def test_login_limit_off_with_zero(start_gateway: StartGateway) -> None:
    gw = await start_gateway(rate_limits={"login_per_ip": 0})
    async with aiohttp.ClientSession() as http:
        for i in range(30):
            async with http.post(gw.url + "/auth/login", json={"code": f"code-{i}"}) as resp:
                assert resp.status == 200


async def test_route_limit_is_per_openid_and_per_ip_when_anonymous(
    start_gateway: StartGateway, seen: Recorder, upstream: aiohttp.test_utils.TestServer
) -> None:
    url = url_of(upstream)
    gw = await start_gateway(
        routes=[
            {"prefix": "/api/", "upstream": url, "rate_limit": "2/m"},
            {"prefix": "/open/", "upstream": url, "auth": "public", "rate_limit": "1/m"},
        ]
    )
    async with aiohttp.ClientSession() as http:
        alice = [await _status(http, gw.url + "/api/x", gw.auth("o-alice")) for _ in range(3)]
        bob = await _status(http, gw.url + "/api/x", gw.auth("o-bob"))
        anonymous = [await _status(http, gw.url + "/open/x", {}) for _ in range(2)]
    assert alice == [200, 200, 429]
    assert bob == 200
    assert anonymous == [200, 429]
    assert len(seen.seen) == 4  # refused requests never reach the upstream


async def _status(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> int:
    async with http.get(url, headers=headers) as resp:
        if resp.status == 429:
            assert (await resp.json())["error"] == "rate_limited"
        return resp.status


# -- IPv6 clients are networks, and many keys cost no scan (issue 13 item 7) ---------------
def test_ipv6_addresses_of_one_network_share_a_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(3, 60.0), clock)
    # 38 addresses of one /64, as one subscriber may pick: one client, one bucket.
    outcomes = []
    for i in range(38):
        try:
            limiter.check_client(f"2001:db8:1:2:{i:x}::{i + 1:x}")
            outcomes.append(200)
        except RateLimited:
            outcomes.append(429)
    assert outcomes == [200] * 3 + [429] * 35
    limiter.check_client("2001:db8:1:3::1")  # the next /64 is another client
    limiter.check_client("192.0.2.1")  # IPv4 addresses stay one each
    limiter.check_client("192.0.2.2")


def test_ipv4_mapped_addresses_are_their_ipv4_address() -> None:
    limiter = RateLimiter(Rate(1, 60.0), Clock())
    limiter.check_client("192.0.2.7")
    with pytest.raises(RateLimited):
        limiter.check_client("::ffff:192.0.2.7")


def test_ipv6_prefix_is_configurable() -> None:
    limiter = RateLimiter(Rate(1, 60.0), Clock(), ipv6_prefix=128)
    limiter.check_client("2001:db8::1")
    limiter.check_client("2001:db8::2")  # each address its own client at /128
    wide = RateLimiter(Rate(1, 60.0), Clock(), ipv6_prefix=48)
    wide.check_client("2001:db8:1:1::1")
    with pytest.raises(RateLimited):
        wide.check_client("2001:db8:1:ffff::1")  # same /48


def test_refilled_buckets_are_dropped_oldest_first() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(1, 1.0), clock, max_keys=1000)
    for i in range(500):
        limiter.check(f"k{i}")
    assert len(limiter) == 500
    clock.now += 1.0  # every bucket has refilled: none carries information any more
    limiter.check("fresh")
    assert len(limiter) == 1


def test_keys_past_the_cap_evict_the_least_recently_used_and_keep_limits() -> None:
    clock = Clock()
    limiter = RateLimiter(Rate(1, 3600.0), clock, max_keys=100)
    limiter.check("attacker")
    for i in range(99):
        limiter.check(f"k{i}")
        clock.now += 0.001
    with pytest.raises(RateLimited):
        limiter.check("attacker")  # used again: now the most recent
    for i in range(99, 150):
        limiter.check(f"k{i}")
    assert len(limiter) == 100  # bounded
    with pytest.raises(RateLimited):
        limiter.check("attacker")  # still limited: the 50 older keys went first
    limiter.check("k0")  # evicted, so a fresh bucket
    with pytest.raises(RateLimited):
        limiter.check("k149")  # kept


async def test_login_limit_groups_ipv6_clients_behind_a_trusted_proxy(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(
        rate_limits={"login_per_ip": "3/m"},
        server={"trusted_proxies": ["127.0.0.1/32"]},
    )
    statuses = []
    async with aiohttp.ClientSession() as http:
        for i in range(8):
            headers = {"X-Forwarded-For": f"2001:db8:77:1::{i + 1:x}"}
            async with http.post(
                gw.url + "/auth/login", json={"code": f"code-{i}"}, headers=headers
            ) as resp:
                statuses.append(resp.status)
        headers = {"X-Forwarded-For": "2001:db8:77:2::1"}
        async with http.post(
            gw.url + "/auth/login", json={"code": "other"}, headers=headers
        ) as resp:
            other = resp.status
    assert statuses == [200, 200, 200] + [429] * 5
    assert other == 200  # another /64, another client
