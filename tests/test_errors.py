"""Every error the gateway answers is JSON with a stable `error` and a human
`message` (contract section 5), carries the request id, and reaches nothing
upstream that the error stopped; parser refusals included."""

from __future__ import annotations

import re

import pytest
from aiohttp.test_utils import TestServer

from tests.support.errors import assert_error
from tests.support.gateway import Running, StartGateway, free_port, url_of
from tests.support.rawhttp import request, request_once
from tests.support.upstream import Recorder

SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


@pytest.fixture
async def errors_gw(start_gateway: StartGateway, upstream: TestServer) -> Running:
    url = url_of(upstream)
    dead = f"http://127.0.0.1:{free_port()}"
    return await start_gateway(
        routes=[
            {"prefix": "/api/", "upstream": url, "auth": "required", "websocket": True},
            {"prefix": "/public/", "upstream": url, "auth": "public"},
            {"prefix": "/small/", "upstream": url, "auth": "public", "max_body": 10},
            {"prefix": "/dead/", "upstream": dead, "auth": "public"},
            {"prefix": "/slow/", "upstream": url, "auth": "public", "timeout": "200ms"},
        ]
    )


# (method, target, extra headers, body, status, error, reached upstream?)
ERROR_CASES: list[tuple[str, str, list[tuple[str, str]], bytes, int, str, bool]] = [
    ("GET", "/public/..%2fx", [], b"", 400, "bad_request", False),
    (
        "GET",
        "/public/x",
        [("Connection", "Upgrade"), ("Upgrade", "h2c")],
        b"",
        400,
        "bad_request",
        False,
    ),
    ("GET", "/api/x", [], b"", 401, "token_missing", False),
    ("GET", "/api/x", [("Authorization", "Bearer nope")], b"", 401, "token_invalid", False),
    ("GET", "/nowhere", [], b"", 404, "no_route", False),
    ("GET", "/auth/nothing", [], b"", 404, "no_route", False),
    ("POST", "/healthz", [], b"", 405, "method_not_allowed", False),
    ("TRACE", "/public/x", [], b"", 405, "method_not_allowed", False),
    ("POST", "/small/x", [], b"x" * 100, 413, "body_too_large", False),
    (
        "POST",
        "/auth/login",
        [("Content-Type", "application/json")],
        b"{",
        400,
        "bad_request",
        False,
    ),
    ("GET", "/auth/me", [], b"", 401, "token_missing", False),
    ("GET", "/dead/x", [], b"", 502, "upstream_unavailable", False),
    ("GET", "/slow/slow?delay=1", [], b"", 504, "upstream_timeout", True),
]


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "status", "error", "reached"),
    ERROR_CASES,
    ids=[f"{c[4]}-{c[5]}-{c[1]}" for c in ERROR_CASES],
)
async def test_error_responses_are_json_and_carry_the_request_id(
    errors_gw: Running,
    seen: Recorder,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    status: int,
    error: str,
    reached: bool,
) -> None:
    reply = await request(
        errors_gw.listener.port,
        target,
        [*headers, ("X-Request-Id", "rid-err-1")],
        method=method,
        body=body,
    )
    parsed = assert_error(reply, status, error)
    assert reply.header("X-Request-Id") == "rid-err-1"
    assert parsed.get("request_id") == "rid-err-1"
    assert bool(seen.seen) is reached
    if status == 401:
        assert (reply.header("WWW-Authenticate") or "").startswith("Bearer")


async def test_error_response_generates_request_id_when_insane(
    errors_gw: Running, seen: Recorder
) -> None:
    reply = await request(errors_gw.listener.port, "/api/x", [("X-Request-Id", "bad id")])
    parsed = assert_error(reply, 401, "token_missing")
    rid = reply.header("X-Request-Id")
    assert rid and rid != "bad id" and SANE_REQUEST_ID.match(rid)
    assert parsed.get("request_id") == rid


# Requests aiohttp's own parser refuses before the gateway's handler runs.
PARSER_ERRORS = [
    b"GET /public/x HTTP/1.1\r\nHost: t\r\nBad Header\r\nX-Request-Id: rid-p\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
    b"GET /public/" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /public/x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    b"GET /public/a\x00b HTTP/1.1\r\nHost: t\r\n\r\n",
    b"NOT A REQUEST\r\n\r\n",
]
PARSER_IDS = ["bad-line", "big-header", "long-target", "bad-te", "two-lengths", "nul", "garbage"]


@pytest.mark.parametrize("raw", PARSER_ERRORS, ids=PARSER_IDS)
async def test_parser_errors_are_json(gw: Running, seen: Recorder, raw: bytes) -> None:
    reply = await request_once(gw.listener.port, raw)
    assert 400 <= reply.status < 500
    assert_error(reply, reply.status)
    assert seen.seen == []


@pytest.mark.parametrize("raw", PARSER_ERRORS, ids=PARSER_IDS)
async def test_parser_errors_carry_a_request_id(gw: Running, raw: bytes) -> None:
    # docs/design.md: the request id is "returned on every response, errors included".
    reply = await request_once(gw.listener.port, raw)
    rid = reply.header("X-Request-Id")
    assert rid and SANE_REQUEST_ID.match(rid)
    assert reply.json.get("request_id") == rid


async def test_a_malformed_header_line_is_a_json_bad_request(gw: Running) -> None:
    reply = await request_once(
        gw.listener.port, b"GET /public/x HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"
    )
    assert_error(reply, 400, "bad_request")
