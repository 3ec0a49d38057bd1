"""The gateway's tokens: forgeries refused, rotation, restarts, and the codec itself.

Contract sections 4, 6 and 8: an HS256 JWT signed with ``token.secret``,
carrying ``sub``, ``exp``, ``iat``, ``iss`` and a session id, with a ``kid``
header naming the key; only HS256 is accepted; bad signature, malformed, wrong
``alg`` (incl. ``none``), tampered or wrong issuer is 401 ``token_invalid``,
expired is 401 ``token_expired`` (``token.leeway`` allowed on ``exp``);
``previous_secrets`` still verify; tokens survive restarts. docs/design.md adds:
``Authorization`` that is not ``Bearer`` and two token headers are
``token_invalid``, an empty header value is no token.

Forged tokens are built with pyjwt (or by hand where pyjwt refuses to build
them) and sent over raw sockets so that odd header shapes reach the gateway as
written.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import warnings
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.auth.tokens import TokenCodec, VerifiedTokens, bearer_from_header, key_id
from gateway.config import Secret, TokenConfig
from gateway.errors import TokenExpired, TokenInvalid, TokenMissing
from gateway.wechat import fake
from tests.support.errors import assert_error
from tests.support.gateway import APPID, TOKEN_SECRET, Running, StartGateway
from tests.support.rawhttp import Response, request
from tests.support.upstream import Recorder

OTHER_SECRET = "another-secret-nobody-configured-0123456789"
NEW_SECRET = "rotated-token-secret-9876543210-abcdefghijkl"
KID = key_id(Secret(TOKEN_SECRET))

# -- helpers --------------------------------------------------------------------------------


async def send(port: int, target: str, headers: list[tuple[str, str]]) -> Response:
    return await request(port, target, headers)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def claims(**over: Any) -> dict[str, Any]:
    """Valid claims for the test config; a value of None removes the claim."""
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "o-forged",
        "iss": "wx-gateway",
        "iat": now,
        "exp": now + 600,
        "sid": "s-forged",
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    payload: dict[str, Any],
    key: Any = TOKEN_SECRET,
    alg: str = "HS256",
    kid: Any = KID,
    **header: Any,
) -> str:
    """pyjwt-encoded token; `kid=None` leaves the kid out."""
    if kid is not None:
        header["kid"] = kid
    with warnings.catch_warnings():
        # pyjwt warns about a short HS384/HS512 key: that is the point of those cases.
        warnings.simplefilter("ignore")
        return jwt.encode(payload, key, algorithm=alg, headers=header or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: dict[str, Any], key: str | None) -> str:
    """A token pyjwt would not build: any header, HMAC-SHA256 under `key` or no signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = (
        b64(hmac.new(key.encode(), signing_input.encode(), hashlib.sha256).digest())
        if key is not None
        else ""
    )
    return f"{signing_input}.{signature}"


def rs256_token() -> str:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return sign(claims(), private, alg="RS256")


def tampered_payload() -> str:
    header, _, signature = sign(claims(sub="o-victim")).split(".")
    payload = sign(claims(sub="o-admin")).split(".")[1]
    return f"{header}.{payload}.{signature}"


def swapped_signature() -> str:
    header, payload, _ = sign(claims(sub="o-admin")).split(".")
    return f"{header}.{payload}.{sign(claims(sub='o-victim')).split('.')[2]}"


def flipped_signature() -> str:
    header, payload, signature = sign(claims()).split(".")
    first = "B" if signature[0] != "B" else "C"
    return f"{header}.{payload}.{first}{signature[1:]}"


def alg_swapped_header() -> str:
    # same payload and HS256 signature, header now says HS512
    _, payload, signature = sign(claims()).split(".")
    header = b64(json.dumps({"alg": "HS512", "typ": "JWT", "kid": KID}).encode())
    return f"{header}.{payload}.{signature}"


INVALID = "token_invalid"
EXPIRED = "token_expired"
MISSING = "token_missing"

# (id, header lines to send, `error` expected on a required/optional route)
FORGERIES: list[tuple[str, Callable[[], list[tuple[str, str]]], str]] = [
    # algorithms other than HS256
    ("alg-none-pyjwt", lambda: bearer(sign(claims(), None, alg="none")), INVALID),
    (
        "alg-none-crafted",
        lambda: bearer(craft({"alg": "none", "kid": KID}, claims(), None)),
        INVALID,
    ),
    (
        "alg-None-crafted",
        lambda: bearer(craft({"alg": "None", "kid": KID}, claims(), None)),
        INVALID,
    ),
    (
        "alg-NONE-signed",
        lambda: bearer(craft({"alg": "NONE", "kid": KID}, claims(), TOKEN_SECRET)),
        INVALID,
    ),
    (
        "hs256-no-signature",
        lambda: bearer(craft({"alg": "HS256", "kid": KID}, claims(), None)),
        INVALID,
    ),
    ("hs256-other-key", lambda: bearer(sign(claims(), OTHER_SECRET)), INVALID),
    (
        "hs256-other-key-expired",
        lambda: bearer(sign(claims(exp=int(time.time()) - 60), OTHER_SECRET)),
        INVALID,
    ),
    ("hs384-right-key", lambda: bearer(sign(claims(), alg="HS384")), INVALID),
    ("hs512-right-key", lambda: bearer(sign(claims(), alg="HS512")), INVALID),
    ("rs256-real-key", lambda: bearer(rs256_token()), INVALID),
    (
        "rs256-header-hmac-signature",
        lambda: bearer(craft({"alg": "RS256", "typ": "JWT", "kid": KID}, claims(), TOKEN_SECRET)),
        INVALID,
    ),
    ("alg-swapped-header", lambda: bearer(alg_swapped_header()), INVALID),
    # tampering
    ("tampered-payload", lambda: bearer(tampered_payload()), INVALID),
    ("swapped-signature", lambda: bearer(swapped_signature()), INVALID),
    ("flipped-signature", lambda: bearer(flipped_signature()), INVALID),
    ("signature-stripped", lambda: bearer(sign(claims()).rsplit(".", 1)[0] + "."), INVALID),
    # claims
    (
        "expired",
        lambda: bearer(sign(claims(iat=int(time.time()) - 7300, exp=int(time.time()) - 30))),
        EXPIRED,
    ),
    (
        "expired-long-ago",
        lambda: bearer(sign(claims(iat=1_600_000_000, exp=1_600_007_200))),
        EXPIRED,
    ),
    ("wrong-issuer", lambda: bearer(sign(claims(iss="someone-else"))), INVALID),
    ("no-iss", lambda: bearer(sign(claims(iss=None))), INVALID),
    ("no-exp", lambda: bearer(sign(claims(exp=None))), INVALID),
    ("no-sid", lambda: bearer(sign(claims(sid=None))), INVALID),
    ("no-sub", lambda: bearer(sign(claims(sub=None))), INVALID),
    ("no-iat", lambda: bearer(sign(claims(iat=None))), INVALID),
    ("empty-sub", lambda: bearer(sign(claims(sub=""))), INVALID),
    ("empty-sid", lambda: bearer(sign(claims(sid=""))), INVALID),
    ("sub-not-a-string", lambda: bearer(sign(claims(sub=12345))), INVALID),
    ("exp-not-a-number", lambda: bearer(sign(claims(exp="9999999999"))), INVALID),
    ("crlf-in-sub", lambda: bearer(sign(claims(sub="o-x\r\nX-OpenId: o-admin"))), INVALID),
    ("crlf-in-uid", lambda: bearer(sign(claims(uid="u\r\nX-OpenId: o-admin"))), INVALID),
    # keys
    ("unknown-kid", lambda: bearer(sign(claims(), kid="0123456789abcdef")), INVALID),
    ("no-kid", lambda: bearer(sign(claims(), kid=None)), INVALID),
    ("empty-kid", lambda: bearer(sign(claims(), kid="")), INVALID),
    (
        "kid-not-a-string",
        lambda: bearer(craft({"alg": "HS256", "kid": 1}, claims(), TOKEN_SECRET)),
        INVALID,
    ),
    (
        "kid-list",
        lambda: bearer(craft({"alg": "HS256", "kid": [KID]}, claims(), TOKEN_SECRET)),
        INVALID,
    ),
    (
        "kid-of-other-key",
        lambda: bearer(sign(claims(), OTHER_SECRET, kid=key_id(Secret(OTHER_SECRET)))),
        INVALID,
    ),
    # garbage
    ("garbage-word", lambda: bearer("garbage"), INVALID),
    ("garbage-dots", lambda: bearer("a.b.c"), INVALID),
    ("only-dots", lambda: bearer(".."), INVALID),
    ("two-parts", lambda: bearer(".".join(sign(claims()).split(".")[:2])), INVALID),
    ("four-parts", lambda: bearer(sign(claims()) + ".x"), INVALID),
    ("five-parts-jwe", lambda: bearer("eyJhbGciOiJkaXIifQ..aaaa.bbbb.cccc"), INVALID),
    ("header-not-json", lambda: bearer(f"{b64(b'not json')}.{b64(b'{}')}.sig"), INVALID),
    ("non-ascii", lambda: bearer("t\u00f6k\u00e9n.\u00e9.\u00e9"), INVALID),
    ("6kb-garbage", lambda: bearer("a" * 6000), INVALID),
    ("6kb-jwt-shaped", lambda: bearer(f"{b64(b'{}')}.{'A' * 6000}.sig"), INVALID),
    # header shapes
    ("bearer-without-token", lambda: [("Authorization", "Bearer")], INVALID),
    ("bearer-and-spaces", lambda: [("Authorization", "Bearer    ")], INVALID),
    ("basic", lambda: [("Authorization", "Basic dXNlcjpwYXNz")], INVALID),
    ("other-scheme", lambda: [("Authorization", f"Token {sign(claims())}")], INVALID),
    ("no-scheme", lambda: [("Authorization", sign(claims()))], INVALID),
    (
        "bearer-with-trailing-junk",
        lambda: [("Authorization", f"Bearer {sign(claims())} junk")],
        INVALID,
    ),
    ("two-authorization-valid", lambda: bearer(sign(claims())) * 2, INVALID),
    (
        "two-authorization-valid-then-bad",
        lambda: [*bearer(sign(claims())), *bearer("garbage")],
        INVALID,
    ),
    (
        "two-authorization-bad-then-valid",
        lambda: [*bearer("garbage"), *bearer(sign(claims()))],
        INVALID,
    ),
]


@pytest.mark.parametrize("prefix", ["/api/", "/opt/"], ids=["required", "optional"])
@pytest.mark.parametrize(
    ("headers", "error"), [(h, e) for _, h, e in FORGERIES], ids=[i for i, _, _ in FORGERIES]
)
async def test_forged_tokens_are_refused(
    gw: Running,
    seen: Recorder,
    prefix: str,
    headers: Callable[[], list[tuple[str, str]]],
    error: str,
) -> None:
    reply = await send(gw.listener.port, prefix + "x", [*headers(), ("X-OpenId", "o-spoof")])
    assert reply.status == 401, reply.body
    assert reply.json["error"] == error
    assert reply.json["message"]
    assert (reply.header("WWW-Authenticate") or "").startswith("Bearer")
    assert seen.seen == []


# Controls: the same path with tokens the gateway must accept.
ACCEPTED: list[tuple[str, Callable[[], list[tuple[str, str]]]]] = [
    ("pyjwt-hs256", lambda: bearer(sign(claims(sub="o-control")))),
    (
        "crafted-hs256",
        lambda: bearer(craft({"alg": "HS256", "kid": KID}, claims(sub="o-control"), TOKEN_SECRET)),
    ),
    ("scheme-lowercase", lambda: [("authorization", f"bearer {sign(claims(sub='o-control'))}")]),
    ("scheme-uppercase", lambda: [("Authorization", f"BEARER {sign(claims(sub='o-control'))}")]),
    ("two-spaces", lambda: [("Authorization", f"Bearer  {sign(claims(sub='o-control'))}")]),
    ("extra-claims", lambda: bearer(sign(claims(sub="o-control", aud="x", role="admin")))),
]


@pytest.mark.parametrize("prefix", ["/api/", "/opt/"], ids=["required", "optional"])
@pytest.mark.parametrize("headers", [h for _, h in ACCEPTED], ids=[i for i, _ in ACCEPTED])
async def test_well_formed_tokens_are_accepted(
    gw: Running, seen: Recorder, prefix: str, headers: Callable[[], list[tuple[str, str]]]
) -> None:
    reply = await send(gw.listener.port, prefix + "x", headers())
    assert reply.status == 200, reply.body
    assert seen.last.header("X-OpenId") == "o-control"


@pytest.mark.parametrize(
    ("prefix", "status", "error"),
    [("/api/", 401, MISSING), ("/opt/", 200, None), ("/public/", 200, None)],
)
async def test_empty_authorization_is_no_token(
    gw: Running, seen: Recorder, prefix: str, status: int, error: str | None
) -> None:
    reply = await send(gw.listener.port, prefix + "x", [("Authorization", "")])
    assert reply.status == status, reply.body
    if error:
        assert reply.json["error"] == error
        assert seen.seen == []
    else:
        assert seen.last.header("X-OpenId") is None


@pytest.mark.parametrize(
    "headers",
    [h for i, h, _ in FORGERIES if i in ("alg-none-pyjwt", "expired", "tampered-payload", "basic")],
)
async def test_public_route_never_looks_at_the_token(
    gw: Running, seen: Recorder, headers: Callable[[], list[tuple[str, str]]]
) -> None:
    reply = await send(gw.listener.port, "/public/x", headers())
    assert reply.status == 200, reply.body
    assert seen.last.header("X-OpenId") is None
    assert seen.last.header("Authorization") is None


async def test_10kb_token_is_refused_before_the_upstream(gw: Running, seen: Recorder) -> None:
    # 10 KB is past aiohttp's 8 KiB header-field limit, so the parser refuses the
    # request (400) before any token logic; either way nothing may reach the upstream.
    for prefix in ("/api/", "/opt/"):
        reply = await send(gw.listener.port, prefix + "x", bearer("a" * 10_240))
        assert (reply.status, reply.json["error"]) in ((400, "bad_request"), (401, INVALID))
    assert seen.seen == []


@pytest.mark.parametrize(
    ("leeway", "exp_offset", "error"),
    [
        ("0s", 30, None),
        ("0s", -5, EXPIRED),
        ("60s", -5, None),
        ("60s", -50, None),
        ("60s", -120, EXPIRED),
        ("2m", -100, None),
    ],
)
async def test_leeway_on_exp(
    start_gateway: StartGateway, seen: Recorder, leeway: str, exp_offset: int, error: str | None
) -> None:
    gw = await start_gateway(token={"leeway": leeway})
    now = int(time.time())
    token = sign(claims(sub="o-leeway", iat=now - 3600, exp=now + exp_offset))
    reply = await send(gw.listener.port, "/api/x", bearer(token))
    if error is None:
        assert reply.status == 200, reply.body
        assert seen.last.header("X-OpenId") == "o-leeway"
    else:
        assert (reply.status, reply.json["error"]) == (401, error)
        assert seen.seen == []


async def test_a_token_accepted_once_still_expires(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    # The gateway may remember verified tokens; a remembered one must still expire.
    gw = await start_gateway(token={"ttl": "2s"})
    token = gw.token("o-short")
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    reply = await send(gw.listener.port, "/api/x", bearer(token))
    assert reply.status == 200, reply.body
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.1)
    reply = await send(gw.listener.port, "/api/x", bearer(token))
    assert reply.status == 401, reply.body
    assert reply.json["error"] == EXPIRED
    assert len(seen.seen) == 1


# -- tokens the gateway issues -------------------------------------------------------------


async def login(gw: Running, code: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    body = json.dumps({"code": code}).encode()
    try:
        writer.write(
            b"POST /auth/login HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        data = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", data
    answer = json.loads(payload)
    assert answer["openid"] == fake.openid_for(code)
    return str(answer["token"])


async def whoami(gw: Running, token: str) -> tuple[int, str | None]:
    """Status of a proxied request with `token`, and the error code when refused."""
    reply = await send(gw.listener.port, "/api/whoami", bearer(token))
    return reply.status, (reply.json["error"] if reply.status != 200 else None)


async def test_issued_token_shape(gw: Running) -> None:
    token = await login(gw, "shape-code")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    assert header["kid"] == KID
    payload = jwt.decode(token, TOKEN_SECRET, algorithms=["HS256"], issuer="wx-gateway")
    assert payload["sub"] == fake.openid_for("shape-code")
    assert payload["exp"] - payload["iat"] == 7200
    assert abs(payload["iat"] - time.time()) < 5
    assert payload["sid"]
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, OTHER_SECRET, algorithms=["HS256"])


async def test_key_rotation(start_gateway: StartGateway, seen: Recorder) -> None:
    old_gw = await start_gateway()
    old_token = await login(old_gw, "rotation-old")
    old_minted = old_gw.token("o-minted-old")

    rotated = await start_gateway(token={"secret": NEW_SECRET, "previous_secrets": [TOKEN_SECRET]})
    # tokens signed with a previous secret still verify...
    assert await whoami(rotated, old_token) == (200, None)
    assert seen.last.header("X-OpenId") == fake.openid_for("rotation-old")
    assert await whoami(rotated, old_minted) == (200, None)
    # ...and new tokens are signed with the new key only, named by its kid
    new_token = await login(rotated, "rotation-new")
    assert jwt.get_unverified_header(new_token)["kid"] == key_id(Secret(NEW_SECRET))
    assert jwt.get_unverified_header(new_token)["kid"] != KID
    jwt.decode(new_token, NEW_SECRET, algorithms=["HS256"])
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(new_token, TOKEN_SECRET, algorithms=["HS256"])
    assert await whoami(rotated, new_token) == (200, None)
    assert seen.last.header("X-OpenId") == fake.openid_for("rotation-new")
    # a gateway that never had the new key refuses the new token
    assert await whoami(old_gw, new_token) == (401, INVALID)
    # a kid naming one key with a signature from the other is refused
    cross = [
        sign(claims(), NEW_SECRET, kid=KID),
        sign(claims(), TOKEN_SECRET, kid=key_id(Secret(NEW_SECRET))),
    ]
    seen.seen.clear()
    for token in cross:
        assert await whoami(rotated, token) == (401, INVALID)
    assert seen.seen == []

    # the old key retired: its tokens are refused, new ones still work
    retired = await start_gateway(token={"secret": NEW_SECRET})
    assert await whoami(retired, old_token) == (401, INVALID)
    assert await whoami(retired, old_minted) == (401, INVALID)
    assert await whoami(retired, new_token) == (200, None)


async def test_several_previous_secrets(start_gateway: StartGateway) -> None:
    older = "older-token-secret-0000000000000000000000"
    gw = await start_gateway(
        token={"secret": NEW_SECRET, "previous_secrets": [TOKEN_SECRET, older]}
    )
    for secret in (NEW_SECRET, TOKEN_SECRET, older):
        token = sign(claims(sub="o-multi"), secret, kid=key_id(Secret(secret)))
        assert await whoami(gw, token) == (200, None), secret
    assert await whoami(gw, sign(claims(), OTHER_SECRET, kid=key_id(Secret(OTHER_SECRET)))) == (
        401,
        INVALID,
    )


async def test_tokens_survive_a_restart(start_gateway: StartGateway, seen: Recorder) -> None:
    first = await start_gateway()
    issued = await login(first, "restart-code")
    minted = first.token("o-restart")
    assert await whoami(first, issued) == (200, None)
    await first.listener.stop()

    second = await start_gateway()
    assert second.listener.port != 0
    assert await whoami(second, issued) == (200, None)
    assert seen.last.header("X-OpenId") == fake.openid_for("restart-code")
    assert await whoami(second, minted) == (200, None)
    assert seen.last.header("X-OpenId") == "o-restart"
    reply = await send(second.listener.port, "/auth/me", bearer(issued))
    assert reply.status == 200, reply.body
    assert reply.json["openid"] == fake.openid_for("restart-code")


async def test_token_forgeries(gw: Running, seen: Recorder) -> None:
    """The attack pass's forgeries, one after the other on one gateway."""
    good = gw.token("o-good")
    h, _, sig = good.split(".")
    cases = {
        "alg none": jwt.encode(claims(), None, algorithm="none"),
        "other key": sign(claims(), "another-key-" + "k" * 32),
        "HS512": sign(claims(), alg="HS512"),
        "tampered payload": f"{h}.{sign(claims(sub='o-admin')).split('.')[1]}.{sig}",
        "wrong issuer": sign(claims(iss="someone-else")),
        "no exp": sign(claims(exp=None)),
        "no sid": sign(claims(sid=None)),
        "unknown kid": sign(claims(), kid="nope"),
        "no kid": sign(claims(), kid=None),
        "garbage": "not.a.token",
        "huge": "a" * 7000,  # over the 4 KiB token limit, under the 8 KiB header limit
        "control chars in sub": sign(claims(sub="o-x\r\nX-OpenId: o-admin")),
    }
    for label, token in cases.items():
        reply = await send(gw.listener.port, "/api/x", bearer(token))
        assert (reply.status, reply.json["error"]) == (401, INVALID), label
    expired = sign(claims(exp=int(time.time()) - 5))
    assert_error(await send(gw.listener.port, "/api/x", bearer(expired)), 401, EXPIRED)
    for header in (
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "Bearer")],
        [*bearer(good), *bearer(good)],
    ):
        reply = await send(gw.listener.port, "/api/x", header)
        assert_error(reply, 401, (INVALID, MISSING))
    assert seen.seen == []
    assert (await send(gw.listener.port, "/api/x", bearer(good))).status == 200


async def test_key_rotation_and_custom_token_header(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    old = await start_gateway()
    old_token = old.token("o-rotated")
    rotated = await start_gateway(
        token={"secret": NEW_SECRET, "previous_secrets": [TOKEN_SECRET], "header": "X-Token"}
    )
    new_token = rotated.token("o-new")
    assert (
        jwt.get_unverified_header(new_token)["kid"] != jwt.get_unverified_header(old_token)["kid"]
    )
    for token, openid in ((old_token, "o-rotated"), (new_token, "o-new")):
        reply = await send(
            rotated.listener.port,
            "/api/x",
            [("X-Token", token), ("Authorization", "Basic kept")],
        )
        assert reply.status == 200
        headers = dict(seen.last.headers)
        assert headers["X-OpenId"] == openid
        # An ordinary header, with a custom token header.
        assert headers["Authorization"] == "Basic kept"
        assert "X-Token" not in headers
    retired = await start_gateway(token={"secret": NEW_SECRET})
    reply = await send(retired.listener.port, "/api/x", bearer(old_token))
    assert_error(reply, 401, INVALID)


# -- gateway.auth.tokens units -----------------------------------------------------------------


def codec(
    secret: str = TOKEN_SECRET,
    previous: tuple[str, ...] = (),
    ttl: float = 7200,
    leeway: float = 0,
    issuer: str = "wx-gateway",
) -> TokenCodec:
    return TokenCodec(
        TokenConfig(
            secret=Secret(secret),
            previous_secrets=tuple(Secret(p) for p in previous),
            ttl=ttl,
            issuer=issuer,
            leeway=leeway,
        ),
        [APPID],
    )


def unverified(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


@pytest.mark.parametrize("unionid", ["u-unit", None])
def test_codec_issue(unionid: str | None) -> None:
    now = time.time()
    token, issued = codec().issue("o-unit", unionid, now)
    assert issued.openid == "o-unit"
    assert issued.unionid == unionid
    assert issued.issued_at == int(now)
    assert issued.expires_at == int(now) + 7200
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT", "kid": KID}
    payload = unverified(token)
    expected = {
        "sub": "o-unit",
        "iss": "wx-gateway",
        "iat": int(now),
        "exp": int(now) + 7200,
        "sid": issued.session_id,
        "appid": APPID,  # the default app's, when none is named
    }
    if unionid:
        expected["uid"] = unionid
    assert payload == expected
    # signed with the configured secret, verifiable by anyone holding it
    jwt.decode(token, TOKEN_SECRET, algorithms=["HS256"], issuer="wx-gateway")


def test_codec_session_ids_are_unique() -> None:
    c = codec()
    now = time.time()
    assert len({c.issue("o-unit", None, now)[1].session_id for _ in range(50)}) == 50


@pytest.mark.parametrize(
    ("ttl", "leeway", "after", "outcome"),
    [
        (7200, 0, 0, "ok"),
        (7200, 0, 1, "ok"),
        (7200, 0, 7199, "ok"),
        (7200, 0, 7200, "expired"),
        (7200, 0, 7201, "expired"),
        (7200, 0, 10**6, "expired"),
        (7200, 30, 7229, "ok"),
        (7200, 30, 7230, "expired"),
        (60, 0, 59, "ok"),
        (60, 0, 60, "expired"),
    ],
)
def test_codec_verify_with_injected_now(ttl: int, leeway: int, after: int, outcome: str) -> None:
    # Issued a little before the real clock so that only `now` decides.
    c = codec(ttl=ttl, leeway=leeway)
    issued_at = int(time.time())
    token, issued = c.issue("o-unit", "u-unit", issued_at)
    if outcome == "ok":
        assert c.verify(token, issued_at + after) == issued
    else:
        with pytest.raises(TokenExpired):
            c.verify(token, issued_at + after)


@pytest.mark.parametrize(
    "base",
    [1_600_000_000, int(time.time()) + 30 * 86400],
    ids=["clock-in-the-past", "clock-in-the-future"],
)
def test_codec_judges_by_the_injected_now_only(base: int) -> None:
    # `verify(token, now)` takes the clock as a parameter (the gateway injects
    # one); a token issued at `now` must verify at `now + 1`, whatever the
    # machine's own clock says, and expire at `now + ttl`.
    c = codec()
    token, issued = c.issue("o-unit", None, base)
    assert c.verify(token, base + 1) == issued
    with pytest.raises(TokenExpired):
        c.verify(token, base + 7200)


def test_codec_rotation() -> None:
    now = time.time()
    old, new = codec(TOKEN_SECRET), codec(NEW_SECRET, previous=(TOKEN_SECRET,))
    retired = codec(NEW_SECRET)
    old_token, old_claims = old.issue("o-old", None, now)
    new_token, new_claims = new.issue("o-new", None, now)
    assert jwt.get_unverified_header(new_token)["kid"] == key_id(Secret(NEW_SECRET))
    assert new.verify(old_token, now) == old_claims
    assert new.verify(new_token, now) == new_claims
    assert retired.verify(new_token, now) == new_claims
    for verifier, token in ((old, new_token), (retired, old_token)):
        with pytest.raises(TokenInvalid):
            verifier.verify(token, now)


@pytest.mark.parametrize(
    "token",
    [
        sign(claims(), OTHER_SECRET),
        sign(claims(), alg="HS512"),
        sign(claims(), None, alg="none"),
        sign(claims(iss="other")),
        sign(claims(sid=None)),
        sign(claims(), kid=None),
        "a" * 5000,
        "",
        "x",
    ],
    ids=["other-key", "hs512", "none", "issuer", "no-sid", "no-kid", "huge", "empty", "word"],
)
def test_codec_verify_refuses(token: str) -> None:
    with pytest.raises(TokenInvalid):
        codec().verify(token, time.time())


def test_codec_issuer_is_checked() -> None:
    now = time.time()
    token, _ = codec(issuer="someone-else").issue("o-unit", None, now)
    with pytest.raises(TokenInvalid):
        codec().verify(token, now)


def test_verified_tokens_cache_still_expires() -> None:
    c = codec(ttl=100)
    cache = VerifiedTokens(c, leeway=0)
    now = int(time.time())
    token, issued = c.issue("o-unit", None, now)
    assert cache.verify(token, now) == issued
    assert cache.verify(token, now + 99) == issued
    with pytest.raises(TokenExpired):
        cache.verify(token, now + 100)
    with pytest.raises(TokenInvalid):
        cache.verify(sign(claims(), OTHER_SECRET), now)


@pytest.mark.parametrize(
    ("value", "is_bearer", "outcome"),
    [
        (None, True, TokenMissing),
        ("", True, TokenMissing),
        ("   ", True, TokenMissing),
        ("Bearer abc", True, "abc"),
        ("bearer abc", True, "abc"),
        ("Bearer   abc  ", True, "abc"),
        ("Bearer", True, TokenInvalid),
        ("Bearer ", True, TokenInvalid),
        ("Basic abc", True, TokenInvalid),
        ("abc", True, TokenInvalid),
        ("Bearerabc", True, TokenInvalid),
        (None, False, TokenMissing),
        ("", False, TokenMissing),
        ("abc", False, "abc"),
        (" abc ", False, "abc"),
        ("Bearer abc", False, "Bearer abc"),
    ],
)
def test_bearer_from_header(value: str | None, is_bearer: bool, outcome: Any) -> None:
    if isinstance(outcome, str):
        assert bearer_from_header(value, is_bearer) == outcome
    else:
        with pytest.raises(outcome):
            bearer_from_header(value, is_bearer)
