"""Storage that stops accepting writes: clear 503s, readiness reports it, proxying goes on."""

from __future__ import annotations

import aiohttp

from gateway.storage.sqlite import SQLiteStorage
from tests.support.gateway import StartGateway


async def test_read_only_storage_is_503_and_not_ready(start_gateway: StartGateway) -> None:
    gw = await start_gateway()
    storage = gw.listener.gateway.services.storage
    assert isinstance(storage, SQLiteStorage)
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.url + "/readyz") as resp:
            assert resp.status == 200
        # Root ignores file modes, so make the store's own connection refuse writes.
        conn = storage._conn
        assert conn is not None
        await conn.execute("PRAGMA query_only = ON")
        async with http.get(gw.url + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "not_ready"
        async with http.post(gw.url + "/auth/login", json={"code": "while-broken"}) as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["error"] == "storage_unavailable"
        assert "while-broken" not in str(body)
        # Tokens are verified without storage: proxied requests keep working.
        async with http.get(gw.url + "/api/x", headers=gw.auth()) as resp:
            assert resp.status == 200
        await conn.execute("PRAGMA query_only = OFF")
        async with http.post(gw.url + "/auth/login", json={"code": "after-repair"}) as resp:
            assert resp.status == 200
        async with http.get(gw.url + "/readyz") as resp:
            assert resp.status == 200
