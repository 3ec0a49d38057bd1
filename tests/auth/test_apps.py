"""Several mini programs behind one gateway (contract section 9), end to end.

A gateway configured with two apps, `shop` (the first: the default app) and
`card`, runs in-process against the fake WeChat serving both, each with its own
secret, openids, session keys and access tokens (a real server on loopback),
and forwards to the reflecting upstream. The fake refuses a code or an access
token of the other app (codes ending in ``@<appid>``), so a gateway that used
the wrong app's credentials anywhere would fail here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from gateway.auth.tokens import key_id
from gateway.config import Secret
from gateway.wechat import fake
from gateway.wechat.crypto import encrypt_payload
from tests.support.client import Reply, bearer, fake_stats, send
from tests.support.errors import assert_error
from tests.support.gateway import APPID, TOKEN_SECRET, Running, StartGateway, config_for, url_of
from tests.support.rawhttp import request
from tests.support.upstream import Recorder, served

SHOP, CARD = "wxshop0000000001", "wxcard0000000002"
SHOP_SECRET, CARD_SECRET = "shop-wechat-secret-1f3a", "card-wechat-secret-8c2d"
SHOP_APP = {"appid": SHOP, "secret": SHOP_SECRET, "name": "shop"}
CARD_APP = {"appid": CARD, "secret": CARD_SECRET, "name": "card"}
IV = "r7BXXKkLb8qrSNn05n0qiA=="
TRUSTED = {"trusted_proxies": ["127.0.0.1/32"]}
PHONE = {"phone_header": "X-Phone"}

StartTwo = Callable[..., Awaitable[Running]]


# -- fixtures and helpers ------------------------------------------------------------


@pytest.fixture
async def wechat2() -> AsyncIterator[TestServer]:
    """The fake WeChat serving both apps, each checking its own secret."""
    async with served(fake.create_app(apps={SHOP: SHOP_SECRET, CARD: CARD_SECRET})) as server:
        yield server


def routes(upstream: str) -> list[dict[str, Any]]:
    return [
        {"prefix": "/api/", "upstream": upstream, "auth": "required"},
        {"prefix": "/opt/", "upstream": upstream, "auth": "optional"},
        {"prefix": "/public/", "upstream": upstream, "auth": "public"},
        {"prefix": "/shop/", "upstream": upstream, "auth": "required", "apps": ["shop"]},
        {"prefix": "/shop-opt/", "upstream": upstream, "auth": "optional", "apps": ["shop"]},
        # By appid rather than name: the same resolution.
        {"prefix": "/card/", "upstream": upstream, "auth": "required", "apps": [CARD]},
    ]


@pytest.fixture
def start_two(
    start_gateway: StartGateway, tmp_path: Path, upstream: TestServer, wechat2: TestServer
) -> StartTwo:
    """Start a gateway serving ``apps`` (default: shop then card) against ``wechat2``;
    keyword arguments override config sections as for ``start_gateway``."""

    async def start(apps: list[dict[str, Any]] | None = None, **sections: Any) -> Running:
        apps = apps or [SHOP_APP, CARD_APP]
        # A route naming an app left out of ``apps`` would be a config error.
        labels = {label for app in apps for label in (app["appid"], app["name"])}
        kept = [r for r in routes(url_of(upstream)) if set(r.get("apps", ())) <= labels]
        raw = config_for(tmp_path, upstream, wechat2, routes=kept, **sections)
        raw["wechat"] = {
            "apps": apps,
            "api_base": url_of(wechat2),
            "timeout": "2s",
        }
        return await start_gateway(raw)

    return start


@pytest.fixture
async def gw2(start_two: StartTwo) -> Running:
    return await start_two()


async def login(http: aiohttp.ClientSession, gw: Running, code: str, appid: Any) -> Reply:
    return await send(http, "POST", gw.url + "/auth/login", json={"code": code, "appid": appid})


async def token_of(http: aiohttp.ClientSession, gw: Running, code: str, appid: str) -> str:
    reply = await login(http, gw, code, appid)
    assert reply.status == 200, reply.raw
    token: str = reply.body["token"]
    return token


def openid(wechat2: TestServer, code: str, appid: str) -> str:
    """The openid the fake gives ``code``'s person in ``appid``."""
    return wechat2.app[fake.FAKE_STATE].openid_for(code, appid)


def session_key(wechat2: TestServer, code: str, appid: str) -> str:
    return wechat2.app[fake.FAKE_STATE].session_key_for(code, appid)


async def app_calls(http: aiohttp.ClientSession, wechat2: TestServer, appid: str) -> dict[str, int]:
    calls: dict[str, int] = (await fake_stats(http, wechat2))["apps"][appid]["calls"]
    return calls


def claims_of(token: str) -> dict[str, Any]:
    payload: dict[str, Any] = jwt.decode(token, TOKEN_SECRET, algorithms=["HS256"])
    return payload


def minted(openid: str, **extra: Any) -> str:
    """A token signed with the gateway's key, as a single-app release issued it
    (no ``appid`` claim) unless ``extra`` adds one."""
    now = int(time.time())
    payload = {"sub": openid, "iss": "wx-gateway", "iat": now, "exp": now + 600}
    payload |= {"sid": secrets.token_urlsafe(12), **extra}
    return jwt.encode(
        payload, TOKEN_SECRET, algorithm="HS256", headers={"kid": key_id(Secret(TOKEN_SECRET))}
    )


async def get(http: aiohttp.ClientSession, gw: Running, path: str, token: str | None) -> Reply:
    return await send(http, "GET", gw.url + path, headers=bearer(token) if token else {})


def sealed(key: str, payload: dict[str, Any]) -> dict[str, str]:
    return {"encrypted_data": encrypt_payload(key, payload, IV), "iv": IV}


def watermark(appid: str) -> dict[str, Any]:
    return {"appid": appid, "timestamp": int(time.time())}


# -- login ------------------------------------------------------------------------------


async def test_login_per_app_uses_that_apps_credentials(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    code = "union-alice"
    shop = await login(http, gw2, code, SHOP)
    card = await login(http, gw2, code, CARD)
    assert (shop.status, card.status) == (200, 200), (shop.raw, card.raw)
    # One person, one openid per app, and the same unionid in both.
    assert shop.body["openid"] == openid(wechat2, code, SHOP)
    assert card.body["openid"] == openid(wechat2, code, CARD)
    assert shop.body["openid"] != card.body["openid"]
    assert shop.body["unionid"] == card.body["unionid"] == fake.unionid_for(code)
    # The body stays the contract's: the app is in the token, not a new field.
    assert set(shop.body) == {"token", "token_type", "expires_in", "openid", "unionid"}
    assert claims_of(shop.body["token"])["appid"] == SHOP
    assert claims_of(card.body["token"])["appid"] == CARD
    assert (await app_calls(http, wechat2, SHOP))["jscode2session"] == 1
    assert (await app_calls(http, wechat2, CARD))["jscode2session"] == 1


async def test_a_code_of_one_app_logs_in_to_that_app_only(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    # The fake answers 40029 to a code of another app, as WeChat does: the login
    # succeeds only if the gateway called jscode2session with the card's appid.
    code = f"bound-bob@{CARD}"
    body = assert_error(await login(http, gw2, code, SHOP), 401, "invalid_code")
    assert body["wechat_errcode"] == 40029
    reply = await login(http, gw2, code, CARD)
    assert reply.status == 200, reply.raw
    assert reply.body["openid"] == openid(wechat2, code, CARD)


async def test_a_wrong_secret_fails_that_app_only(
    start_two: StartTwo, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    gw = await start_two([SHOP_APP, {**CARD_APP, "secret": "not-the-card-secret"}])
    # The fake's 40125 (invalid appsecret) is an "other errcode": 502 with it.
    body = assert_error(await login(http, gw, "carol", CARD), 502, "wechat_error")
    assert body["wechat_errcode"] == 40125
    assert "not-the-card-secret" not in repr(body)
    assert (await login(http, gw, "carol", SHOP)).status == 200
    stored = gw.listener.gateway.services.storage
    assert await stored.get_user(CARD, openid(wechat2, "carol", CARD)) is None
    assert await stored.get_user(SHOP, openid(wechat2, "carol", SHOP)) is not None


@pytest.mark.parametrize("body", [{"code": "dave"}, {"code": "dave", "appid": None}])
async def test_appid_is_required_with_two_apps(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer, body: dict[str, Any]
) -> None:
    reply = await send(http, "POST", gw2.url + "/auth/login", json=body)
    assert_error(reply, 400, "bad_request")
    assert (await fake_stats(http, wechat2))["calls"]["jscode2session"] == 0


@pytest.mark.parametrize("appid", ["wxnotconfigured01", "shop", SHOP.upper(), SHOP + " "])
async def test_unknown_appid_is_unknown_app(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer, appid: str
) -> None:
    # A name is not an appid, and appids are compared exactly.
    assert_error(await login(http, gw2, "erin", appid), 400, "unknown_app")
    assert (await fake_stats(http, wechat2))["calls"]["jscode2session"] == 0


@pytest.mark.parametrize("appid", [12, True, [SHOP], {"appid": SHOP}, "", "  "])
async def test_non_string_appid_is_bad_request(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer, appid: Any
) -> None:
    assert_error(await login(http, gw2, "frank", appid), 400, "bad_request")
    assert (await fake_stats(http, wechat2))["calls"]["jscode2session"] == 0


async def test_appid_is_optional_with_one_app(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    plain = await send(http, "POST", gw.url + "/auth/login", json={"code": "gina"})
    assert plain.status == 200, plain.raw
    assert claims_of(plain.body["token"])["appid"] == APPID
    named = await login(http, gw, "gina", APPID)
    assert named.status == 200 and named.body["openid"] == plain.body["openid"]
    assert_error(await login(http, gw, "gina", SHOP), 400, "unknown_app")
    assert (await fake_stats(http, wechat))["calls"]["jscode2session"] == 2


# -- one person across apps ----------------------------------------------------------------


async def test_unionid_links_the_records_of_one_person(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    code = "union-hana"
    for appid in (SHOP, CARD):
        await token_of(http, gw2, code, appid)
    await token_of(http, gw2, "union-someone-else", SHOP)
    storage = gw2.listener.gateway.services.storage
    records = await storage.users_by_unionid(fake.unionid_for(code) or "")
    assert sorted((r.appid, r.openid) for r in records) == sorted(
        [(SHOP, openid(wechat2, code, SHOP)), (CARD, openid(wechat2, code, CARD))]
    )
    # Each record has its own app's session_key.
    keys = {r.appid: r.session_key for r in records}
    assert keys == {SHOP: session_key(wechat2, code, SHOP), CARD: session_key(wechat2, code, CARD)}


async def test_me_answers_from_the_tokens_app(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    code = "union-ivan"
    shop = await token_of(http, gw2, code, SHOP)
    card = await token_of(http, gw2, code, CARD)
    assert (await phone(http, gw2, shop, {"code": "phone-13900000001"})).status == 200
    shop_me = (await get(http, gw2, "/auth/me", shop)).body
    card_me = (await get(http, gw2, "/auth/me", card)).body
    assert shop_me == {
        "openid": openid(wechat2, code, SHOP),
        "unionid": fake.unionid_for(code),
        "phone_number": "13900000001",
    }
    # The number belongs to the shop record; the card record has none.
    assert card_me == {
        "openid": openid(wechat2, code, CARD),
        "unionid": fake.unionid_for(code),
        "phone_number": None,
    }


# -- phone and decrypt use the token's app -------------------------------------------------


async def phone(http: aiohttp.ClientSession, gw: Running, token: str, body: Any) -> Reply:
    return await send(http, "POST", gw.url + "/auth/phone", headers=bearer(token), json=body)


async def decrypt(http: aiohttp.ClientSession, gw: Running, token: str, body: Any) -> Reply:
    return await send(http, "POST", gw.url + "/auth/decrypt", headers=bearer(token), json=body)


async def test_phone_code_uses_each_apps_own_access_token(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    shop = await token_of(http, gw2, "jun", SHOP)
    card = await token_of(http, gw2, "jun", CARD)
    for i in range(3):
        # Codes bound to an app: the fake answers 40001 to the other app's token,
        # so each 200 proves the call carried that app's access token.
        answer = await phone(http, gw2, shop, {"code": f"phone-1380000000{i}@{SHOP}"})
        assert answer.status == 200, answer.raw
        answer = await phone(http, gw2, card, {"code": f"phone-1390000000{i}@{CARD}"})
        assert answer.status == 200, answer.raw
        assert answer.body["phone_number"] == f"1390000000{i}"
    assert (await app_calls(http, wechat2, SHOP))["stable_token"] == 1
    assert (await app_calls(http, wechat2, CARD))["stable_token"] == 1

    # The card's token dies (a 40001 on its next use): only the card refetches.
    async with http.post(wechat2.make_url("/_fake/invalidate_tokens"), params={"appid": CARD}) as r:
        assert (await r.json())["invalidated"] == 1
    assert (await phone(http, gw2, card, {"code": f"phone-13911112222@{CARD}"})).status == 200
    assert (await phone(http, gw2, shop, {"code": f"phone-13811112222@{SHOP}"})).status == 200
    assert (await app_calls(http, wechat2, CARD))["stable_token"] == 2
    assert (await app_calls(http, wechat2, SHOP))["stable_token"] == 1
    me = (await get(http, gw2, "/auth/me", card)).body
    assert me["phone_number"] == "13911112222"


async def test_decrypt_checks_the_watermark_against_the_tokens_app(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    code = "union-kumi"
    shop = await token_of(http, gw2, code, SHOP)
    card = await token_of(http, gw2, code, CARD)
    shop_key, card_key = session_key(wechat2, code, SHOP), session_key(wechat2, code, CARD)
    assert shop_key != card_key

    own = await decrypt(http, gw2, card, sealed(card_key, {"n": 1, "watermark": watermark(CARD)}))
    assert own.status == 200, own.raw
    assert own.body["data"]["n"] == 1
    # Sealed with the card's key, but stamped for the shop (the default app).
    other = sealed(card_key, {"n": 2, "watermark": watermark(SHOP)})
    assert_error(await decrypt(http, gw2, card, other), 400, "decrypt_failed")
    # The shop token decrypts with the shop record's key and checks the shop's appid.
    mine = sealed(shop_key, {"n": 3, "watermark": watermark(SHOP)})
    assert (await decrypt(http, gw2, shop, mine)).status == 200
    theirs = sealed(shop_key, {"n": 4, "watermark": watermark(CARD)})
    assert_error(await decrypt(http, gw2, shop, theirs), 400, "decrypt_failed")
    # The other app's session_key does not open it either.
    crossed = sealed(shop_key, {"n": 5, "watermark": watermark(CARD)})
    assert_error(await decrypt(http, gw2, card, crossed), 400, "decrypt_failed")


async def test_legacy_phone_checks_the_watermark_against_the_tokens_app(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    code = "union-lena"
    card = await token_of(http, gw2, code, CARD)
    key = session_key(wechat2, code, CARD)
    number = {"phoneNumber": "13700000007", "purePhoneNumber": "13700000007", "countryCode": "86"}
    stamped_shop = sealed(key, {**number, "watermark": watermark(SHOP)})
    assert_error(await phone(http, gw2, card, stamped_shop), 400, "decrypt_failed")
    assert (await get(http, gw2, "/auth/me", card)).body["phone_number"] is None
    stamped_card = sealed(key, {**number, "watermark": watermark(CARD)})
    answer = await phone(http, gw2, card, stamped_card)
    assert answer.status == 200, answer.raw
    assert (await get(http, gw2, "/auth/me", card)).body["phone_number"] == "13700000007"


# -- upstream headers -----------------------------------------------------------------------


async def test_upstream_gets_the_tokens_appid(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer, seen: Recorder
) -> None:
    for appid in (SHOP, CARD):
        token = await token_of(http, gw2, "union-mika", appid)
        for path in ("/api/x", "/opt/x"):
            assert (await get(http, gw2, path, token)).status == 200
            assert seen.last.header_values("X-AppId") == [("X-AppId", appid)]
            assert seen.last.header("X-OpenId") == openid(wechat2, "union-mika", appid)
    assert (await get(http, gw2, "/opt/anon", None)).status == 200
    assert seen.last.header_values("X-AppId", "X-OpenId") == []


SPOOFS = [
    ("X-AppId", "wxforged1"),
    ("X_AppId", "wxforged2"),
    ("x-appid", "wxforged3"),
    ("X-APPID", "wxforged4"),
    ("X-Phone", "19900000001"),
    ("X_Phone", "19900000002"),
    ("x_phone", "19900000003"),
]


@pytest.mark.parametrize("path", ["/public/x", "/opt/x", "/shop-opt/x"])
async def test_client_appid_and_phone_headers_are_stripped_without_a_token(
    start_two: StartTwo, seen: Recorder, path: str
) -> None:
    gw = await start_two(identity=PHONE)
    answer = await request(gw.listener.port, path, SPOOFS)
    assert answer.status == 200, answer.body
    assert seen.last.header_values("X-AppId", "X-Phone") == []
    assert not any(v.startswith(("wxforged", "199")) for _, v in seen.last.headers)


async def test_client_appid_and_phone_headers_are_replaced_with_a_token(
    start_two: StartTwo, http: aiohttp.ClientSession, wechat2: TestServer, seen: Recorder
) -> None:
    gw = await start_two(identity=PHONE)
    token = await token_of(http, gw, "nora", CARD)
    assert (await phone(http, gw, token, {"code": "phone-13600000006"})).status == 200
    answer = await request(gw.listener.port, "/api/x", [*SPOOFS, *bearer(token).items()])
    assert answer.status == 200, answer.body
    assert seen.last.header_values("X-AppId", "X-Phone") == [
        ("X-AppId", CARD),
        ("X-Phone", "13600000006"),
    ]


# -- a route's apps ---------------------------------------------------------------------------


async def test_route_apps_refuses_a_token_of_another_app(
    gw2: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    shop = await token_of(http, gw2, "olga", SHOP)
    card = await token_of(http, gw2, "olga", CARD)
    for path, token in [("/shop/x", card), ("/shop-opt/x", card), ("/card/x", shop)]:
        before = len(seen.seen)
        assert_error(await get(http, gw2, path, token), 403, "app_forbidden")
        assert len(seen.seen) == before, f"{path} reached the upstream"
    for path, token, appid in [("/shop/x", shop, SHOP), ("/card/x", card, CARD)]:
        assert (await get(http, gw2, path, token)).status == 200
        assert seen.last.header("X-AppId") == appid
    # Anonymous on an optional route with apps: nothing to check, it passes.
    assert (await get(http, gw2, "/shop-opt/anon", None)).status == 200
    assert seen.last.raw_path == "/shop-opt/anon"
    assert seen.last.header_values("X-AppId", "X-OpenId") == []
    # Without a token a required route with apps is still token_missing, not 403.
    assert_error(await get(http, gw2, "/shop/x", None), 401, "token_missing")


async def test_verify_returns_the_appid_and_applies_route_apps(
    start_two: StartTwo, http: aiohttp.ClientSession, wechat2: TestServer
) -> None:
    gw = await start_two(server=TRUSTED)
    shop = await token_of(http, gw, "union-pia", SHOP)
    card = await token_of(http, gw, "union-pia", CARD)

    async def verify(token: str | None, uri: str | None = None) -> Reply:
        headers = bearer(token) if token else {}
        if uri is not None:
            headers["X-Forwarded-Uri"] = uri
        return await send(http, "GET", gw.url + "/auth/verify", headers=headers)

    plain = await verify(card)
    assert plain.status == 200, plain.raw
    assert plain.headers.getall("X-AppId") == [CARD]
    assert plain.headers["X-OpenId"] == openid(wechat2, "union-pia", CARD)
    assert plain.body == {
        "openid": openid(wechat2, "union-pia", CARD),
        "unionid": fake.unionid_for("union-pia"),
    }
    assert_error(await verify(card, "/shop/orders"), 403, "app_forbidden")
    allowed = await verify(shop, "/shop/orders")
    assert allowed.status == 200 and allowed.headers.getall("X-AppId") == [SHOP]
    assert (await verify(card, "/card/x")).headers.getall("X-AppId") == [CARD]
    assert_error(await verify(shop, "/card/x"), 403, "app_forbidden")
    # Anonymous on an optional route with apps: 200 without identity headers.
    anon = await verify(None, "/shop-opt/x")
    assert anon.status == 200 and "X-AppId" not in anon.headers


# -- the phone header -------------------------------------------------------------------------


async def test_phone_header_is_off_by_default(
    gw2: Running, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    token = await token_of(http, gw2, "quinn", SHOP)
    assert (await phone(http, gw2, token, {"code": "phone-13512345678"})).status == 200
    assert (await get(http, gw2, "/api/x", token)).status == 200
    # No header of any name carries the number to the upstream.
    assert [k for k, v in seen.last.headers if "13512345678" in v] == []
    verified = await get(http, gw2, "/auth/verify", token)
    assert verified.status == 200
    assert [k for k, v in verified.headers.items() if "13512345678" in v] == []


async def test_phone_header_appears_once_the_number_is_known(
    start_two: StartTwo, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    gw = await start_two(identity=PHONE)
    shop = await token_of(http, gw, "union-rosa", SHOP)
    card = await token_of(http, gw, "union-rosa", CARD)
    assert (await get(http, gw, "/api/before", shop)).status == 200
    assert seen.last.header_values("X-Phone") == []
    assert (await phone(http, gw, shop, {"code": "phone-13412345678"})).status == 200
    assert (await get(http, gw, "/api/after", shop)).status == 200
    assert seen.last.header_values("X-Phone") == [("X-Phone", "13412345678")]
    verified = await get(http, gw, "/auth/verify", shop)
    assert verified.headers.getall("X-Phone") == ["13412345678"]
    # The number is the shop record's: the same person's card token carries none.
    assert (await get(http, gw, "/api/card", card)).status == 200
    assert seen.last.header_values("X-Phone") == []
    assert "X-Phone" not in (await get(http, gw, "/auth/verify", card)).headers


async def test_phone_header_after_a_restart_is_read_from_storage(
    start_two: StartTwo, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    first = await start_two(identity=PHONE)
    token = await token_of(http, first, "sara", CARD)
    assert (await phone(http, first, token, {"code": "phone-13312345678"})).status == 200
    await first.listener.stop()
    # A fresh worker has nothing cached: the first request reads the number.
    second = await start_two(identity=PHONE)
    assert (await get(http, second, "/api/x", token)).status == 200
    assert seen.last.header_values("X-Phone") == [("X-Phone", "13312345678")]
    assert (await get(http, second, "/api/y", token)).status == 200
    assert seen.last.header_values("X-Phone") == [("X-Phone", "13312345678")]


# -- tokens across config changes -------------------------------------------------------------


async def test_a_token_of_an_app_removed_from_the_config_is_invalid(
    start_two: StartTwo, http: aiohttp.ClientSession, seen: Recorder
) -> None:
    both = await start_two()
    shop = await token_of(http, both, "tomo", SHOP)
    card = await token_of(http, both, "tomo", CARD)
    await both.listener.stop()
    shop_only = await start_two([SHOP_APP])
    assert_error(await get(http, shop_only, "/auth/me", card), 401, "token_invalid")
    before = len(seen.seen)
    assert_error(await get(http, shop_only, "/api/x", card), 401, "token_invalid")
    assert len(seen.seen) == before
    assert (await get(http, shop_only, "/auth/me", shop)).status == 200
    assert (await get(http, shop_only, "/api/x", shop)).status == 200
    assert seen.last.header("X-AppId") == SHOP


async def test_a_token_without_appid_belongs_to_the_default_app(
    gw2: Running, http: aiohttp.ClientSession, wechat2: TestServer, seen: Recorder
) -> None:
    code = "union-umi"
    shop = await token_of(http, gw2, code, SHOP)
    assert (await phone(http, gw2, shop, {"code": "phone-13212345678"})).status == 200
    legacy = minted(openid(wechat2, code, SHOP))
    assert "appid" not in jwt.decode(legacy, options={"verify_signature": False})
    me = await get(http, gw2, "/auth/me", legacy)
    assert me.status == 200, me.raw
    assert me.body["phone_number"] == "13212345678"  # the shop (default) record's
    assert (await get(http, gw2, "/api/x", legacy)).status == 200
    assert seen.last.header("X-AppId") == SHOP
    assert (await get(http, gw2, "/shop/x", legacy)).status == 200
    assert_error(await get(http, gw2, "/card/x", legacy), 403, "app_forbidden")


@pytest.mark.parametrize("appid", ["wxnotconfigured01", "shop", None, 7, [SHOP], {"id": SHOP}])
async def test_a_signed_token_naming_no_configured_app_is_invalid(
    gw2: Running, http: aiohttp.ClientSession, appid: Any
) -> None:
    # Signed with our key (a token of a removed app, or a bug elsewhere): still
    # refused as token_invalid, never a 500 and never the default app.
    token = minted("o-someone", appid=appid)
    assert_error(await get(http, gw2, "/auth/me", token), 401, "token_invalid")
