"""The access-token lease is fenced: a holder that stalled past its lease cannot
overwrite the newer token of the one that took the lease over.

Three :class:`AccessTokens` (three instances) share one store, on each backend;
WeChat is a real aiohttp server on loopback whose first ``stable_token`` answer
is held back until the test lets it go. Time is injected: the stall is the
clock moving past the lease, not a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import build_config
from gateway.storage import AccessToken, Storage
from gateway.storage.redis import RedisStorage
from gateway.storage.sqlite import SQLiteStorage
from gateway.wechat.access_token import AccessTokens
from gateway.wechat.client import WechatClient
from tests.support.gateway import base_config, url_of
from tests.support.redis import RedisServer, redis_server, unique_prefix
from tests.support.waiting import until

__all__ = ["redis_server"]  # a fixture: imported for pytest to find

LEASE_TTL = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


class SlowFirstToken:
    """``stable_token`` whose first answer waits for ``release``."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        call = self.calls
        if call == 1:
            await self.release.wait()
            return web.json_response({"access_token": "tok-stalled", "expires_in": 7200})
        return web.json_response({"access_token": f"tok-{call}", "expires_in": 7200})


@pytest.fixture
async def wechat_api() -> AsyncIterator[tuple[SlowFirstToken, TestServer]]:
    api = SlowFirstToken()
    app = web.Application()
    app.router.add_post("/cgi-bin/stable_token", api.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield api, server
    api.release.set()
    await server.close()


def _stores(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Storage]:
    if request.param == "sqlite":
        return lambda: SQLiteStorage(tmp_path / "gateway.db")
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = unique_prefix()
    return lambda: RedisStorage(server.url, prefix=prefix)


@pytest.fixture(params=["sqlite", "redis"])
async def three_stores(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[list[Storage]]:
    make = _stores(request, tmp_path)
    stores = [make() for _ in range(3)]
    for store in stores:
        await store.open()
    yield stores
    for store in stores:
        await store.close()


async def test_a_stalled_holders_late_token_is_refused(
    tmp_path: Path, three_stores: list[Storage], wechat_api: tuple[SlowFirstToken, TestServer]
) -> None:
    api, server = wechat_api
    raw = base_config(tmp_path, "http://127.0.0.1:9", url_of(server))
    raw["wechat"]["timeout"] = "30s"  # the held answer must not time out first
    config = build_config(raw, env={})
    client = WechatClient(config.wechat)
    await client.start()
    clock = Clock()
    a, b, c = (
        AccessTokens(client, store, clock, app=config.wechat.default_app, lease_ttl=LEASE_TTL)
        for store in three_stores
    )
    try:
        # a takes the lease and asks WeChat, which is slow to answer ...
        stalled = asyncio.create_task(a.get())
        await until(lambda: api.calls == 1, "a's stable_token call")
        # ... past the lease: b takes it over and stores a newer token.
        clock.now += LEASE_TTL + 1
        assert await b.get() == "tok-2"
        # a's answer finally comes: its write is refused, and a uses b's token.
        api.release.set()
        assert await stalled == "tok-2"
        assert await three_stores[0].get_access_token(config.wechat.default_app.appid) == (
            AccessToken("tok-2", clock.now + 7200 - 300)
        )
        # Another instance gets the newer token from the store, not from WeChat.
        assert await c.get() == "tok-2"
        assert (a.fetches, b.fetches, c.fetches, api.calls) == (1, 1, 0, 2)
    finally:
        await client.close()
