"""A Redis outage, as gateways on it live through it (contract section 10).

Real gateways in this process, a real redis-server that the tests stop and
start, and, where one instance must lose Redis while another keeps it, a TCP
relay on loopback whose link the test cuts. What must hold: ``/readyz`` stays
200 (a 503 would take the whole fleet out of the balancer at once); the outage
shows in ``/metrics`` and in the log, once; tokens are honoured on what is known
for ``storage.max_staleness``, then answered 503 until the feeds are read again;
public and anonymous requests go on; an instance that starts during the outage
serves degraded; everything recovers without a restart, and a logout made
through an instance that still reached Redis is honoured by the one that did not,
once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import aiohttp
import pytest

from tests.support.client import Reply, bearer, logged_in, send
from tests.support.gateway import Running, StartGateway
from tests.support.metrics import samples
from tests.support.redis import RedisServer, own_redis
from tests.support.waiting import eventually

__all__ = ["own_redis"]  # a fixture: imported for pytest to find

# Small, so the bound is reached within the test; the default is 30 s.
STRICT = "2s"
# Never reached here: this gateway keeps serving known tokens throughout.
LENIENT = "1h"


def storage(url: str, max_staleness: str) -> dict[str, Any]:
    return {"url": url, "prefix": "outage:", "max_staleness": max_staleness}


def outage_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def storage_gauges(http: aiohttp.ClientSession, gw: Running) -> tuple[float, float]:
    """(wxgateway_storage_up, wxgateway_storage_feed_age_seconds) of its one worker."""
    async with http.get(gw.url + "/metrics") as resp:
        assert resp.status == 200
        series = samples(await resp.text())
    up = [v for (name, _), v in series.items() if name == "wxgateway_storage_up"]
    age = [v for (name, _), v in series.items() if name == "wxgateway_storage_feed_age_seconds"]
    assert len(up) == len(age) == 1, series
    return up[0], age[0]


async def answers(http: aiohttp.ClientSession, gw: Running, path: str, token: str | None) -> Reply:
    return await send(http, "GET", gw.url + path, headers=bearer(token) if token else {})


async def test_an_outage_keeps_readyz_shows_in_metrics_and_bounds_staleness(
    own_redis: RedisServer,
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    strict = await start_gateway(storage=storage(own_redis.url, STRICT))
    lenient = await start_gateway(storage=storage(own_redis.url, LENIENT))
    token = (await logged_in(http, lenient.url, "before-the-outage"))["token"]
    for gw in (strict, lenient):
        assert (await answers(http, gw, "/api/x", token)).status == 200
        up, age = await storage_gauges(http, gw)
        assert up == 1.0 and age < 2.0  # read four times a second; 2 s is STRICT

    own_redis.stop()

    async def strict_refuses() -> bool:
        return (await answers(http, strict, "/api/x", token)).status == 503

    await eventually(strict_refuses, "tokens refused past storage.max_staleness")
    reply = await answers(http, strict, "/api/x", token)
    assert reply.body["error"] == "storage_unavailable", reply.raw
    # Anonymous and public requests do not depend on revocations.
    assert (await answers(http, strict, "/opt/x", None)).status == 200
    assert (await answers(http, strict, "/public/x", None)).status == 200
    # A token on an optional route is judged, so it is refused too.
    assert (await answers(http, strict, "/opt/x", token)).status == 503
    # Within its bound, the lenient gateway honours the token on what it knows.
    assert (await answers(http, lenient, "/api/x", token)).status == 200
    # What needs the store fails fast and clearly.
    login = await send(http, "POST", lenient.url + "/auth/login", json={"code": "during"})
    assert (login.status, login.body["error"]) == (503, "storage_unavailable")
    logout = await send(http, "POST", lenient.url + "/auth/logout", headers=bearer(token))
    assert (logout.status, logout.body["error"]) == (503, "storage_unavailable")

    for gw in (strict, lenient):
        # The fleet stays in the balancer; the outage shows in the metrics.
        assert (await send(http, "GET", gw.url + "/readyz")).status == 200
        assert (await storage_gauges(http, gw))[0] == 0.0
    assert (await storage_gauges(http, strict))[1] >= 2.0
    # Logged once per gateway when it started, not once per failed poll (the
    # strict one failed a poll every 0.25 s for over 2 s by now).
    assert len(outage_lines(caplog, "revocations cannot be read")) == 2
    assert len(outage_lines(caplog, "no revocation read for 2 s")) == 1

    own_redis.start()  # empty: this Redis keeps nothing on disk

    async def strict_serves() -> bool:
        return (await answers(http, strict, "/api/x", token)).status == 200

    await eventually(strict_serves, "tokens served again once Redis is back")
    for gw in (strict, lenient):
        await eventually(partial(_up, http, gw), "wxgateway_storage_up back to 1")
    assert len(outage_lines(caplog, "revocations read again")) == 2
    fresh = await logged_in(http, strict.url, "after-the-outage")
    assert (await answers(http, lenient, "/api/x", fresh["token"])).status == 200


async def _up(http: aiohttp.ClientSession, gw: Running) -> bool:
    return (await storage_gauges(http, gw))[0] == 1.0


async def test_an_instance_started_while_redis_is_down_serves_degraded_then_recovers(
    own_redis: RedisServer, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    own_redis.stop()
    gw = await start_gateway(storage=storage(own_redis.url, STRICT))  # does not exit
    token = gw.token()
    assert (await send(http, "GET", gw.url + "/readyz")).status == 200
    refused = await answers(http, gw, "/api/x", token)
    # Nothing read yet: no revocation is known, so no token is taken on trust.
    assert (refused.status, refused.body["error"]) == (503, "storage_unavailable")
    assert (await answers(http, gw, "/public/x", None)).status == 200
    assert (await answers(http, gw, "/opt/x", None)).status == 200
    assert (await storage_gauges(http, gw))[0] == 0.0

    own_redis.start()

    async def serves() -> bool:
        return (await answers(http, gw, "/api/x", token)).status == 200

    await eventually(serves, "tokens served once the first feed read succeeds")
    assert (await logged_in(http, gw.url, "after-start"))["token"]


# -- one instance cut off from Redis while another still reaches it ---------------


class Link:
    """A TCP relay on loopback to Redis: the network between one gateway and
    Redis, which the test cuts (every connection closed, new ones refused) and
    restores."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Link:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()
        self._writers.discard(writer)

    def cut_off(self) -> None:
        self.cut = True
        for writer in list(self._writers):
            writer.close()

    def restore(self) -> None:
        self.cut = False

    async def close(self) -> None:
        self.cut_off()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def link(own_redis: RedisServer) -> AsyncIterator[Link]:
    relay = await Link(own_redis.port).start()
    yield relay
    await relay.close()


async def test_a_logout_made_while_an_instance_was_cut_off_reaches_it_when_it_is_back(
    own_redis: RedisServer, link: Link, start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    # Default max_staleness (30 s): the cut-off instance keeps serving meanwhile.
    cut = await start_gateway(storage={"url": f"redis://127.0.0.1:{link.port}/0"})
    reaching = await start_gateway(storage={"url": own_redis.url})
    token = (await logged_in(http, reaching.url, "cut-off"))["token"]
    assert (await answers(http, cut, "/api/x", token)).status == 200

    link.cut_off()
    await eventually(partial(_down, http, cut), "the cut-off instance seeing the outage")
    logout = await send(http, "POST", reaching.url + "/auth/logout", headers=bearer(token))
    assert logout.status == 200, logout.raw
    # The cut-off instance cannot know yet: within its bound it honours the token.
    assert (await answers(http, cut, "/api/x", token)).status == 200

    link.restore()

    async def refused() -> bool:
        reply = await answers(http, cut, "/api/x", token)
        return reply.status == 401 and reply.body["error"] == "token_revoked"

    await eventually(refused, "the logout honoured once the link is back")


async def _down(http: aiohttp.ClientSession, gw: Running) -> bool:
    return (await storage_gauges(http, gw))[0] == 0.0
