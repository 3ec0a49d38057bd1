"""A hostile-input battery over raw sockets.

Every case is sent byte for byte (no HTTP client normalising it) to a running
gateway in front of the reflecting upstream (tests/support/upstream.py), and checked for
the same things:

- the gateway answers a 4xx whose body is the contract's JSON (`error` and
  `message`), or closes the connection; never a 5xx (contract section 4);
- cases that are legitimate HTTP (valid chunk extensions, two pipelined
  requests...) get the correct success behaviour instead;
- the upstream never receives a smuggled request, an unauthenticated request on
  an `auth: required` route, a client-supplied identity header, the token header
  or a hop-by-hop header (contract sections 5 and 8);
- the gateway still serves a normal authenticated request afterwards, and
  logged no error (no handler crash behind a polite answer).

A few cases are sent again to a real `gateway run` with two workers, checking
that no worker died (the supervisor would silently replace it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from gateway.auth.tokens import TokenCodec
from gateway.config import build_config
from tests.support.errors import assert_error
from tests.support.gateway import Running, StartGateway, base_config, config_for
from tests.support.headers import fold
from tests.support.procs import children, spawn, wait_workers
from tests.support.rawhttp import Exchange, exchange
from tests.support.upstream import Recorder, Seen

OPENID = "o-hostile-real-user"
FORGED = "o-forged"


def _mint_token() -> bytes:
    """A valid token for every gateway these tests start (they share conftest's
    token secret); minted up front so Content-Lengths are computed on real bytes."""
    raw = base_config(Path("/nonexistent"), "http://127.0.0.1:9", "http://127.0.0.1:9")
    codec = TokenCodec.for_config(build_config(raw, env={}))
    return codec.issue(OPENID, None, time.time())[0].encode()


TOKEN = _mint_token()

H = b"Host: gw.example\r\n"
A = b"Authorization: Bearer " + TOKEN + b"\r\n"
C = b"Connection: close\r\n"

# Hop-by-hop fields (RFC 9110 7.6.1, plus the obsolete and proxy ones the contract
# names) that must never reach the upstream. Transfer-Encoding is left out: the
# gateway itself frames a streamed body upstream with it.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
}


# -- the cases ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One hostile request (or several on one connection).

    expect:
      "reject": a 4xx JSON error as first answer, or a closed connection with no
                answer; the upstream receives nothing.
      "ok":     exactly ``statuses``; the upstream received exactly ``upstream``
                ((method, raw path) in order), and ``body`` for the first one.
      "either": one of the two (for inputs RFC 9112 lets a server accept or refuse);
                the invariants hold whichever it is.
    """

    id: str
    raw: bytes
    expect: str
    statuses: tuple[int, ...] = (200,)
    upstream: tuple[tuple[str, str | None], ...] = ()  # None: any path
    body: bytes | None = None
    errors: tuple[str, ...] | None = None  # allowed `error` codes for a reject
    must_close: bool = False
    check: Callable[[Recorder, Exchange], None] | None = None


def get(
    target: bytes,
    *headers: bytes,
    auth: bool = True,
    close: bool = True,
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    return (
        method
        + b" "
        + target
        + b" "
        + version
        + b"\r\n"
        + H
        + (A if auth else b"")
        + b"".join(headers)
        + (C if close else b"")
        + b"\r\n"
    )


def post(
    target: bytes, body: bytes, *headers: bytes, auth: bool = True, close: bool = True
) -> bytes:
    length = b"Content-Length: %d\r\n" % len(body)
    return (
        b"POST "
        + target
        + b" HTTP/1.1\r\n"
        + H
        + (A if auth else b"")
        + length
        + b"".join(headers)
        + (C if close else b"")
        + b"\r\n"
        + body
    )


def chunked(target: bytes, body: bytes, *headers: bytes, auth: bool = True) -> bytes:
    return (
        b"POST "
        + target
        + b" HTTP/1.1\r\n"
        + H
        + (A if auth else b"")
        + b"Transfer-Encoding: chunked\r\n"
        + b"".join(headers)
        + C
        + b"\r\n"
        + body
    )


SMUGGLED_GET = b"GET /api/SMUGGLED HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n"
# The same, carrying a valid token: if it ever reaches the upstream, the gateway
# parsed body bytes as a request of their own (a desync).
SMUGGLED_AUTHED = b"GET /api/SMUGGLED HTTP/1.1\r\nHost: gw.example\r\n" + A + b"\r\n"
# Splits a case into pieces sent 0.3 s apart (a client waiting for 100 Continue).
PAUSE_MARK = b"@PAUSE@"
BAD = ("bad_request",)
BAD_OR_LARGE = ("bad_request", "body_too_large")


def upstream_header(seen: Seen, name: str) -> list[str]:
    return [v for _, v in seen.header_values(name)]


def check_xff_is_peer(seen: Recorder, _: Exchange) -> None:
    assert upstream_header(seen.last, "X-Forwarded-For") == ["127.0.0.1"]


def check_not_forwarded(*names: str) -> Callable[[Recorder, Exchange], None]:
    def check(seen: Recorder, _: Exchange) -> None:
        for name in names:
            assert upstream_header(seen.last, name) == [], name

    return check


def check_request_id(seen: Recorder, ex: Exchange) -> None:
    sent = upstream_header(seen.last, "X-Request-Id")
    assert len(sent) == 1 and sent[0] == ex.responses[0].header("X-Request-Id")


def check_host(seen: Recorder, _: Exchange) -> None:
    host = upstream_header(seen.last, "Host")
    assert len(host) == 1 and host[0].startswith("127.0.0.1:"), host


def check_closed(_: Recorder, ex: Exchange) -> None:
    assert ex.closed


MANY_HEADERS = b"".join(b"X-H-%d: v\r\n" % i for i in range(5000))
SOME_HEADERS = b"".join(b"X-H-%d: v\r\n" % i for i in range(60))
LONG_PATH = b"/api/" + b"a/" * 3000 + b"end"
DOTS_PATH = b"/api/" + b"./" * 2000 + b"x"

CASES: list[Case] = [
    # --- message framing: Content-Length and Transfer-Encoding ----------------------
    Case(
        "cl-and-te",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED_GET,
        "reject",
        errors=BAD,
    ),
    Case(
        "te-and-cl",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 60\r\n\r\n0\r\n\r\n" + SMUGGLED_GET,
        "reject",
        errors=BAD,
    ),
    Case(
        "cl-and-te-on-api",
        b"POST /api/x HTTP/1.1\r\nHost: gw.example\r\n" + A + b"Content-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n1\r\nZ\r\n0\r\n\r\n",
        "reject",
        errors=BAD,
    ),
    Case(
        "te-identity-with-cl",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: identity\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        "reject",
        errors=BAD,
    ),
    Case(
        "te-chunked-then-identity",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked, identity\r\n"
        b"\r\n3\r\nabc\r\n0\r\n\r\n",
        "reject",
        errors=BAD,
    ),
    Case(
        "te-xchunked",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: xchunked\r\n"
        b"Content-Length: 3\r\n\r\nabc",
        "reject",
        errors=BAD,
    ),
    Case(
        "te-space-before-colon",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding : chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        "reject",
        errors=BAD,
    ),
    Case(
        "te-obs-fold",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding:\r\n chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        "reject",
        errors=BAD,
    ),
    Case(
        "te-vertical-tab",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding:\x0bchunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        "reject",
        errors=BAD,
    ),
    Case(
        "te-twice",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "either",
        upstream=(("POST", "/public/x"),),
        body=b"abc",
    ),
    Case(
        "te-on-http10",
        b"POST /public/x HTTP/1.0\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\n"
        b"\r\n3\r\nabc\r\n0\r\n\r\n" + SMUGGLED_GET,
        "either",
        upstream=(("POST", "/public/x"),),
        body=b"abc",
        # RFC 9112 6.1: framing is faulty; close the connection after this message.
        must_close=True,
    ),
    Case(
        "cl-conflicting",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 1\r\n"
        b"Content-Length: 41\r\n\r\na" + SMUGGLED_GET[:40],
        "reject",
        errors=BAD,
    ),
    Case(
        "cl-duplicate-equal",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 3\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nabc",
        "either",
        upstream=(("POST", "/public/x"),),
        body=b"abc",
    ),
    Case(
        "cl-list",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 3, 3\r\n"
        b"Connection: close\r\n\r\nabc",
        "either",
        upstream=(("POST", "/public/x"),),
        body=b"abc",
    ),
    Case(
        "cl-negative",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: -1\r\n\r\nabc",
        "reject",
        errors=BAD,
    ),
    Case(
        "cl-plus-sign",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: +3\r\n\r\nabc",
        "reject",
        errors=BAD,
    ),
    Case(
        "cl-hex",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 0x3\r\n\r\nabc",
        "reject",
        errors=BAD,
    ),
    Case(
        "cl-two-numbers",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 3 3\r\n\r\nabc",
        "reject",
        errors=BAD,
    ),
    Case(
        "cl-empty",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: \r\n\r\nabc",
        "reject",
        errors=BAD,
    ),
    Case(
        "cl-overflow",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\n"
        b"Content-Length: 99999999999999999999999999999\r\n\r\nabc",
        "reject",
        errors=BAD_OR_LARGE,
    ),
    Case(
        "cl-huge-over-max-body",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 10000000000\r\n\r\nabc",
        "reject",
        errors=("body_too_large",),
    ),
    Case(
        "request-smuggled-in-cl-body",
        post(b"/public/x", SMUGGLED_GET, auth=False),
        "ok",
        upstream=(("POST", "/public/x"),),
        body=SMUGGLED_GET,
    ),
    # Bytes read in one go behind a chunked request are never served: the parser
    # that read them is dropped with the request's trailers (docs/design.md,
    # "State that lives on a connection"); the answer closes the connection and
    # the client retries them (RFC 9112 9.3.2).
    Case(
        "request-after-chunked-terminator-is-not-served",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED_GET,
        "ok",
        statuses=(200,),
        upstream=(("POST", "/public/x"),),
        body=b"abc",
        must_close=True,
    ),
    Case(
        "request-after-zero-cl-is-its-own",
        b"POST /public/x HTTP/1.1\r\nHost: gw.example\r\nContent-Length: 0\r\n\r\n" + SMUGGLED_GET,
        "ok",
        statuses=(200, 401),
        upstream=(("POST", "/public/x"),),
        body=b"",
    ),
    # --- chunk sizes and extensions ------------------------------------------------
    Case("chunk-size-negative", chunked(b"/api/x", b"-1\r\nA\r\n0\r\n\r\n"), "reject", errors=BAD),
    Case(
        "chunk-size-hex-overflow",
        chunked(b"/api/x", b"1" + b"0" * 32 + b"\r\nA\r\n0\r\n\r\n"),
        "reject",
        errors=BAD_OR_LARGE,
    ),
    Case(
        "chunk-size-overflow-wraps-to-one",
        # 2**64 + 1: a 64-bit accumulator that wraps reads this as 1.
        chunked(b"/api/x", b"10000000000000001\r\nA\r\n0\r\n\r\n" + SMUGGLED_GET),
        "reject",
        errors=BAD_OR_LARGE,
    ),
    Case("chunk-size-non-hex", chunked(b"/api/x", b"zz\r\nA\r\n0\r\n\r\n"), "reject", errors=BAD),
    Case("chunk-size-0x", chunked(b"/api/x", b"0x1\r\nA\r\n0\r\n\r\n"), "reject", errors=BAD),
    Case("chunk-size-empty", chunked(b"/api/x", b"\r\nA\r\n0\r\n\r\n"), "reject", errors=BAD),
    Case(
        "chunk-size-huge",
        chunked(b"/public/x", b"fffffffffff\r\n" + b"A" * 100_000, auth=False),
        "reject",
        errors=BAD_OR_LARGE,
    ),
    Case(
        "chunk-size-trailing-space",
        chunked(b"/api/x", b"1 \r\nA\r\n0\r\n\r\n"),
        "either",
        upstream=(("POST", "/api/x"),),
        body=b"A",
    ),
    Case(
        "chunk-size-bare-lf",
        chunked(b"/api/x", b"1\nA\r\n0\r\n\r\n"),
        "either",
        upstream=(("POST", "/api/x"),),
        body=b"A",
    ),
    Case(
        "chunk-data-longer-than-size",
        chunked(b"/api/x", b"1\r\nAB\r\n0\r\n\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "chunk-data-missing-crlf",
        chunked(b"/api/x", b"1\r\nA0\r\n\r\n" + SMUGGLED_GET),
        "reject",
        errors=BAD,
    ),
    Case(
        "chunk-ext-valid",
        chunked(b"/api/x", b"1;name=value\r\nA\r\n2;a=1;b\r\nBC\r\n0;last\r\n\r\n"),
        "ok",
        upstream=(("POST", "/api/x"),),
        body=b"ABC",
    ),
    Case(
        "chunk-ext-quoted",
        chunked(b"/api/x", b'3;name="v a;l"\r\nabc\r\n0\r\n\r\n'),
        "ok",
        upstream=(("POST", "/api/x"),),
        body=b"abc",
    ),
    Case(
        "chunk-ext-nul",
        chunked(b"/api/x", b"1;a\x00b\r\nA\r\n0\r\n\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "chunk-ext-bare-lf",
        chunked(b"/api/x", b"1;a\nb\r\nA\r\n0\r\n\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "chunk-ext-bare-cr",
        chunked(b"/api/x", b"1;a\rb\r\nA\r\n0\r\n\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "chunk-trailer-forged-identity",
        chunked(b"/api/x", b"1\r\nA\r\n0\r\nX-OpenId: " + FORGED.encode() + b"\r\n\r\n"),
        "ok",
        upstream=(("POST", "/api/x"),),
        body=b"A",
    ),
    Case(
        "chunk-trailer-framing-fields",
        chunked(
            b"/api/x",
            b"1\r\nA\r\n0\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n",
        ),
        "either",
        upstream=(("POST", "/api/x"),),
        body=b"A",
    ),
    # --- line endings, obs-fold, CR/LF/NUL in header values ---------------------
    Case(
        "bare-lf-everywhere",
        (b"GET /api/x HTTP/1.1\r\n" + H + A + C + b"\r\n").replace(b"\r\n", b"\n"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "bare-lf-header-injection",
        get(b"/api/x", b"X-Note: a\nX-OpenId: " + FORGED.encode() + b"\r\n"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "bare-cr-header-injection",
        get(b"/api/x", b"X-Note: a\rX-OpenId: " + FORGED.encode() + b"\r\n"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "bare-cr-without-token",
        get(b"/api/SMUGGLED", b"X-Note: a\rAuthorization: Bearer x\r\n", auth=False),
        "reject",
        errors=("bad_request", "token_missing"),
    ),
    Case(
        "nul-in-header-value",
        get(b"/api/x", b"X-Note: a\x00X-OpenId: " + FORGED.encode() + b"\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "ctl-in-header-value",
        get(b"/api/x", b"X-Note: a\x01b\x7fc\r\n"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "obs-fold-identity",
        get(b"/api/x", b"X-Note: a\r\n X-OpenId: " + FORGED.encode() + b"\r\n"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "obs-fold-tab",
        get(b"/api/x", b"X-Note: a\r\n\tb\r\n"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "obs-fold-authorization",
        b"GET /api/x HTTP/1.1\r\nHost: gw.example\r\nAuthorization: Bearer\r\n "
        + TOKEN
        + b"\r\n"
        + C
        + b"\r\n",
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "obs-fold-first-field",
        b"GET /api/x HTTP/1.1\r\n X-OpenId: " + FORGED.encode() + b"\r\n" + H + A + C + b"\r\n",
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "oversized-request-line",
        get(b"/api/" + b"a" * 20_000),
        "reject",
        errors=BAD,
    ),
    Case(
        "oversized-header-value",
        get(b"/api/x", b"X-Big: " + b"a" * 20_000 + b"\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "oversized-header-name",
        get(b"/api/x", b"X-" + b"a" * 20_000 + b": v\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "oversized-head-in-many-fields",
        get(b"/api/x", *(b"X-Pad-%d: %s\r\n" % (i, b"p" * 8000) for i in range(40))),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "thousands-of-headers",
        get(b"/api/x", MANY_HEADERS),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "sixty-headers",
        get(b"/api/x", SOME_HEADERS),
        "ok",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "non-utf8-header-value",
        get(b"/api/x", b"X-Note: \xff\xfe\x80 \xc3\x28\r\n"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "non-utf8-header-name",
        get(b"/api/x", b"X-\xff\xfe: v\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "non-utf8-in-identity-lookalike",
        get(b"/api/x", b"X-Open\xc4\xb0d: " + FORGED.encode() + b"\r\n"),
        "reject",
        errors=BAD,
    ),
    # --- absurd request targets -------------------------------------------------------
    Case("non-utf8-path", get(b"/api/\xff\xfe\x80"), "either", upstream=(("GET", None),)),
    Case("utf8-path", get(b"/api/\xc3\xa9t\xc3\xa9"), "either", upstream=(("GET", None),)),
    Case(
        "very-long-path",
        get(LONG_PATH),
        "ok",
        upstream=(("GET", LONG_PATH.decode()),),
    ),
    Case("many-dot-segments", get(DOTS_PATH), "ok", upstream=(("GET", "/api/x"),)),
    Case(
        "dot-dot-into-api-without-token",
        get(b"/public/" + b"a/" * 50 + b"../" * 51 + b"api/SMUGGLED", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "dot-dot-above-root",
        get(b"/public/" + b"../" * 100 + b"api/SMUGGLED", auth=False),
        "reject",
        errors=BAD,
    ),
    Case(
        "encoded-slash",
        get(b"/public/..%2Fapi%2FSMUGGLED", auth=False),
        "reject",
        errors=BAD,
    ),
    Case("encoded-slash-lower", get(b"/api/a%2fb"), "reject", errors=BAD),
    Case("encoded-nul", get(b"/api/x%00.json"), "reject", errors=BAD),
    Case("raw-nul-in-path", get(b"/api/x\x00y"), "reject", errors=BAD),
    Case(
        "backslash",
        get(b"/public/..\\api\\SMUGGLED", auth=False),
        "reject",
        errors=BAD,
    ),
    Case(
        "encoded-backslash", get(b"/public/..%5capi%5cSMUGGLED", auth=False), "reject", errors=BAD
    ),
    Case(
        "encoded-dot-dot-into-api",
        get(b"/public/%2e%2E/api/SMUGGLED", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "semicolon-dot-dot-into-api",
        get(b"/public/..;x=1/api/SMUGGLED", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "double-encoded-dot-dot-stays-public",
        get(b"/public/%252e%252e/api/x", auth=False),
        "ok",
        upstream=(("GET", "/public/%252e%252e/api/x"),),
    ),
    Case(
        "absolute-form-other-host",
        get(b"http://evil.example:8443/api/x?q=1"),
        "ok",
        upstream=(("GET", "/api/x?q=1"),),
        check=check_host,
    ),
    Case(
        "absolute-form-other-host-without-token",
        get(b"http://evil.example/api/SMUGGLED", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "absolute-form-userinfo",
        get(b"http://user:pw@evil.example/api/x"),
        "either",
        upstream=(("GET", "/api/x"),),
        check=check_host,
    ),
    Case("absolute-form-ftp", get(b"ftp://evil.example/api/x"), "reject", errors=BAD),
    Case("authority-form", get(b"evil.example:443"), "reject", errors=BAD),
    Case("asterisk-form", get(b"*", method=b"OPTIONS"), "reject", errors=BAD),
    Case("relative-target", get(b"api/x"), "reject", errors=BAD),
    Case("fragment", get(b"/api/x#frag"), "reject", errors=BAD),
    Case(
        "scheme-relative-lookalike",
        get(b"//evil.example/api/SMUGGLED", auth=False),
        "reject",
        errors=("no_route", "token_missing", "bad_request"),
    ),
    Case(
        "own-endpoint-behind-dot-dot",
        get(b"/api/../auth/me", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "health-behind-dot-dot",
        get(b"/public/../healthz", auth=False),
        "ok",
        upstream=(),
    ),
    Case(
        "query-kept-verbatim",
        get(b"/api/x?next=/../../etc/passwd&e=%2F%00%5c&u=%C3%A9&&="),
        "ok",
        upstream=(("GET", "/api/x?next=/../../etc/passwd&e=%2F%00%5c&u=%C3%A9&&="),),
    ),
    Case(
        "non-ascii-in-query",
        get(b"/api/x?u=\xc3\xa9&v=\xff"),
        "either",
        upstream=(("GET", None),),
    ),
    # --- Connection-listed names: hop-by-hop abuse -------------------------------
    Case(
        "connection-x-openid",
        get(b"/api/x", b"Connection: X-OpenId\r\n", b"X-OpenId: " + FORGED.encode() + b"\r\n"),
        "ok",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "connection-x-openid-without-token",
        get(b"/api/SMUGGLED", b"Connection: X-OpenId\r\n", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "connection-x-openid-optional-route",
        get(
            b"/opt/x",
            b"Connection: X-OpenId, X-UnionId\r\n",
            b"X-OpenId: " + FORGED.encode() + b"\r\n",
            b"X-UnionId: " + FORGED.encode() + b"\r\n",
            auth=False,
        ),
        "ok",
        upstream=(("GET", "/opt/x"),),
    ),
    Case(
        "connection-underscore-identity",
        get(
            b"/api/x",
            b"Connection: X_OpenId\r\n",
            b"X_OpenId: " + FORGED.encode() + b"\r\n",
        ),
        "ok",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "connection-x-forwarded-for",
        get(
            b"/api/x",
            b"Connection: X-Forwarded-For\r\n",
            b"X-Forwarded-For: 6.6.6.6\r\n",
        ),
        "ok",
        upstream=(("GET", "/api/x"),),
        check=check_xff_is_peer,
    ),
    Case(
        "connection-authorization",
        get(b"/api/x", b"Connection: Authorization\r\n"),
        "ok",
        upstream=(("GET", "/api/x"),),
        check=check_not_forwarded("Authorization"),
    ),
    Case(
        "connection-authorization-without-token",
        get(b"/api/SMUGGLED", b"Connection: Authorization\r\n", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "connection-x-request-id",
        get(b"/api/x", b"Connection: X-Request-Id\r\n", b"X-Request-Id: rid-hostile-1\r\n"),
        "ok",
        upstream=(("GET", "/api/x"),),
        check=check_request_id,
    ),
    Case(
        "connection-host",
        get(b"/api/x", b"Connection: Host\r\n"),
        "ok",
        upstream=(("GET", "/api/x"),),
        check=check_host,
    ),
    Case(
        "connection-content-length",
        post(b"/api/x", b"hello", b"Connection: Content-Length\r\n"),
        "ok",
        upstream=(("POST", "/api/x"),),
        body=b"hello",
    ),
    Case(
        "connection-transfer-encoding",
        chunked(b"/api/x", b"5\r\nhello\r\n0\r\n\r\n", b"Connection: Transfer-Encoding\r\n"),
        "ok",
        upstream=(("POST", "/api/x"),),
        body=b"hello",
    ),
    Case(
        "connection-custom-hop",
        get(b"/api/x", b"Connection: X-Private, keep-alive\r\n", b"X-Private: secret\r\n"),
        "ok",
        upstream=(("GET", "/api/x"),),
        check=check_not_forwarded("X-Private", "Keep-Alive"),
    ),
    Case(
        "hop-by-hop-without-connection",
        get(
            b"/api/x",
            b"Keep-Alive: timeout=5\r\n",
            b"TE: trailers\r\n",
            b"Trailer: X-T\r\n",
            b"Proxy-Authorization: Basic dXNlcjpwdw==\r\n",
            b"Proxy-Connection: keep-alive\r\n",
        ),
        "ok",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "upgrade-h2c",
        get(
            b"/public/x",
            b"Connection: Upgrade, HTTP2-Settings\r\n",
            b"Upgrade: h2c\r\n",
            b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n",
            auth=False,
            close=False,
        ),
        "reject",
        errors=BAD,
    ),
    Case(
        "upgrade-websocket-on-plain-route",
        get(
            b"/public/x",
            b"Connection: Upgrade\r\n",
            b"Upgrade: websocket\r\n",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"Sec-WebSocket-Version: 13\r\n",
            auth=False,
            close=False,
        ),
        "reject",
        errors=BAD,
    ),
    Case(
        "upgrade-websocket-without-token",
        get(
            b"/api/ws",
            b"Connection: Upgrade\r\n",
            b"Upgrade: websocket\r\n",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            b"Sec-WebSocket-Version: 13\r\n",
            auth=False,
            close=False,
        ),
        "reject",
        errors=("token_missing",),
    ),
    # --- identity header name variants ------------------------------------------
    *[
        Case(
            f"identity-spelling-{label}",
            get(b"/api/x", name + b": " + FORGED.encode() + b"\r\n"),
            "ok",
            upstream=(("GET", "/api/x"),),
        )
        for label, name in [
            ("underscore", b"X_OpenId"),
            ("lower", b"x-openid"),
            ("upper", b"X-OPENID"),
            ("mixed-underscore", b"x_OPENiD"),
            ("unionid-underscore", b"X_UnionId"),
            ("unionid-upper", b"X-UNIONID"),
        ]
    ],
    Case(
        "identity-value-tab-ows",
        get(b"/api/x", b"X-OpenId:\t" + FORGED.encode() + b"\t\r\n"),
        "ok",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "identity-space-before-colon",
        get(b"/api/x", b"X-OpenId : " + FORGED.encode() + b"\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "identity-tab-before-colon",
        get(b"/api/x", b"X-OpenId\t: " + FORGED.encode() + b"\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "identity-nul-in-name",
        get(b"/api/x", b"X-OpenId\x00: " + FORGED.encode() + b"\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "identity-space-inside-name",
        get(b"/api/x", b"X-Open Id: " + FORGED.encode() + b"\r\n"),
        "reject",
        errors=BAD,
    ),
    Case(
        "identity-only-on-optional-route",
        get(
            b"/opt/x",
            b"X-OpenId: " + FORGED.encode() + b"\r\n",
            b"x_openid: " + FORGED.encode() + b"\r\n",
            auth=False,
        ),
        "ok",
        upstream=(("GET", "/opt/x"),),
    ),
    Case(
        "identity-only-on-public-route",
        get(b"/public/x", b"X-OpenId: " + FORGED.encode() + b"\r\n"),
        "ok",
        upstream=(("GET", "/public/x"),),
    ),
    # RFC 7515 section 2: base64url without `=` padding; a padded token is not
    # the token that was issued (contract section 4: malformed/tampered -> 401).
    Case(
        "token-with-base64-padding",
        get(b"/api/padded", auth=False).replace(
            H, H + b"Authorization: Bearer " + TOKEN + b"=\r\n"
        ),
        "reject",
        errors=("token_invalid",),
    ),
    Case(
        "two-authorization-headers",
        get(b"/api/SMUGGLED", b"Authorization: Bearer not-a-token\r\n"),
        "reject",
        errors=("token_invalid",),
    ),
    Case(
        "authorization-underscore-spelling-only",
        get(b"/api/SMUGGLED", b"Authorization_: x\r\n", auth=False),
        "reject",
        errors=("token_missing",),
    ),
    # --- protocol versions, methods, garbage ----------------------------------------
    Case(
        "http10",
        get(b"/api/x", version=b"HTTP/1.0", close=False),
        "ok",
        upstream=(("GET", "/api/x"),),
        check=check_closed,
    ),
    Case(
        "http10-keep-alive",
        get(b"/api/x", b"Connection: keep-alive\r\n", version=b"HTTP/1.0", close=False),
        "ok",
        upstream=(("GET", "/api/x"),),
    ),
    # Both tokens, in two fields: close wins (h11, RFC 9112 9.6); llhttp alone
    # would keep the connection (found by test_framing_differential).
    Case(
        "http10-keep-alive-and-close",
        get(
            b"/api/x",
            b"Connection: keep-alive\r\nConnection: close\r\n",
            version=b"HTTP/1.0",
            close=False,
        ),
        "ok",
        upstream=(("GET", "/api/x"),),
        check=check_closed,
    ),
    # An HTTP/0.9 line carries no headers, so no token: never past /api/.
    Case(
        "http09",
        b"GET /api/SMUGGLED\r\n\r\n",
        "reject",
        errors=("bad_request", "token_missing"),
    ),
    Case(
        "http09-public",
        b"GET /public/x\r\n\r\n",
        "either",
        upstream=(("GET", "/public/x"),),
    ),
    Case(
        "http2-version-line",
        get(b"/api/x", version=b"HTTP/2.0"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case("http-version-garbage", get(b"/api/x", version=b"HTTP/1.x"), "reject", errors=BAD),
    Case("http-version-lowercase", get(b"/api/x", version=b"http/1.1"), "reject", errors=BAD),
    Case(
        "h2-preface",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00",
        "reject",
        errors=BAD,
    ),
    Case(
        "tls-client-hello",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",
        "reject",
        errors=BAD,
    ),
    Case(
        "response-line-as-request",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        "reject",
        errors=BAD,
    ),
    # RFC 9112 3: a recipient MAY split the request line on any whitespace run.
    Case(
        "request-line-extra-spaces",
        b"GET  /api/x  HTTP/1.1\r\n" + H + A + C + b"\r\n",
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "request-line-trailing-word",
        get(b"/api/x", version=b"HTTP/1.1 extra"),
        "reject",
        errors=BAD,
    ),
    Case(
        "empty-lines-before-request",
        b"\r\n\r\n" + get(b"/api/x"),
        "either",
        upstream=(("GET", "/api/x"),),
    ),
    Case(
        "unknown-method",
        get(b"/api/x", method=b"FROBNICATE"),
        "either",
        upstream=(("FROBNICATE", "/api/x"),),
    ),
    Case(
        "unknown-method-without-token",
        get(b"/api/SMUGGLED", method=b"FROBNICATE", auth=False),
        "reject",
        errors=("bad_request", "token_missing", "method_not_allowed"),
    ),
    Case(
        "lowercase-method", get(b"/api/x", method=b"get"), "either", upstream=(("get", "/api/x"),)
    ),
    Case(
        "webdav-method",
        get(b"/api/x", method=b"PROPFIND"),
        "ok",
        upstream=(("PROPFIND", "/api/x"),),
    ),
    Case("method-with-nul", get(b"/api/x", method=b"G\x00T"), "reject", errors=BAD),
    Case(
        "connect-method",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n" + A + b"\r\n",
        "reject",
        errors=("bad_request", "method_not_allowed"),
    ),
    Case(
        "trace-method",
        get(b"/api/x", method=b"TRACE"),
        "reject",
        errors=("method_not_allowed",),
    ),
    # --- an early answer must not turn the unread body into requests -------------
    Case(
        "unauthenticated-post-body-holds-request",
        post(b"/api/x", SMUGGLED_AUTHED, auth=False, close=False),
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "bad-path-post-body-holds-request",
        post(b"/api/a%2fb", SMUGGLED_AUTHED, close=False),
        "reject",
        errors=BAD,
    ),
    Case(
        "no-route-post-body-holds-request",
        post(b"/nowhere", SMUGGLED_AUTHED, close=False),
        "reject",
        errors=("no_route",),
    ),
    Case(
        "trace-body-holds-request",
        post(b"/api/x", SMUGGLED_AUTHED, close=False).replace(b"POST", b"TRACE", 1),
        "reject",
        errors=("method_not_allowed",),
    ),
    Case(
        "own-endpoint-body-holds-request",
        post(b"/healthz", SMUGGLED_AUTHED, close=False),
        "reject",
        errors=("method_not_allowed",),
    ),
    Case(
        "over-max-body-cl-body-holds-request",
        post(b"/api/x", SMUGGLED_AUTHED + b"p" * 70_000, close=False),
        "reject",
        errors=("body_too_large",),
    ),
    Case(
        "over-max-body-cl-partial-body-holds-request",
        post(b"/api/x", SMUGGLED_AUTHED + b"p" * 70_000, close=False)[:-60_000],
        "reject",
        errors=("body_too_large",),
    ),
    Case(
        "over-max-body-chunked-holds-request",
        chunked(
            b"/api/x",
            b"%x\r\n" % (70_000 + len(SMUGGLED_AUTHED))
            + b"p" * 70_000
            + SMUGGLED_AUTHED
            + b"\r\n0\r\n\r\n",
        ).replace(C, b""),
        "reject",
        errors=("body_too_large",),
    ),
    Case(
        "expect-100-refused-then-body-holds-request",
        post(b"/api/x", b"", b"Expect: 100-continue\r\n", auth=False, close=False).replace(
            b"Content-Length: 0", b"Content-Length: %d" % len(SMUGGLED_AUTHED)
        )
        + PAUSE_MARK
        + SMUGGLED_AUTHED,
        "reject",
        errors=("token_missing",),
    ),
    Case(
        "expect-100-too-large-then-body-holds-request",
        post(b"/api/x", b"", b"Expect: 100-continue\r\n", close=False).replace(
            b"Content-Length: 0", b"Content-Length: 70000"
        )
        + PAUSE_MARK
        + SMUGGLED_AUTHED
        + b"p" * (70_000 - len(SMUGGLED_AUTHED)),
        "reject",
        errors=("body_too_large",),
    ),
    Case(
        "expect-100-accepted",
        post(b"/api/x", b"", b"Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: 5"
        )
        + PAUSE_MARK
        + b"hello",
        "ok",
        upstream=(("POST", "/api/x"),),
        body=b"hello",
        check=check_not_forwarded("Expect"),
    ),
    # --- pipelining --------------------------------------------------------------------
    Case(
        "pipeline-two-valid",
        get(b"/api/one", close=False) + get(b"/api/two"),
        "ok",
        statuses=(200, 200),
        upstream=(("GET", "/api/one"), ("GET", "/api/two")),
    ),
    Case(
        "pipeline-second-without-token",
        get(b"/api/one", close=False) + get(b"/api/SMUGGLED", auth=False),
        "ok",
        statuses=(200, 401),
        upstream=(("GET", "/api/one"),),
    ),
    Case(
        "pipeline-second-forges-identity",
        get(b"/api/one", close=False)
        + get(b"/api/two", b"X-OpenId: " + FORGED.encode() + b"\r\n", auth=False),
        "ok",
        statuses=(200, 401),
        upstream=(("GET", "/api/one"),),
    ),
    Case(
        "pipeline-post-then-get",
        post(b"/api/one", b"0123456789", close=False) + get(b"/api/two"),
        "ok",
        statuses=(200, 200),
        upstream=(("POST", "/api/one"), ("GET", "/api/two")),
        body=b"0123456789",
    ),
    Case(
        "pipeline-twenty",
        b"".join(get(b"/api/n%d" % i, close=False) for i in range(19)) + get(b"/api/n19"),
        "ok",
        statuses=(200,) * 20,
        upstream=tuple(("GET", f"/api/n{i}") for i in range(20)),
    ),
]

IDS = [c.id for c in CASES]
assert len(set(IDS)) == len(IDS), "case ids must be unique"


# -- the checks -------------------------------------------------------------------


def token_sent(raw: bytes) -> bool:
    return TOKEN in raw


def assert_answers_sane(ex: Exchange) -> None:
    for response in ex.responses:
        assert response.status < 500, (response.status, response.body[:300])
        if response.status >= 400:
            assert_error(response, None)


def assert_upstream_clean(seen: Recorder, *, token_sent: bool) -> None:
    """What the upstream received, whatever the case: nothing smuggled, nothing
    forged, no token, no hop-by-hop field, no control character."""
    for record in seen.seen:
        path = record.raw_path
        assert "SMUGGLED" not in path, f"a smuggled request reached the upstream: {record}"
        identity = [(k, v) for k, v in record.headers if fold(k) in ("x-openid", "x-unionid")]
        if path.startswith("/api/"):
            assert token_sent, f"an unauthenticated request reached /api/: {record}"
            assert identity == [("X-OpenId", OPENID)], identity
        elif path.startswith("/public/") or not token_sent:
            assert identity == [], identity
        else:
            assert identity in ([], [("X-OpenId", OPENID)]), identity
        for name, value in record.headers:
            assert fold(name) != "authorization", f"token header forwarded: {record}"
            assert name.lower() not in HOP_BY_HOP, f"hop-by-hop {name} forwarded"
            assert not any(c in name for c in "\r\n\x00 \t:"), repr(name)
            assert not any(c in value for c in "\r\n\x00"), repr(value)
            if fold(name) in ("x-openid", "x-unionid"):
                assert FORGED not in value


def classify(case: Case, ex: Exchange) -> str:
    if not ex.responses:
        assert ex.closed, f"no answer and the connection is still open: {ex.rest[:200]!r}"
        return "reject"
    first = ex.responses[0]
    if 400 <= first.status < 500 and (case.expect != "ok" or first.status != case.statuses[0]):
        return "reject"
    return "ok"


def pieces(raw: bytes) -> list[bytes]:
    return raw.split(PAUSE_MARK)


def check_case(case: Case, ex: Exchange, seen: Recorder, token_sent: bool) -> None:
    assert_answers_sane(ex)
    assert_upstream_clean(seen, token_sent=token_sent)
    outcome = classify(case, ex)
    if case.expect != "either":
        assert outcome == case.expect, (
            f"expected {case.expect}, got {ex.statuses()} closed={ex.closed} "
            f"{[r.body[:200] for r in ex.responses]} upstream={[s.raw_path for s in seen.seen]}"
        )
    if outcome == "reject":
        # One answer, then nothing: a second one means bytes after the refused
        # request were read as another request.
        assert len(ex.responses) <= 1, ex.statuses()
        assert seen.seen == [], [(s.method, s.raw_path) for s in seen.seen]
        if ex.responses:
            assert_error(ex.responses[0], None, case.errors)
        return
    assert tuple(ex.statuses()) == case.statuses, (ex.statuses(), ex.rest[:200])
    got = [(s.method, s.raw_path) for s in seen.seen]
    want = [(m, p) for m, p in case.upstream]
    assert len(got) == len(want), (got, want)
    for (gm, gp), (wm, wp) in zip(got, want, strict=True):
        assert gm == wm, (got, want)
        if wp is not None:
            assert gp == wp, (got, want)
    if case.body is not None:
        assert seen.seen[0].body == case.body, seen.seen[0].body[:200]
    for response in ex.responses:
        if response.status == 200 and seen.seen:
            assert response.header("X-Request-Id"), response.headers
    if case.must_close:
        assert ex.closed
    if case.check is not None:
        case.check(seen, ex)


async def assert_still_serving(port: int, seen: Recorder) -> None:
    before = len(seen.seen)
    ex = await exchange(port, get(b"/api/after-hostile"))
    assert ex.statuses() == [200], (ex.statuses(), ex.rest[:200])
    assert len(seen.seen) == before + 1
    last = seen.last
    assert last.raw_path == "/api/after-hostile"
    assert upstream_header(last, "X-OpenId") == [OPENID]


def assert_no_error_logs(caplog: pytest.LogCaptureFixture) -> None:
    bad = [
        r
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.split(".")[0] in ("gateway", "aiohttp")
    ]
    assert not bad, [f"{r.name}: {r.getMessage()} {r.exc_text or ''}" for r in bad]


@pytest.fixture
async def hostile_gw(start_gateway: StartGateway) -> Running:
    # A small max_body so "huge" bodies hit the limit in a few kilobytes.
    return await start_gateway(server={"max_body": "64KiB"})


@pytest.mark.parametrize("case", CASES, ids=IDS)
async def test_hostile_request(
    hostile_gw: Running, seen: Recorder, caplog: pytest.LogCaptureFixture, case: Case
) -> None:
    raw = case.raw
    ex = await exchange(
        hostile_gw.listener.port, pieces(raw), expect=max(1, len(case.statuses)), pause=0.3
    )
    check_case(case, ex, seen, token_sent=token_sent(case.raw))
    await assert_still_serving(hostile_gw.listener.port, seen)
    assert_no_error_logs(caplog)


# -- slowloris ------------------------------------------------------------------------


async def test_slowloris_does_not_block_other_clients(
    hostile_gw: Running, seen: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty clients trickle their header bytes for ~6 s (within the 10 s
    header_timeout); meanwhile normal requests are answered, and the trickled
    requests end in a sane way. No clock is read: a gateway that the tricklers
    blocked would answer nothing until the first of them was done."""
    port = hostile_gw.listener.port
    head = b"GET /api/trickled HTTP/1.1\r\nHost: gw.example\r\n" + A + b"X-Trickle: " + b"t" * 20

    async def trickler() -> Exchange:
        pieces = [head[:20]] + [bytes([b]) for b in head[20:]] + [b"\r\n" + C + b"\r\n"]
        # ~6 s in total, whatever the head's length.
        return await exchange(port, pieces, pause=6.0 / len(pieces))

    slow = [asyncio.create_task(trickler()) for _ in range(20)]
    served_meanwhile = 0
    while not any(t.done() for t in slow) and served_meanwhile < 10:
        ex = await exchange(port, get(b"/api/meanwhile"))
        assert ex.statuses() == [200], ex.statuses()
        if not any(t.done() for t in slow):
            served_meanwhile += 1
        await asyncio.sleep(0.1)
    results = await asyncio.gather(*slow)
    assert served_meanwhile >= 3, f"{served_meanwhile} requests served while the tricklers ran"
    for ex in results:
        assert_answers_sane(ex)
        # Either served once its head was complete, or refused/closed as too slow.
        assert ex.statuses() in ([200], []) or 400 <= ex.statuses()[0] < 500, ex.statuses()
    assert_upstream_clean(seen, token_sent=True)
    slow_seen = [s for s in seen.seen if s.raw_path == "/api/trickled"]
    assert len(slow_seen) == sum(1 for ex in results if ex.statuses() == [200])
    await assert_still_serving(port, seen)
    assert_no_error_logs(caplog)


async def test_slow_body_does_not_block_other_clients(hostile_gw: Running, seen: Recorder) -> None:
    """A body trickled a byte at a time (~8 s) is relayed as it comes; others are
    served meanwhile, while it is still arriving."""
    port = hostile_gw.listener.port
    body = b"0123456789abcdef"
    head = post(b"/api/trickled-body", body)[: -len(body)]
    task = asyncio.create_task(exchange(port, [head, *[bytes([b]) for b in body]], pause=0.5))
    for _ in range(5):
        ex = await exchange(port, get(b"/api/meanwhile"))
        assert ex.statuses() == [200]
        assert not task.done(), "the trickled body ended before the others were served"
    ex = await task
    assert ex.statuses() == [200]
    record = next(s for s in seen.seen if s.raw_path == "/api/trickled-body")
    assert record.body == body
    assert upstream_header(record, "X-OpenId") == [OPENID]


# -- the same against `gateway run` with two workers ----------------------------


SUBPROCESS_CASES = [
    c
    for c in CASES
    if c.id
    in {
        "cl-and-te",
        "cl-conflicting",
        "chunk-size-negative",
        "chunk-size-hex-overflow",
        "chunk-size-huge",
        "chunk-data-missing-crlf",
        "nul-in-header-value",
        "bare-cr-header-injection",
        "oversized-request-line",
        "thousands-of-headers",
        "non-utf8-path",
        "encoded-slash",
        "connection-x-openid",
        "http09",
        "h2-preface",
        "tls-client-hello",
        "pipeline-second-without-token",
        "request-after-chunked-terminator-is-not-served",
    }
]


async def test_battery_against_two_workers(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, seen: Recorder
) -> None:
    raw = config_for(tmp_path, upstream, wechat, server={"workers": 2, "max_body": "64KiB"})
    gateway = await spawn(tmp_path, raw, name="hostile")
    port = raw["server"]["port"]
    try:
        workers = await wait_workers(gateway, 2)
        # Both workers must be accepting before we start (SO_REUSEPORT spreads
        # connections by their source port, so each case is sent several times).
        await assert_still_serving(port, seen)
        for case in SUBPROCESS_CASES:
            for _ in range(4):
                seen.seen.clear()
                ex = await exchange(
                    port,
                    pieces(case.raw),
                    expect=max(1, len(case.statuses)),
                    pause=0.3,
                )
                check_case(case, ex, seen, token_sent=token_sent(case.raw))
        for _ in range(8):
            await assert_still_serving(port, seen)
        assert sorted(children(gateway.pid)) == workers, "a worker died and was replaced"
    finally:
        code = await asyncio.to_thread(gateway.stop)
    output = gateway.output()
    assert code == 0, output
    assert "Traceback" not in output, output
    assert "exited with" not in output, output
