"""The WeChat trust boundary (issue 13 items 5, 6 and 8): a hostile WeChat.

``wechat.api_base`` is trusted for who a user is and nothing more. Against a
WeChat that redirects, answers 50 MB, compresses, or sends fields outside
their documented shapes, the gateway answers 502 ``wechat_error``, follows no
redirect (the app secret and access tokens never reach the redirect target),
reads no more than a few KiB, and stores nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.wechat import fake
from gateway.wechat.crypto import encrypt_payload
from tests.support.client import Reply, bearer, send
from tests.support.errors import assert_error
from tests.support.gateway import (
    APPID,
    Running,
    StartGateway,
    base_config,
    url_of,
)
from tests.support.procs import peak_rss_kib, spawn
from tests.support.upstream import served
from tests.support.waiting import PROMPT, until

HUGE = 50 * 1024 * 1024
# The documented cap on a WeChat answer (gateway/wechat/client.py MAX_ANSWER_BYTES).
MAX_ANSWER_BYTES = 4 * 1024
LOGIN, TOKEN, PHONE = (
    "/sns/jscode2session",
    "/cgi-bin/stable_token",
    "/wxa/business/getuserphonenumber",
)
IV = base64.b64encode(bytes(range(16))).decode()

Answer = Callable[[web.Request], Awaitable[web.StreamResponse]]

# -- a hostile WeChat, and a trap for whatever it redirects to -------------------------------


@dataclass
class Hostile:
    """Answers each API as the test says; by default like WeChat would."""

    answers: dict[str, Answer] = field(default_factory=dict)
    sent: list[int] = field(default_factory=list)  # body bytes each huge answer got out

    async def handle(self, request: web.Request) -> web.StreamResponse:
        answer = self.answers.get(request.path)
        if answer is not None:
            return await answer(request)
        return web.json_response(await default_answer(request))


async def default_answer(request: web.Request) -> dict[str, Any]:
    if request.path == LOGIN:
        code = request.query["js_code"]
        return {"openid": fake.openid_for(code), "session_key": fake.session_key_for(code)}
    if request.path == TOKEN:
        return {"access_token": "hostile-access-token_0123456789", "expires_in": 7200}
    return {
        "errcode": 0,
        "errmsg": "ok",
        "phone_info": {
            "phoneNumber": "13912345678",
            "purePhoneNumber": "13912345678",
            "countryCode": "86",
            "watermark": {"timestamp": int(time.time()), "appid": APPID},
        },
    }


HOSTILE = web.AppKey("hostile", Hostile)
TRAP = web.AppKey("trap", list)


@pytest.fixture
async def hostile_server() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[HOSTILE] = Hostile()
    app.router.add_route("*", "/{tail:.*}", app[HOSTILE].handle)
    async with served(app) as server:
        yield server


@pytest.fixture
def hostile(hostile_server: TestServer) -> Hostile:
    return hostile_server.app[HOSTILE]


@pytest.fixture
async def trap() -> AsyncIterator[TestServer]:
    """A redirect target that records every request and answers like a WeChat
    that picked the attacker's openid."""

    async def record(request: web.Request) -> web.Response:
        request.app[TRAP].append((request.method, request.path_qs, await request.read()))
        answer = await default_answer(request)
        if request.path == LOGIN:
            answer["openid"] = "oAttackerChosenOpenid"
        return web.json_response(answer)

    app = web.Application()
    app[TRAP] = []
    app.router.add_route("*", "/{tail:.*}", record)
    async with served(app) as server:
        yield server


@pytest.fixture
async def hgw(start_gateway: StartGateway, hostile_server: TestServer) -> Running:
    """A gateway whose WeChat is the hostile one."""
    return await start_gateway(wechat={"api_base": url_of(hostile_server)})


def users(gw: Running) -> int:
    db = gw.config.storage.url.removeprefix("sqlite:///")
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        return int(conn.execute("SELECT count(*) FROM users").fetchone()[0])


async def login(http: aiohttp.ClientSession, gw: Running, code: str = "boundary-user") -> Reply:
    return await send(http, "POST", gw.url + "/auth/login", json={"code": code})


async def phone_by_code(http: aiohttp.ClientSession, gw: Running) -> tuple[Reply, str]:
    """Log in (through the default answer), then ask for the phone number by code."""
    reply = await login(http, gw)
    assert reply.status == 200, reply.raw
    token = reply.body["token"]
    return await send(
        http, "POST", gw.url + "/auth/phone", headers=bearer(token), json={"code": "p"}
    ), token


async def call_api(http: aiohttp.ClientSession, gw: Running, api: str) -> Reply:
    """The gateway call that reaches ``api`` at WeChat."""
    if api == LOGIN:
        return await login(http, gw)
    return (await phone_by_code(http, gw))[0]


def body(raw: bytes) -> Answer:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=raw, content_type="application/json")

    return answer


def json_answer(value: Any) -> Answer:
    return body(json.dumps(value).encode())


# -- item 5: redirects -------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("api", [LOGIN, TOKEN, PHONE])
async def test_a_redirect_is_wechat_error_and_never_followed(
    hgw: Running,
    hostile: Hostile,
    trap: TestServer,
    http: aiohttp.ClientSession,
    api: str,
    status: int,
) -> None:
    async def redirect(request: web.Request) -> web.Response:
        # Where a hijacked WeChat would send the secret: the whole query and, on
        # a 307/308, the re-posted body (stable_token's holds the secret).
        target = trap.make_url(request.path).with_query(request.query)
        return web.Response(status=status, headers={"Location": str(target)})

    hostile.answers[api] = redirect
    reply = await call_api(http, hgw, api)
    assert_error(reply, 502, "wechat_error")
    assert trap.app[TRAP] == []  # nothing reached the redirect target
    assert "oAttackerChosenOpenid" not in reply.raw.decode()
    if api == LOGIN:
        assert users(hgw) == 0


# -- item 6: sizes ---------------------------------------------------------------------------


def huge(hostile: Hostile, *, declared: bool, total: int = HUGE) -> Answer:
    """A valid answer padded to ``total`` bytes, written until the reader goes away."""

    async def answer(request: web.Request) -> web.StreamResponse:
        head = json.dumps(await default_answer(request))[:-1].encode() + b', "pad": "'
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if declared:
            response.content_length = total
        sent = 0
        try:
            await response.prepare(request)
            await response.write(head)
            sent = len(head)
            chunk = b"x" * 65536
            while sent < total - 2:
                piece = chunk[: total - 2 - sent]
                await response.write(piece)
                sent += len(piece)
            await response.write(b'"}')
            sent += 2
            await response.write_eof()
        except (ConnectionError, OSError):
            pass  # the gateway hung up: what we measure
        finally:
            hostile.sent.append(sent)
        return response

    return answer


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("api", [LOGIN, TOKEN, PHONE])
async def test_a_50_mb_answer_is_wechat_error_and_never_read_whole(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession, api: str, declared: bool
) -> None:
    hostile.answers[api] = huge(hostile, declared=declared)
    started = time.monotonic()
    reply = await call_api(http, hgw, api)
    assert_error(reply, 502, "wechat_error")
    assert time.monotonic() - started < PROMPT
    # The gateway stopped reading at a few KiB and closed: the rest could not be
    # written (what got out sits in socket buffers, a few MB at most).
    await until(lambda: bool(hostile.sent), "the hostile answer's end")
    assert hostile.sent[0] < HUGE // 2, hostile.sent


@pytest.mark.parametrize("api", [LOGIN, TOKEN, PHONE])
async def test_the_size_cap_is_a_few_kib(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession, api: str
) -> None:
    """An answer of exactly the cap passes; one byte more is wechat_error."""

    def padded(size: int) -> Answer:
        async def answer(request: web.Request) -> web.Response:
            text = json.dumps(await default_answer(request))
            return web.Response(
                body=text[:-1].encode() + b" " * (size - len(text)) + b"}",
                content_type="application/json",
            )

        return answer

    hostile.answers[api] = padded(MAX_ANSWER_BYTES)
    assert (await call_api(http, hgw, api)).status == 200
    hostile.answers[api] = padded(MAX_ANSWER_BYTES + 1)
    if api == TOKEN:
        # The token from the call above is cached: make the gateway fetch again.
        await hgw.listener.gateway.services.access_tokens[APPID].invalidate(
            "hostile-access-token_0123456789"
        )
    assert_error(await call_api(http, hgw, api), 502, "wechat_error")


async def test_a_compressed_answer_is_refused_before_it_expands(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession
) -> None:
    """A deflate bomb: 50 MB of JSON in ~50 KB of gzip. The gateway asks for
    identity and refuses any Content-Encoding, so nothing is inflated."""

    asked: list[str | None] = []

    async def bomb(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Accept-Encoding"))
        text = json.dumps(await default_answer(request))[:-1] + ', "pad": "'
        inflated = text.encode() + b"0" * HUGE + b'"}'
        return web.Response(
            body=gzip.compress(inflated, 9),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )

    hostile.answers[LOGIN] = bomb
    assert_error(await login(http, hgw), 502, "wechat_error")
    assert users(hgw) == 0
    assert asked == ["identity"]


async def test_memory_stays_bounded_under_four_50_mb_answers(
    tmp_path: Path,
    upstream: TestServer,
    hostile_server: TestServer,
    hostile: Hostile,
    http: aiohttp.ClientSession,
) -> None:
    """A real ``gateway run``: four concurrent logins answered with 50 MB each
    (the attack that took a worker from 56 to 358 MB)."""
    proc = await spawn(tmp_path, base_config(tmp_path, url_of(upstream), url_of(hostile_server)))
    url = proc.url
    try:
        for code in ("warm-1", "warm-2"):  # load every code path first
            async with http.post(url + "/auth/login", json={"code": code}) as resp:
                assert resp.status == 200
        before = peak_rss_kib(proc.pid)
        hostile.answers[LOGIN] = huge(hostile, declared=False)

        async def one(code: str) -> int:
            async with http.post(url + "/auth/login", json={"code": code}) as resp:
                return resp.status

        statuses = await asyncio.gather(*(one(f"huge-{i}") for i in range(4)))
        assert statuses == [502] * 4
        growth_mib = (peak_rss_kib(proc.pid) - before) / 1024
        assert growth_mib < 40, f"peak RSS grew {growth_mib:.0f} MiB"
    finally:
        await asyncio.to_thread(proc.stop)


# -- item 8: field shapes ---------------------------------------------------------------------

GOOD_OPENID = fake.openid_for("shape")
GOOD_KEY = fake.session_key_for("shape")


def login_answer(**fields: Any) -> bytes:
    answer = {"openid": GOOD_OPENID, "session_key": GOOD_KEY, **fields}
    return json.dumps({k: v for k, v in answer.items() if v is not None}).encode()


BAD_LOGIN_ANSWERS = {
    "openid with CR LF": login_answer(openid="oVictim\r\nX-OpenId: admin"),
    "openid of 3000 characters": login_answer(openid="o" * 3000),
    "openid of 129 characters": login_answer(openid="o" * 129),
    "openid padded with spaces": login_answer(openid=" admin "),
    "openid with a comma": login_answer(openid="victim, attacker"),
    "openid with a dot": login_answer(openid="o.victim"),
    "openid not a string": login_answer(openid=12345),
    "openid empty": login_answer(openid=""),
    "openid missing": json.dumps({"session_key": GOOD_KEY}).encode(),
    "openid with a lone surrogate": login_answer()[:-1] + b', "openid": "o\\ud800abc"}',
    "openid not UTF-8": b'{"openid": "o\xff\xfeabc", "session_key": "' + GOOD_KEY.encode() + b'"}',
    "unionid with CR LF": login_answer(unionid="oUnion\r\nX-Evil: 1"),
    "unionid with a comma": login_answer(unionid="victim, attacker"),
    "unionid of 3000 characters": login_answer(unionid="u" * 3000),
    "unionid not a string": login_answer(unionid=["u"]),
    "session_key not base64": login_answer(session_key="not base64 at all!"),
    "session_key of 15 bytes": login_answer(session_key=base64.b64encode(b"k" * 15).decode()),
    "session_key of 32 bytes": login_answer(session_key=base64.b64encode(b"k" * 32).decode()),
    "session_key urlsafe": login_answer(
        session_key=base64.urlsafe_b64encode(b"\xfb" * 16).decode()
    ),
    "session_key not canonical": login_answer(session_key=GOOD_KEY[:21] + "B=="),
    "session_key with a newline": login_answer(session_key=GOOD_KEY[:8] + "\n" + GOOD_KEY[8:]),
    "session_key not a string": login_answer(session_key=16),
    "a lone surrogate anywhere": login_answer()[:-1] + b', "errmsg": "\\udc00"}',
    "NaN": login_answer()[:-1] + b', "x": NaN}',
    "Infinity": login_answer()[:-1] + b', "x": -Infinity}',
    "nested past the decoder's stack": login_answer()[:-1]
    + b', "x": '
    + b"[" * 1900
    + b"]" * 1900
    + b"}",
    "truncated JSON": login_answer()[:-3],
    "a JSON array": b"[]",
    "errcode a string": login_answer()[:-1] + b', "errcode": "0"}',
}


@pytest.mark.parametrize("answer", list(BAD_LOGIN_ANSWERS.values()), ids=list(BAD_LOGIN_ANSWERS))
async def test_malformed_login_answers_are_wechat_error_and_store_nothing(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession, answer: bytes
) -> None:
    assert len(answer) <= MAX_ANSWER_BYTES  # each case is about shape, not size
    hostile.answers[LOGIN] = body(answer)
    assert_error(await login(http, hgw), 502, "wechat_error")
    assert users(hgw) == 0


GOOD_LOGIN_ANSWERS = {
    "a real-looking openid": login_answer(),
    "openid of 128 characters": login_answer(openid="o" * 127 + "_"),
    "openid with - and _": login_answer(openid="o-_AZaz09"),
    "a unionid": login_answer(unionid="oUnion-_0123456789"),
    "unionid null": login_answer()[:-1] + b', "unionid": null}',
    "unionid empty": login_answer(unionid=""),
    "errcode 0 and errmsg": login_answer(errcode=0, errmsg="ok"),
}


@pytest.mark.parametrize("answer", list(GOOD_LOGIN_ANSWERS.values()), ids=list(GOOD_LOGIN_ANSWERS))
async def test_well_formed_login_answers_pass(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession, answer: bytes
) -> None:
    hostile.answers[LOGIN] = body(answer)
    reply = await login(http, hgw)
    assert reply.status == 200, reply.raw
    sent = json.loads(answer)
    assert reply.body["openid"] == sent["openid"]
    assert reply.body["unionid"] == (sent.get("unionid") or None)
    assert users(hgw) == 1


def phone_answer(**info: Any) -> dict[str, Any]:
    phone_info = {
        "phoneNumber": "13912345678",
        "purePhoneNumber": "13912345678",
        "countryCode": "86",
        "watermark": {"timestamp": 1, "appid": APPID},
        **info,
    }
    return {
        "errcode": 0,
        "errmsg": "ok",
        "phone_info": {k: v for k, v in phone_info.items() if v is not None},
    }


BAD_PHONE_INFOS = {
    "number with CR LF": {"phoneNumber": "139\r\n12345678"},
    "number with letters": {"phoneNumber": "139abc45678"},
    "number of 100 digits": {"phoneNumber": "1" * 100},
    "number padded": {"phoneNumber": " 13912345678 "},
    "number with a comma": {"phoneNumber": "13912345678,13700000000"},
    "number with a lone surrogate": {"phoneNumber": "139\ud80012345678"},
    "number not a string": {"phoneNumber": 13912345678},
    "pure number with a plus": {"purePhoneNumber": "+13912345678"},
    "pure number empty": {"purePhoneNumber": ""},
    "country code with CR LF": {"countryCode": "86\r\n"},
    "country code of 10 digits": {"countryCode": "8" * 10},
    "country code a boolean": {"countryCode": True},
    "country code negative": {"countryCode": -86},
    "country code a float": {"countryCode": 86.5},
}


@pytest.mark.parametrize("info", list(BAD_PHONE_INFOS.values()), ids=list(BAD_PHONE_INFOS))
async def test_malformed_phone_answers_are_wechat_error_and_store_nothing(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession, info: dict[str, Any]
) -> None:
    hostile.answers[PHONE] = json_answer(phone_answer(**info))
    reply, token = await phone_by_code(http, hgw)
    assert_error(reply, 502, "wechat_error")
    me = await send(http, "GET", hgw.url + "/auth/me", headers=bearer(token))
    assert me.body["phone_number"] is None


BAD_TOKEN_ANSWERS = {
    "access_token with CR LF": {"access_token": "tok\r\nen", "expires_in": 7200},
    "access_token with a space": {"access_token": "tok en", "expires_in": 7200},
    "access_token of 3000 characters": {"access_token": "t" * 3000, "expires_in": 7200},
    "access_token empty": {"access_token": "", "expires_in": 7200},
    "expires_in zero": {"access_token": "token", "expires_in": 0},
    "expires_in negative": {"access_token": "token", "expires_in": -7200},
    "expires_in a boolean": {"access_token": "token", "expires_in": True},
    "expires_in a string": {"access_token": "token", "expires_in": "7200"},
    "expires_in of a century": {"access_token": "token", "expires_in": 100 * 365 * 86400},
}


@pytest.mark.parametrize("answer", list(BAD_TOKEN_ANSWERS.values()), ids=list(BAD_TOKEN_ANSWERS))
async def test_malformed_access_token_answers_are_wechat_error(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession, answer: dict[str, Any]
) -> None:
    hostile.answers[TOKEN] = json_answer(answer)
    reply, _ = await phone_by_code(http, hgw)
    assert_error(reply, 502, "wechat_error")


async def test_well_formed_phone_answers_pass(
    hgw: Running, hostile: Hostile, http: aiohttp.ClientSession
) -> None:
    for info, expected in (
        ({}, ("13912345678", "13912345678", "86")),
        ({"countryCode": 86}, ("13912345678", "13912345678", "86")),
        (
            {"phoneNumber": "+1 2025550123", "purePhoneNumber": "2025550123", "countryCode": "1"},
            ("+1 2025550123", "2025550123", "1"),
        ),
        (
            {"phoneNumber": "+85291234567", "countryCode": "+852"},
            ("+85291234567", "13912345678", "+852"),
        ),
    ):
        hostile.answers[PHONE] = json_answer(phone_answer(**info))
        reply, _ = await phone_by_code(http, hgw)
        assert reply.status == 200, reply.raw
        assert (
            reply.body["phone_number"],
            reply.body["pure_phone_number"],
            reply.body["country_code"],
        ) == expected


async def test_a_legacy_phone_payload_of_the_wrong_shape_is_not_stored(
    hgw: Running, http: aiohttp.ClientSession
) -> None:
    """The legacy payload is WeChat's too (sealed with the session_key): the
    same shapes apply, and a failure is the one decrypt_failed (no oracle)."""
    reply = await login(http, hgw, "legacy-shape")
    token = reply.body["token"]
    session_key = fake.session_key_for("legacy-shape")
    for number in ("139\r\n12345678", "1" * 10_000):
        payload = {
            "phoneNumber": number,
            "purePhoneNumber": "13912345678",
            "countryCode": "86",
            "watermark": {"appid": APPID, "timestamp": 1},
        }
        sealed = {"encrypted_data": encrypt_payload(session_key, payload, IV), "iv": IV}
        reply = await send(
            http, "POST", hgw.url + "/auth/phone", headers=bearer(token), json=sealed
        )
        assert_error(reply, 400, "decrypt_failed")
    me = await send(http, "GET", hgw.url + "/auth/me", headers=bearer(token))
    assert me.body["phone_number"] is None
