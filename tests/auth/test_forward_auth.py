"""Forward-auth mode: ``GET``/``HEAD /auth/verify`` (contract sections 4 and 8,
docs/forward-auth.md).

A valid token gives 200 with the identity as ``X-OpenId`` (and ``X-UnionId``
when known) response headers and a JSON ``{openid, unionid}`` body; otherwise
the contract's 401 errors. From a peer in ``server.trusted_proxies`` only, the
original URI (``X-Forwarded-Uri``, else ``X-Original-URI``) is normalised like a
proxied path and the ``auth`` policy of the route it matches applies; from any
other peer those headers are ignored and a valid token is always required.

The first half drives the gateway directly (the peer is 127.0.0.1). The second
puts a real nginx (Debian's package, installed when missing) in front, running
exactly the ``nginx`` block of docs/forward-auth.md, and checks what reaches the
reflecting upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.wechat import fake
from tests.support import ROOT
from tests.support.client import bearer, logged_in
from tests.support.errors import check_error
from tests.support.gateway import Running, StartGateway, free_port, url_of
from tests.support.nginx import Nginx, built_with, doc_block, http_conf, nginx_binary
from tests.support.rawhttp import Response, request
from tests.support.upstream import Recorder

DOC = ROOT / "docs" / "forward-auth.md"
TRUSTED = {"trusted_proxies": ["127.0.0.1/32"]}


# -- helpers --------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: Any  # CIMultiDictProxy
    body: Any  # parsed JSON, or None (HEAD)
    raw: bytes


async def verify(
    http: aiohttp.ClientSession,
    gw: Running,
    headers: dict[str, str] | None = None,
    *,
    method: str = "GET",
) -> Answer:
    async with http.request(method, gw.url + "/auth/verify", headers=headers or {}) as resp:
        raw = await resp.read()
        if method == "HEAD":
            assert raw == b""
            body = None
        else:
            assert resp.headers["Content-Type"].startswith("application/json"), raw
            body = await resp.json(content_type=None)
        return Answer(resp.status, resp.headers, body, raw)


def assert_refused(answer: Answer, status: int, code: str) -> None:
    """The contract's error, and no identity for the proxy to pass on."""
    content_type = answer.headers.get("Content-Type", "")
    check_error(answer.status, content_type, answer.raw, status, code)
    assert "X-OpenId" not in answer.headers
    assert "X-UnionId" not in answer.headers


def assert_anonymous(answer: Answer) -> None:
    """200, no identity: the original URI's route lets the request through anonymously."""
    assert answer.status == 200, (answer.status, answer.body)
    assert answer.body == {"openid": None, "unionid": None}
    assert "X-OpenId" not in answer.headers
    assert "X-UnionId" not in answer.headers


def assert_identity(answer: Answer, openid: str, unionid: str | None = None) -> None:
    assert answer.status == 200, (answer.status, answer.body)
    assert answer.headers.getall("X-OpenId") == [openid]
    if unionid is None:
        assert "X-UnionId" not in answer.headers
    else:
        assert answer.headers.getall("X-UnionId") == [unionid]
    if answer.body is not None:
        assert answer.body == {"openid": openid, "unionid": unionid}


def uri(value: str, token: str | None = None) -> dict[str, str]:
    headers = {"X-Forwarded-Uri": value}
    if token is not None:
        headers.update(bearer(token))
    return headers


def expired_token(gw: Running, openid: str = "o-expired") -> str:
    now = gw.listener.gateway.clock()
    return gw.codec.issue(openid, None, now - gw.codec.ttl - 60)[0]


def tampered_token(gw: Running) -> str:
    """A real signature over someone else's claims."""
    mine, theirs = gw.token("o-me").split("."), gw.token("o-admin").split(".")
    return ".".join([mine[0], theirs[1], mine[2]])


# -- tokens, without an original URI (the plain token check) --------------------------------


async def test_a_valid_token_gives_the_identity_headers_and_body(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    answer = await verify(http, gw, gw.auth("o-verify-user"))
    assert_identity(answer, "o-verify-user")


async def test_a_token_with_a_unionid_gives_x_unionid(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    answer = await verify(http, gw, gw.auth("o-with-union", unionid="u-union-of-o"))
    assert_identity(answer, "o-with-union", "u-union-of-o")


async def test_x_unionid_only_when_the_wechat_login_gave_one(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    # docs/fake-wechat.md: codes starting with "union" log in with a unionid.
    with_union = await logged_in(http, gw.url, "union-forward-auth")
    assert with_union["unionid"] == fake.unionid_for("union-forward-auth") is not None
    answer = await verify(http, gw, bearer(with_union["token"]))
    assert_identity(answer, fake.openid_for("union-forward-auth"), with_union["unionid"])

    plain = await logged_in(http, gw.url, "plain-forward-auth")
    assert plain["unionid"] is None
    answer = await verify(http, gw, bearer(plain["token"]))
    assert_identity(answer, fake.openid_for("plain-forward-auth"), None)


async def test_no_token_is_token_missing(gw: Running, http: aiohttp.ClientSession) -> None:
    assert_refused(await verify(http, gw), 401, "token_missing")
    assert_refused(await verify(http, gw, {"Authorization": ""}), 401, "token_missing")


@pytest.mark.parametrize(
    "value",
    ["Bearer not-a-jwt", "Bearer a.b.c", "Basic dXNlcjpwYXNz"],
)
async def test_a_malformed_token_is_token_invalid(
    gw: Running, http: aiohttp.ClientSession, value: str
) -> None:
    assert_refused(await verify(http, gw, {"Authorization": value}), 401, "token_invalid")


async def test_a_tampered_token_is_token_invalid(gw: Running, http: aiohttp.ClientSession) -> None:
    assert_refused(await verify(http, gw, bearer(tampered_token(gw))), 401, "token_invalid")


async def test_an_expired_token_is_token_expired(gw: Running, http: aiohttp.ClientSession) -> None:
    assert_refused(await verify(http, gw, bearer(expired_token(gw))), 401, "token_expired")


async def test_a_logged_out_token_is_token_revoked(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    token, other = gw.token("o-leaving"), gw.token("o-leaving")
    assert_identity(await verify(http, gw, bearer(token)), "o-leaving")
    async with http.post(gw.url + "/auth/logout", headers=bearer(token)) as resp:
        assert resp.status == 200
    assert_refused(await verify(http, gw, bearer(token)), 401, "token_revoked")
    # The same user's other session stays valid.
    assert_identity(await verify(http, gw, bearer(other)), "o-leaving")


async def test_head_answers_like_get_without_a_body(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(server=TRUSTED)
    answer = await verify(http, gw, gw.auth("o-head", unionid="u-head"), method="HEAD")
    assert_identity(answer, "o-head", "u-head")

    answer = await verify(http, gw, method="HEAD")
    assert answer.status == 401
    assert "X-OpenId" not in answer.headers

    answer = await verify(http, gw, {"Authorization": "Bearer junk"}, method="HEAD")
    assert answer.status == 401
    assert "X-OpenId" not in answer.headers

    answer = await verify(http, gw, uri("/public/page"), method="HEAD")
    assert answer.status == 200
    assert "X-OpenId" not in answer.headers
    answer = await verify(http, gw, uri("/api/page"), method="HEAD")
    assert answer.status == 401


async def test_other_methods_are_405(gw: Running, http: aiohttp.ClientSession) -> None:
    for method in ("POST", "PUT", "DELETE"):
        async with http.request(method, gw.url + "/auth/verify", headers=gw.auth()) as resp:
            assert resp.status == 405, method
            assert (await resp.json())["error"] == "method_not_allowed"
            assert "X-OpenId" not in resp.headers


async def test_configured_header_names_are_used(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(
        identity={"openid_header": "X-User-Id", "unionid_header": "X-User-Union"},
        token={"header": "X-Token"},
    )
    answer = await verify(http, gw, {"X-Token": gw.token("o-custom", "u-custom")})
    assert answer.status == 200
    assert answer.headers.getall("X-User-Id") == ["o-custom"]
    assert answer.headers.getall("X-User-Union") == ["u-custom"]
    assert "X-OpenId" not in answer.headers
    assert answer.body == {"openid": "o-custom", "unionid": "u-custom"}
    # With a custom token header, Authorization carries no token.
    assert_refused(await verify(http, gw, gw.auth("o-custom")), 401, "token_missing")


# -- the original URI, from a trusted proxy ----------------------------------------------------


@pytest.fixture
async def trusted(start_gateway: StartGateway) -> Running:
    return await start_gateway(server=TRUSTED)


async def test_public_route_needs_no_token_and_gives_no_identity(
    trusted: Running, http: aiohttp.ClientSession
) -> None:
    gw = trusted
    assert_anonymous(await verify(http, gw, uri("/public/page?x=1")))
    # A public route never looks at the token: a bad one is ignored, a good one
    # gives no identity either (as when proxied).
    assert_anonymous(await verify(http, gw, uri("/public/page", "junk")))
    assert_anonymous(await verify(http, gw, uri("/public/page", expired_token(gw))))
    assert_anonymous(await verify(http, gw, uri("/public/page", gw.token("o-public"))))


async def test_optional_route(trusted: Running, http: aiohttp.ClientSession) -> None:
    gw = trusted
    assert_anonymous(await verify(http, gw, uri("/opt/page")))
    assert_identity(await verify(http, gw, uri("/opt/page", gw.token("o-opt"))), "o-opt")
    assert_refused(await verify(http, gw, uri("/opt/page", "junk")), 401, "token_invalid")
    assert_refused(
        await verify(http, gw, uri("/opt/page", tampered_token(gw))), 401, "token_invalid"
    )
    assert_refused(
        await verify(http, gw, uri("/opt/page", expired_token(gw))), 401, "token_expired"
    )


async def test_optional_route_refuses_a_revoked_token(
    trusted: Running, http: aiohttp.ClientSession
) -> None:
    gw = trusted
    token = gw.token("o-opt-revoked")
    async with http.post(gw.url + "/auth/logout", headers=bearer(token)) as resp:
        assert resp.status == 200
    assert_refused(await verify(http, gw, uri("/opt/page", token)), 401, "token_revoked")


async def test_required_route(trusted: Running, http: aiohttp.ClientSession) -> None:
    gw = trusted
    assert_refused(await verify(http, gw, uri("/api/orders")), 401, "token_missing")
    assert_refused(await verify(http, gw, uri("/api/orders", "junk")), 401, "token_invalid")
    assert_refused(
        await verify(http, gw, uri("/api/orders", expired_token(gw))), 401, "token_expired"
    )
    assert_identity(await verify(http, gw, uri("/api/orders", gw.token("o-req"))), "o-req")


@pytest.mark.parametrize("path", ["/nowhere", "/publicity/x", "/", "/opt"])
async def test_no_matching_route_needs_a_token(
    trusted: Running, http: aiohttp.ClientSession, path: str
) -> None:
    gw = trusted
    assert_refused(await verify(http, gw, uri(path)), 401, "token_missing")
    assert_identity(await verify(http, gw, uri(path, gw.token("o-nr"))), "o-nr")


@pytest.mark.parametrize(
    "path", ["/auth/verify", "/auth/me", "/auth/login", "/auth", "/healthz", "/readyz", "/metrics"]
)
async def test_the_gateways_own_endpoints_need_a_token_even_under_a_public_catch_all(
    start_gateway: StartGateway,
    upstream: TestServer,
    http: aiohttp.ClientSession,
    path: str,
) -> None:
    target = url_of(upstream)
    gw = await start_gateway(
        server=TRUSTED,
        routes=[
            {"prefix": "/", "upstream": target, "auth": "public"},
            {"prefix": "/api/", "upstream": target, "auth": "required"},
        ],
    )
    # The catch-all is public for everything else...
    assert_anonymous(await verify(http, gw, uri("/anything/else")))
    # ...but never for the gateway's own endpoints, which no route may serve.
    assert_refused(await verify(http, gw, uri(path)), 401, "token_missing")
    assert_refused(await verify(http, gw, uri(path + "?x=1")), 401, "token_missing")
    assert_identity(await verify(http, gw, uri(path, gw.token("o-own"))), "o-own")


@pytest.mark.parametrize(
    ("original", "public"),
    [
        ("/public/../api/x", False),
        ("/public/%2e%2e/api/x", False),
        ("/public/%2E%2E/api/x", False),
        ("/public/..;/api/x", False),
        ("/public/./../api/x", False),
        ("/api/x?next=/public/", False),
        ("/api/../public/x", True),
        ("/public/./x", True),
        ("//public//x", True),
        ("/%70ublic/x", True),
        ("/public/x?next=/api/", True),
    ],
)
async def test_the_original_uri_is_normalised_before_its_route_is_chosen(
    trusted: Running, http: aiohttp.ClientSession, original: str, public: bool
) -> None:
    gw = trusted
    answer = await verify(http, gw, uri(original))
    if public:
        assert_anonymous(answer)
    else:
        assert_refused(answer, 401, "token_missing")
        assert_identity(await verify(http, gw, uri(original, gw.token("o-norm"))), "o-norm")


@pytest.mark.parametrize(
    "original",
    [
        "/public/%2Fx",
        "/public/%2f..%2fapi",
        "/public/%5Cx",
        "/public/%00x",
        "/public/a\\b",
        "/../api/x",
        "/public/../../x",
        "/public/%2e%2e/%2e%2e/x",
        "/public/%zz",
        "/public/x#frag",
        "public/x",
    ],
)
async def test_a_bad_original_uri_is_bad_request(
    trusted: Running, http: aiohttp.ClientSession, original: str
) -> None:
    gw = trusted
    for headers in (
        {"X-Forwarded-Uri": original},
        {"X-Original-URI": original},
        {"X-Forwarded-Uri": original, **gw.auth("o-bad")},
    ):
        answer = await verify(http, gw, headers)
        assert_refused(answer, 400, "bad_request")


async def test_x_forwarded_uri_wins_over_x_original_uri(
    trusted: Running, http: aiohttp.ClientSession
) -> None:
    gw = trusted
    # Only X-Original-URI (nginx's usual name): it is used.
    assert_anonymous(await verify(http, gw, {"X-Original-URI": "/public/x"}))
    assert_refused(await verify(http, gw, {"X-Original-URI": "/api/x"}), 401, "token_missing")
    # Both: X-Forwarded-Uri decides, whichever way round.
    both = {"X-Forwarded-Uri": "/api/x", "X-Original-URI": "/public/x"}
    assert_refused(await verify(http, gw, both), 401, "token_missing")
    both = {"X-Forwarded-Uri": "/public/x", "X-Original-URI": "/api/x"}
    assert_anonymous(await verify(http, gw, both))
    # A bad X-Original-URI behind a usable X-Forwarded-Uri is never looked at.
    both = {"X-Forwarded-Uri": "/public/x", "X-Original-URI": "/../x"}
    assert_anonymous(await verify(http, gw, both))
    # An empty X-Forwarded-Uri counts as absent.
    both = {"X-Forwarded-Uri": "", "X-Original-URI": "/public/x"}
    assert_anonymous(await verify(http, gw, both))
    # Header names are case-insensitive.
    assert_anonymous(await verify(http, gw, {"x-forwarded-uri": "/public/x"}))
    assert_anonymous(await verify(http, gw, {"x-original-uri": "/public/x"}))


# -- the original URI, from an untrusted peer: ignored ------------------------------------------


@pytest.mark.parametrize("proxies", [[], ["10.0.0.0/8", "::1/128"]])
async def test_an_untrusted_peer_cannot_choose_the_policy(
    start_gateway: StartGateway, http: aiohttp.ClientSession, proxies: list[str]
) -> None:
    gw = await start_gateway(server={"trusted_proxies": proxies})
    for headers in (
        {"X-Forwarded-Uri": "/public/x"},
        {"X-Original-URI": "/public/x"},
        {"X-Forwarded-Uri": "/opt/x", "X-Original-URI": "/public/x"},
        # Not even parsed: no 400 for a URI nobody vouched for.
        {"X-Forwarded-Uri": "/public/%2Fx"},
        {"X-Original-URI": "/../x"},
    ):
        assert_refused(await verify(http, gw, headers), 401, "token_missing")
        token = gw.token("o-untrusted")
        assert_identity(await verify(http, gw, {**headers, **bearer(token)}), "o-untrusted")
        answer = await verify(http, gw, {**headers, "Authorization": "Bearer junk"})
        assert_refused(answer, 401, "token_invalid")


# -- a real nginx in front ----------------------------------------------------------------------

DOC_LISTEN = "listen 127.0.0.1:8000;"
DOC_GATEWAY = "http://127.0.0.1:8080/auth/verify;"
DOC_UPSTREAM = "http://127.0.0.1:9000;"


def nginx_conf(directory: Path, binary: str, port: int, gateway: str, upstream: str) -> str:
    """docs/forward-auth.md's server block, on this test's ports."""
    server = doc_block(DOC)
    for placeholder, value in (
        (DOC_LISTEN, f"listen 127.0.0.1:{port};"),
        (DOC_GATEWAY, f"{gateway}/auth/verify;"),
        (DOC_UPSTREAM, f"{upstream};"),
    ):
        assert server.count(placeholder) == 1, f"the docs' nginx block lost {placeholder!r}"
        server = server.replace(placeholder, value)
    built = built_with(binary)
    assert "--with-http_auth_request_module" in built, f"this nginx lacks auth_request: {built}"
    return http_conf(directory, binary, server)


@dataclass
class Edge:
    port: int
    gw: Running
    seen: Recorder

    async def get(self, target: str, *headers: tuple[str, str]) -> Response:
        """Over a raw socket, so the target reaches nginx exactly as written."""
        return await request(self.port, target, headers, host="edge.test")


@pytest.fixture
async def edge(
    start_gateway: StartGateway, upstream: TestServer, seen: Recorder, tmp_path: Path
) -> AsyncIterator[Edge]:
    binary = nginx_binary()
    gw = await start_gateway(server=TRUSTED)
    directory = tmp_path / "nginx"
    directory.mkdir()
    port = free_port()
    nginx = Nginx(binary, directory, nginx_conf(directory, binary, port, gw.url, url_of(upstream)))
    try:
        await asyncio.to_thread(nginx.wait_listening, port)
        yield Edge(port, gw, seen)
    finally:
        nginx.stop()


async def test_nginx_injects_the_identity_and_drops_forged_headers(
    edge: Edge, http: aiohttp.ClientSession
) -> None:
    user = await logged_in(http, edge.gw.url, "union-behind-nginx")
    assert user["unionid"]
    reply = await edge.get(
        "/api/orders?page=2",
        ("Authorization", f"Bearer {user['token']}"),
        ("X-OpenId", "o-forged"),
        ("x-openid", "o-forged-lower"),
        ("X-UnionId", "u-forged"),
        ("X_OpenId", "o-forged-underscore"),
    )
    assert reply.status == 200
    got = edge.seen.last
    assert got.raw_path == "/api/orders?page=2"
    names = [name.lower() for name in got.header_names()]
    assert names.count("x-openid") == 1, got.headers
    assert got.header("X-OpenId") == user["openid"]
    assert names.count("x-unionid") == 1, got.headers
    assert got.header("X-UnionId") == user["unionid"]
    assert "x_openid" not in names, got.headers
    assert "authorization" not in names, "the token went on to the upstream"

    # A user without a unionid: no X-UnionId, even a forged one.
    plain = await logged_in(http, edge.gw.url, "plain-behind-nginx")
    reply = await edge.get(
        "/opt/page", ("Authorization", f"Bearer {plain['token']}"), ("X-UnionId", "u-forged")
    )
    assert reply.status == 200
    assert edge.seen.last.header("X-OpenId") == plain["openid"]
    assert "x-unionid" not in [n.lower() for n in edge.seen.last.header_names()]


async def test_nginx_refuses_a_required_location_without_a_valid_token(edge: Edge) -> None:
    for headers in (
        (),
        (("X-OpenId", "o-forged"),),
        (("Authorization", "Bearer junk"),),
        (("Authorization", f"Bearer {expired_token(edge.gw)}"),),
        # The client's own claims about the original URI are overwritten by nginx.
        (("X-Forwarded-Uri", "/public/x"), ("X-Original-URI", "/public/x")),
    ):
        for target in (
            "/api/orders",
            "/public/../api/orders",
            "/public/%2e%2e/api/orders",
            "http://edge.test/public/../api/orders",
            "/x",
        ):
            reply = await edge.get(target, *headers)
            assert reply.status == 401, (target, headers, reply)
    assert edge.seen.seen == [], "a refused request reached the upstream"


async def test_nginx_passes_public_and_anonymous_optional_requests_without_identity(
    edge: Edge,
) -> None:
    reply = await edge.get("/public/page", ("X-OpenId", "o-forged"), ("X-UnionId", "u-forged"))
    assert reply.status == 200
    names = [n.lower() for n in edge.seen.last.header_names()]
    assert edge.seen.last.raw_path == "/public/page"
    assert "x-openid" not in names and "x-unionid" not in names, edge.seen.last.headers

    # Public ignores the token: no identity even with a valid one.
    reply = await edge.get("/public/page", ("Authorization", f"Bearer {edge.gw.token('o-p')}"))
    assert reply.status == 200
    assert "x-openid" not in [n.lower() for n in edge.seen.last.header_names()]

    reply = await edge.get("/opt/page")
    assert reply.status == 200
    assert "x-openid" not in [n.lower() for n in edge.seen.last.header_names()]
    count = len(edge.seen.seen)
    assert (await edge.get("/opt/page", ("Authorization", "Bearer junk"))).status == 401
    assert len(edge.seen.seen) == count


async def test_nginx_refuses_a_token_within_a_second_of_its_logout(
    edge: Edge, http: aiohttp.ClientSession
) -> None:
    user = await logged_in(http, edge.gw.url, "logout-behind-nginx")
    auth = ("Authorization", f"Bearer {user['token']}")
    assert (await edge.get("/api/before", auth)).status == 200
    assert edge.seen.last.header("X-OpenId") == user["openid"]

    async with http.post(edge.gw.url + "/auth/logout", headers=bearer(user["token"])) as resp:
        assert resp.status == 200
    logged_out = time.monotonic()
    while True:
        sent = time.monotonic() - logged_out  # when asked, not when answered
        reply = await edge.get("/api/after", auth)
        if reply.status == 401:
            break
        assert reply.status == 200
        assert sent < 1.0, f"still accepted when asked {sent:.2f} s after the logout"
        await asyncio.sleep(0.05)
    count = len(edge.seen.seen)
    assert (await edge.get("/api/again", auth)).status == 401
    assert (await edge.get("/opt/again", auth)).status == 401
    assert len(edge.seen.seen) == count
    assert all(s.raw_path != "/api/again" for s in edge.seen.seen)


async def test_repeated_original_uri_headers_are_refused(start_gateway: StartGateway) -> None:
    """A proxy that appends its X-Forwarded-Uri to the client's would otherwise let the
    client pick the route: two values (or a folded list) are 400, never a public pass."""
    gw = await start_gateway(server={"trusted_proxies": ["127.0.0.1/32"]})
    async with aiohttp.ClientSession() as http:
        for headers in (
            [("X-Forwarded-Uri", "/public/x"), ("X-Forwarded-Uri", "/api/x")],
            [("X-Forwarded-Uri", "/public/x, /api/x")],
            [("X-Original-URI", "/public/x"), ("X-Original-URI", "/api/x")],
        ):
            async with http.get(gw.url + "/auth/verify", headers=CIMultiDict(headers)) as resp:
                assert resp.status == 400, headers
                assert (await resp.json())["error"] == "bad_request"
        # One value with a comma is an ordinary URI.
        headers = {"X-Forwarded-Uri": "/public/x?a=1,2"}
        async with http.get(gw.url + "/auth/verify", headers=headers) as resp:
            assert resp.status == 200
