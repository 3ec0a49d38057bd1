"""The WeChat server-API client: one long-lived session, errcodes mapped once.

WeChat answers almost every error with HTTP 200 and ``{"errcode": N}``; a missing
errcode means success. :func:`raise_for_errcode` turns errcodes into the
contract's errors in one table, whichever API they came from.

SECURITY: ``wechat.api_base`` is trusted for who a user is, and for nothing
else (docs/security.md, "The WeChat trust boundary"). A redirect is never
followed: the request carries the app secret (jscode2session's query,
stable_token's body) or an access token, and a 3xx would hand them, and the
choice of openid, to whoever the Location names. An answer is read up to a few
KiB and no further, uncompressed (a compressed answer could expand past any
cap before it is counted), and every field is checked against WeChat's
documented shape (:mod:`gateway.wechat.shapes`). Each failure is 502
``wechat_error``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config import AppConfig, WechatConfig
from gateway.errors import (
    GatewayError,
    InvalidCode,
    WechatError,
    WechatRateLimited,
    WechatTimeout,
    WechatUserBlocked,
)
from gateway.wechat import shapes

log = logging.getLogger("gateway.wechat")

# The most bytes read of an answer. jscode2session answers ~150 bytes, stable_token
# ~200, the phone API ~300 (errmsgs are short): 4 KiB is many times that, and
# small enough that a hostile answer costs nothing to refuse.
MAX_ANSWER_BYTES = 4 * 1024
# errcodes meaning "the access token is bad": refetch once, retry once.
ACCESS_TOKEN_ERRCODES = frozenset({40001, 40014, 42001})
_ERRCODE_ERRORS: dict[int, type[GatewayError]] = {
    40029: InvalidCode,  # invalid code
    40163: InvalidCode,  # code already used
    45011: WechatRateLimited,
    40226: WechatUserBlocked,  # high-risk user
}


class AccessTokenRejected(Exception):
    """WeChat refused the access token (40001/40014/42001)."""

    def __init__(self, errcode: int) -> None:
        super().__init__(f"access token rejected (errcode {errcode})")
        self.errcode = errcode


def raise_for_errcode(payload: dict[str, Any], *, uses_access_token: bool = False) -> None:
    errcode = payload.get("errcode", 0)
    if not isinstance(errcode, int) or isinstance(errcode, bool):
        raise WechatError("WeChat answered with a malformed errcode.")
    if errcode == 0:
        return
    if uses_access_token and errcode in ACCESS_TOKEN_ERRCODES:
        raise AccessTokenRejected(errcode)
    error = _ERRCODE_ERRORS.get(errcode, WechatError)
    # errmsg comes from WeChat and may echo request parameters; it is logged by
    # code only and never returned.
    log.info("WeChat errcode %s", errcode)
    raise error(f"WeChat returned errcode {errcode}.", wechat_errcode=errcode)


@dataclass(frozen=True, slots=True)
class WechatSession:
    openid: str
    session_key: str
    unionid: str | None

    def __repr__(self) -> str:
        return (
            f"WechatSession(openid={self.openid!r}, session_key=<hidden>, unionid={self.unionid!r})"
        )


@dataclass(frozen=True, slots=True)
class PhoneInfo:
    phone_number: str
    pure_phone_number: str
    country_code: str

    def as_json(self) -> dict[str, str]:
        return {
            "phone_number": self.phone_number,
            "pure_phone_number": self.pure_phone_number,
            "country_code": self.country_code,
        }


def phone_info_from(data: dict[str, Any]) -> PhoneInfo:
    """WeChat's phone fields (current API's phone_info, or a decrypted legacy
    payload). countryCode arrives as a string or a number; it leaves as a string."""
    return PhoneInfo(*shapes.phone_fields(data))


class WechatClient:
    def __init__(
        self,
        config: WechatConfig,
        api_base: str | None = None,
        observe: Callable[[str, float, str], None] | None = None,
    ) -> None:
        self._config = config
        # observe(api path, seconds, outcome): "ok", "timeout", "error" or "errcode".
        self._observe = observe
        self.api_base = (api_base or config.api_base).rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self._config.timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
            # Answers are counted as they arrive (MAX_ANSWER_BYTES): compressed
            # ones are refused rather than expanded, and not asked for.
            auto_decompress=False,
            headers={"Accept-Encoding": "identity"},
            trust_env=False,  # never a proxy from the environment between us and WeChat
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
        uses_access_token: bool = False,
        limit: int = MAX_ANSWER_BYTES,
    ) -> dict[str, Any]:
        """One WeChat call, never retried here; transport faults become
        WechatTimeout / WechatError, errcodes are raised by raise_for_errcode."""
        started = time.perf_counter()
        outcome = "error"
        try:
            payload = await self._call(method, path, params, body, uses_access_token, limit)
            outcome = "ok"
            return payload
        except WechatTimeout:
            outcome = "timeout"
            raise
        except AccessTokenRejected:
            outcome = "errcode"
            raise
        except GatewayError as exc:
            outcome = "errcode" if "wechat_errcode" in exc.extra else "error"
            raise
        finally:
            seconds = time.perf_counter() - started
            # The path only: the query and body carry the secret or an access token.
            log.debug("WeChat %s %s: %s in %.3f s", method, path, outcome, seconds)
            if self._observe is not None:
                self._observe(path, seconds, outcome)

    async def _call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: dict[str, Any] | None,
        uses_access_token: bool,
        limit: int,
    ) -> dict[str, Any]:
        assert self._session is not None, "WechatClient.start() was not awaited"
        url = self.api_base + path
        try:
            async with self._session.request(
                method, url, params=params, json=body, allow_redirects=False
            ) as resp:
                raw = await _read_answer(resp, limit)
        except TimeoutError:
            raise WechatTimeout() from None
        except (aiohttp.ClientError, OSError):
            # The exception text can contain the URL, whose query holds the secret.
            raise WechatError("WeChat could not be reached.") from None
        payload = shapes.parse_answer(raw)
        raise_for_errcode(payload, uses_access_token=uses_access_token)
        return payload

    async def code2session(self, app: AppConfig, code: str) -> WechatSession:
        payload = await self.call(
            "GET",
            "/sns/jscode2session",
            params={
                "appid": app.appid,
                "secret": app.secret.reveal(),
                "js_code": code,
                "grant_type": "authorization_code",
            },
        )
        return WechatSession(
            shapes.identifier(payload.get("openid"), "openid"),
            shapes.session_key(payload.get("session_key")),
            shapes.optional_identifier(payload.get("unionid"), "unionid"),
        )

    async def stable_token(self, app: AppConfig, force_refresh: bool) -> tuple[str, int]:
        payload = await self.call(
            "POST",
            "/cgi-bin/stable_token",
            body={
                "grant_type": "client_credential",
                "appid": app.appid,
                "secret": app.secret.reveal(),
                "force_refresh": force_refresh,
            },
        )
        return (
            shapes.access_token(payload.get("access_token")),
            shapes.expires_in(payload.get("expires_in")),
        )

    async def phone_number(self, code: str, access_token: str) -> PhoneInfo:
        payload = await self.call(
            "POST",
            "/wxa/business/getuserphonenumber",
            params={"access_token": access_token},
            body={"code": code},
            uses_access_token=True,
        )
        info = payload.get("phone_info")
        if not isinstance(info, dict):
            raise WechatError("WeChat answered without phone_info.")
        return phone_info_from(info)


async def _read_answer(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of a 200 answer, at most ``limit`` bytes, or WechatError.

    Nothing past the limit is read: the connection is closed instead, so a
    50 MB answer costs ``limit`` bytes, not 50 MB.
    """
    if resp.status != 200:
        resp.close()
        if 300 <= resp.status < 400:
            raise WechatError(f"WeChat answered a redirect (HTTP {resp.status}); not followed.")
        raise WechatError(f"WeChat answered HTTP {resp.status}.")
    if resp.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        resp.close()
        raise WechatError("WeChat answered with a compressed body, which was not asked for.")
    if resp.content_length is not None and resp.content_length > limit:
        resp.close()
        raise WechatError(f"WeChat's answer is larger than {limit} bytes.")
    body = bytearray()
    while chunk := await resp.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            resp.close()
            raise WechatError(f"WeChat's answer is larger than {limit} bytes.")
    return bytes(body)
