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

from gateway.wechat.fake import (
    DEMO_PHONE,
    FAKE_APPID,
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


async def phone(client: Client, code: str, token: str | None = None) -> dict[str, Any]:
    if token is None:
        token = (await stable_token(client))["access_token"]
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
    assert info["watermark"]["appid"] == FAKE_APPID
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
