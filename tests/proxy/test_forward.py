"""A request passed on and its answer passed back, against real upstreams on
loopback: what the upstream *saw*, and what the client got. Bodies both ways,
statuses and reasons as written, no body after HEAD/204/304, interim (1xx)
answers and `Expect: 100-continue`, CONNECT/TRACE refused.
(Headers: test_headers.py; paths: test_paths.py; WebSockets: test_websocket.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from tests.support.errors import assert_error, error_of
from tests.support.gateway import Running, StartGateway, route, url_of
from tests.support.rawhttp import Conn, Response, parse_all, read_to_close
from tests.support.rawupstream import RawUpstream, RawUpstreams
from tests.support.upstream import Recorder, served
from tests.support.waiting import PROMPT, within


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
        assert await error_of(resp) == "token_missing"
    assert seen.seen == []


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


async def test_sse_events_arrive_as_written(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    async with http.get(gw.url + "/public/../events?n=3") as resp:
        pass  # `..` resolved: /events has no route
    assert resp.status == 404
    # Gated: the upstream writes each event once the client has read the one before,
    # so a gateway that held events back until the stream ended would deliver none.
    async with http.get(gw.url + "/public/events?n=3&gated=1") as resp:
        assert resp.status == 200
        for i in range(3):
            line = await within(resp.content.readline(), f"event {i}")
            assert line == f"data: event {i}\n".encode()
            assert await within(resp.content.readline(), "the event's end") == b"\n"
            seen.gates[i].set()
        assert await resp.read() == b""


# -- statuses, reasons and bodies as the upstream wrote them ----------------------------


async def special(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name == "reason":
        return web.Response(status=200, reason="Totally Fine", text="fine")
    if name == "odd-status":
        return web.Response(status=599, reason="Network Weirdness", text="odd")
    if name == "reason-stream":
        response = web.StreamResponse(status=202, reason="Still Going")
        await response.prepare(request)
        await response.write(b"first,")
        await asyncio.sleep(0.1)  # not an assertion: makes the gateway take its streaming path
        await response.write(b"second")
        await response.write_eof()
        return response
    if name.startswith("error-"):
        return web.Response(
            status=int(name.split("-")[1]),
            headers={"X-Upstream": "own-error", "Content-Type": "application/json"},
            body=b'{"error": "upstream_says_no", "detail": 42}',
        )
    if name == "not-modified":
        return web.Response(status=304, headers={"ETag": '"v1"'})
    if name == "no-content":
        return web.Response(status=204, headers={"X-Deleted": "yes"})
    raise web.HTTPNotFound()


@pytest.fixture
async def special_upstream() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_route("*", "/s/{name}", special)
    async with served(app) as server:
        yield server


@pytest.fixture
async def special_gw(start_gateway: StartGateway, special_upstream: TestServer) -> Running:
    return await start_gateway(routes=[route("/s/", url_of(special_upstream))])


@pytest.mark.parametrize("code", [500, 502, 503, 504])
async def test_upstream_error_status_is_passed_through_unchanged(
    special_gw: Running, http: aiohttp.ClientSession, code: int
) -> None:
    async with http.get(special_gw.url + f"/s/error-{code}") as resp:
        assert resp.status == code
        assert resp.headers["X-Upstream"] == "own-error"
        assert await resp.read() == b'{"error": "upstream_says_no", "detail": 42}'


async def test_status_reason_is_kept(special_gw: Running) -> None:
    data = await read_to_close(
        special_gw.listener.port,
        b"GET /s/reason HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /s/odd-status HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /s/reason-stream HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    fine, odd, stream = parse_all(data)
    assert (fine.status, fine.reason, fine.body) == (200, "Totally Fine", b"fine")
    assert (odd.status, odd.reason, odd.body) == (599, "Network Weirdness", b"odd")
    assert (stream.status, stream.reason, stream.body) == (202, "Still Going", b"first,second")


async def test_head_204_and_304_carry_no_body(
    gw: Running, special_gw: Running, seen: Recorder
) -> None:
    # Pipelined on one connection: a stray body byte would corrupt the next response.
    data = await read_to_close(
        gw.listener.port,
        b"HEAD /public/status?code=200 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /public/status?code=204 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /public/status?code=304 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /public/status?code=201 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    head, no_content, not_modified, created = parse_all(data, head_requests=frozenset({0}))
    assert head.status == 200 and head.body == b""
    # HEAD reports the length a GET would have (the upstream's "status").
    assert head.header("Content-Length") == "6"
    assert head.header("Transfer-Encoding") is None
    assert (no_content.status, no_content.body) == (204, b"")
    assert no_content.header("Transfer-Encoding") is None
    assert no_content.header("Content-Length") in (None, "0")
    assert (not_modified.status, not_modified.body) == (304, b"")
    assert not_modified.header("Transfer-Encoding") is None
    assert (created.status, created.body) == (201, b"status")
    assert [s.method for s in seen.seen] == ["HEAD", "GET", "GET", "GET"]

    data = await read_to_close(
        special_gw.listener.port,
        b'GET /s/not-modified HTTP/1.1\r\nHost: a\r\nIf-None-Match: "v1"\r\n\r\n'
        b"DELETE /s/no-content HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /s/reason HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    not_modified, no_content, fine = parse_all(data)
    assert (not_modified.status, not_modified.body, not_modified.header("ETag")) == (
        304,
        b"",
        '"v1"',
    )
    assert (no_content.status, no_content.body, no_content.header("X-Deleted")) == (
        204,
        b"",
        "yes",
    )
    assert (fine.status, fine.body) == (200, b"fine")


async def test_304_with_content_length_from_upstream_has_no_body(
    start_gateway: StartGateway, raw_upstream: RawUpstreams
) -> None:
    """A 304 (or a HEAD answer) may carry the Content-Length of the representation
    without a body: the gateway must not wait for, or send, those bytes."""

    async def handler(up: RawUpstream, reader: asyncio.StreamReader, writer: Any) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n")
            elif b"/nm" in head.split(b"\r\n")[0]:
                writer.write(
                    b'HTTP/1.1 304 Not Modified\r\nETag: "v2"\r\nContent-Length: 12345\r\n\r\n'
                )
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await raw_upstream(handler)
    gw = await start_gateway(routes=[route("/r/", up.url, timeout="5s")])
    data = await read_to_close(
        gw.listener.port,
        b"GET /r/nm HTTP/1.1\r\nHost: a\r\n\r\n"
        b"HEAD /r/h HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /r/ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    not_modified, head, ok = parse_all(data, head_requests=frozenset({1}))
    assert (not_modified.status, not_modified.header("ETag")) == (304, '"v2"')
    assert head.status == 200 and head.header("Content-Length") == "12345"
    assert (ok.status, ok.body) == (200, b"ok")


@pytest.mark.parametrize(
    "request_line",
    [b"TRACE /public/x HTTP/1.1", b"CONNECT /public/x HTTP/1.1", b"CONNECT /api/x HTTP/1.1"],
)
async def test_connect_and_trace_are_405(gw: Running, seen: Recorder, request_line: bytes) -> None:
    # A follow-up request is pipelined: no tunnel opens, the connection stays HTTP.
    data = await read_to_close(
        gw.listener.port,
        request_line
        + b"\r\nHost: a\r\nAuthorization: Bearer "
        + gw.token().encode()
        + b"\r\n\r\nGET /public/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    refused, after = parse_all(data)
    assert_error(refused, 405, "method_not_allowed")
    assert after.status == 200
    assert [(s.method, s.raw_path) for s in seen.seen] == [("GET", "/public/after")]


async def test_connect_authority_form_is_refused(gw: Running, seen: Recorder) -> None:
    """`CONNECT host:port` has no path, so no route: refused, never tunnelled."""
    data = await read_to_close(
        gw.listener.port,
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n"
        b"GET /public/after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    refused, after = parse_all(data)
    # Observed: 400 bad_request (not a path).
    body = assert_error(refused, None, ("bad_request", "method_not_allowed"))
    assert (refused.status, body["error"]) in ((400, "bad_request"), (405, "method_not_allowed"))
    assert after.status == 200
    assert [(s.method, s.raw_path) for s in seen.seen] == [("GET", "/public/after")]


# -- interim answers and `Expect: 100-continue` ------------------------------------------


async def _expect_exchange(port: int, head: bytes, body: bytes) -> tuple[bytes, Response]:
    """Send the head, read the first interim/final answer, send the body only if
    it was `100 Continue`; returns (first status line, final response)."""
    conn = await Conn.open(port)
    try:
        await conn.send(head)
        await conn.wait_for(b"\r\n\r\n")
        first = conn.received.split(b"\r\n", 1)[0]
        if first.startswith(b"HTTP/1.1 100 "):
            await conn.send(body)
        # One framed answer, not the close: after a refusal the gateway may
        # linger to drain a body that never comes.
        return first, await conn.next()
    finally:
        await conn.close()


async def test_expect_100_continue_upload(gw: Running, seen: Recorder) -> None:
    body = os.urandom(300_000)
    head = (
        b"POST /api/upload HTTP/1.1\r\nHost: a\r\n"
        b"Authorization: Bearer " + gw.token().encode() + b"\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n" % len(body)
    )
    status_line, final = await _expect_exchange(gw.listener.port, head, body)
    assert status_line == b"HTTP/1.1 100 Continue"
    assert final.status == 200
    answer = json.loads(final.body)
    assert answer["body_size"] == len(body)
    assert answer["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert seen.last.body_size == len(body)
    assert seen.last.header("Expect") is None


async def test_expect_100_continue_refused_before_the_body(
    start_gateway: StartGateway, upstream: TestServer, seen: Recorder
) -> None:
    """Failing checks answer at once, without `100 Continue`: the body is never sent."""
    gw = await start_gateway(
        routes=[
            route("/lim/", url_of(upstream), max_body="1KiB"),
            {"prefix": "/api/", "upstream": url_of(upstream), "auth": "required"},
        ]
    )
    over = (
        b"POST /lim/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    status_line, final = await _expect_exchange(gw.listener.port, over, b"x" * 5000)
    assert status_line.split(b" ")[1] == b"413"
    assert_error(final, 413, "body_too_large")
    no_token = (
        b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    status_line, final = await _expect_exchange(gw.listener.port, no_token, b"y" * 10)
    assert status_line.split(b" ")[1] == b"401"
    assert_error(final, 401, "token_missing")
    assert seen.seen == []


@pytest.mark.parametrize("together", [True, False], ids=["one-segment", "apart"])
@pytest.mark.parametrize(
    ("method", "interim", "final"),
    [
        ("GET", b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n", 200),
        ("POST", b"HTTP/1.1 100 Continue\r\n\r\n", 201),
        ("GET", b"HTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n", 200),
    ],
    ids=["103", "100", "102-then-103"],
)
async def test_interim_1xx_answers_are_dropped_and_the_final_one_arrives(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    raw_upstream: RawUpstreams,
    method: str,
    interim: bytes,
    final: int,
    together: bool,
) -> None:
    async def handler(
        _: RawUpstream, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":", 1)[1]))
            answer = b"HTTP/1.1 %d Done\r\nContent-Length: 5\r\nX-Final: yes\r\n\r\nfinal" % final
            if together:
                w.write(interim + answer)
            else:
                w.write(interim)
                await w.drain()
                await asyncio.sleep(0.1)  # not an assertion: most likely a read of its own
                w.write(answer)
            await w.drain()

    up = await raw_upstream(handler)
    gw = await start_gateway(routes=[route("/i/", up.url)])
    for _ in range(2):  # and the connection is reused cleanly after it
        async with http.request(
            method,
            gw.url + "/i/x",
            data=b"hello" if method == "POST" else None,
            timeout=aiohttp.ClientTimeout(total=PROMPT),  # before the fix: the client hung
        ) as resp:
            body = await resp.read()
            assert resp.status == final, (resp.status, body)
            assert body == b"final" and resp.headers["X-Final"] == "yes"
            assert "Link" not in resp.headers  # the interim answer's headers are not merged in
    assert up.connections == 1
