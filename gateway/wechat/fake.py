"""A fake WeChat API server: a development aid, never for production.

It answers the four WeChat calls the gateway makes (contract section 7) so the
whole login flow can be tried without credentials, and so tests can drive every
WeChat error path against a real server on loopback. Like WeChat, it answers
errors with HTTP 200 and ``{"errcode", "errmsg"}``.

Magic codes, matched on the start of a login or phone code (docs/fake-wechat.md
has the table): ``invalid`` 40029, ``used`` 40163, ``ratelimit`` 45011,
``blocked`` 40226, ``busy`` -1, ``errcode-<N>`` N; ``slow`` answers after
``slow_seconds``; ``notjson`` and ``http500`` break the transport; ``union``
adds a unionid; ``phone-[intcc-]<digits>`` picks the phone number. Any other
code is a valid login.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

log = logging.getLogger(__name__)

FAKE_APPID: Final = "wx00000000fakeapp"  # the watermark appid when none is configured
DEMO_PHONE: Final = "13800138000"
OLD_TOKEN_GRACE: Final = 300.0  # WeChat keeps a replaced cgi-bin/token token alive 5 more minutes
APIS: Final = ("jscode2session", "token", "stable_token", "getuserphonenumber")
_SEEN_CODES_KEPT: Final = 1000  # a dev server left running for days must not grow unbounded

_ERROR_PREFIXES: Final = (
    ("invalid", 40029, "invalid code"),
    ("used", 40163, "code been used"),
    ("ratelimit", 45011, "api minute-quota reach limit  mustslower  retry next minute"),
    ("blocked", 40226, "invalid request, risky user"),
    ("busy", -1, "system error"),
)
_ERRCODE_RE: Final = re.compile(r"errcode-(-?\d{1,10})")
_PHONE_RE: Final = re.compile(r"phone-(intcc-)?(\d{1,20})")


@dataclass
class FakeState:
    """Everything one fake remembers; on the app, so two fakes never share it."""

    appid: str | None
    secret: str | None
    token_ttl: int
    slow_seconds: float
    clock: Callable[[], float]
    calls: Counter[str] = field(default_factory=Counter)
    js_codes: deque[str] = field(default_factory=lambda: deque(maxlen=_SEEN_CODES_KEPT))
    phone_codes: deque[str] = field(default_factory=lambda: deque(maxlen=_SEEN_CODES_KEPT))
    tokens: dict[str, float] = field(default_factory=dict)  # access token -> expiry on `clock`
    stable_token: str | None = None
    plain_token: str | None = None
    # Set at shutdown so a `slow...` request never holds a graceful shutdown hostage.
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def issue_token(self) -> str:
        now = self.clock()
        self.tokens = {t: exp for t, exp in self.tokens.items() if exp > now}
        token = secrets.token_urlsafe(96)  # real tokens are ~130 url-safe characters
        self.tokens[token] = now + self.token_ttl
        return token

    def token_valid(self, token: str) -> bool:
        return self.tokens.get(token, -math.inf) > self.clock()

    def reset(self) -> None:
        self.calls.clear()
        self.js_codes.clear()
        self.phone_codes.clear()
        self.tokens.clear()
        self.stable_token = self.plain_token = None


FAKE_STATE: Final = web.AppKey("fake_wechat_state", FakeState)


def _digest(label: str, code: str) -> bytes:
    return hashlib.sha256(f"{label}{code}".encode("utf-8", "surrogatepass")).digest()


def openid_for(code: str) -> str:
    """The openid jscode2session answers for ``code``: "o" + 27 url-safe characters,
    the shape of a real openid, so length or alphabet checks see a realistic value."""
    return "o" + base64.urlsafe_b64encode(_digest("", code)).decode()[:27]


def unionid_for(code: str) -> str | None:
    """The unionid for ``code``, or None: only ``union...`` codes get one, as only
    apps bound to an open-platform account get one from WeChat."""
    if not code.startswith("union"):
        return None
    return "o" + base64.urlsafe_b64encode(_digest("unionid:", code)).decode()[:27]


def session_key_for(code: str) -> str:
    """Base64 of 16 bytes, like WeChat's, so tests can encrypt legacy payloads with it."""
    return base64.b64encode(_digest("session_key:", code)[:16]).decode()


def _error(errcode: int, errmsg: str) -> web.Response:
    # Real errmsgs end in a request id; a gateway that matches on errmsg would break.
    rid = "-".join(secrets.token_hex(4) for _ in range(3))
    return web.json_response({"errcode": errcode, "errmsg": f"{errmsg} rid: {rid}"})


def _check_credentials(state: FakeState, appid: Any, secret: Any) -> web.Response | None:
    if not isinstance(appid, str) or not appid:
        return _error(41002, "appid missing")
    if not isinstance(secret, str) or not secret:
        return _error(41004, "appsecret missing")
    if state.appid is not None and appid != state.appid:
        return _error(40013, "invalid appid")
    expected = state.secret
    if expected is not None and not hmac.compare_digest(secret.encode(), expected.encode()):
        return _error(40125, "invalid appsecret")  # never echo the secret back
    return None


async def _magic(state: FakeState, code: str) -> web.Response | None:
    """The answer a magic code forces, or None to answer ``code`` normally."""
    if code.startswith("slow"):
        # Why an event, not a bare sleep: shutdown sets it, releasing the handler.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.closing.wait(), state.slow_seconds)
        return None
    if code.startswith("notjson"):
        return web.Response(text="<html>502 Bad Gateway</html>", content_type="text/html")
    if code.startswith("http500"):
        return web.Response(status=500, text="Internal Server Error")
    if match := _ERRCODE_RE.match(code):
        return _error(int(match.group(1)), "fake errcode")
    for prefix, errcode, errmsg in _ERROR_PREFIXES:
        if code.startswith(prefix):
            return _error(errcode, errmsg)
    return None


async def _json_body(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both
        return None
    return body if isinstance(body, dict) else None


async def _jscode2session(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    state.calls["jscode2session"] += 1
    query = request.query
    code = query.get("js_code", "")
    if code:
        state.js_codes.append(code)
    refused = _check_credentials(state, query.get("appid"), query.get("secret"))
    if refused is not None:
        return refused
    if query.get("grant_type") != "authorization_code":
        return _error(40002, "invalid grant_type")
    if not code:
        return _error(41008, "missing code")
    if (forced := await _magic(state, code)) is not None:
        return forced
    # A success carries no errcode at all, as WeChat sends it today.
    answer = {"openid": openid_for(code), "session_key": session_key_for(code)}
    if (unionid := unionid_for(code)) is not None:
        answer["unionid"] = unionid
    return web.json_response(answer)


async def _token(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    state.calls["token"] += 1
    query = request.query
    refused = _check_credentials(state, query.get("appid"), query.get("secret"))
    if refused is not None:
        return refused
    if query.get("grant_type") != "client_credential":
        return _error(40002, "invalid grant_type")
    # Each call replaces the previous token, which lives 5 more minutes: why instances
    # sharing an app must use stable_token instead (contract section 6).
    old = state.plain_token
    if old is not None and old in state.tokens:
        state.tokens[old] = min(state.tokens[old], state.clock() + OLD_TOKEN_GRACE)
    state.plain_token = state.issue_token()
    return web.json_response({"access_token": state.plain_token, "expires_in": state.token_ttl})


async def _stable_token(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    state.calls["stable_token"] += 1
    body = await _json_body(request)
    if body is None:
        return _error(47001, "data format error")
    refused = _check_credentials(state, body.get("appid"), body.get("secret"))
    if refused is not None:
        return refused
    if body.get("grant_type") != "client_credential":
        return _error(40002, "invalid grant_type")
    current, now = state.stable_token, state.clock()
    # `is True`: the field is a JSON boolean; a string "false" must not force a refresh.
    if current is not None and body.get("force_refresh") is not True and state.token_valid(current):
        remaining = math.ceil(state.tokens[current] - now)
        return web.json_response({"access_token": current, "expires_in": remaining})
    if current is not None:
        state.tokens.pop(current, None)  # force_refresh kills the previous stable token
    state.stable_token = state.issue_token()
    return web.json_response({"access_token": state.stable_token, "expires_in": state.token_ttl})


def _phone_info(state: FakeState, code: str) -> dict[str, Any]:
    match = _PHONE_RE.fullmatch(code)
    pure = match.group(2) if match else DEMO_PHONE
    # WeChat documents countryCode as a string but has been seen sending a number.
    country_code: str | int = 86 if match and match.group(1) else "86"
    return {
        # Mainland numbers come without the area code in phoneNumber too.
        "phoneNumber": pure,
        "purePhoneNumber": pure,
        "countryCode": country_code,
        "watermark": {"timestamp": int(time.time()), "appid": state.appid or FAKE_APPID},
    }


async def _getuserphonenumber(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    state.calls["getuserphonenumber"] += 1
    token = request.query.get("access_token", "")
    if not token:
        return _error(41001, "access_token missing")
    if not state.token_valid(token):
        return _error(40001, "invalid credential, access_token is invalid or not latest")
    body = await _json_body(request)
    if body is None:
        return _error(47001, "data format error")
    code = body.get("code")
    if not isinstance(code, str) or not code:
        return _error(41008, "missing code")
    state.phone_codes.append(code)
    if (forced := await _magic(state, code)) is not None:
        return forced
    return web.json_response({"errcode": 0, "errmsg": "ok", "phone_info": _phone_info(state, code)})


async def _stats(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    calls = {api: state.calls[api] for api in APIS}
    seen = {"js_codes": list(state.js_codes), "phone_codes": list(state.phone_codes)}
    return web.json_response({"calls": calls, **seen})


async def _invalidate_tokens(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    count = len(state.tokens)
    state.tokens.clear()
    return web.json_response({"ok": True, "invalidated": count})


async def _reset(request: web.Request) -> web.Response:
    request.app[FAKE_STATE].reset()
    return web.json_response({"ok": True})


@web.middleware
async def _invalid_url(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    # WeChat answers an unknown path (e.g. a miscased jsCode2Session) with errcode 40066.
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _error(40066, "invalid url")


async def _release_slow_requests(app: web.Application) -> None:
    app[FAKE_STATE].closing.set()


def create_app(
    *,
    appid: str | None = None,
    secret: str | None = None,
    token_ttl: int = 7200,
    slow_seconds: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The fake as an aiohttp app. With ``appid``/``secret`` set, callers must send
    exactly those (else 40013/40125); without, any non-empty value is accepted.
    ``clock`` drives access-token expiry, so tests can move time without sleeping."""
    app = web.Application(middlewares=[_invalid_url])
    app[FAKE_STATE] = FakeState(appid, secret, token_ttl, slow_seconds, clock)
    app.on_shutdown.append(_release_slow_requests)
    app.router.add_get("/sns/jscode2session", _jscode2session)
    app.router.add_get("/cgi-bin/token", _token)
    app.router.add_post("/cgi-bin/stable_token", _stable_token)
    app.router.add_post("/wxa/business/getuserphonenumber", _getuserphonenumber)
    app.router.add_get("/_fake/stats", _stats)
    app.router.add_post("/_fake/invalidate_tokens", _invalidate_tokens)
    app.router.add_post("/_fake/reset", _reset)
    return app


class PathOnlyAccessLogger(AbstractAccessLogger):
    """Logs method, path and status, never the query: it carries the secret and tokens."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %.3fs", request.method, request.path, response.status, time)


def run(
    host: str = "127.0.0.1",
    port: int = 8081,
    *,
    appid: str | None = None,
    secret: str | None = None,
) -> None:
    """Serve the fake until interrupted (blocking); what `gateway fake-wechat` runs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log.warning(
        "FAKE WeChat API server on http://%s:%s - a development aid only, NEVER use in "
        "production: it accepts made-up codes and hands out fake identities (appid check: %s)",
        host,
        port,
        appid or "off",
    )
    app = create_app(appid=appid, secret=secret)
    web.run_app(app, host=host, port=port, access_log_class=PathOnlyAccessLogger)
