"""The WeChat login flow end to end against the fake WeChat as a real server."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from gateway.wechat import fake
from gateway.wechat.crypto import encrypt_payload
from tests.conftest import APPID, TOKEN_SECRET, Running, StartGateway
from tests.support.upstream import Recorder


async def login(http: aiohttp.ClientSession, gw: Running, code: str) -> tuple[int, dict[str, Any]]:
    async with http.post(gw.url + "/auth/login", json={"code": code}) as resp:
        return resp.status, await resp.json()


async def stats(http: aiohttp.ClientSession, wechat: TestServer) -> dict[str, Any]:
    async with http.get(wechat.make_url("/_fake/stats")) as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def test_login_response_and_token(gw: Running, http: aiohttp.ClientSession) -> None:
    status, body = await login(http, gw, "union-alice")
    assert status == 200
    assert set(body) == {"token", "token_type", "expires_in", "openid", "unionid"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 7200
    assert body["openid"] == fake.openid_for("union-alice")
    assert body["unionid"] == fake.unionid_for("union-alice")
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "HS256" and header["kid"]
    claims = jwt.decode(body["token"], TOKEN_SECRET, algorithms=["HS256"], issuer="wx-gateway")
    assert claims["sub"] == body["openid"] and claims["sid"]
    assert claims["exp"] - claims["iat"] == 7200
    status, plain = await login(http, gw, "plain-bob")
    assert status == 200 and plain["unionid"] is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1]",
        b"{}",
        b'{"code": ""}',
        b'{"code": "   "}',
        b'{"code": 12}',
        b'{"code": null}',
        b'{"code": ["a"]}',
        ('{"code": "' + "c" * 1025 + '"}').encode(),
    ],
)
async def test_login_bad_requests(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer, payload: bytes
) -> None:
    async with http.post(gw.url + "/auth/login", data=payload) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "bad_request"
    assert (await stats(http, wechat))["calls"]["jscode2session"] == 0


async def test_login_limits(gw: Running, http: aiohttp.ClientSession) -> None:
    status, _ = await login(http, gw, "c" * 1024)
    assert status == 200
    async with http.post(gw.url + "/auth/login", data=b'{"code": "' + b"x" * 70000 + b'"}') as resp:
        assert resp.status == 413 and (await resp.json())["error"] == "body_too_large"
    async with http.get(gw.url + "/auth/login") as resp:
        assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("code", "status", "error", "errcode"),
    [
        ("invalid-1", 401, "invalid_code", 40029),
        ("used-1", 401, "invalid_code", 40163),
        ("ratelimit-1", 429, "wechat_rate_limited", 45011),
        ("blocked-1", 403, "wechat_user_blocked", 40226),
        ("busy-1", 502, "wechat_error", -1),
        ("errcode-12345", 502, "wechat_error", 12345),
        ("notjson-1", 502, "wechat_error", None),
        ("http500-1", 502, "wechat_error", None),
    ],
)
async def test_login_wechat_errors(
    gw: Running,
    http: aiohttp.ClientSession,
    wechat: TestServer,
    code: str,
    status: int,
    error: str,
    errcode: int | None,
) -> None:
    got, body = await login(http, gw, code)
    assert (got, body["error"]) == (status, error)
    assert body.get("wechat_errcode") == errcode
    if errcode is not None:
        assert type(body["wechat_errcode"]) is int
    assert "wechat-secret-value" not in str(body)
    # one call, never retried with the same code
    assert (await stats(http, wechat))["calls"]["jscode2session"] == 1


async def test_login_timeout_and_unreachable(
    start_gateway: StartGateway, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    gw = await start_gateway(wechat={"timeout": "1s"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, body = await login(http, gw, "slow-1")
    assert (status, body["error"]) == (504, "wechat_timeout")
    assert loop.time() - started < 4
    assert (await stats(http, wechat))["calls"]["jscode2session"] == 1
    dead = await start_gateway(wechat={"api_base": "http://127.0.0.1:9"})
    status, body = await login(http, dead, "any")
    assert (status, body["error"]) == (502, "wechat_error") and "wechat_errcode" not in body


async def test_concurrent_logins(gw: Running, http: aiohttp.ClientSession) -> None:
    results = await asyncio.gather(*(login(http, gw, f"user-{i}") for i in range(100)))
    assert all(status == 200 for status, _ in results)
    assert len({body["openid"] for _, body in results}) == 100
    same = await asyncio.gather(*(login(http, gw, "same-user") for _ in range(20)))
    assert all(status == 200 for status, _ in same)
    storage = gw.listener.gateway.services.storage
    db = storage._conn  # type: ignore[attr-defined]
    async with db.execute("SELECT COUNT(*) FROM users") as cursor:
        assert (await cursor.fetchone())[0] == 101


async def test_session_key_never_leaves(
    gw: Running, http: aiohttp.ClientSession, seen: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    key = fake.session_key_for("secret-holder")
    async with http.post(gw.url + "/auth/login", json={"code": "secret-holder"}) as resp:
        text = await resp.text()
        headers = str(resp.headers)
        token = (await resp.json())["token"]
    assert key not in text and key not in headers
    record = await gw.listener.gateway.services.storage.get_user(fake.openid_for("secret-holder"))
    assert record is not None and record.session_key == key
    auth = {"Authorization": f"Bearer {token}"}
    for path in ("/auth/me", "/api/x"):
        async with http.get(gw.url + path, headers=auth) as resp:
            assert key not in await resp.text()
    assert all(key not in v and "wechat-secret-value" not in v for _, v in seen.last.headers)
    assert key not in caplog.text and "wechat-secret-value" not in caplog.text


async def test_logout_me_and_other_sessions(gw: Running, http: aiohttp.ClientSession) -> None:
    _, first = await login(http, gw, "phone-user")
    _, second = await login(http, gw, "phone-user")
    a = {"Authorization": f"Bearer {first['token']}"}
    b = {"Authorization": f"Bearer {second['token']}"}
    async with http.get(gw.url + "/auth/me", headers=a) as resp:
        assert await resp.json() == {
            "openid": first["openid"],
            "unionid": None,
            "phone_number": None,
        }
    async with http.post(gw.url + "/auth/logout", headers=a) as resp:
        assert resp.status == 200 and await resp.json() == {"ok": True}
    for method, path in (("GET", "/api/x"), ("GET", "/auth/me"), ("POST", "/auth/logout")):
        async with http.request(method, gw.url + path, headers=a) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "token_revoked"
    async with http.get(gw.url + "/api/x", headers=b) as resp:
        assert resp.status == 200
    for method, path in (
        ("POST", "/auth/logout"),
        ("GET", "/auth/me"),
        ("POST", "/auth/phone"),
        ("POST", "/auth/decrypt"),
        ("GET", "/auth/verify"),
    ):
        async with http.request(method, gw.url + path) as resp:
            assert resp.status == 401 and (await resp.json())["error"] == "token_missing"


async def test_verify_endpoint(gw: Running, http: aiohttp.ClientSession) -> None:
    _, body = await login(http, gw, "union-verify")
    async with http.get(
        gw.url + "/auth/verify", headers={"Authorization": f"Bearer {body['token']}"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-OpenId"] == body["openid"]
        assert resp.headers["X-UnionId"] == body["unionid"]


async def test_logout_and_user_survive_restart(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway()
    _, body = await login(http, gw, "restart-user")
    auth = {"Authorization": f"Bearer {body['token']}"}
    async with http.post(
        gw.url + "/auth/phone", headers=auth, json={"code": "phone-13700000000"}
    ) as resp:
        assert resp.status == 200
    _, other = await login(http, gw, "restart-user")
    async with http.post(gw.url + "/auth/logout", headers=auth) as resp:
        assert resp.status == 200
    await gw.listener.stop()
    again = await start_gateway()
    async with http.get(again.url + "/auth/me", headers=auth) as resp:
        assert (await resp.json())["error"] == "token_revoked"
    async with http.get(
        again.url + "/auth/me", headers={"Authorization": f"Bearer {other['token']}"}
    ) as resp:
        assert (await resp.json())["phone_number"] == "13700000000"


async def test_phone_by_code_single_token_fetch_and_refetch(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    _, body = await login(http, gw, "phone-owner")
    auth = {"Authorization": f"Bearer {body['token']}"}
    for i in range(10):
        async with http.post(
            gw.url + "/auth/phone", headers=auth, json={"code": f"phone-1390000000{i}"}
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "phone_number": f"1390000000{i}",
                "pure_phone_number": f"1390000000{i}",
                "country_code": "86",
            }
    assert (await stats(http, wechat))["calls"]["stable_token"] == 1
    async with http.post(wechat.make_url("/_fake/invalidate_tokens")) as resp:
        assert resp.status == 200
    async with http.post(
        gw.url + "/auth/phone", headers=auth, json={"code": "phone-intcc-13911112222"}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["country_code"] == "86"
    assert (await stats(http, wechat))["calls"]["stable_token"] == 2
    async with http.get(gw.url + "/auth/me", headers=auth) as resp:
        assert (await resp.json())["phone_number"] == "13911112222"
    async with http.post(
        gw.url + "/auth/phone", headers=auth, json={"code": "invalid-phone"}
    ) as resp:
        body = await resp.json()
        assert (resp.status, body["error"], body["wechat_errcode"]) == (401, "invalid_code", 40029)
    async with http.post(
        gw.url + "/auth/phone", headers=auth, json={"code": "errcode-40001"}
    ) as resp:
        body = await resp.json()
        assert (resp.status, body["error"], body["wechat_errcode"]) == (502, "wechat_error", 40001)


async def test_legacy_decrypt(gw: Running, http: aiohttp.ClientSession) -> None:
    code = "legacy-user"
    _, body = await login(http, gw, code)
    auth = {"Authorization": f"Bearer {body['token']}"}
    key, iv = fake.session_key_for(code), "r7BXXKkLb8qrSNn05n0qiA=="
    phone = {
        "phoneNumber": "13800000001",
        "purePhoneNumber": "13800000001",
        "countryCode": 86,
        "watermark": {"appid": APPID, "timestamp": 1},
    }
    data = encrypt_payload(key, phone, iv)
    async with http.post(
        gw.url + "/auth/phone", headers=auth, json={"encrypted_data": data, "iv": iv}
    ) as resp:
        assert resp.status == 200 and (await resp.json())["country_code"] == "86"
    info = {"nickName": "Band", "watermark": {"appid": APPID, "timestamp": 1}}
    data = encrypt_payload(key, info, iv)
    async with http.post(
        gw.url + "/auth/decrypt", headers=auth, json={"encrypted_data": data, "iv": iv}
    ) as resp:
        assert resp.status == 200 and (await resp.json())["data"]["nickName"] == "Band"
    wrong = encrypt_payload(key, {**info, "watermark": {"appid": "wxother", "timestamp": 1}}, iv)
    other_key = encrypt_payload(fake.session_key_for("someone-else"), info, iv)
    cases = [
        ({"encrypted_data": wrong, "iv": iv}, 400, "decrypt_failed"),
        ({"encrypted_data": other_key, "iv": iv}, 400, "decrypt_failed"),
        ({"encrypted_data": "***not base64***", "iv": iv}, 400, "bad_request"),
        ({"encrypted_data": data, "iv": "bad"}, 400, "bad_request"),
    ]
    for payload, status, error in cases:
        async with http.post(gw.url + "/auth/decrypt", headers=auth, json=payload) as resp:
            assert (resp.status, (await resp.json())["error"]) == (status, error)
    stranger = gw.auth("o-never-logged-in")
    async with http.post(
        gw.url + "/auth/decrypt", headers=stranger, json={"encrypted_data": data, "iv": iv}
    ) as resp:
        assert (resp.status, (await resp.json())["error"]) == (401, "session_expired")
