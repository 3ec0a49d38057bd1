"""Table-driven checks of the three things a client must never control: which
route (and so which policy) applies, who it is, and which token is accepted."""

from __future__ import annotations

import asyncio
import json
import time
import warnings

import jwt
import pytest
from aiohttp.test_utils import TestServer

from tests.conftest import TOKEN_SECRET, Running, StartGateway
from tests.support.upstream import Recorder


async def raw_request(port: int, head: str) -> tuple[int, dict[str, object] | None]:
    """Send `head` as-is (no client library normalising it); status and JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode("latin-1") + b"Connection: close\r\n\r\n")
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    status_line, _, rest = data.partition(b"\r\n")
    body = rest.partition(b"\r\n\r\n")[2]
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    return int(status_line.split(b" ")[1]), parsed


@pytest.fixture
async def two_policies(start_gateway: StartGateway, upstream: TestServer) -> Running:
    url = str(upstream.make_url("")).rstrip("/")
    return await start_gateway(
        routes=[
            {"prefix": "/public", "upstream": url, "auth": "public"},
            {"prefix": "/private", "upstream": url, "auth": "required"},
            {"prefix": "/", "upstream": url, "auth": "public"},
        ]
    )


@pytest.mark.parametrize(
    ("target", "status", "forwarded"),
    [
        ("/public/../private/x", 401, None),
        ("/public/%2e%2e/private/x", 401, None),
        ("/public/%2E%2E/private/x", 401, None),
        ("/public/.%2e/private/x", 401, None),
        ("/public//../private/x", 401, None),
        ("//private/x", 401, None),
        ("/public/..;/private/x", 401, None),
        ("/private;jsessionid=1/x", 401, None),
        ("/./private/x", 401, None),
        ("/public/..%2fprivate/x", 400, None),
        ("/public/..%2Fprivate", 400, None),
        ("/public/..%5cprivate", 400, None),
        ("/public/..\\private", 400, None),
        ("/public/%00", 400, None),
        ("/public/%zz", 400, None),
        ("/..", 400, None),
        ("/public/../../x", 400, None),
        ("/public/a%20b/./c?q=%2F&r=..%2F", 200, "/public/a%20b/c?q=%2F&r=..%2F"),
        ("/public/x/../y", 200, "/public/y"),
        ("/public//x", 200, "/public/x"),
        ("http://evil.example/public/x", 200, "/public/x"),
        ("/publicx/..", 200, "/"),
    ],
)
async def test_path_tricks(
    two_policies: Running, seen: Recorder, target: str, status: int, forwarded: str | None
) -> None:
    got, body = await raw_request(
        two_policies.listener.port, f"GET {target} HTTP/1.1\r\nHost: t\r\n"
    )
    assert got == status, body
    if forwarded is None:
        assert seen.seen == []
        assert body is not None and body["error"] in ("bad_request", "token_missing")
    else:
        assert seen.last.raw_path == forwarded


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
@pytest.mark.parametrize(
    ("prefix", "with_token"),
    [("/api/", True), ("/opt/", True), ("/opt/", False), ("/public/", True), ("/public/", False)],
)
async def test_identity_headers_cannot_be_forged(
    gw: Running, seen: Recorder, name: str, prefix: str, with_token: bool
) -> None:
    token = f"Authorization: Bearer {gw.token('o-real', None)}\r\n" if with_token else ""
    status, _ = await raw_request(
        gw.listener.port,
        f"GET {prefix}x HTTP/1.1\r\nHost: t\r\n{token}{name}: o-forged\r\n{name}: o-forged-2\r\n",
    )
    assert status == 200
    identity = [
        (k, v)
        for k, v in seen.last.headers
        if k.lower().replace("_", "-") in ("x-openid", "x-unionid")
    ]
    expected = [("X-OpenId", "o-real")] if with_token and prefix != "/public/" else []
    assert identity == expected
    assert all(k.lower() != "authorization" for k, _ in seen.last.headers)


async def test_connection_header_cannot_strip_gateway_headers(gw: Running, seen: Recorder) -> None:
    status, _ = await raw_request(
        gw.listener.port,
        "GET /api/x HTTP/1.1\r\nHost: t\r\nConnection: keep-alive, X-OpenId, X-Forwarded-For, X-Request-Id, Content-Length\r\n"
        f"Authorization: Bearer {gw.token('o-conn')}\r\nX-Forwarded-For: 6.6.6.6\r\nX-Custom: kept\r\n",
    )
    assert status == 200
    last = seen.last
    assert last.header("X-OpenId") == "o-conn"
    assert last.header("X-Forwarded-For") == "127.0.0.1"
    assert last.header("X-Request-Id")
    assert last.header("X-Custom") == "kept"
    assert last.header("Connection") is None


def forge(
    payload: dict[str, object], key: str = TOKEN_SECRET, alg: str = "HS256", **header: object
) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyjwt warns about HS512 with this key: that is the point
        return jwt.encode(payload, key, algorithm=alg, headers=header or None)


def claims(**over: object) -> dict[str, object]:
    now = int(time.time())
    base: dict[str, object] = {
        "sub": "o-x",
        "iss": "wx-gateway",
        "iat": now,
        "exp": now + 600,
        "sid": "s1",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


async def test_token_forgeries(gw: Running, seen: Recorder) -> None:
    good = gw.token("o-good")
    kid = jwt.get_unverified_header(good)["kid"]
    h, _, s = good.split(".")
    cases = {
        "alg none": jwt.encode(claims(), None, algorithm="none"),
        "other key": forge(claims(), "another-key-" + "k" * 32, kid=kid),
        "HS512": forge(claims(), alg="HS512", kid=kid),
        "tampered payload": f"{h}.{forge(claims(sub='o-admin'), kid=kid).split('.')[1]}.{s}",
        "wrong issuer": forge(claims(iss="someone-else"), kid=kid),
        "no exp": forge(claims(exp=None), kid=kid),
        "no sid": forge(claims(sid=None), kid=kid),
        "unknown kid": forge(claims(), kid="nope"),
        "no kid": forge(claims()),
        "garbage": "not.a.token",
        "huge": "a" * 7000,  # over the 4 KiB token limit, under the 8 KiB header limit
        "control chars in sub": forge(claims(sub="o-x\r\nX-OpenId: o-admin"), kid=kid),
    }
    for label, token in cases.items():
        status, body = await raw_request(
            gw.listener.port, f"GET /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
        )
        assert (status, body and body["error"]) == (401, "token_invalid"), label
    expired = forge(claims(exp=int(time.time()) - 5), kid=kid)
    status, body = await raw_request(
        gw.listener.port, f"GET /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {expired}\r\n"
    )
    assert (status, body and body["error"]) == (401, "token_expired")
    for header in (
        "Authorization: Basic dXNlcjpwYXNz",
        "Authorization: Bearer",
        f"Authorization: Bearer {good}\r\nAuthorization: Bearer {good}",
    ):
        status, body = await raw_request(
            gw.listener.port, f"GET /api/x HTTP/1.1\r\nHost: t\r\n{header}\r\n"
        )
        assert (
            status == 401
            and body is not None
            and body["error"] in ("token_invalid", "token_missing")
        ), header
    assert seen.seen == []
    status, _ = await raw_request(
        gw.listener.port, f"GET /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {good}\r\n"
    )
    assert status == 200


async def test_key_rotation_and_custom_token_header(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    old = await start_gateway()
    old_token = old.token("o-rotated")
    new_secret = "new-token-secret-" + "n" * 32
    rotated = await start_gateway(
        token={"secret": new_secret, "previous_secrets": [TOKEN_SECRET], "header": "X-Token"}
    )
    new_token = rotated.token("o-new")
    assert (
        jwt.get_unverified_header(new_token)["kid"] != jwt.get_unverified_header(old_token)["kid"]
    )
    for token, openid in ((old_token, "o-rotated"), (new_token, "o-new")):
        status, _ = await raw_request(
            rotated.listener.port,
            f"GET /api/x HTTP/1.1\r\nHost: t\r\nX-Token: {token}\r\nAuthorization: Basic kept\r\n",
        )
        assert status == 200
        headers = dict(seen.last.headers)
        assert headers["X-OpenId"] == openid
        assert (
            headers["Authorization"] == "Basic kept"
        )  # an ordinary header with a custom token header
        assert "X-Token" not in headers
    retired = await start_gateway(token={"secret": new_secret})
    status, body = await raw_request(
        retired.listener.port,
        f"GET /api/x HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {old_token}\r\n",
    )
    assert (status, body and body["error"]) == (401, "token_invalid")


async def test_forwarded_headers_from_trusted_and_untrusted_peers(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX_Forwarded_For: 7.7.7.7\r\n"
    untrusted = await start_gateway()
    status, _ = await raw_request(
        untrusted.listener.port, f"GET /public/x HTTP/1.1\r\nHost: front\r\n{spoof}"
    )
    assert status == 200
    last = seen.last
    assert (
        last.header("X-Forwarded-For"),
        last.header("X-Forwarded-Proto"),
        last.header("X-Forwarded-Host"),
    ) == ("127.0.0.1", "http", "front")
    assert last.header("X_Forwarded_For") is None
    trusted = await start_gateway(server={"trusted_proxies": ["127.0.0.0/8"]})
    status, _ = await raw_request(
        trusted.listener.port, f"GET /public/x HTTP/1.1\r\nHost: front\r\n{spoof}"
    )
    assert status == 200
    last = seen.last
    assert (
        last.header("X-Forwarded-For"),
        last.header("X-Forwarded-Proto"),
        last.header("X-Forwarded-Host"),
    ) == ("6.6.6.6, 127.0.0.1", "https", "evil")


async def test_request_id_passed_through_or_replaced(gw: Running, seen: Recorder) -> None:
    for given, kept in (("abc-123.x:y", True), ("has spaces", False), ("x" * 200, False)):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
        writer.write(
            f"GET /public/x HTTP/1.1\r\nHost: t\r\nX-Request-Id: {given}\r\nConnection: close\r\n\r\n".encode()
        )
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
        returned = next(
            line.split(b": ", 1)[1].decode()
            for line in data.split(b"\r\n")
            if line.lower().startswith(b"x-request-id:")
        )
        assert returned == seen.last.header("X-Request-Id")
        assert (returned == given) is kept
    status, body = await raw_request(
        gw.listener.port, "GET /nowhere HTTP/1.1\r\nHost: t\r\nX-Request-Id: err-1\r\n"
    )
    assert status == 404 and body is not None and body["request_id"] == "err-1"
