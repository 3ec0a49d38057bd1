"""``log.level: debug`` writes no secret (issue 13 item 1).

A real ``gateway run`` (a supervisor and two workers) at debug level goes
through login, phone (code API), legacy decrypt, logout, a revoked token and
malformed requests; then everything it wrote, stdout (the access log) and
stderr, is searched for every secret that passed through it: session keys (as
base64, hex and Python bytes), the WeChat and token secrets, the gateway's
tokens and their signatures, WeChat access tokens, phone numbers, openids and
unionids in clear, and the revoked session ids.
"""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp.test_utils import TestServer

from gateway.wechat import fake
from gateway.wechat.crypto import encrypt_payload
from tests.support.client import Reply, bearer, send
from tests.support.gateway import APPID, TOKEN_SECRET, WECHAT_SECRET, config_for
from tests.support.procs import spawn
from tests.support.rawhttp import exchange
from tests.support.secrets import leaking_lines, leaks
from tests.support.waiting import PROMPT, eventually

IV = base64.b64encode(bytes(range(16))).decode()
LEGACY_PHONE = "13700001111"
CODE_PHONE = "13912345678"


def session_key_forms(session_key: str) -> dict[str, str]:
    raw = base64.b64decode(session_key)
    return {
        "session_key (base64)": session_key,
        "session_key (hex)": raw.hex(),
        "session_key (bytes)": repr(raw)[2:-1],
        "session_key (urlsafe base64)": base64.urlsafe_b64encode(raw).decode(),
    }


async def test_debug_level_writes_no_secret(
    tmp_path: Path, upstream: TestServer, wechat: TestServer, http: aiohttp.ClientSession
) -> None:
    raw = config_for(
        tmp_path, upstream, wechat, server={"workers": 2}, log={"level": "debug", "access": True}
    )
    proc = await spawn(tmp_path, raw)
    url, port = proc.url, raw["server"]["port"]
    secrets: dict[str, str] = {"wechat secret": WECHAT_SECRET, "token secret": TOKEN_SECRET}
    try:
        await _walk_through(http, url, port, secrets)
    finally:
        output = await asyncio.to_thread(proc.output)
    for token in list(wechat.app[fake.FAKE_STATE].tokens):
        secrets[f"access token {token[:6]}..."] = token
    assert any(name.startswith("access token") for name in secrets)
    # No secret, from any logger, in any process ...
    leaked = leaks(output, secrets)
    assert leaked == [], "\n".join([", ".join(leaked), *leaking_lines(output, secrets)])
    # ... and debug was on: the gateway's own DEBUG records are there.
    assert " DEBUG gateway.wechat" in output, output[-3000:]


async def _walk_through(
    http: aiohttp.ClientSession, url: str, port: int, secrets: dict[str, str]
) -> None:
    async def call(method: str, path: str, **kwargs: Any) -> Reply:
        return await send(http, method, url + path, **kwargs)

    users: dict[str, dict[str, Any]] = {}
    for code in ("union-debug-alice", "debug-bob", "union-debug-carol"):
        reply = await call("POST", "/auth/login", json={"code": code})
        assert reply.status == 200, reply.raw
        users[code] = reply.body
        token = reply.body["token"]
        secrets.update(
            {f"{k} of {code}": v for k, v in session_key_forms(fake.session_key_for(code)).items()}
        )
        secrets[f"token of {code}"] = token
        secrets[f"token signature of {code}"] = token.rsplit(".", 1)[1]
        secrets[f"openid of {code}"] = reply.body["openid"]
        if reply.body["unionid"]:
            secrets[f"unionid of {code}"] = reply.body["unionid"]
    alice = bearer(users["union-debug-alice"]["token"])

    # Phone, current API (an access token is fetched, stored and used).
    reply = await call("POST", "/auth/phone", headers=alice, json={"code": f"phone-{CODE_PHONE}"})
    assert reply.status == 200, reply.raw
    secrets["phone (code API)"] = CODE_PHONE
    # Phone and decrypt, legacy API (the stored session_key is read back).
    session_key = fake.session_key_for("union-debug-alice")
    watermark = {"appid": APPID, "timestamp": int(time.time())}
    phone_payload = {
        "phoneNumber": LEGACY_PHONE,
        "purePhoneNumber": LEGACY_PHONE,
        "countryCode": "86",
        "watermark": watermark,
    }
    sealed = {"encrypted_data": encrypt_payload(session_key, phone_payload, IV), "iv": IV}
    reply = await call("POST", "/auth/phone", headers=alice, json=sealed)
    assert reply.status == 200, reply.raw
    secrets["phone (legacy)"] = LEGACY_PHONE
    nickname = "debug-nick-4242"
    sealed = {
        "encrypted_data": encrypt_payload(
            session_key, {"nickName": nickname, "watermark": watermark}, IV
        ),
        "iv": IV,
    }
    reply = await call("POST", "/auth/decrypt", headers=alice, json=sealed)
    assert reply.status == 200 and reply.body["data"]["nickName"] == nickname
    secrets["decrypted data"] = nickname
    assert (await call("GET", "/auth/me", headers=alice)).status == 200
    assert (await call("GET", "/api/orders", headers=alice)).status == 200

    # Logout: the revoked session id goes into storage and every worker polls it.
    bob_token = users["debug-bob"]["token"]
    secrets["revoked session id"] = jwt.decode(bob_token, options={"verify_signature": False})[
        "sid"
    ]
    assert (await call("POST", "/auth/logout", headers=bearer(bob_token))).status == 200

    async def refused_everywhere() -> bool:  # by both workers (each polls storage)
        me = [await call("GET", "/auth/me", headers=bearer(bob_token)) for _ in "12345"]
        return {reply.status for reply in me} == {401}

    await eventually(refused_everywhere, "the revoked token refused by every worker")

    # Malformed requests carrying secrets: refused, and never echoed into a log.
    carol = users["union-debug-carol"]["token"]
    mid = len(carol) // 2
    one_bad_byte = carol[:mid] + "\x01" + carol[mid + 1 :]
    for request in (
        f"GET /api/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {one_bad_byte}\r\n\r\n",
        # A query string llhttp refuses, carrying the token and a session key.
        f"GET /api/x?token={carol}&k={session_key}\x7f HTTP/1.1\r\nHost: gw\r\n\r\n",
        f"GET /api/x HTTP/1.1\r\nHost: gw\r\nX-Phone: {CODE_PHONE}\x00{carol}\r\n\r\n",
    ):
        answer = await exchange(port, request.encode("latin-1"), deadline=PROMPT)
        assert answer.closed
        assert answer.statuses() in ([], [400]), answer
