"""POST /auth/phone and /auth/decrypt (contract sections 4, 6 and 8).

The current API goes through a WeChat access token: cached, shared through
storage, fetched by one caller at a time (across processes too), refetched once
and the call retried once on 40001/40014/42001. The legacy API decrypts
``encrypted_data`` with the stored session_key. Every WeChat call is counted
on the fake WeChat's ``/_fake/stats``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from gateway.wechat import fake
from gateway.wechat.access_token import lease_name
from gateway.wechat.crypto import encrypt_payload
from tests.support.client import Reply, bearer, fake_stats, logged_in, send
from tests.support.errors import assert_error
from tests.support.gateway import (
    APPID,
    WECHAT_SECRET,
    Running,
    StartGateway,
    base_config,
    config_for,
    url_of,
)
from tests.support.procs import GatewayProcess, RunGateway
from tests.support.upstream import served

PHONE_KEYS = {"phone_number", "pure_phone_number", "country_code"}
IV = base64.b64encode(bytes(range(16))).decode()
TTL = 4  # seconds an access token of `short_lived_tokens_wechat` lives

# -- helpers -------------------------------------------------------------------


async def login(http: aiohttp.ClientSession, base: str, code: str) -> str:
    """A fresh session's token."""
    token: str = (await logged_in(http, base, code))["token"]
    return token


async def phone(http: aiohttp.ClientSession, base: str, token: str, body: Any) -> Reply:
    return await send(http, "POST", base + "/auth/phone", headers=bearer(token), json=body)


async def decrypt(http: aiohttp.ClientSession, base: str, token: str, body: Any) -> Reply:
    return await send(http, "POST", base + "/auth/decrypt", headers=bearer(token), json=body)


async def me(http: aiohttp.ClientSession, base: str, token: str) -> dict[str, Any]:
    reply = await send(http, "GET", base + "/auth/me", headers=bearer(token))
    assert reply.status == 200, reply.raw
    body: dict[str, Any] = reply.body
    return body


async def calls(http: aiohttp.ClientSession, wechat: TestServer) -> dict[str, int]:
    counts: dict[str, int] = (await fake_stats(http, wechat))["calls"]
    return counts


def sealed(session_key: str, payload: dict[str, Any], iv: str = IV) -> dict[str, str]:
    return {"encrypted_data": encrypt_payload(session_key, payload, iv), "iv": iv}


def watermark(appid: str = APPID) -> dict[str, Any]:
    return {"timestamp": int(time.time()), "appid": appid}


def raw_cbc(session_key: str, plaintext: bytes) -> dict[str, str]:
    """AES-128-CBC with no padding applied: the caller controls every byte."""
    encryptor = Cipher(
        algorithms.AES(base64.b64decode(session_key)), modes.CBC(base64.b64decode(IV))
    ).encryptor()
    data = encryptor.update(plaintext) + encryptor.finalize()
    return {"encrypted_data": base64.b64encode(data).decode(), "iv": IV}


# -- the current API: a phone code -------------------------------------------------------


async def test_phone_code_answers_and_stores(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    token = await login(http, gw.url, "phone-owner")
    reply = await phone(http, gw.url, token, {"code": "phone-13912345678"})
    assert reply.status == 200, reply.raw
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.body == {
        "phone_number": "13912345678",
        "pure_phone_number": "13912345678",
        "country_code": "86",
    }
    assert (await me(http, gw.url, token))["phone_number"] == "13912345678"
    stored = await gw.listener.gateway.services.storage.get_user(
        APPID, fake.openid_for("phone-owner")
    )
    assert stored is not None and stored.phone_number == "13912345678"
    # A later number replaces the earlier one.
    reply = await phone(http, gw.url, token, {"code": "phone-13700000000"})
    assert reply.status == 200
    assert (await me(http, gw.url, token))["phone_number"] == "13700000000"
    async with http.get(wechat.make_url("/_fake/stats")) as resp:
        assert (await resp.json())["phone_codes"] == ["phone-13912345678", "phone-13700000000"]


async def test_numeric_country_code_is_returned_as_a_string(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    token = await login(http, gw.url, "intcc-owner")
    reply = await phone(http, gw.url, token, {"code": "phone-intcc-13912345678"})
    assert reply.status == 200, reply.raw
    assert reply.body == {
        "phone_number": "13912345678",
        "pure_phone_number": "13912345678",
        "country_code": "86",
    }
    assert type(reply.body["country_code"]) is str


async def test_ten_phone_calls_fetch_one_access_token(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    token = await login(http, gw.url, "ten-calls")
    for i in range(10):
        reply = await phone(http, gw.url, token, {"code": f"phone-1390000000{i}"})
        assert reply.status == 200, reply.raw
        assert reply.body["pure_phone_number"] == f"1390000000{i}"
    counts = await calls(http, wechat)
    assert counts["stable_token"] == 1
    assert counts["token"] == 0  # cgi-bin/token would invalidate other instances' tokens
    assert counts["getuserphonenumber"] == 10


async def test_rejected_access_token_is_refetched_once_and_the_call_retried(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    token = await login(http, gw.url, "refetch")
    assert (await phone(http, gw.url, token, {"code": "phone-13900000001"})).status == 200
    assert (await calls(http, wechat))["stable_token"] == 1
    async with http.post(wechat.make_url("/_fake/invalidate_tokens")) as resp:
        assert (await resp.json())["invalidated"] >= 1
    reply = await phone(http, gw.url, token, {"code": "phone-13900000002"})
    assert reply.status == 200, reply.raw
    assert reply.body["pure_phone_number"] == "13900000002"
    counts = await calls(http, wechat)
    assert counts["stable_token"] == 2  # exactly one refetch
    assert counts["getuserphonenumber"] == 3  # 1 + (rejected + retried)
    # The refetched token is cached again.
    assert (await phone(http, gw.url, token, {"code": "phone-13900000003"})).status == 200
    counts = await calls(http, wechat)
    assert counts["stable_token"] == 2 and counts["getuserphonenumber"] == 4


async def test_concurrent_cold_phone_calls_fetch_one_access_token(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    token = await login(http, gw.url, "herd")
    replies = await asyncio.gather(
        *(phone(http, gw.url, token, {"code": f"phone-1380000{i:04d}"}) for i in range(20))
    )
    assert [r.status for r in replies] == [200] * 20
    assert (await calls(http, wechat))["stable_token"] == 1


@pytest.fixture
async def short_lived_tokens_wechat() -> AsyncIterator[TestServer]:
    """A fake WeChat whose access tokens live 4 s, on the wall clock (the gateway's)."""
    app = fake.create_app(appid=APPID, secret=WECHAT_SECRET, token_ttl=TTL, clock=time.time)
    async with served(app) as server:
        yield server


async def test_access_token_is_refreshed_a_margin_before_it_expires(
    start_gateway: StartGateway,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    upstream: TestServer,
    short_lived_tokens_wechat: TestServer,
) -> None:
    wechat = short_lived_tokens_wechat
    gw = await start_gateway(config_for(tmp_path, upstream, wechat))
    token = await login(http, gw.url, "margin")
    first = await phone(http, gw.url, token, {"code": "phone-13600000001"})
    answered = time.time()
    assert first.status == 200
    [expiry] = wechat.app[fake.FAKE_STATE].tokens.values()
    # The gateway took the token between its issue and `answered`, so it stops
    # using it by answered + TTL - TTL / 10. Just before WeChat's expiry WeChat
    # still accepts it, but a gateway that keeps that margin has stopped using it.
    # (On a machine so busy that the first call took longer than the margin, the
    # second call comes after the expiry: a gateway without the margin then sees
    # the token refused and retries, which the counts below catch as well.)
    ask_at = max(expiry - 0.15, answered + TTL * 0.9 + 0.05)
    await asyncio.sleep(ask_at - time.time())
    second = await phone(http, gw.url, token, {"code": "phone-13600000002"})
    assert second.status == 200, second.raw
    counts = await calls(http, wechat)
    assert counts["stable_token"] == 2, counts
    assert counts["getuserphonenumber"] == 2, counts  # no call was made with a dying token


# -- WeChat's errors on the phone API ------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "error", "errcode", "phone_calls", "token_fetches"),
    [
        ("invalid-phone", 401, "invalid_code", 40029, 1, 1),
        ("used-phone", 401, "invalid_code", 40163, 1, 1),
        ("ratelimit-phone", 429, "wechat_rate_limited", 45011, 1, 1),
        ("blocked-phone", 403, "wechat_user_blocked", 40226, 1, 1),
        ("busy-phone", 502, "wechat_error", -1, 1, 1),
        ("errcode-12345", 502, "wechat_error", 12345, 1, 1),
        ("notjson-phone", 502, "wechat_error", None, 1, 1),
        ("http500-phone", 502, "wechat_error", None, 1, 1),
        # Access-token errcodes: refetch once, retry once; the retry fails too.
        ("errcode-40001", 502, "wechat_error", 40001, 2, 2),
        ("errcode-40014", 502, "wechat_error", 40014, 2, 2),
        ("errcode-42001", 502, "wechat_error", 42001, 2, 2),
    ],
)
async def test_phone_wechat_error_mapping(
    gw: Running,
    http: aiohttp.ClientSession,
    wechat: TestServer,
    code: str,
    status: int,
    error: str,
    errcode: int | None,
    phone_calls: int,
    token_fetches: int,
) -> None:
    token = await login(http, gw.url, "phone-errors")
    body = assert_error(await phone(http, gw.url, token, {"code": code}), status, error)
    if errcode is None:
        assert "wechat_errcode" not in body
    else:
        assert type(body["wechat_errcode"]) is int and body["wechat_errcode"] == errcode
    counts = await calls(http, wechat)
    assert counts["getuserphonenumber"] == phone_calls, counts
    assert counts["stable_token"] == token_fetches, counts
    assert (await me(http, gw.url, token))["phone_number"] is None
    # The gateway is fine afterwards.
    ok = await phone(http, gw.url, token, {"code": "phone-13500000000"})
    assert ok.status == 200, ok.raw
    assert (await me(http, gw.url, token))["phone_number"] == "13500000000"


async def test_phone_wechat_timeout(
    start_gateway: StartGateway, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    gw = await start_gateway(wechat={"timeout": "1s"})
    token = await login(http, gw.url, "timeout-phone-owner")
    started = time.monotonic()
    body = assert_error(
        await phone(http, gw.url, token, {"code": "slow-phone"}), 504, "wechat_timeout"
    )
    # The fake answers "slow-" codes after 5 s: a 504 is the 1 s timeout's.
    assert time.monotonic() - started >= 0.9
    assert "wechat_errcode" not in body
    # Not retried later in the background (an absence: a grace, not a poll).
    await asyncio.sleep(0.3)
    assert (await calls(http, wechat))["getuserphonenumber"] == 1


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="empty"),
        pytest.param({"code": ""}, id="empty-code"),
        pytest.param({"code": "  "}, id="blank-code"),
        pytest.param({"code": 13912345678}, id="number-code"),
        pytest.param({"code": None}, id="null-code"),
        pytest.param({"code": "p" * 1025}, id="1025-char-code"),
        pytest.param(["phone-1"], id="array"),
    ],
)
async def test_phone_bad_request(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer, body: Any
) -> None:
    token = gw.token("o-bad-request")
    assert_error(await phone(http, gw.url, token, body), 400, "bad_request")
    counts = await calls(http, wechat)
    assert counts["getuserphonenumber"] == 0 and counts["stable_token"] == 0


# -- single flight across processes ------------------------------------------------------


def delaying_wechat(target: str, delay: float) -> web.Application:
    """In front of the fake WeChat: stable_token answers `delay` later, widening the
    window in which two processes could both decide to fetch."""
    client = web.AppKey("client", aiohttp.ClientSession)

    async def session(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as http:
            app[client] = http
            yield

    async def forward(request: web.Request) -> web.Response:
        if request.path == "/cgi-bin/stable_token":
            await asyncio.sleep(delay)
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with request.app[client].request(
            request.method, target + request.raw_path, data=await request.read(), headers=headers
        ) as resp:
            return web.Response(
                status=resp.status,
                body=await resp.read(),
                headers={"Content-Type": resp.headers.get("Content-Type", "text/plain")},
            )

    app = web.Application()
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


@pytest.mark.parametrize("delay", [0.0, 0.5], ids=["direct", "slow-stable-token"])
async def test_access_token_single_flight_across_processes(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, run_gateway: RunGateway, delay: float
) -> None:
    shim: TestServer | None = None
    api_base = url_of(wechat)
    if delay:
        shim = TestServer(delaying_wechat(api_base, delay), host="127.0.0.1")
        await shim.start_server()
        api_base = url_of(shim)
    procs: list[GatewayProcess] = []
    try:
        for name in ("one", "two"):
            # The same storage file (tmp_path/gateway.db) for both.
            raw = base_config(tmp_path, url_of(upstream), api_base)
            procs.append(await run_gateway(raw=raw, name=name))
        urls = [p.url for p in procs]
        async with aiohttp.ClientSession() as http:
            tokens = [await login(http, u, f"xproc-{i}") for i, u in enumerate(urls)]
            assert (await calls(http, wechat))["stable_token"] == 0
            replies = await asyncio.gather(
                *(
                    phone(http, u, t, {"code": f"phone-1370{i}{k:05d}"})
                    for i, (u, t) in enumerate(zip(urls, tokens, strict=True))
                    for k in range(8)
                )
            )
            assert [r.status for r in replies] == [200] * 16, [r.raw for r in replies]
            counts = await calls(http, wechat)
            assert counts["stable_token"] == 1, counts
            assert counts["getuserphonenumber"] == 16
    finally:
        outputs = [await asyncio.to_thread(p.output) for p in procs]
        if shim is not None:
            await shim.close()
    assert all("Traceback" not in out for out in outputs), outputs


async def test_access_token_refetch_single_flight_across_processes(
    wechat: TestServer, run_gateway: RunGateway
) -> None:
    """WeChat rejects the shared token while both processes are busy: one refetch in
    all, not one per process (a second forced refresh would kill the first one's
    fresh token under its in-flight retries)."""
    procs: list[GatewayProcess] = []
    try:
        # The same storage file (tmp_path/gateway.db) for both.
        procs = [await run_gateway(name=name) for name in ("one", "two")]
        urls = [p.url for p in procs]
        async with aiohttp.ClientSession() as http:
            tokens = [await login(http, u, f"refetch-xproc-{i}") for i, u in enumerate(urls)]
            # Warm up one after the other: one fetch, then shared through storage.
            for u, t in zip(urls, tokens, strict=True):
                assert (await phone(http, u, t, {"code": "phone-13800000000"})).status == 200
            assert (await calls(http, wechat))["stable_token"] == 1
            for round_ in range(1, 41):
                async with http.post(wechat.make_url("/_fake/invalidate_tokens")) as resp:
                    assert resp.status == 200
                replies = await asyncio.gather(
                    *(
                        phone(http, u, t, {"code": f"phone-1371{i}{k:05d}"})
                        for i, (u, t) in enumerate(zip(urls, tokens, strict=True))
                        for k in range(8)
                    )
                )
                assert [r.status for r in replies] == [200] * 16, (round_, [r.raw for r in replies])
                counts = await calls(http, wechat)
                assert counts["stable_token"] == 1 + round_, (round_, counts)
    finally:
        outputs = [await asyncio.to_thread(p.output) for p in procs]
    assert all("Traceback" not in out for out in outputs), outputs


async def test_lease_winner_rechecks_the_shared_token_before_fetching(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    """The cross-process race, made deterministic (white-box: it plays the *other*
    process directly on the SQLite file). The other process holds the fetch lease;
    this gateway, wanting a token, finds none and waits. The other process then
    stores its token and releases the lease in one commit, while this gateway is
    between "read: no token" and "take the lease". Taking the lease must not mean
    fetching: the token is in storage now."""
    token = await login(http, gw.url, "lease-race")
    db = Path(gw.config.storage.url.removeprefix("sqlite:///"))
    other = sqlite3.connect(db, isolation_level=None, timeout=10)
    try:
        other.execute(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, 'another-process', ?)",
            (lease_name(APPID), time.time() + 60),
        )
        call = asyncio.create_task(phone(http, gw.url, token, {"code": "phone-13900001234"}))
        await asyncio.sleep(0.3)
        assert not call.done(), "the gateway did not wait for the lease holder"
        other.execute("BEGIN IMMEDIATE")  # hold the write lock: the gateway queues on it
        async with http.post(
            wechat.make_url("/cgi-bin/stable_token"),
            json={
                "grant_type": "client_credential",
                "appid": APPID,
                "secret": WECHAT_SECRET,
                "force_refresh": False,
            },
        ) as resp:
            fetched = await resp.json()
        await asyncio.sleep(0.3)
        other.execute(
            "INSERT INTO access_token (appid, token, expires_at) VALUES (?, ?, ?) ON CONFLICT "
            "(appid) DO UPDATE SET token = excluded.token, expires_at = excluded.expires_at",
            (APPID, fetched["access_token"], time.time() + fetched["expires_in"] - 600),
        )
        other.execute("DELETE FROM leases WHERE name = ?", (lease_name(APPID),))
        other.execute("COMMIT")
        reply = await asyncio.wait_for(call, 10)
    finally:
        if other.in_transaction:
            other.execute("ROLLBACK")
        other.close()
    assert reply.status == 200, reply.raw
    counts = await calls(http, wechat)
    # The only stable_token call is the other process's.
    assert counts["stable_token"] == 1, counts
    assert counts["getuserphonenumber"] == 1


# -- the legacy API: encrypted_data + iv --------------------------------------------------


async def test_legacy_encrypted_phone_is_decrypted_and_stored(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    code = "legacy-phone"
    token = await login(http, gw.url, code)
    key = fake.session_key_for(code)
    payload = {
        "phoneNumber": "+86 13912345678",
        "purePhoneNumber": "13912345678",
        "countryCode": "86",
        "watermark": watermark(),
    }
    reply = await phone(http, gw.url, token, sealed(key, payload))
    assert reply.status == 200, reply.raw
    assert reply.body == {
        "phone_number": "+86 13912345678",
        "pure_phone_number": "13912345678",
        "country_code": "86",
    }
    assert (await me(http, gw.url, token))["phone_number"] == "+86 13912345678"
    # countryCode as a number comes back as a string.
    payload = {**payload, "countryCode": 86, "phoneNumber": "13700000000"}
    reply = await phone(http, gw.url, token, sealed(key, payload))
    assert reply.status == 200, reply.raw
    assert reply.body["country_code"] == "86"
    # The legacy path needs no WeChat call at all.
    counts = await calls(http, wechat)
    assert counts["getuserphonenumber"] == 0 and counts["stable_token"] == 0


async def test_decrypt_returns_the_payload(gw: Running, http: aiohttp.ClientSession) -> None:
    code = "union-decrypt"
    token = await login(http, gw.url, code)
    payload = {
        "nickName": "小明 Ming",
        "gender": 1,
        "avatarUrl": "https://example.invalid/a.png",
        "unionId": fake.unionid_for(code),
        "nested": {"list": [1, 2, {"x": None}], "flag": True},
        "watermark": watermark(),
    }
    reply = await decrypt(http, gw.url, token, sealed(fake.session_key_for(code), payload))
    assert reply.status == 200, reply.raw
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.body == {"data": payload}


async def test_decrypt_failures_all_look_the_same(gw: Running, http: aiohttp.ClientSession) -> None:
    code = "decrypt-failures"
    token = await login(http, gw.url, code)
    key = fake.session_key_for(code)
    other_key = fake.session_key_for("someone-else")
    assert other_key != key
    cases = {
        "watermark appid differs": sealed(key, {"a": 1, "watermark": watermark("wxsomeoneelse")}),
        "no watermark": sealed(key, {"a": 1}),
        "wrong key": sealed(other_key, {"a": 1, "watermark": watermark()}),
        "bad padding": raw_cbc(key, b'{"watermark": 1}' + b"\x00" * 16),
        "not json": raw_cbc(key, b"hello, world!!!\x01"),
        "json array": sealed(key, [{"watermark": watermark()}]),  # type: ignore[arg-type]
        "truncated": {
            "encrypted_data": base64.b64encode(
                base64.b64decode(sealed(key, {"watermark": watermark()})["encrypted_data"])[:-3]
            ).decode(),
            "iv": IV,
        },
    }
    answers = {}
    for name, body in cases.items():
        for endpoint in ("/auth/decrypt", "/auth/phone"):
            reply = await send(http, "POST", gw.url + endpoint, headers=bearer(token), json=body)
            error = assert_error(reply, 400, "decrypt_failed")
            error.pop("request_id", None)
            answers[(name, endpoint)] = error
    # One answer for every failure, or a client could tell padding from the rest.
    assert len({json.dumps(a, sort_keys=True) for a in answers.values()}) == 1, answers
    assert (await me(http, gw.url, token))["phone_number"] is None


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"encrypted_data": "not base64!!", "iv": IV}, id="data-not-base64"),
        pytest.param({"encrypted_data": "AAAA", "iv": "%%%%"}, id="iv-not-base64"),
        pytest.param({"encrypted_data": "QUJD=DEF", "iv": IV}, id="data-misplaced-padding"),
        pytest.param({"encrypted_data": "", "iv": IV}, id="empty-data"),
        pytest.param({"encrypted_data": "AAAA"}, id="no-iv"),
        pytest.param({"iv": IV}, id="no-data"),
        pytest.param({"encrypted_data": 12, "iv": IV}, id="number-data"),
    ],
)
async def test_decrypt_bad_input_is_bad_request(
    gw: Running, http: aiohttp.ClientSession, body: dict[str, Any]
) -> None:
    token = await login(http, gw.url, "bad-input")
    assert_error(await decrypt(http, gw.url, token, body), 400, "bad_request")
    assert_error(await phone(http, gw.url, token, body), 400, "bad_request")


async def test_decrypt_without_a_stored_session_key_is_session_expired(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    body = sealed(fake.session_key_for("x"), {"a": 1, "watermark": watermark()})
    never = gw.token("o-never-logged-in")
    assert_error(await decrypt(http, gw.url, never, body), 401, "session_expired")
    assert_error(await phone(http, gw.url, never, body), 401, "session_expired")
    # A record made by the phone-code API alone has a number but no session_key.
    phone_only = gw.token("o-phone-only")
    assert (await phone(http, gw.url, phone_only, {"code": "phone-13100000000"})).status == 200
    assert_error(await decrypt(http, gw.url, phone_only, body), 401, "session_expired")


# -- from the end-to-end login flow --------------------------------------------


async def test_phone_by_code_single_token_fetch_and_refetch(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    body = await logged_in(http, gw.url, "phone-owner")
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
    assert (await fake_stats(http, wechat))["calls"]["stable_token"] == 1
    async with http.post(wechat.make_url("/_fake/invalidate_tokens")) as resp:
        assert resp.status == 200
    async with http.post(
        gw.url + "/auth/phone", headers=auth, json={"code": "phone-intcc-13911112222"}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["country_code"] == "86"
    assert (await fake_stats(http, wechat))["calls"]["stable_token"] == 2
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
    body = await logged_in(http, gw.url, code)
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
