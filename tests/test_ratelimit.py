"""Rate limits: login per client IP, and the optional per-route limit."""

from __future__ import annotations

import aiohttp
import pytest

from gateway.config import Rate
from gateway.errors import RateLimited
from gateway.ratelimit import RateLimiter
from tests.conftest import StartGateway
from tests.upstream import Recorder


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
    url = str(upstream.make_url("")).rstrip("/")
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
