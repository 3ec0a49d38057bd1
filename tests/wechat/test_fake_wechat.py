"""The fake WeChat API server, driven over HTTP exactly as the gateway drives it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient

from gateway.cli import main
from gateway.wechat.fake import (
    DEMO_PHONE,
    FAKE_STATE,
    create_app,
    openid_for,
    session_key_for,
    unionid_for,
)
from tests.support import ROOT
from tests.support.gateway import free_port
from tests.support.waiting import PROMPT, until

APPID, SECRET = "wxtestappid0000001", "test-app-secret-value"
Client = TestClient[web.Request, web.Application]


class FakeClock:
    """Moves only when a test says so, so token expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, clock: FakeClock) -> Client:
    return await aiohttp_client(create_app(token_ttl=7200, slow_seconds=0.5, clock=clock))


async def login(client: Client, code: str, **overrides: str) -> dict[str, Any]:
    params = {"appid": APPID, "secret": SECRET, "js_code": code}
    params["grant_type"] = "authorization_code"
    params.update(overrides)
    resp = await client.get("/sns/jscode2session", params=params)
    assert resp.status == 200
    return dict(await resp.json())


async def stable_token(client: Client, **fields: Any) -> dict[str, Any]:
    body = {"grant_type": "client_credential", "appid": APPID, "secret": SECRET, **fields}
    resp = await client.post("/cgi-bin/stable_token", json=body)
    assert resp.status == 200
    return dict(await resp.json())


async def phone(
    client: Client, code: str, token: str | None = None, **credentials: str
) -> dict[str, Any]:
    """Ask for a phone number with ``token``, or with a fresh stable token of the
    app ``credentials`` (``appid``, ``secret``) name, by default APPID's."""
    if token is None:
        token = (await stable_token(client, **credentials))["access_token"]
    resp = await client.post(
        "/wxa/business/getuserphonenumber", params={"access_token": token}, json={"code": code}
    )
    assert resp.status == 200
    return dict(await resp.json())


async def stats(client: Client) -> dict[str, Any]:
    return dict(await (await client.get("/_fake/stats")).json())


# --- jscode2session -------------------------------------------------------------


async def test_login_is_deterministic_and_shaped_like_wechat(client: Client) -> None:
    first, again, other = [await login(client, c) for c in ("abc", "abc", "abd")]
    assert first == again
    assert first["openid"] != other["openid"]
    assert first["session_key"] != other["session_key"]
    assert first["openid"] == openid_for("abc")
    assert first["session_key"] == session_key_for("abc")
    # A real openid: 28 url-safe characters starting with "o"; a session_key: 16 bytes.
    assert len(first["openid"]) == 28
    assert first["openid"].startswith("o")
    assert len(base64.b64decode(first["session_key"], validate=True)) == 16
    # WeChat omits errcode on success, and sends no unionid unless it has one.
    assert set(first) == {"openid", "session_key"}


async def test_union_codes_get_a_stable_unionid(client: Client) -> None:
    answer = await login(client, "union-42")
    assert answer["unionid"] == unionid_for("union-42")
    assert answer["unionid"] != answer["openid"]
    assert len(answer["unionid"]) == 28
    assert unionid_for("union-42") == unionid_for("union-42")
    assert unionid_for("plain-code") is None


@pytest.mark.parametrize(
    ("code", "errcode"),
    [
        ("invalid", 40029),
        ("invalid-xyz", 40029),
        ("used-1", 40163),
        ("ratelimit-a", 45011),
        ("blocked-user", 40226),
        ("busy", -1),
        ("errcode-40001", 40001),
        ("errcode-12345-tail", 12345),
        ("errcode--2", -2),
    ],
)
@pytest.mark.parametrize("api", ["login", "phone"])
async def test_magic_codes_force_errcodes(
    client: Client, api: str, code: str, errcode: int
) -> None:
    answer = await (login(client, code) if api == "login" else phone(client, code))
    assert answer["errcode"] == errcode
    assert isinstance(answer["errmsg"], str)
    assert answer["errmsg"]
    assert "openid" not in answer
    assert "phone_info" not in answer


@pytest.mark.parametrize("api", ["login", "phone"])
async def test_notjson_and_http500_codes(client: Client, api: str) -> None:
    token = (await stable_token(client))["access_token"]
    for code, status in (("notjson-1", 200), ("http500-1", 500)):
        if api == "login":
            resp = await client.get(
                "/sns/jscode2session",
                params={
                    "appid": APPID,
                    "secret": SECRET,
                    "js_code": code,
                    "grant_type": "authorization_code",
                },
            )
        else:
            resp = await client.post(
                "/wxa/business/getuserphonenumber",
                params={"access_token": token},
                json={"code": code},
            )
        assert resp.status == status
        with pytest.raises(ValueError):
            json.loads(await resp.text())


async def test_request_errors(client: Client) -> None:
    assert (await login(client, ""))["errcode"] == 41008
    assert (await login(client, "x", appid=""))["errcode"] == 41002
    assert (await login(client, "x", secret=""))["errcode"] == 41004
    assert (await login(client, "x", grant_type="client_credential"))["errcode"] == 40002


async def test_unknown_path_is_errcode_40066(client: Client) -> None:
    resp = await client.get("/sns/jsCode2Session", params={"js_code": "x"})
    assert resp.status == 200
    assert (await resp.json())["errcode"] == 40066


async def test_configured_appid_and_secret_are_enforced(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(appid=APPID, secret=SECRET))
    assert "openid" in await login(client, "good")
    assert (await login(client, "good", appid="wxother"))["errcode"] == 40013
    wrong = await login(client, "good", secret="not-the-secret")
    assert wrong["errcode"] == 40125
    assert "not-the-secret" not in wrong["errmsg"]
    assert SECRET not in wrong["errmsg"]
    assert (await stable_token(client, secret="nope"))["errcode"] == 40125
    assert (await stable_token(client, appid="wxother"))["errcode"] == 40013
    resp = await client.get(
        "/cgi-bin/token",
        params={"grant_type": "client_credential", "appid": APPID, "secret": "nope"},
    )
    assert (await resp.json())["errcode"] == 40125


async def test_without_configured_appid_any_credentials_work(client: Client) -> None:
    assert "openid" in await login(client, "x", appid="wxanything", secret="anything")


# --- access tokens ----------------------------------------------------------------


async def test_stable_token_is_stable_until_it_expires(client: Client, clock: FakeClock) -> None:
    first = await stable_token(client)
    assert first["expires_in"] == 7200
    assert len(first["access_token"]) >= 100
    clock.now += 1000
    second = await stable_token(client, force_refresh=False)
    assert second == {"access_token": first["access_token"], "expires_in": 6200}
    # Only a JSON true forces a refresh.
    assert (await stable_token(client, force_refresh="true"))["access_token"] == first[
        "access_token"
    ]
    clock.now += 6200
    expired = await stable_token(client)
    assert expired["access_token"] != first["access_token"]
    assert expired["expires_in"] == 7200
    assert (await phone(client, "p", first["access_token"]))["errcode"] == 40001
    assert (await phone(client, "p", expired["access_token"]))["errcode"] == 0


async def test_force_refresh_replaces_and_kills_the_old_token(client: Client) -> None:
    old = (await stable_token(client))["access_token"]
    new = (await stable_token(client, force_refresh=True))["access_token"]
    assert new != old
    assert (await phone(client, "p", old))["errcode"] == 40001
    assert (await phone(client, "p", new))["errcode"] == 0
    assert (await stable_token(client))["access_token"] == new


async def test_invalidate_tokens(client: Client) -> None:
    token = (await stable_token(client))["access_token"]
    assert (await phone(client, "p", token))["errcode"] == 0
    resp = await client.post("/_fake/invalidate_tokens")
    assert (await resp.json())["ok"] is True
    assert (await phone(client, "p", token))["errcode"] == 40001
    fresh = (await stable_token(client))["access_token"]
    assert fresh != token
    assert (await phone(client, "p", fresh))["errcode"] == 0


async def test_cgi_bin_token_replaces_the_previous_one_after_a_grace(
    client: Client, clock: FakeClock
) -> None:
    params = {"grant_type": "client_credential", "appid": APPID, "secret": SECRET}
    first = await (await client.get("/cgi-bin/token", params=params)).json()
    second = await (await client.get("/cgi-bin/token", params=params)).json()
    assert first["expires_in"] == 7200
    assert first["access_token"] != second["access_token"]
    assert (await phone(client, "p", first["access_token"]))["errcode"] == 0
    clock.now += 301
    assert (await phone(client, "p", first["access_token"]))["errcode"] == 40001
    assert (await phone(client, "p", second["access_token"]))["errcode"] == 0
    bad = await (await client.get("/cgi-bin/token", params={**params, "grant_type": "x"})).json()
    assert bad["errcode"] == 40002


async def test_stable_token_needs_a_json_body(client: Client) -> None:
    resp = await client.post("/cgi-bin/stable_token", data=b"appid=x")
    assert (await resp.json())["errcode"] == 47001


# --- getuserphonenumber -------------------------------------------------------------


async def test_phone_number_with_string_country_code(client: Client) -> None:
    before = int(time.time())
    answer = await phone(client, "phone-13912345678")
    assert answer["errcode"] == 0
    assert answer["errmsg"] == "ok"
    info = answer["phone_info"]
    assert info["purePhoneNumber"] == "13912345678"
    assert info["phoneNumber"] == "13912345678"
    assert info["countryCode"] == "86"
    # An open fake stamps the app the token was issued to, as WeChat does.
    assert info["watermark"]["appid"] == APPID
    assert before <= info["watermark"]["timestamp"] <= int(time.time())


async def test_phone_number_with_numeric_country_code(client: Client) -> None:
    info = (await phone(client, "phone-intcc-13700000001"))["phone_info"]
    assert info["purePhoneNumber"] == "13700000001"
    assert info["countryCode"] == 86
    assert isinstance(info["countryCode"], int)


async def test_other_phone_codes_get_the_demo_number(client: Client) -> None:
    info = (await phone(client, "whatever"))["phone_info"]
    assert info["purePhoneNumber"] == DEMO_PHONE == "13800138000"
    assert info["countryCode"] == "86"


async def test_watermark_carries_the_configured_appid(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(appid=APPID, secret=SECRET))
    assert (await phone(client, "x"))["phone_info"]["watermark"]["appid"] == APPID


async def test_phone_token_errors(client: Client) -> None:
    resp = await client.post("/wxa/business/getuserphonenumber", json={"code": "x"})
    assert (await resp.json())["errcode"] == 41001
    assert (await phone(client, "x", "a-token-the-fake-never-issued"))["errcode"] == 40001
    token = (await stable_token(client))["access_token"]
    resp = await client.post(
        "/wxa/business/getuserphonenumber", params={"access_token": token}, data=b"{not json"
    )
    assert (await resp.json())["errcode"] == 47001
    resp = await client.post(
        "/wxa/business/getuserphonenumber", params={"access_token": token}, json={}
    )
    assert (await resp.json())["errcode"] == 41008


# --- admin ------------------------------------------------------------------------


async def test_stats_count_calls_and_reset_clears_them(client: Client) -> None:
    await login(client, "c1")
    await login(client, "c2")
    token = (await stable_token(client))["access_token"]
    await phone(client, "phone-1", token)
    params = {"grant_type": "client_credential", "appid": APPID, "secret": SECRET}
    await client.get("/cgi-bin/token", params=params)
    seen = await stats(client)
    assert seen["calls"] == {
        "jscode2session": 2,
        "token": 1,
        "stable_token": 1,
        "getuserphonenumber": 1,
    }
    assert seen["js_codes"] == ["c1", "c2"]
    assert seen["phone_codes"] == ["phone-1"]

    assert (await (await client.post("/_fake/reset")).json()) == {"ok": True}
    cleared = await stats(client)
    assert cleared["calls"] == dict.fromkeys(cleared["calls"], 0)
    assert cleared["js_codes"] == []
    assert (await phone(client, "x", token))["errcode"] == 40001  # tokens reset too


async def test_two_fakes_share_no_state(aiohttp_client: AiohttpClient) -> None:
    one = await aiohttp_client(create_app())
    two = await aiohttp_client(create_app())
    token = (await stable_token(one))["access_token"]
    await login(one, "only-in-one")
    assert (await phone(two, "x", token))["errcode"] == 40001
    assert (await stats(two))["js_codes"] == []
    assert (await stats(one))["js_codes"] == ["only-in-one"]


# --- slow codes ---------------------------------------------------------------------


@pytest.mark.parametrize("api", ["login", "phone"])
async def test_slow_codes_delay_the_answer(client: Client, api: str) -> None:
    call = login if api == "login" else phone
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(client, "slow-a"), 0.2)
    started = time.monotonic()
    answer = await call(client, "slow-b")
    assert time.monotonic() - started >= 0.45
    if api == "login":
        assert answer["openid"] == openid_for("slow-b")
    else:
        assert answer["phone_info"]["purePhoneNumber"] == DEMO_PHONE


async def test_shutdown_releases_slow_requests() -> None:
    # A 30 s slow code must not make a test server's teardown wait 30 s.
    server = TestServer(create_app(slow_seconds=30))
    client = TestClient(server)
    await client.start_server()
    try:
        pending = asyncio.create_task(login(client, "slow"))
        state = server.app[FAKE_STATE]
        await until(lambda: state.calls["jscode2session"] == 1, "the slow login being served")
        started = time.monotonic()
        await server.close()
        # Far from the 30 s the slow code would otherwise hold the shutdown.
        assert time.monotonic() - started < 15
        # Released by the shutdown, then answered normally.
        assert (await pending)["openid"] == openid_for("slow")
    finally:
        await client.close()


# --- several apps (contract section 9) ---------------------------------------------

SHOP, SHOP_SECRET = "wxshop00000000001", "shop-secret-value"
CARD, CARD_SECRET = "wxcard00000000002", "card-secret-value"
SHOP_APP, CARD_APP = {"appid": SHOP, "secret": SHOP_SECRET}, {"appid": CARD, "secret": CARD_SECRET}


@pytest.fixture
async def two_apps(aiohttp_client: AiohttpClient, clock: FakeClock) -> Client:
    apps = {SHOP: SHOP_SECRET, CARD: CARD_SECRET}
    return await aiohttp_client(create_app(apps=apps, slow_seconds=0.5, clock=clock))


async def plain_token(client: Client, app: dict[str, str]) -> dict[str, Any]:
    params = {"grant_type": "client_credential", **app}
    return dict(await (await client.get("/cgi-bin/token", params=params)).json())


async def test_each_app_checks_its_own_secret(two_apps: Client) -> None:
    for app in (SHOP_APP, CARD_APP):
        assert "openid" in await login(two_apps, "x", **app)
        assert "access_token" in await stable_token(two_apps, **app)
        assert "access_token" in await plain_token(two_apps, app)
    # One app's secret does not open another app.
    swapped = await login(two_apps, "x", appid=SHOP, secret=CARD_SECRET)
    assert swapped["errcode"] == 40125
    assert CARD_SECRET not in swapped["errmsg"]
    assert (await stable_token(two_apps, appid=CARD, secret=SHOP_SECRET))["errcode"] == 40125
    assert (await plain_token(two_apps, {"appid": CARD, "secret": SHOP_SECRET}))["errcode"] == 40125
    assert (await login(two_apps, "x", appid="wxnotserved", secret=SHOP_SECRET))["errcode"] == 40013


async def test_one_person_has_an_openid_per_app_and_one_unionid(two_apps: Client) -> None:
    shop, card = [await login(two_apps, "union-alice", **app) for app in (SHOP_APP, CARD_APP)]
    assert shop["openid"] != card["openid"]
    assert shop["session_key"] != card["session_key"]
    assert shop["unionid"] == card["unionid"] == unionid_for("union-alice")
    # The first app keeps the values of a one-app fake; the others are named.
    assert shop["openid"] == openid_for("union-alice")
    assert shop["session_key"] == session_key_for("union-alice")
    assert card["openid"] == openid_for("union-alice", CARD)
    assert card["session_key"] == session_key_for("union-alice", CARD)
    state = two_apps.server.app[FAKE_STATE]
    assert state.openid_for("union-alice", SHOP) == shop["openid"]
    assert state.session_key_for("union-alice", CARD) == card["session_key"]
    # Another person: other openids in both apps, and no unionid without "union".
    bob = [await login(two_apps, "bob", **app) for app in (SHOP_APP, CARD_APP)]
    assert {b["openid"] for b in bob}.isdisjoint({shop["openid"], card["openid"]})
    assert all("unionid" not in b for b in bob)


async def test_the_first_configured_app_is_the_primary_one(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(apps={CARD: CARD_SECRET, SHOP: SHOP_SECRET}))
    assert (await login(client, "c", **CARD_APP))["openid"] == openid_for("c")
    assert (await login(client, "c", **SHOP_APP))["openid"] == openid_for("c", SHOP)
    assert openid_for("c", SHOP) != openid_for("c")


async def test_a_code_belongs_to_the_app_it_names(two_apps: Client) -> None:
    # "@<appid>" binds a code to an app; the person is the text before it.
    refused = await login(two_apps, "union-carol@" + CARD, **SHOP_APP)
    assert refused["errcode"] == 40029
    bound = await login(two_apps, "union-carol@" + CARD, **CARD_APP)
    assert bound == await login(two_apps, "union-carol", **CARD_APP)
    assert bound["unionid"] == (await login(two_apps, "union-carol@" + SHOP, **SHOP_APP))["unionid"]
    # Codes are counted where they were sent, and each app's are its own.
    seen = await stats(two_apps)
    assert seen["apps"][SHOP]["js_codes"] == ["union-carol@" + CARD, "union-carol@" + SHOP]
    assert seen["apps"][CARD]["js_codes"] == ["union-carol@" + CARD, "union-carol"]
    assert seen["apps"][SHOP]["calls"]["jscode2session"] == 2
    assert seen["calls"]["jscode2session"] == 4


async def test_access_tokens_are_per_app(two_apps: Client) -> None:
    shop = (await stable_token(two_apps, **SHOP_APP))["access_token"]
    card = (await stable_token(two_apps, **CARD_APP))["access_token"]
    assert shop != card
    # Each token answers for its own app: the watermark names it.
    for token, appid in ((shop, SHOP), (card, CARD)):
        info = (await phone(two_apps, "p", token))["phone_info"]
        assert info["watermark"]["appid"] == appid
    # A phone code of the card app cannot be used with the shop's token.
    assert (await phone(two_apps, "phone-13900000001@" + CARD, shop))["errcode"] == 40001
    answer = await phone(two_apps, "phone-13900000001@" + CARD, card)
    assert answer["phone_info"]["purePhoneNumber"] == "13900000001"
    # A forced refresh, or the replacement of a cgi-bin/token, touches one app only.
    fresh_card = (await stable_token(two_apps, force_refresh=True, **CARD_APP))["access_token"]
    assert (await phone(two_apps, "p", card))["errcode"] == 40001
    assert (await phone(two_apps, "p", shop))["errcode"] == 0
    assert (await stable_token(two_apps, **SHOP_APP))["access_token"] == shop
    assert (await stable_token(two_apps, **CARD_APP))["access_token"] == fresh_card


async def test_a_plain_token_replaced_in_one_app_lives_on_in_the_other(
    two_apps: Client, clock: FakeClock
) -> None:
    card_only = (await plain_token(two_apps, CARD_APP))["access_token"]
    shop_first = (await plain_token(two_apps, SHOP_APP))["access_token"]
    await plain_token(two_apps, SHOP_APP)  # replaces shop_first, not card_only
    clock.now += 301
    assert (await phone(two_apps, "p", shop_first))["errcode"] == 40001
    assert (await phone(two_apps, "p", card_only))["errcode"] == 0


async def test_invalidating_one_apps_tokens(two_apps: Client) -> None:
    shop = (await stable_token(two_apps, **SHOP_APP))["access_token"]
    card = (await stable_token(two_apps, **CARD_APP))["access_token"]
    resp = await two_apps.post("/_fake/invalidate_tokens", params={"appid": CARD})
    assert await resp.json() == {"ok": True, "invalidated": 1}
    assert (await phone(two_apps, "p", card))["errcode"] == 40001
    assert (await phone(two_apps, "p", shop))["errcode"] == 0
    assert (await stable_token(two_apps, **CARD_APP))["access_token"] != card


@pytest.mark.parametrize("app", [SHOP_APP, CARD_APP], ids=["shop", "card"])
@pytest.mark.parametrize(
    ("code", "errcode"),
    [("invalid-1", 40029), ("used-1", 40163), ("blocked", 40226), ("errcode-40014", 40014)],
)
async def test_magic_codes_work_in_every_app(
    two_apps: Client, app: dict[str, str], code: str, errcode: int
) -> None:
    assert (await login(two_apps, code, **app))["errcode"] == errcode
    assert (await phone(two_apps, code, **app))["errcode"] == errcode
    # The same app still logs other codes in: a magic code breaks only its own call.
    assert "openid" in await login(two_apps, "fine", **app)


@pytest.mark.parametrize("app", [SHOP_APP, CARD_APP], ids=["shop", "card"])
async def test_phone_and_slow_codes_work_in_every_app(
    two_apps: Client, app: dict[str, str]
) -> None:
    info = (await phone(two_apps, "phone-intcc-13700000009", **app))["phone_info"]
    assert (info["purePhoneNumber"], info["countryCode"]) == ("13700000009", 86)
    assert info["watermark"]["appid"] == app["appid"]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(login(two_apps, "slow-1", **app), 0.2)
    answer = await login(two_apps, "slow-2", **app)
    assert answer["openid"] == two_apps.server.app[FAKE_STATE].openid_for("slow-2", app["appid"])


async def test_an_open_fake_serves_every_appid_it_meets(client: Client) -> None:
    # With no app configured, the first appid met keeps the one-app values.
    first = await login(client, "dave", appid="wxfirst", secret="any")
    second = await login(client, "dave", appid="wxsecond", secret="other")
    assert first["openid"] == openid_for("dave")
    assert second["openid"] == openid_for("dave", "wxsecond")
    # A reset forgets tokens and counters, not who is who.
    await client.post("/_fake/reset")
    assert (await login(client, "dave", appid="wxsecond", secret="x")) == second
    assert (await login(client, "dave", appid="wxfirst", secret="y")) == first
    assert set((await stats(client))["apps"]) == {"wxfirst", "wxsecond"}


def test_create_app_takes_one_form_of_apps() -> None:
    with pytest.raises(ValueError, match="not both"):
        create_app(appid=SHOP, secret=SHOP_SECRET, apps={CARD: CARD_SECRET})
    with pytest.raises(ValueError, match="appid"):
        create_app(secret=SHOP_SECRET)


# --- run() as a real process --------------------------------------------------------


def _get_json(url: str, deadline: float) -> dict[str, Any]:
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_run_serves_real_tcp_and_warns_loudly() -> None:
    port = free_port()
    script = (
        f"from gateway.wechat.fake import run; run(port={port}, appid={APPID!r}, secret={SECRET!r})"
    )
    proc = subprocess.Popen(
        [sys.executable, "-u", "-c", script],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = (
            f"http://127.0.0.1:{port}/sns/jscode2session?appid={APPID}&secret={SECRET}"
            "&js_code=tcp-code&grant_type=authorization_code"
        )
        answer = _get_json(url, time.monotonic() + PROMPT)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert answer == {"openid": openid_for("tcp-code"), "session_key": session_key_for("tcp-code")}
    assert "WARNING" in output
    assert "FAKE WeChat API server" in output
    assert "NEVER use in production" in output
    # The access log names the path but never the query that carries the secret.
    assert "GET /sns/jscode2session 200" in output
    assert SECRET not in output


def test_the_command_serves_several_apps_and_logs_no_secret() -> None:
    port = free_port()
    argv = ["fake-wechat", "--port", str(port)]
    argv += ["--app", f"{SHOP}:{SHOP_SECRET}", "--app", f"{CARD}:{CARD_SECRET}"]
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "gateway", *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/sns/jscode2session?grant_type=authorization_code&js_code=cli"
    try:
        deadline = time.monotonic() + PROMPT
        shop = _get_json(f"{base}&appid={SHOP}&secret={SHOP_SECRET}", deadline)
        card = _get_json(f"{base}&appid={CARD}&secret={CARD_SECRET}", deadline)
        swapped = _get_json(f"{base}&appid={CARD}&secret={SHOP_SECRET}", deadline)
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=20)
    assert shop["openid"] == openid_for("cli")
    assert card["openid"] == openid_for("cli", CARD)
    assert swapped["errcode"] == 40125
    assert f"appid check: {SHOP}, {CARD}" in output
    assert SHOP_SECRET not in output
    assert CARD_SECRET not in output


@pytest.mark.parametrize("bad", ["", ":secret", "wxapp:"])
def test_the_command_refuses_a_malformed_app(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["fake-wechat", "--app", bad])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "APPID:SECRET" in err
    assert ":secret" not in err  # the value may hold a secret: never echoed
