"""The proxy path against a reflecting upstream: what the upstream *saw*."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Running
from tests.support.upstream import Recorder


async def test_required_route_forwards_with_identity(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    async with http.get(
        URL(gw.url + "/api/items?x=1&y=%2F", encoded=True), headers=gw.auth("o-alice", "u-alice")
    ) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["path"] == "/api/items?x=1&y=%2F"
    assert seen.last.header("X-OpenId") == "o-alice"
    assert seen.last.header("X-UnionId") == "u-alice"
    assert seen.last.header("Authorization") is None
    assert resp.headers["X-Request-Id"] == seen.last.header("X-Request-Id")


async def test_missing_token_is_401_and_nothing_reaches_upstream(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    async with http.get(gw.url + "/api/items") as resp:
        assert resp.status == 401
        assert resp.content_type == "application/json"
        body = await resp.json()
    assert body["error"] == "token_missing"
    assert body["message"]
    assert seen.seen == []


async def test_no_route_is_404_json(gw: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/nowhere") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "no_route"


async def test_request_and_response_bodies_pass_unchanged(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    payload = bytes(range(256)) * 1000
    async with http.post(gw.url + "/api/upload", data=payload, headers=gw.auth()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["body_size"] == len(payload)
    assert seen.last.body == payload
    assert seen.last.header("Content-Length") == str(len(payload))


async def test_chunked_upload_is_forwarded(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    async def gen():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"a" * 1000

    async with http.post(gw.url + "/api/upload", data=gen(), headers=gw.auth()) as resp:
        assert resp.status == 200
    assert seen.last.body == b"a" * 10000


async def test_upstream_status_and_cookies_reach_client(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    async with http.get(gw.url + "/public/cookies") as resp:
        assert resp.status == 200
        assert resp.headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/; HttpOnly"]
    async with http.get(gw.url + "/public/status?code=418") as resp:
        assert resp.status == 418


async def test_content_encoding_is_not_touched(gw: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/public/gzip") as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == b"\x1f\x8b\x08\x00not-really-gzip"


async def test_hop_by_hop_response_headers_are_dropped(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    async with http.get(gw.url + "/public/hop") as resp:
        assert resp.headers["X-Kept"] == "yes"
        for name in ("X-Private-Hop", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in resp.headers


async def test_sse_events_arrive_as_written(gw: Running, http: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with http.get(gw.url + "/public/../events?n=3&interval=0.7") as resp:
        pass  # `..` resolved: /events has no route
    assert resp.status == 404
    async with http.get(gw.url + "/public/events?n=3&interval=0.7") as resp:
        assert resp.status == 200
        started = loop.time()
        first = await resp.content.readline()
        first_at = loop.time() - started
        rest = await resp.read()
    assert first == b"data: event 0\n"
    assert b"event 2" in rest
    # The upstream needs >= 1.4 s for all three; the first must not wait for them.
    assert first_at < 1.0


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
async def test_upgrade_on_non_websocket_route_is_400(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder, upgrade: str
) -> None:
    headers = {
        "Connection": "Upgrade",
        "Upgrade": upgrade,
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    async with http.get(gw.url + "/public/ws", headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"
    # On a route that needs a token, the answer is the same with or without one:
    # the route cannot take an upgrade whoever asks (checked before the token).
    for auth in ({}, gw.auth("o-up"), {"Authorization": "Bearer not-a-token"}):
        async with http.get(gw.url + "/opt/ws", headers={**headers, **auth}) as resp:
            assert resp.status == 400, auth
            assert (await resp.json())["error"] == "bad_request"
    assert seen.seen == []


async def test_websocket_is_relayed_with_identity(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    async with http.ws_connect(
        gw.url + "/api/ws", headers={**gw.auth("o-ws"), "X-OpenId": "spoof"}, protocols=("chat",)
    ) as ws:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert (await ws.receive_str()) == "echo:hello"
        await ws.send_bytes(b"abc")
        assert (await ws.receive_bytes()) == b"cba"
        await ws.send_str("whoami")
        assert (await ws.receive_str()) == "o-ws"
    assert seen.last.method == "WS"
    assert [v for k, v in seen.last.headers if k.lower() == "x-openid"] == ["o-ws"]


async def test_websocket_needs_a_token(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await http.ws_connect(gw.url + "/api/ws")
    assert info.value.status == 401
    assert seen.seen == []


async def test_own_endpoints_are_never_proxied(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    async with http.get(gw.url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/api/../readyz") as resp:
        assert resp.status == 200
    async with http.get(gw.url + "/auth/unknown") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"] == "no_route"
    async with http.post(gw.url + "/healthz") as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"
    assert seen.seen == []


async def test_parser_errors_are_json(gw: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    writer.write(b"GET /public/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n")
    await writer.drain()
    data = await reader.read(65536)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400"
    assert b"application/json" in head
    assert json.loads(body)["error"] == "bad_request"
