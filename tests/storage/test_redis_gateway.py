"""The gateway end to end on Redis: two in-process gateways on one real
redis-server act as one (contract section 10): a login through one is known to
the other, a logout through one is refused by the other within 1 s."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from gateway.storage.redis import RedisStorage
from tests.support.client import bearer, logged_in, send
from tests.support.gateway import StartGateway
from tests.support.redis import RedisServer, own_redis

__all__ = ["own_redis"]  # a fixture: imported for pytest to find


async def test_two_gateways_on_one_redis_share_users_and_logouts(
    own_redis: RedisServer, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    # own_redis first: set up first, torn down last, after the gateways.
    storage = {"url": own_redis.url, "prefix": "gw:"}
    one, two = await start_gateway(storage=storage), await start_gateway(storage=storage)
    assert isinstance(one.listener.gateway.services.storage, RedisStorage)

    user = await logged_in(http, one.url, "redis-e2e")
    token = user["token"]
    # Known to the other gateway: its /auth/me reads the record from Redis.
    me = await send(http, "GET", two.url + "/auth/me", headers=bearer(token))
    assert me.status == 200, me.raw
    assert me.body["openid"] == user["openid"]
    assert (await send(http, "GET", two.url + "/api/x", headers=bearer(token))).status == 200
    assert (await send(http, "GET", two.url + "/readyz")).status == 200

    out = await send(http, "POST", one.url + "/auth/logout", headers=bearer(token))
    assert out.status == 200
    # Durable in Redis before the answer: the revocation is there now.
    assert "gw:rev:ids" in own_redis.all_keys()
    t0 = time.monotonic()
    seen: list[tuple[float, int]] = []
    # Probe the other gateway until 2.5 s have passed and a probe started after
    # 1.5 s (a round may take a while on a busy machine).
    while time.monotonic() - t0 < 2.5 or not any(at > 1.5 for at, _ in seen):
        at = time.monotonic() - t0
        reply = await send(http, "GET", two.url + "/api/x", headers=bearer(token))
        assert reply.status in (200, 401), reply.raw
        seen.append((at, reply.status))
        await asyncio.sleep(0.02)
    last_accept = max((at for at, status in seen if status == 200), default=0.0)
    # Contract: within 1 s (each gateway polls revoked_since every 0.25 s);
    # 0.5 s of slack for the measurement on a loaded machine.
    assert last_accept <= 1.5, seen
    assert all(status == 401 for at, status in seen if at > last_accept)
    refused = await send(http, "GET", two.url + "/api/x", headers=bearer(token))
    assert refused.body["error"] == "token_revoked"
