"""What headers the upstream sees, and the client gets back, whatever is sent.

Contract sections 5 and 8: identity headers (configured and default names, any
case, `_` spellings) are stripped on every route before the gateway sets its
own; the token header is never forwarded; hop-by-hop headers (RFC 9110 7.6.1,
those listed in `Connection`, Proxy-Authorization) are not forwarded, either
way; X-Forwarded-* are replaced from untrusted peers and extended from trusted
ones; Forwarded and X-Real-IP are removed from untrusted peers and kept from
trusted ones; X-Request-Id is passed through or generated and returned.
(Error answers, and the request id they carry: tests/test_errors.py.)

Requests go over raw sockets so that duplicate headers, `_` names and odd
`Connection` values reach the gateway exactly as written.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.support.errors import assert_error
from tests.support.gateway import Running, StartGateway
from tests.support.rawhttp import Response, request
from tests.support.rawupstream import RawUpstream
from tests.support.upstream import Recorder

DEFAULT_IDENTITY = ("x-openid", "x-unionid")
CUSTOM_IDENTITY = {"openid_header": "X-User", "unionid_header": "X-Union"}
SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


async def send(
    port: int, target: str = "/public/x", headers: list[tuple[str, str]] | None = None, **kw: Any
) -> Response:
    """One request over a raw socket, header lines exactly as given; read to EOF."""
    return await request(port, target, headers or [], host="front.example", **kw)


def upstream_values(seen: Recorder, *names: str) -> list[tuple[str, str]]:
    """Every header the upstream got whose name folds (case, `_` -> `-`) to one of names."""
    return seen.last.header_values(*names)


# -- identity headers ------------------------------------------------------------------

# (route prefix, token sent?) -> the policy's answer; required without a token is 401.
POLICIES = [
    ("/api/", True),
    ("/opt/", True),
    ("/opt/", False),
    ("/public/", True),
    ("/public/", False),
]
DEFAULT_SPOOFS = ["X-OpenId", "x-openid", "X_OpenId", "X-OPENID", "X-UnionId", "x_unionid"]
CUSTOM_SPOOFS = [
    *DEFAULT_SPOOFS,
    "X-User",
    "x-user",
    "X_User",
    "X-UNION",
    "x_union",
]


def expected_identity(
    prefix: str, with_token: bool, openid_header: str, unionid_header: str
) -> list[tuple[str, str]]:
    if with_token and prefix != "/public/":
        return [(openid_header, "o-real"), (unionid_header, "u-real")]
    return []


@pytest.mark.parametrize("spoof", DEFAULT_SPOOFS)
@pytest.mark.parametrize(("prefix", "with_token"), POLICIES)
async def test_spoofed_identity_is_stripped_default_names(
    gw: Running, seen: Recorder, spoof: str, prefix: str, with_token: bool
) -> None:
    headers = [(spoof, "o-forged")]
    if with_token:
        headers.append(("Authorization", f"Bearer {gw.token('o-real', 'u-real')}"))
    reply = await send(gw.listener.port, prefix + "x", headers)
    assert reply.status == 200, reply.body
    assert upstream_values(seen, *DEFAULT_IDENTITY) == expected_identity(
        prefix, with_token, "X-OpenId", "X-UnionId"
    )


@pytest.mark.parametrize("spoof", CUSTOM_SPOOFS)
@pytest.mark.parametrize(("prefix", "with_token"), POLICIES)
async def test_spoofed_identity_is_stripped_custom_names(
    start_gateway: StartGateway, seen: Recorder, spoof: str, prefix: str, with_token: bool
) -> None:
    gw = await start_gateway(identity=CUSTOM_IDENTITY)
    headers = [(spoof, "o-forged")]
    if with_token:
        headers.append(("Authorization", f"Bearer {gw.token('o-real', 'u-real')}"))
    reply = await send(gw.listener.port, prefix + "x", headers)
    assert reply.status == 200, reply.body
    # Neither the custom nor the default names may carry anything but the gateway's value.
    assert upstream_values(seen, "X-User", "X-Union", *DEFAULT_IDENTITY) == expected_identity(
        prefix, with_token, "X-User", "X-Union"
    )


@pytest.mark.parametrize("identity", [None, CUSTOM_IDENTITY], ids=["default", "custom"])
async def test_required_route_without_token_with_spoofed_identity_is_401(
    start_gateway: StartGateway, seen: Recorder, identity: dict[str, str] | None
) -> None:
    gw = await start_gateway(**({"identity": identity} if identity else {}))
    reply = await send(
        gw.listener.port, "/api/x", [("X-OpenId", "o-forged"), ("X-User", "o-forged")]
    )
    assert_error(reply, 401, "token_missing")
    assert seen.seen == []


@pytest.mark.parametrize(("prefix", "with_token"), POLICIES)
async def test_duplicated_identity_headers_all_stripped(
    gw: Running, seen: Recorder, prefix: str, with_token: bool
) -> None:
    headers = [
        ("X-OpenId", "o-forged-1"),
        ("X-OpenId", "o-forged-2"),
        ("x_openid", "o-forged-3"),
        ("X-OPENID", "o-forged-4"),
        ("X-UnionId", "u-forged-1"),
        ("X-UnionId", "u-forged-2"),
        ("X_UNIONID", "u-forged-3"),
    ]
    if with_token:
        headers.insert(3, ("Authorization", f"Bearer {gw.token('o-real', 'u-real')}"))
    reply = await send(gw.listener.port, prefix + "x", headers)
    assert reply.status == 200, reply.body
    assert upstream_values(seen, *DEFAULT_IDENTITY) == expected_identity(
        prefix, with_token, "X-OpenId", "X-UnionId"
    )


async def test_token_without_unionid_sends_no_unionid(gw: Running, seen: Recorder) -> None:
    reply = await send(
        gw.listener.port,
        "/api/x",
        [("X-UnionId", "u-forged"), ("Authorization", f"Bearer {gw.token('o-real')}")],
    )
    assert reply.status == 200
    assert upstream_values(seen, *DEFAULT_IDENTITY) == [("X-OpenId", "o-real")]


IDENTITY_SPELLINGS = [
    "X-OpenId",
    "x-openid",
    "X_OpenId",
    "X-OPENID",
    "x_openid",
    "X-UnionId",
    "x_unionid",
]


@pytest.mark.parametrize("name", IDENTITY_SPELLINGS)
@pytest.mark.parametrize(("prefix", "with_token"), POLICIES)
async def test_identity_headers_cannot_be_forged(
    gw: Running, seen: Recorder, name: str, prefix: str, with_token: bool
) -> None:
    # Two lines of the same spelling, the token (if any) carrying no unionid.
    token = [("Authorization", f"Bearer {gw.token('o-real', None)}")] if with_token else []
    reply = await request(
        gw.listener.port, prefix + "x", [*token, (name, "o-forged"), (name, "o-forged-2")]
    )
    assert reply.status == 200
    expected = [("X-OpenId", "o-real")] if with_token and prefix != "/public/" else []
    assert upstream_values(seen, *DEFAULT_IDENTITY) == expected
    assert upstream_values(seen, "Authorization") == []


# -- Connection abuse --------------------------------------------------------------------


@pytest.mark.parametrize(
    "listed",
    [
        "X-OpenId",
        "x_openid",
        "X-UnionId",
        "X-Forwarded-For",
        "X-Forwarded-Proto",
        "X-Forwarded-Host",
        "X-Request-Id",
        "X-OpenId, X-UnionId, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Request-Id",
    ],
)
async def test_connection_cannot_remove_gateway_headers(
    gw: Running, seen: Recorder, listed: str
) -> None:
    reply = await send(
        gw.listener.port,
        "/api/x",
        [
            ("Connection", listed),
            ("Authorization", f"Bearer {gw.token('o-real', 'u-real')}"),
            ("X-OpenId", "o-forged"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Request-Id", "rid-conn-1"),
        ],
    )
    assert reply.status == 200, reply.body
    assert upstream_values(seen, *DEFAULT_IDENTITY) == [
        ("X-OpenId", "o-real"),
        ("X-UnionId", "u-real"),
    ]
    for name, value in [
        ("X-Forwarded-For", "127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "front.example"),
        ("X-Request-Id", "rid-conn-1"),
    ]:
        assert [v for _, v in upstream_values(seen, name)] == [value], name
    assert seen.last.header("Connection") is None


async def test_connection_listing_custom_identity_header(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    gw = await start_gateway(identity=CUSTOM_IDENTITY)
    reply = await send(
        gw.listener.port,
        "/api/x",
        [
            ("Connection", "X-User, X-Union"),
            ("X-User", "o-forged"),
            ("Authorization", f"Bearer {gw.token('o-real', 'u-real')}"),
        ],
    )
    assert reply.status == 200
    assert upstream_values(seen, "X-User", "X-Union", *DEFAULT_IDENTITY) == [
        ("X-User", "o-real"),
        ("X-Union", "u-real"),
    ]


@pytest.mark.parametrize("listed", ["Content-Length", "Host", "content-length, host"])
async def test_connection_cannot_remove_framing(gw: Running, seen: Recorder, listed: str) -> None:
    payload = b"0123456789" * 10
    reply = await send(
        gw.listener.port,
        "/public/upload",
        [("Connection", listed), ("Content-Type", "application/octet-stream")],
        method="POST",
        body=payload,
    )
    assert reply.status == 200, reply.body
    assert seen.last.body == payload
    assert seen.last.header("Content-Length") == str(len(payload))
    assert seen.last.header("Host")


async def test_connection_header_cannot_strip_gateway_headers(gw: Running, seen: Recorder) -> None:
    reply = await request(
        gw.listener.port,
        "/api/x",
        [
            ("Connection", "keep-alive, X-OpenId, X-Forwarded-For, X-Request-Id, Content-Length"),
            ("Authorization", f"Bearer {gw.token('o-conn')}"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("X-Custom", "kept"),
        ],
    )
    assert reply.status == 200
    last = seen.last
    assert last.header("X-OpenId") == "o-conn"
    assert last.header("X-Forwarded-For") == "127.0.0.1"
    assert last.header("X-Request-Id")
    assert last.header("X-Custom") == "kept"
    assert last.header("Connection") is None


# -- the token header --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "token"),
    [
        ("/api/", "valid"),
        ("/opt/", "valid"),
        ("/public/", "valid"),
        ("/public/", "garbage"),
        ("/public/", "basic"),
    ],
)
async def test_authorization_token_header_never_forwarded(
    gw: Running, seen: Recorder, prefix: str, token: str
) -> None:
    value = {
        "valid": f"Bearer {gw.token('o-real')}",
        "garbage": "Bearer not-a-token",
        "basic": "Basic dXNlcjpwYXNz",
    }[token]
    reply = await send(gw.listener.port, prefix + "x", [("Authorization", value)])
    assert reply.status == 200, reply.body
    assert upstream_values(seen, "Authorization") == []
    # the token must not leak through the reflected request either
    assert value.encode() not in reply.body


@pytest.fixture
async def x_token(start_gateway: StartGateway) -> Running:
    return await start_gateway(token={"header": "X-Token"})


@pytest.mark.parametrize("prefix", ["/api/", "/opt/", "/public/"])
async def test_custom_token_header_bare_token_and_authorization_forwarded(
    x_token: Running, seen: Recorder, prefix: str
) -> None:
    token = x_token.token("o-custom", "u-custom")
    reply = await send(
        x_token.listener.port,
        prefix + "x",
        [("X-Token", token), ("Authorization", "Basic dXNlcjpwYXNz")],
    )
    assert reply.status == 200, reply.body
    assert upstream_values(seen, "X-Token") == []
    assert upstream_values(seen, "Authorization") == [("Authorization", "Basic dXNlcjpwYXNz")]
    expected = [] if prefix == "/public/" else [("X-OpenId", "o-custom"), ("X-UnionId", "u-custom")]
    assert upstream_values(seen, *DEFAULT_IDENTITY) == expected
    assert token.encode() not in reply.body


async def test_custom_token_header_underscore_spelling_not_forwarded(
    x_token: Running, seen: Recorder
) -> None:
    token = x_token.token("o-custom")
    reply = await send(x_token.listener.port, "/public/x", [("X_Token", token)])
    assert reply.status == 200
    assert upstream_values(seen, "X-Token") == []


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        # Authorization is an ordinary header now: a valid bearer there is no token
        (lambda t: [("Authorization", f"Bearer {t}")], "token_missing"),
        # the custom header carries the bare token, not "Bearer <token>"
        (lambda t: [("X-Token", f"Bearer {t}")], "token_invalid"),
        (lambda t: [("X-Token", "garbage")], "token_invalid"),
        (lambda t: [("X-Token", t), ("X-Token", t)], "token_invalid"),
    ],
    ids=["bearer-in-authorization", "bearer-in-x-token", "garbage", "two-x-token"],
)
async def test_custom_token_header_refusals(
    x_token: Running, seen: Recorder, headers: Any, error: str
) -> None:
    reply = await send(x_token.listener.port, "/api/x", headers(x_token.token("o-custom")))
    assert_error(reply, 401, error)
    assert seen.seen == []


# -- hop-by-hop request headers ---------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "dropped"),
    [
        ([("Connection", "X-Hop"), ("X-Hop", "1")], ["X-Hop"]),
        (
            [("Connection", "x-hop-a, X-HOP-B"), ("X-Hop-A", "1"), ("X-Hop-B", "2")],
            ["X-Hop-A", "X-Hop-B"],
        ),
        (
            [
                ("Connection", "X-Hop-A"),
                ("Connection", "X-Hop-B"),
                ("X-Hop-A", "1"),
                ("X-Hop-B", "2"),
            ],
            ["X-Hop-A", "X-Hop-B"],
        ),
        ([("Connection", "keep-alive"), ("Keep-Alive", "timeout=5, max=100")], ["Keep-Alive"]),
        ([("Keep-Alive", "timeout=5")], ["Keep-Alive"]),
        ([("TE", "trailers")], ["TE"]),
        ([("Trailer", "X-Checksum")], ["Trailer"]),
        ([("Upgrade", "h2c")], ["Upgrade"]),
        ([("Upgrade", "websocket")], ["Upgrade"]),
        ([("Proxy-Authorization", "Basic dXNlcjpwYXNz")], ["Proxy-Authorization"]),
        ([("Proxy-Authenticate", "Basic")], ["Proxy-Authenticate"]),
        ([("Proxy-Connection", "keep-alive")], ["Proxy-Connection"]),
    ],
    ids=[
        "connection-listed",
        "connection-listed-two",
        "connection-twice",
        "keep-alive-listed",
        "keep-alive",
        "te",
        "trailer",
        "upgrade-h2c",
        "upgrade-websocket",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
    ],
)
@pytest.mark.parametrize("prefix", ["/api/", "/public/"])
async def test_hop_by_hop_request_headers_not_forwarded(
    gw: Running, seen: Recorder, prefix: str, sent: list[tuple[str, str]], dropped: list[str]
) -> None:
    headers = [*sent, ("X-Kept", "yes"), ("Authorization", f"Bearer {gw.token('o-hop')}")]
    reply = await send(gw.listener.port, prefix + "x", headers)
    assert reply.status == 200, reply.body
    for name in [*dropped, "Connection"]:
        assert upstream_values(seen, name) == [], name
    assert seen.last.header("X-Kept") == "yes"


# -- what the upstream answers ----------------------------------------------------------


async def test_hop_by_hop_response_headers_are_dropped(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    async with http.get(gw.url + "/public/hop") as resp:
        assert resp.headers["X-Kept"] == "yes"
        for name in ("X-Private-Hop", "Keep-Alive", "Proxy-Authenticate"):
            assert name not in resp.headers


async def test_content_encoding_is_not_touched(gw: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(gw.url + "/public/gzip") as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == b"\x1f\x8b\x08\x00not-really-gzip"


# -- X-Forwarded-* ------------------------------------------------------------------------

SPOOFED_FORWARDED = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
]


@pytest.mark.parametrize(
    "sent",
    [
        [],
        SPOOFED_FORWARDED,
        [*SPOOFED_FORWARDED, ("X-Forwarded-For", "7.7.7.7, 8.8.8.8")],
        [("x-forwarded-for", "6.6.6.6"), ("X-FORWARDED-PROTO", "https")],
        [("X_Forwarded_For", "6.6.6.6"), ("X_Forwarded_Proto", "https"), ("X_Forwarded_Host", "e")],
    ],
    ids=["none", "spoofed", "spoofed-twice", "case", "underscore"],
)
@pytest.mark.parametrize("trusted", [None, ["10.0.0.0/8"]], ids=["no-trust", "other-net"])
async def test_forwarded_headers_from_untrusted_peer_are_replaced(
    start_gateway: StartGateway,
    seen: Recorder,
    sent: list[tuple[str, str]],
    trusted: list[str] | None,
) -> None:
    gw = await start_gateway(**({"server": {"trusted_proxies": trusted}} if trusted else {}))
    reply = await send(gw.listener.port, "/public/x", sent)
    assert reply.status == 200
    assert upstream_values(seen, "X-Forwarded-For") == [("X-Forwarded-For", "127.0.0.1")]
    assert upstream_values(seen, "X-Forwarded-Proto") == [("X-Forwarded-Proto", "http")]
    assert upstream_values(seen, "X-Forwarded-Host") == [("X-Forwarded-Host", "front.example")]


@pytest.mark.parametrize(
    ("sent", "xff", "proto", "host"),
    [
        ([], "127.0.0.1", "http", "front.example"),
        (SPOOFED_FORWARDED, "6.6.6.6, 127.0.0.1", "https", "evil.example"),
        (
            [("X-Forwarded-For", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2, 3.3.3.3")],
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1",
            "http",
            "front.example",
        ),
        ([("X-Forwarded-Proto", "https")], "127.0.0.1", "https", "front.example"),
        ([("X-Forwarded-Host", "app.example")], "127.0.0.1", "http", "app.example"),
        # the `_` spellings are not what a proxy sends: dropped, not believed
        (
            [("X_Forwarded_For", "6.6.6.6"), ("X_Forwarded_Proto", "https")],
            "127.0.0.1",
            "http",
            "front.example",
        ),
    ],
    ids=["none", "all", "two-xff", "proto-only", "host-only", "underscore"],
)
async def test_forwarded_headers_from_trusted_peer_are_extended(
    start_gateway: StartGateway,
    seen: Recorder,
    sent: list[tuple[str, str]],
    xff: str,
    proto: str,
    host: str,
) -> None:
    gw = await start_gateway(server={"trusted_proxies": ["127.0.0.0/8"]})
    reply = await send(gw.listener.port, "/public/x", sent)
    assert reply.status == 200
    assert upstream_values(seen, "X-Forwarded-For") == [("X-Forwarded-For", xff)]
    assert upstream_values(seen, "X-Forwarded-Proto") == [("X-Forwarded-Proto", proto)]
    assert upstream_values(seen, "X-Forwarded-Host") == [("X-Forwarded-Host", host)]


async def test_forwarded_headers_from_trusted_and_untrusted_peers(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    spoof = [
        ("X-Forwarded-For", "6.6.6.6"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Host", "evil"),
        ("X_Forwarded_For", "7.7.7.7"),
    ]
    wanted = ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host")
    untrusted = await start_gateway()
    reply = await request(untrusted.listener.port, "/public/x", spoof, host="front")
    assert reply.status == 200
    assert tuple(seen.last.header(n) for n in wanted) == ("127.0.0.1", "http", "front")
    assert seen.last.header("X_Forwarded_For") is None
    trusted = await start_gateway(server={"trusted_proxies": ["127.0.0.0/8"]})
    reply = await request(trusted.listener.port, "/public/x", spoof, host="front")
    assert reply.status == 200
    assert tuple(seen.last.header(n) for n in wanted) == ("6.6.6.6, 127.0.0.1", "https", "evil")


# -- Forwarded and X-Real-IP (contract section 8; issue 12, item 8) ------------------------

# Claims about the client that backends believe as X-Forwarded-For (Spring's
# ForwardedHeaderFilter, nginx's realip module): from an untrusted peer, every
# spelling and every line is removed; from a trusted proxy, what it set passes
# as sent (the gateway appends nothing to them), and `_` spellings, which no
# proxy sends, are removed as for the gateway's own headers.
PEER_CLAIMS: dict[str, list[tuple[str, str]]] = {
    "forwarded": [("Forwarded", "for=6.6.6.6;proto=https;host=evil.example")],
    "forwarded-case": [("forwarded", "for=6.6.6.6"), ("FORWARDED", 'for="[2001:db8::6]"')],
    "forwarded-twice": [("Forwarded", "for=6.6.6.6"), ("Forwarded", "for=7.7.7.7, for=8.8.8.8")],
    "real-ip": [("X-Real-IP", "6.6.6.6")],
    "real-ip-case": [("x-real-ip", "6.6.6.6"), ("X-REAL-IP", "7.7.7.7")],
    "real-ip-twice": [("X-Real-IP", "6.6.6.6"), ("X-Real-IP", "7.7.7.7")],
    "underscore": [("X_Real_IP", "6.6.6.6"), ("x_real_ip", "7.7.7.7"), ("X_Real_Ip", "8.8.8.8")],
    "all": [
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("X_Real_IP", "7.7.7.7"),
        ("Forwarded", "for=7.7.7.7"),
        *SPOOFED_FORWARDED,
    ],
}


@pytest.mark.parametrize("sent", list(PEER_CLAIMS.values()), ids=list(PEER_CLAIMS))
@pytest.mark.parametrize("trusted", [None, ["10.0.0.0/8"]], ids=["no-trust", "other-net"])
@pytest.mark.parametrize("prefix", ["/public/", "/api/"])
async def test_forwarded_and_real_ip_from_untrusted_peer_never_reach_the_upstream(
    start_gateway: StartGateway,
    seen: Recorder,
    sent: list[tuple[str, str]],
    trusted: list[str] | None,
    prefix: str,
) -> None:
    gw = await start_gateway(**({"server": {"trusted_proxies": trusted}} if trusted else {}))
    auth = [("Authorization", f"Bearer {gw.token('o-peer')}")] if prefix == "/api/" else []
    reply = await send(gw.listener.port, prefix + "x", [*sent, *auth])
    assert reply.status == 200
    assert upstream_values(seen, "Forwarded", "X-Real-IP") == []
    assert upstream_values(seen, "X-Forwarded-For") == [("X-Forwarded-For", "127.0.0.1")]


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ([], []),
        (
            [("Forwarded", "for=1.1.1.1;proto=https"), ("X-Real-IP", "1.1.1.1")],
            [("Forwarded", "for=1.1.1.1;proto=https"), ("X-Real-IP", "1.1.1.1")],
        ),
        (
            [("forwarded", "for=1.1.1.1"), ("FORWARDED", "for=2.2.2.2")],
            [("forwarded", "for=1.1.1.1"), ("FORWARDED", "for=2.2.2.2")],
        ),
        ([("x-real-ip", "1.1.1.1"), ("X_Real_IP", "6.6.6.6")], [("x-real-ip", "1.1.1.1")]),
        ([("X_Real_IP", "6.6.6.6"), ("x_real_ip", "6.6.6.6")], []),
        # listed in Connection: hop-by-hop, whoever sent it
        (
            [("Connection", "X-Real-IP"), ("X-Real-IP", "1.1.1.1"), ("Forwarded", "for=1.1.1.1")],
            [("Forwarded", "for=1.1.1.1")],
        ),
    ],
    ids=["none", "both", "forwarded-twice", "plus-underscore", "underscore-only", "connection"],
)
async def test_forwarded_and_real_ip_from_trusted_peer_are_kept_as_sent(
    start_gateway: StartGateway,
    seen: Recorder,
    sent: list[tuple[str, str]],
    kept: list[tuple[str, str]],
) -> None:
    gw = await start_gateway(server={"trusted_proxies": ["127.0.0.0/8"]})
    reply = await send(gw.listener.port, "/public/x", sent)
    assert reply.status == 200
    # (The upstream's parser gives well-known names its own case: compared folded.)
    got = [(k.lower(), v) for k, v in upstream_values(seen, "Forwarded", "X-Real-IP")]
    assert got == [(k.lower(), v) for k, v in kept]


async def test_forwarded_and_real_ip_stripped_from_a_websocket_handshake(
    gw: Running, seen: Recorder
) -> None:
    headers = CIMultiDict(gw.auth("o-ws"))
    for name, value in PEER_CLAIMS["all"]:
        headers.add(name, value)
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(gw.url + "/api/ws", headers=headers) as ws,
    ):
        await ws.send_str("whoami")
        assert (await ws.receive(timeout=5)).data == "o-ws"
    assert seen.last.method == "WS"
    assert upstream_values(seen, "Forwarded", "X-Real-IP") == []


# -- X-Request-Id ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("A.b:c_d-0", True),
        ("0f8fad5b-d9cb-469f-a165-70867728950e", True),
        ("r" * 128, True),
        ("r" * 129, False),
        ("r" * 200, False),
        ("has spaces", False),
        ("abc/def", False),
        ("<script>", False),
        ("a,b", False),
        ("caf\u00e9", False),
        ("", False),
    ],
    ids=lambda v: (
        v if isinstance(v, bool) else (v[:20] + f"..{len(v)}" if len(v) > 20 else v or "empty")
    ),
)
@pytest.mark.parametrize("prefix", ["/api/", "/public/"])
async def test_request_id_passed_through_or_generated(
    gw: Running, seen: Recorder, given: str, kept: bool, prefix: str
) -> None:
    reply = await send(
        gw.listener.port,
        prefix + "x",
        [("X-Request-Id", given), ("Authorization", f"Bearer {gw.token()}")],
    )
    assert reply.status == 200
    sent_upstream = [v for _, v in upstream_values(seen, "X-Request-Id")]
    assert len(sent_upstream) == 1
    assert reply.header("X-Request-Id") == sent_upstream[0]
    if kept:
        assert sent_upstream[0] == given
    else:
        assert sent_upstream[0] != given
        assert SANE_REQUEST_ID.match(sent_upstream[0])


async def test_request_id_generated_when_absent_and_unique(gw: Running, seen: Recorder) -> None:
    ids = []
    for _ in range(3):
        reply = await send(gw.listener.port, "/public/x")
        assert reply.status == 200
        rid = reply.header("X-Request-Id")
        assert rid and SANE_REQUEST_ID.match(rid)
        assert [v for _, v in upstream_values(seen, "X-Request-Id")] == [rid]
        ids.append(rid)
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    "sent",
    [
        [("X-Request-Id", "first"), ("X-Request-Id", "second")],
        [("X-Request-Id", "rid-1"), ("X_Request_Id", "spoof")],
        [("x_request_id", "spoof")],
    ],
    ids=["twice", "plus-underscore", "underscore-only"],
)
async def test_request_id_is_sent_upstream_once(
    gw: Running, seen: Recorder, sent: list[tuple[str, str]]
) -> None:
    reply = await send(gw.listener.port, "/public/x", sent)
    assert reply.status == 200
    values = [v for _, v in upstream_values(seen, "X-Request-Id")]
    assert values == [reply.header("X-Request-Id")]
    assert "spoof" not in values


async def test_request_id_passed_through_or_replaced(gw: Running, seen: Recorder) -> None:
    for given, kept in (("abc-123.x:y", True), ("has spaces", False), ("x" * 200, False)):
        reply = await request(gw.listener.port, "/public/x", [("X-Request-Id", given)])
        returned = reply.header("X-Request-Id")
        assert returned == seen.last.header("X-Request-Id")
        assert (returned == given) is kept
    reply = await request(gw.listener.port, "/nowhere", [("X-Request-Id", "err-1")])
    assert reply.status == 404 and reply.json["request_id"] == "err-1"


@pytest.mark.parametrize("body", [b"ok", b""], ids=["whole", "empty"])
async def test_an_upstream_x_request_id_is_passed_and_not_doubled(
    start_gateway: StartGateway, http: aiohttp.ClientSession, body: bytes
) -> None:
    async def handler(_: RawUpstream, reader: Any, writer: Any) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nX-Request-Id: from-upstream\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()

    up = await RawUpstream(handler).start()
    try:
        gw = await start_gateway(routes=[{"prefix": "/r/", "upstream": up.url, "auth": "public"}])
        async with http.get(gw.url + "/r/x", headers={"X-Request-Id": "from-client"}) as resp:
            assert resp.status == 200 and await resp.read() == body
            assert resp.headers.getall("X-Request-Id") == ["from-upstream"]
    finally:
        await up.close()


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("GET", "/healthz", b""),
        ("GET", "/readyz", b""),
        ("GET", "/metrics", b""),
        ("POST", "/auth/login", b'{"code": "hygiene-code"}'),
    ],
)
async def test_own_endpoints_return_the_request_id(
    gw: Running, method: str, target: str, body: bytes
) -> None:
    # docs/design.md: the request id is "returned on every response".
    reply = await send(
        gw.listener.port,
        target,
        [("X-Request-Id", "rid-own-1"), ("Content-Type", "application/json")],
        method=method,
        body=body,
    )
    assert reply.status == 200, reply.body
    assert reply.header("X-Request-Id") == "rid-own-1"
