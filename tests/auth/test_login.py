"""POST /auth/login against the fake WeChat as a real server on loopback.

Contract sections 4 (response and error table), 6 (token and user model) and 8
(limits, `wechat_errcode`). Records are read back from the SQLite file itself;
durability under ``kill -9`` and secret hygiene are checked on a real
``gateway run`` subprocess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp.test_utils import TestServer

from gateway.storage.base import UserRecord
from gateway.storage.sqlite import SQLiteStorage
from gateway.wechat import fake
from gateway.wechat.crypto import encrypt_payload
from tests.support.client import Reply, bearer, fake_stats, logged_in, login, send
from tests.support.errors import assert_error, error_of
from tests.support.gateway import (
    APPID,
    TOKEN_SECRET,
    WECHAT_SECRET,
    Running,
    StartGateway,
    free_port,
)
from tests.support.procs import RunGateway
from tests.support.secrets import leaks
from tests.support.upstream import Recorder

LOGIN_KEYS = {"token", "token_type", "expires_in", "openid", "unionid"}
IV = base64.b64encode(bytes(range(16))).decode()


# -- helpers -------------------------------------------------------------------


async def read_user(db: Path, openid: str) -> UserRecord | None:
    store = SQLiteStorage(db)
    await store.open()
    try:
        return await store.get_user(APPID, openid)
    finally:
        await store.close()


def sql(db: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows


def user_count(db: Path) -> int:
    return int(sql(db, "SELECT count(*) FROM users")[0][0])


def db_of(gw: Running) -> Path:
    return Path(gw.config.storage.url.removeprefix("sqlite:///"))


# -- the success answer and the token ---------------------------------------------


async def test_login_response_is_exactly_the_contract(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    sids = set()
    for code in ("union-alice", "plain-bob"):
        before = time.time()
        reply = await login(http, gw.url, code)
        assert reply.status == 200, reply.raw
        assert reply.headers["Content-Type"].startswith("application/json")
        body = reply.body
        assert set(body) == LOGIN_KEYS
        assert body["token_type"] == "Bearer"
        assert type(body["expires_in"]) is int and body["expires_in"] == 7200
        assert body["openid"] == fake.openid_for(code)
        assert body["unionid"] == fake.unionid_for(code)
        header = jwt.get_unverified_header(body["token"])
        assert header["alg"] == "HS256"
        assert isinstance(header["kid"], str) and header["kid"]
        assert TOKEN_SECRET not in header["kid"]
        claims = jwt.decode(
            body["token"],
            TOKEN_SECRET,
            algorithms=["HS256"],
            issuer="wx-gateway",
            options={"require": ["sub", "exp", "iat", "iss", "sid"]},
        )
        assert claims["sub"] == body["openid"]
        assert claims["iss"] == "wx-gateway"
        assert isinstance(claims["sid"], str) and claims["sid"]
        assert claims["exp"] - claims["iat"] == body["expires_in"]
        assert before - 5 <= claims["iat"] <= time.time() + 5
        sids.add(claims["sid"])
        # The token is accepted by the gateway that issued it.
        me = await send(http, "GET", gw.url + "/auth/me", headers=bearer(body["token"]))
        assert me.status == 200 and me.body["openid"] == body["openid"]
    assert len(sids) == 2
    stats = await fake_stats(http, wechat)
    assert stats["calls"]["jscode2session"] == 2
    assert stats["js_codes"] == ["union-alice", "plain-bob"]


async def test_expires_in_follows_token_ttl(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(token={"ttl": "10m"})
    reply = await login(http, gw.url, "ttl-user")
    assert reply.status == 200
    assert reply.body["expires_in"] == 600
    claims = jwt.decode(reply.body["token"], TOKEN_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 600


# -- 400 bad_request, and WeChat is never asked ----------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"", id="empty-body"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b'["code"]', id="json-array"),
        pytest.param(b'"code"', id="json-string"),
        pytest.param(b"12", id="json-number"),
        pytest.param(b"null", id="json-null"),
        pytest.param(b"{}", id="missing-code"),
        pytest.param(b'{"js_code": "abc"}', id="other-key"),
        pytest.param(b'{"code": ""}', id="empty-code"),
        pytest.param(b'{"code": "   "}', id="spaces-code"),
        pytest.param(b'{"code": "\\t\\n"}', id="whitespace-code"),
        pytest.param(b'{"code": 12}', id="number-code"),
        pytest.param(b'{"code": null}', id="null-code"),
        pytest.param(b'{"code": ["a"]}', id="list-code"),
        pytest.param(b'{"code": {"a": 1}}', id="object-code"),
        pytest.param(b'{"code": true}', id="bool-code"),
        pytest.param(('{"code": "' + "c" * 1025 + '"}').encode(), id="1025-char-code"),
        pytest.param(b'{"code": "\\ud800"}', id="lone-surrogate-code"),
        pytest.param(b'{"code": "abc\\u0000"}', id="nul-in-code"),
        pytest.param('{"code": "代码"}'.encode(), id="non-ascii-code"),
        pytest.param(b"[" * 1000, id="deeply-nested-json"),
    ],
)
async def test_login_bad_request(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer, payload: bytes
) -> None:
    reply = await send(
        http,
        "POST",
        gw.url + "/auth/login",
        data=payload,
        headers={"Content-Type": "application/json"},
    )
    assert_error(reply, 400, "bad_request")
    assert (await fake_stats(http, wechat))["calls"]["jscode2session"] == 0
    assert user_count(db_of(gw)) == 0


async def test_code_length_boundary(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    code = "k" * 1024
    reply = await login(http, gw.url, code)
    assert reply.status == 200, reply.raw
    assert reply.body["openid"] == fake.openid_for(code)
    assert_error(await login(http, gw.url, "k" * 1025), 400, "bad_request")
    stats = await fake_stats(http, wechat)
    # The 1024-character code reached WeChat unchanged; the 1025 one never did.
    assert stats["js_codes"] == [code]


async def test_auth_body_limit_is_64_kib(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    def body_of(size: int, code: str) -> bytes:
        head = b'{"code": "' + code.encode() + b'", "pad": "'
        tail = b'"}'
        return head + b"p" * (size - len(head) - len(tail)) + tail

    exact = body_of(64 * 1024, "exactly-64k")
    assert len(exact) == 65536
    reply = await send(
        http,
        "POST",
        gw.url + "/auth/login",
        data=exact,
        headers={"Content-Type": "application/json"},
    )
    assert reply.status == 200, reply.raw
    assert reply.body["openid"] == fake.openid_for("exactly-64k")

    over = body_of(64 * 1024 + 1, "one-byte-over")
    reply = await send(
        http,
        "POST",
        gw.url + "/auth/login",
        data=over,
        headers={"Content-Type": "application/json"},
    )
    assert_error(reply, 413, "body_too_large")

    async def chunks() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold on the bytes actually read.
        yield b'{"code": "chunked-over", "pad": "'
        for _ in range(10):
            yield b"q" * 8192
        yield b'"}'

    reply = await send(
        http,
        "POST",
        gw.url + "/auth/login",
        data=chunks(),
        headers={"Content-Type": "application/json"},
    )
    assert_error(reply, 413, "body_too_large")
    assert (await fake_stats(http, wechat))["js_codes"] == ["exactly-64k"]


# -- WeChat's errors ----------------------------------------------------------------

ANY_ERRCODE = object()


@pytest.mark.parametrize(
    ("code", "status", "error", "errcode"),
    [
        ("invalid-code-1", 401, "invalid_code", 40029),
        ("used-code-1", 401, "invalid_code", 40163),
        ("ratelimit-1", 429, "wechat_rate_limited", 45011),
        ("blocked-1", 403, "wechat_user_blocked", 40226),
        ("busy-1", 502, "wechat_error", -1),
        ("errcode-12345", 502, "wechat_error", 12345),
        ("errcode--2", 502, "wechat_error", -2),
        # Access-token errcodes mean nothing special for jscode2session (it takes no
        # access token): "other errcodes" -> 502 wechat_error with the errcode.
        ("errcode-40001", 502, "wechat_error", 40001),
        ("errcode-40014", 502, "wechat_error", 40014),
        ("errcode-42001", 502, "wechat_error", 42001),
        ("notjson-1", 502, "wechat_error", None),
        ("http500-1", 502, "wechat_error", None),
        # errcode 0 with no openid: a malformed success, not a login.
        ("errcode-0", 502, "wechat_error", ANY_ERRCODE),
    ],
)
async def test_login_wechat_error_mapping(
    gw: Running,
    http: aiohttp.ClientSession,
    wechat: TestServer,
    code: str,
    status: int,
    error: str,
    errcode: Any,
) -> None:
    reply = await login(http, gw.url, code)
    body = assert_error(reply, status, error)
    assert WECHAT_SECRET not in reply.raw.decode()
    if errcode is None:
        assert "wechat_errcode" not in body
    elif errcode is not ANY_ERRCODE:
        assert type(body["wechat_errcode"]) is int
        assert body["wechat_errcode"] == errcode
    assert "token" not in body
    stats = await fake_stats(http, wechat)
    # One call per login, never retried: a wx.login code is single use.
    assert stats["calls"]["jscode2session"] == 1
    assert stats["js_codes"] == [code]
    assert user_count(db_of(gw)) == 0


async def test_login_wechat_timeout(
    start_gateway: StartGateway, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    gw = await start_gateway(wechat={"timeout": "1s"})
    started = time.monotonic()
    body = assert_error(await login(http, gw.url, "slow-login"), 504, "wechat_timeout")
    elapsed = time.monotonic() - started
    # The fake answers "slow-" codes after 5 s: a 504 is the 1 s timeout's.
    assert elapsed >= 0.9, elapsed
    assert "wechat_errcode" not in body
    # Not retried, even later in the background.
    await asyncio.sleep(0.5)
    stats = await fake_stats(http, wechat)
    assert stats["calls"]["jscode2session"] == 1
    assert stats["js_codes"] == ["slow-login"]
    assert user_count(db_of(gw)) == 0


async def test_login_wechat_unreachable(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(wechat={"api_base": f"http://127.0.0.1:{free_port()}"})
    started = time.monotonic()
    body = assert_error(await login(http, gw.url, "nobody-home"), 502, "wechat_error")
    # A refused connection is final: no waiting out a timeout (or five of them).
    assert time.monotonic() - started < 5 * 2.0
    assert "wechat_errcode" not in body
    assert user_count(db_of(gw)) == 0


# -- the user record ---------------------------------------------------------------


async def test_login_upserts_one_record_per_openid(
    gw: Running, http: aiohttp.ClientSession
) -> None:
    db = db_of(gw)
    code = "union-carol"
    before = time.time()
    reply = await login(http, gw.url, code)
    assert reply.status == 200
    user = await read_user(db, fake.openid_for(code))
    assert user is not None
    assert user.unionid == fake.unionid_for(code)
    assert user.session_key == fake.session_key_for(code)
    assert user.phone_number is None
    assert before - 5 <= user.created_at <= time.time() + 5
    assert user.last_login_at >= user.created_at
    # Age the record and spoil its session_key: the next login must refresh both.
    sql(
        db,
        "UPDATE users SET session_key = 'stale', created_at = created_at - 1000, "
        "last_login_at = last_login_at - 1000 WHERE openid = ?",
        (user.openid,),
    )
    assert (await login(http, gw.url, code)).status == 200
    again = await read_user(db, user.openid)
    assert again is not None
    assert again.session_key == fake.session_key_for(code)
    assert again.created_at == pytest.approx(user.created_at - 1000)
    assert again.last_login_at >= user.last_login_at
    assert again.unionid == user.unionid
    assert user_count(db) == 1


async def test_100_concurrent_logins_of_distinct_users(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    codes = [f"crowd-{i}" for i in range(100)]
    replies = await asyncio.gather(*(login(http, gw.url, code) for code in codes))
    assert [r.status for r in replies] == [200] * 100
    assert [r.body["openid"] for r in replies] == [fake.openid_for(c) for c in codes]
    assert len({r.body["token"] for r in replies}) == 100
    db = db_of(gw)
    rows = dict(sql(db, "SELECT openid, session_key FROM users"))
    assert rows == {fake.openid_for(c): fake.session_key_for(c) for c in codes}
    assert (await fake_stats(http, wechat))["calls"]["jscode2session"] == 100


async def test_20_concurrent_logins_of_one_user_give_one_record(
    gw: Running, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    replies = await asyncio.gather(*(login(http, gw.url, "same-person") for _ in range(20)))
    assert [r.status for r in replies] == [200] * 20
    assert {r.body["openid"] for r in replies} == {fake.openid_for("same-person")}
    sids = {jwt.decode(r.body["token"], TOKEN_SECRET, algorithms=["HS256"])["sid"] for r in replies}
    assert len(sids) == 20  # twenty sessions, one user
    db = db_of(gw)
    assert sql(db, "SELECT openid, session_key FROM users") == [
        (fake.openid_for("same-person"), fake.session_key_for("same-person"))
    ]
    assert (await fake_stats(http, wechat))["calls"]["jscode2session"] == 20


async def test_records_survive_a_restart(
    start_gateway: StartGateway, http: aiohttp.ClientSession
) -> None:
    first = await start_gateway()
    token = (await login(http, first.url, "union-restart")).body["token"]
    phone = await send(
        http,
        "POST",
        first.url + "/auth/phone",
        headers=bearer(token),
        json={"code": "phone-13911112222"},
    )
    assert phone.status == 200, phone.raw
    await first.listener.stop()

    second = await start_gateway()
    me = await send(http, "GET", second.url + "/auth/me", headers=bearer(token))
    assert me.status == 200, me.raw
    assert me.body == {
        "openid": fake.openid_for("union-restart"),
        "unionid": fake.unionid_for("union-restart"),
        "phone_number": "13911112222",
    }
    # A new login by the same openid keeps the stored phone number.
    token2 = (await login(http, second.url, "union-restart")).body["token"]
    me2 = await send(http, "GET", second.url + "/auth/me", headers=bearer(token2))
    assert me2.body["phone_number"] == "13911112222"
    assert user_count(db_of(second)) == 1


async def test_kill_9_right_after_login_loses_nothing(
    run_gateway: RunGateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proc = await run_gateway()
    url = proc.url
    first = await login(http, url, "durable-one")
    assert first.status == 200
    phone = await send(
        http,
        "POST",
        url + "/auth/phone",
        headers=bearer(first.body["token"]),
        json={"code": "phone-13700001111"},
    )
    assert phone.status == 200
    last = await login(http, url, "durable-two")
    assert last.status == 200
    proc.proc.kill()  # SIGKILL, the moment the response is in
    assert await asyncio.to_thread(proc.stop, signal.SIGKILL) == -signal.SIGKILL

    db = tmp_path / "gateway.db"
    one = await read_user(db, fake.openid_for("durable-one"))
    two = await read_user(db, fake.openid_for("durable-two"))
    assert one is not None and two is not None
    assert one.session_key == fake.session_key_for("durable-one")
    assert one.phone_number == "13700001111"
    assert two.session_key == fake.session_key_for("durable-two")


# -- secrets never leave --------------------------------------------------------------


async def test_secrets_never_appear_in_responses_upstream_or_logs(
    run_gateway: RunGateway, http: aiohttp.ClientSession, seen: Recorder, tmp_path: Path
) -> None:
    proc = await run_gateway()
    url = proc.url
    code = "union-secret-holder"
    replies: list[Reply] = []

    async def call(method: str, path: str, **kwargs: Any) -> Reply:
        reply = await send(http, method, url + path, **kwargs)
        replies.append(reply)
        return reply

    good = await call("POST", "/auth/login", json={"code": code})
    assert good.status == 200
    token = good.body["token"]
    auth = bearer(token)
    await call("POST", "/auth/login", json={"code": "invalid-leak"})
    await call("POST", "/auth/login", json={"code": "notjson-leak"})
    await call("POST", "/auth/login", json={"code": "http500-leak"})
    await call("POST", "/auth/login", json={"code": "errcode-40125"})
    assert (await call("GET", "/auth/me", headers=auth)).status == 200
    assert (await call("GET", "/auth/verify", headers=auth)).status == 200
    assert (await call("POST", "/auth/phone", headers=auth, json={"code": "phone-1"})).status == 200
    assert (
        await call("POST", "/auth/phone", headers=auth, json={"code": "invalid-phone"})
    ).status == 401
    session_key = fake.session_key_for(code)
    sealed = encrypt_payload(
        session_key, {"nickName": "n", "watermark": {"appid": APPID, "timestamp": 1}}, IV
    )
    assert (
        await call("POST", "/auth/decrypt", headers=auth, json={"encrypted_data": sealed, "iv": IV})
    ).status == 200
    foreign = encrypt_payload(
        session_key, {"nickName": "n", "watermark": {"appid": "wxother", "timestamp": 1}}, IV
    )
    assert (
        await call(
            "POST", "/auth/decrypt", headers=auth, json={"encrypted_data": foreign, "iv": IV}
        )
    ).status == 400
    assert (
        await call("POST", "/auth/decrypt", headers=auth, json={"encrypted_data": "@@@", "iv": IV})
    ).status == 400
    upstream_calls = len(seen.seen)
    assert (await call("POST", "/api/orders?x=1", headers=auth, data=b"hello")).status == 200
    assert (await call("GET", "/opt/profile", headers=auth)).status == 200
    assert len(seen.seen) == upstream_calls + 2
    assert seen.last.header("X-OpenId") == fake.openid_for(code)

    rows = sql(tmp_path / "gateway.db", "SELECT token FROM access_token")
    assert rows, "the phone call should have cached an access token"
    secrets = {
        "session_key": session_key,
        "wechat secret": WECHAT_SECRET,
        "token key": TOKEN_SECRET,
        "access token": rows[0][0],
    }
    for reply in replies:
        text = reply.raw.decode("utf-8", "replace") + "\n" + repr(list(reply.headers.items()))
        assert leaks(text, secrets) == [], text
    for request in seen.seen:
        text = request.raw_path + repr(request.headers) + request.body.decode("utf-8", "replace")
        assert leaks(text, secrets) == []
        # The gateway's own token is not forwarded either.
        assert token not in text
    output = await asyncio.to_thread(proc.output)
    assert leaks(output, secrets) == [], output


# -- from the end-to-end login flow --------------------------------------------


async def test_login_response_and_token(gw: Running, http: aiohttp.ClientSession) -> None:
    body = await logged_in(http, gw.url, "union-alice")
    assert set(body) == {"token", "token_type", "expires_in", "openid", "unionid"}
    assert body["token_type"] == "Bearer" and body["expires_in"] == 7200
    assert body["openid"] == fake.openid_for("union-alice")
    assert body["unionid"] == fake.unionid_for("union-alice")
    header = jwt.get_unverified_header(body["token"])
    assert header["alg"] == "HS256" and header["kid"]
    claims = jwt.decode(body["token"], TOKEN_SECRET, algorithms=["HS256"], issuer="wx-gateway")
    assert claims["sub"] == body["openid"] and claims["sid"]
    assert claims["exp"] - claims["iat"] == 7200
    plain = await logged_in(http, gw.url, "plain-bob")
    assert plain["unionid"] is None


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
        assert await error_of(resp) == "bad_request"
    assert (await fake_stats(http, wechat))["calls"]["jscode2session"] == 0


async def test_login_limits(gw: Running, http: aiohttp.ClientSession) -> None:
    await logged_in(http, gw.url, "c" * 1024)
    async with http.post(gw.url + "/auth/login", data=b'{"code": "' + b"x" * 70000 + b'"}') as resp:
        assert resp.status == 413 and (await resp.json())["error"] == "body_too_large"
    async with http.get(gw.url + "/auth/login") as resp:
        assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"


async def test_login_timeout_and_unreachable(
    start_gateway: StartGateway, http: aiohttp.ClientSession, wechat: TestServer
) -> None:
    gw = await start_gateway(wechat={"timeout": "1s"})
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The fake answers "slow-" codes after 5 s: a 504 is the 1 s timeout's, before it.
    assert_error(await login(http, gw.url, "slow-1"), 504, "wechat_timeout")
    assert loop.time() - started >= 0.9
    assert (await fake_stats(http, wechat))["calls"]["jscode2session"] == 1
    dead = await start_gateway(wechat={"api_base": "http://127.0.0.1:9"})
    body = assert_error(await login(http, dead.url, "any"), 502, "wechat_error")
    assert "wechat_errcode" not in body


async def test_concurrent_logins(gw: Running, http: aiohttp.ClientSession) -> None:
    results = await asyncio.gather(*(logged_in(http, gw.url, f"user-{i}") for i in range(100)))
    assert len({body["openid"] for body in results}) == 100
    await asyncio.gather(*(logged_in(http, gw.url, "same-user") for _ in range(20)))
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
    record = await gw.listener.gateway.services.storage.get_user(
        APPID, fake.openid_for("secret-holder")
    )
    assert record is not None and record.session_key == key
    auth = {"Authorization": f"Bearer {token}"}
    for path in ("/auth/me", "/api/x"):
        async with http.get(gw.url + path, headers=auth) as resp:
            assert key not in await resp.text()
    assert all(key not in v and WECHAT_SECRET not in v for _, v in seen.last.headers)
    assert key not in caplog.text and WECHAT_SECRET not in caplog.text
