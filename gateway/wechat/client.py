"""The WeChat server-API client: one long-lived session, errcodes mapped once.

WeChat answers almost every error with HTTP 200 and ``{"errcode": N}``; a missing
errcode means success. :func:`raise_for_errcode` turns errcodes into the
contract's errors in one table, whichever API they came from.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway.config import WechatConfig
from gateway.errors import (
    GatewayError,
    InvalidCode,
    WechatError,
    WechatRateLimited,
    WechatTimeout,
    WechatUserBlocked,
)

log = logging.getLogger("gateway.wechat")

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
    number, pure, country = (
        data.get("phoneNumber"),
        data.get("purePhoneNumber"),
        data.get("countryCode"),
    )
    if not isinstance(number, str) or not isinstance(pure, str):
        raise WechatError("WeChat answered without a phone number.")
    if isinstance(country, bool) or not isinstance(country, str | int):
        raise WechatError("WeChat answered without a country code.")
    return PhoneInfo(number, pure, str(country))


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
    ) -> dict[str, Any]:
        """One WeChat call, never retried here; transport faults become
        WechatTimeout / WechatError, errcodes are raised by raise_for_errcode."""
        started = time.perf_counter()
        outcome = "error"
        try:
            payload = await self._call(method, path, params, body, uses_access_token)
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
            if self._observe is not None:
                self._observe(path, time.perf_counter() - started, outcome)

    async def _call(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: dict[str, Any] | None,
        uses_access_token: bool,
    ) -> dict[str, Any]:
        assert self._session is not None, "WechatClient.start() was not awaited"
        url = self.api_base + path
        try:
            async with self._session.request(method, url, params=params, json=body) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise WechatTimeout() from None
        except (aiohttp.ClientError, OSError):
            # The exception text can contain the URL, whose query holds the secret.
            raise WechatError("WeChat could not be reached.") from None
        if status != 200:
            raise WechatError(f"WeChat answered HTTP {status}.")
        try:
            payload = json.loads(raw)
        except ValueError:
            raise WechatError("WeChat answered with something that is not JSON.") from None
        if not isinstance(payload, dict):
            raise WechatError("WeChat answered with something that is not a JSON object.")
        raise_for_errcode(payload, uses_access_token=uses_access_token)
        return payload

    async def code2session(self, code: str) -> WechatSession:
        payload = await self.call(
            "GET",
            "/sns/jscode2session",
            params={
                "appid": self._config.appid,
                "secret": self._config.secret.reveal(),
                "js_code": code,
                "grant_type": "authorization_code",
            },
        )
        openid, key, unionid = (
            payload.get("openid"),
            payload.get("session_key"),
            payload.get("unionid"),
        )
        if not isinstance(openid, str) or not openid or not isinstance(key, str) or not key:
            raise WechatError("WeChat answered without an openid or session_key.")
        return WechatSession(openid, key, unionid if isinstance(unionid, str) and unionid else None)

    async def stable_token(self, force_refresh: bool) -> tuple[str, int]:
        payload = await self.call(
            "POST",
            "/cgi-bin/stable_token",
            body={
                "grant_type": "client_credential",
                "appid": self._config.appid,
                "secret": self._config.secret.reveal(),
                "force_refresh": force_refresh,
            },
        )
        token, expires_in = payload.get("access_token"), payload.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(expires_in, int):
            raise WechatError("WeChat answered without an access token.")
        return token, expires_in

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
