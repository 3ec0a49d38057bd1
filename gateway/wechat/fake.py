"""A fake WeChat API server: a development aid, never for production.

It answers the four WeChat calls the gateway makes (contract section 7) so the
whole login flow can be tried without credentials, and so tests can drive every
WeChat error path against a real server on loopback. Like WeChat, it answers
errors with HTTP 200 and ``{"errcode", "errmsg"}``.

It serves any number of mini programs (contract section 9): each configured
appid has its own secret check, access tokens, session keys and openids, and
one unionid per person across them, as apps under one open-platform account.

Magic codes, matched on the start of a login or phone code (docs/fake-wechat.md
has the table): ``invalid`` 40029, ``used`` 40163, ``ratelimit`` 45011,
``blocked`` 40226, ``busy`` -1, ``errcode-<N>`` N; ``slow`` answers after
``slow_seconds``; ``notjson`` and ``http500`` break the transport; ``union``
adds a unionid; ``phone-[intcc-]<digits>`` picks the phone number. A code
ending in ``@<appid>`` belongs to that app only. Any other code is a valid login.
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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

log = logging.getLogger(__name__)

DEMO_PHONE: Final = "13800138000"
OLD_TOKEN_GRACE: Final = 300.0  # WeChat keeps a replaced cgi-bin/token token alive 5 more minutes
APIS: Final = ("jscode2session", "token", "stable_token", "getuserphonenumber")
_SEEN_CODES_KEPT: Final = 1000  # a dev server left running for days must not grow unbounded
_OPEN_APPS_KEPT: Final = 100  # the same, for the appids an open fake (no apps configured) meets

_ERROR_PREFIXES: Final = (
    ("invalid", 40029, "invalid code"),
    ("used", 40163, "code been used"),
    ("ratelimit", 45011, "api minute-quota reach limit  mustslower  retry next minute"),
    ("blocked", 40226, "invalid request, risky user"),
    ("busy", -1, "system error"),
)
_ERRCODE_RE: Final = re.compile(r"errcode-(-?\d{1,10})")
_PHONE_RE: Final = re.compile(r"phone-(intcc-)?(\d{1,20})")
_INVALID_TOKEN: Final = (40001, "invalid credential, access_token is invalid or not latest")


def _codes() -> deque[str]:
    return deque(maxlen=_SEEN_CODES_KEPT)


@dataclass
class FakeApp:
    """One mini program on the fake: what it was sent, and its current access tokens."""

    appid: str
    calls: Counter[str] = field(default_factory=Counter)
    js_codes: deque[str] = field(default_factory=_codes)
    phone_codes: deque[str] = field(default_factory=_codes)
    stable_token: str | None = None
    plain_token: str | None = None

    def stats(self) -> dict[str, Any]:
        calls = {api: self.calls[api] for api in APIS}
        return {
            "calls": calls,
            "js_codes": list(self.js_codes),
            "phone_codes": list(self.phone_codes),
        }


@dataclass
class FakeState:
    """Everything one fake remembers; on the app, so two fakes never share it.

    ``secrets`` maps each configured appid to its secret (None: any secret); empty,
    the fake is open: any appid and secret work, each appid met becoming an app.
    ``calls``/``js_codes``/``phone_codes`` count every app together, ``apps`` each one.
    """

    secrets: dict[str, str | None]
    token_ttl: int
    slow_seconds: float
    clock: Callable[[], float]
    calls: Counter[str] = field(default_factory=Counter)
    js_codes: deque[str] = field(default_factory=_codes)
    phone_codes: deque[str] = field(default_factory=_codes)
    apps: dict[str, FakeApp] = field(init=False, default_factory=dict)
    # The app whose users keep the appid-less helpers' values: the first configured,
    # or for an open fake the first appid it met. Never reset: an openid is for life.
    primary: str | None = field(init=False, default=None)
    tokens: dict[str, float] = field(default_factory=dict)  # access token -> expiry on `clock`
    token_apps: dict[str, str] = field(default_factory=dict)  # access token -> its appid
    # Set at shutdown so a `slow...` request never holds a graceful shutdown hostage.
    closing: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.apps = {appid: FakeApp(appid) for appid in self.secrets}
        self.primary = next(iter(self.secrets), None)

    def app(self, appid: str) -> FakeApp | None:
        """The app ``appid`` names, or None if the fake does not serve it."""
        if appid in self.apps or self.secrets:
            return self.apps.get(appid)
        if len(self.apps) >= _OPEN_APPS_KEPT:
            return None
        self.primary = self.primary or appid
        return self.apps.setdefault(appid, FakeApp(appid))

    def helper_appid(self, appid: str) -> str | None:
        """The ``appid`` argument that makes the module's helpers give what this fake
        answers to ``appid``: None for the primary app, ``appid`` for the others."""
        return None if appid == self.primary else appid

    def openid_for(self, code: str, appid: str) -> str:
        return openid_for(code, self.helper_appid(appid))

    def session_key_for(self, code: str, appid: str) -> str:
        return session_key_for(code, self.helper_appid(appid))

    def issue_token(self, app: FakeApp) -> str:
        now = self.clock()
        self.tokens = {t: exp for t, exp in self.tokens.items() if exp > now}
        self.token_apps = {t: a for t, a in self.token_apps.items() if t in self.tokens}
        token = secrets.token_urlsafe(96)  # real tokens are ~130 url-safe characters
        self.tokens[token] = now + self.token_ttl
        self.token_apps[token] = app.appid
        return token

    def token_app(self, token: str) -> FakeApp | None:
        """The app a live access token was issued to, or None (unknown or expired)."""
        if self.tokens.get(token, -math.inf) <= self.clock():
            return None
        return self.apps.get(self.token_apps.get(token, ""))

    def drop_token(self, token: str) -> None:
        self.tokens.pop(token, None)
        self.token_apps.pop(token, None)

    def invalidate(self, appid: str | None = None) -> int:
        """Kill every access token, or only ``appid``'s; how many there were."""
        dead = [t for t, a in self.token_apps.items() if appid is None or a == appid]
        for token in dead:
            self.drop_token(token)
        return len(dead)

    def reset(self) -> None:
        self.calls.clear()
        self.js_codes.clear()
        self.phone_codes.clear()
        self.tokens.clear()
        self.token_apps.clear()
        self.apps = {appid: FakeApp(appid) for appid in self.secrets}


FAKE_STATE: Final = web.AppKey("fake_wechat_state", FakeState)


def split_app(code: str) -> tuple[str, str | None]:
    """``code`` without its ``@<appid>`` ending, and that appid (None without one).

    Why: a real code belongs to the mini program that got it, and another app's
    credentials or token cannot use it. The ending lets a test make a code that
    fails unless the gateway uses the right app's."""
    text, at, appid = code.rpartition("@")
    return (text, appid) if at and appid else (code, None)


def _digest(label: str, code: str) -> bytes:
    return hashlib.sha256(f"{label}{code}".encode("utf-8", "surrogatepass")).digest()


def _app_label(label: str, appid: str | None) -> str:
    return label if appid is None else f"{label}app={appid}:"


def openid_for(code: str, appid: str | None = None) -> str:
    """The openid jscode2session answers for ``code``: "o" + 27 url-safe characters,
    the shape of a real openid, so length or alphabet checks see a realistic value.

    A person is the code's text without an ``@<appid>`` ending, and has one openid
    per app. ``appid`` None is the fake's primary app (the first configured, the
    only one in a single-app fake), whose openids are those of a one-app fake;
    pass ``appid`` for any other app. ``FakeState.openid_for`` applies the rule."""
    person, _ = split_app(code)
    return "o" + base64.urlsafe_b64encode(_digest(_app_label("", appid), person)).decode()[:27]


def unionid_for(code: str) -> str | None:
    """The unionid for ``code``, or None: only ``union...`` codes get one, as only
    apps bound to an open-platform account get one from WeChat. The same in every
    app: it is what links one person's openids across them."""
    person, _ = split_app(code)
    if not person.startswith("union"):
        return None
    return "o" + base64.urlsafe_b64encode(_digest("unionid:", person)).decode()[:27]


def session_key_for(code: str, appid: str | None = None) -> str:
    """Base64 of 16 bytes, like WeChat's, so tests can encrypt legacy payloads with it.
    One per app, with ``appid`` as in ``openid_for``."""
    person, _ = split_app(code)
    return base64.b64encode(_digest(_app_label("session_key:", appid), person)[:16]).decode()


def _error(errcode: int, errmsg: str) -> web.Response:
    # Real errmsgs end in a request id; a gateway that matches on errmsg would break.
    rid = "-".join(secrets.token_hex(4) for _ in range(3))
    return web.json_response({"errcode": errcode, "errmsg": f"{errmsg} rid: {rid}"})


def _check_credentials(state: FakeState, appid: Any, secret: Any) -> FakeApp | web.Response:
    """The app these credentials open, or WeChat's refusal."""
    if not isinstance(appid, str) or not appid:
        return _error(41002, "appid missing")
    if not isinstance(secret, str) or not secret:
        return _error(41004, "appsecret missing")
    app = state.app(appid)
    if app is None:
        return _error(40013, "invalid appid")
    expected = state.secrets.get(appid)
    if expected is not None and not hmac.compare_digest(secret.encode(), expected.encode()):
        return _error(40125, "invalid appsecret")  # never echo the secret back
    return app


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
    app = _check_credentials(state, query.get("appid"), query.get("secret"))
    if isinstance(app, web.Response):
        return app
    app.calls["jscode2session"] += 1
    if code:
        app.js_codes.append(code)
    if query.get("grant_type") != "authorization_code":
        return _error(40002, "invalid grant_type")
    if not code:
        return _error(41008, "missing code")
    if split_app(code)[1] not in (None, app.appid):
        return _error(40029, "invalid code")  # WeChat's answer to another app's code
    if (forced := await _magic(state, code)) is not None:
        return forced
    # A success carries no errcode at all, as WeChat sends it today.
    answer = {
        "openid": state.openid_for(code, app.appid),
        "session_key": state.session_key_for(code, app.appid),
    }
    if (unionid := unionid_for(code)) is not None:
        answer["unionid"] = unionid
    return web.json_response(answer)


async def _token(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    state.calls["token"] += 1
    query = request.query
    app = _check_credentials(state, query.get("appid"), query.get("secret"))
    if isinstance(app, web.Response):
        return app
    app.calls["token"] += 1
    if query.get("grant_type") != "client_credential":
        return _error(40002, "invalid grant_type")
    # Each call replaces the app's previous token, which lives 5 more minutes: why
    # instances sharing an app must use stable_token instead (contract section 6).
    old = app.plain_token
    if old is not None and old in state.tokens:
        state.tokens[old] = min(state.tokens[old], state.clock() + OLD_TOKEN_GRACE)
    app.plain_token = state.issue_token(app)
    return web.json_response({"access_token": app.plain_token, "expires_in": state.token_ttl})


async def _stable_token(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    state.calls["stable_token"] += 1
    body = await _json_body(request)
    if body is None:
        return _error(47001, "data format error")
    app = _check_credentials(state, body.get("appid"), body.get("secret"))
    if isinstance(app, web.Response):
        return app
    app.calls["stable_token"] += 1
    if body.get("grant_type") != "client_credential":
        return _error(40002, "invalid grant_type")
    current, now = app.stable_token, state.clock()
    # `is True`: the field is a JSON boolean; a string "false" must not force a refresh.
    if (
        current is not None
        and body.get("force_refresh") is not True
        and state.token_app(current) is app
    ):
        remaining = math.ceil(state.tokens[current] - now)
        return web.json_response({"access_token": current, "expires_in": remaining})
    if current is not None:
        state.drop_token(current)  # force_refresh kills the previous stable token
    app.stable_token = state.issue_token(app)
    return web.json_response({"access_token": app.stable_token, "expires_in": state.token_ttl})


def _phone_info(app: FakeApp, code: str) -> dict[str, Any]:
    match = _PHONE_RE.fullmatch(split_app(code)[0])
    pure = match.group(2) if match else DEMO_PHONE
    # WeChat documents countryCode as a string but has been seen sending a number.
    country_code: str | int = 86 if match and match.group(1) else "86"
    return {
        # Mainland numbers come without the area code in phoneNumber too.
        "phoneNumber": pure,
        "purePhoneNumber": pure,
        "countryCode": country_code,
        "watermark": {"timestamp": int(time.time()), "appid": app.appid},
    }


async def _getuserphonenumber(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    state.calls["getuserphonenumber"] += 1
    token = request.query.get("access_token", "")
    if not token:
        return _error(41001, "access_token missing")
    # The token names the app, as on WeChat: the call carries no appid.
    if (app := state.token_app(token)) is None:
        return _error(*_INVALID_TOKEN)
    app.calls["getuserphonenumber"] += 1
    body = await _json_body(request)
    if body is None:
        return _error(47001, "data format error")
    code = body.get("code")
    if not isinstance(code, str) or not code:
        return _error(41008, "missing code")
    state.phone_codes.append(code)
    app.phone_codes.append(code)
    if split_app(code)[1] not in (None, app.appid):
        return _error(*_INVALID_TOKEN)  # another app's token for this app's code
    if (forced := await _magic(state, code)) is not None:
        return forced
    return web.json_response({"errcode": 0, "errmsg": "ok", "phone_info": _phone_info(app, code)})


async def _stats(request: web.Request) -> web.Response:
    state = request.app[FAKE_STATE]
    calls = {api: state.calls[api] for api in APIS}
    seen = {"js_codes": list(state.js_codes), "phone_codes": list(state.phone_codes)}
    apps = {appid: app.stats() for appid, app in state.apps.items()}
    return web.json_response({"calls": calls, **seen, "apps": apps})


async def _invalidate_tokens(request: web.Request) -> web.Response:
    # ?appid=A kills only A's tokens: how a test makes one app's token die, not the other's.
    count = request.app[FAKE_STATE].invalidate(request.query.get("appid"))
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
    apps: Mapping[str, str | None] | None = None,
    token_ttl: int = 7200,
    slow_seconds: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
) -> web.Application:
    """The fake as an aiohttp app.

    ``apps`` maps each served appid to its secret (None: any secret); the first is
    the primary app (see ``openid_for``). ``appid``/``secret`` is the one-app form,
    ``apps={appid: secret}``. Callers must send a served appid and its secret
    (else 40013/40125); with no app given, any non-empty appid and secret work.
    ``clock`` drives access-token expiry, so tests can move time without sleeping."""
    if apps is not None and appid is not None:
        raise ValueError("create_app: give apps= or appid=/secret=, not both")
    if appid is None and secret is not None:
        raise ValueError("create_app: secret= needs the appid= it belongs to")
    served = dict(apps) if apps is not None else ({appid: secret} if appid is not None else {})
    app = web.Application(middlewares=[_invalid_url])
    app[FAKE_STATE] = FakeState(served, token_ttl, slow_seconds, clock)
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
    apps: Mapping[str, str | None] | None = None,
) -> None:
    """Serve the fake until interrupted (blocking); what `gateway fake-wechat` runs.
    ``appid``/``secret`` and ``apps`` as in ``create_app``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app(appid=appid, secret=secret, apps=apps)
    served = list(app[FAKE_STATE].secrets)  # appids only: a secret is never logged
    log.warning(
        "FAKE WeChat API server on http://%s:%s - a development aid only, NEVER use in "
        "production: it accepts made-up codes and hands out fake identities (appid check: %s)",
        host,
        port,
        ", ".join(served) or "off",
    )
    web.run_app(app, host=host, port=port, access_log_class=PathOnlyAccessLogger)
