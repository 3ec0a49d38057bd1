"""The gateway's own ``/auth/*`` endpoints (contract section 4).

The WeChat ``session_key`` goes from jscode2session straight into storage and
is read back only to decrypt legacy payloads; no response, log line or error
ever carries it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from gateway.auth.assertion import Asserter
from gateway.auth.identity import Identity, IdentityResolver, land
from gateway.auth.phones import MISSING
from gateway.config import AppConfig, Config
from gateway.config.model import AuthPolicy
from gateway.config.reserved import is_reserved
from gateway.errors import (
    AppForbidden,
    BadRequest,
    BodyTooLarge,
    DecryptFailed,
    SessionExpired,
    UnknownApp,
)
from gateway.proxy.headers import HeaderRules
from gateway.proxy.paths import BadPath, normalise, split_target
from gateway.proxy.routing import Router
from gateway.ratelimit import LoginLimiter
from gateway.wechat import crypto
from gateway.wechat.client import PhoneInfo, phone_info_from

if TYPE_CHECKING:
    from gateway.runtime.services import Services
    from gateway.server.request import Request

MAX_AUTH_BODY = 64 * 1024  # contract section 8
MAX_CODE_LENGTH = 1024
MAX_ENCRYPTED_LENGTH = 48 * 1024

# An own endpoint: the request in, its (small, whole) response out.
Endpoint = Callable[["Request"], Awaitable[web.StreamResponse]]


async def read_json_object(request: Request, limit: int = MAX_AUTH_BODY) -> dict[str, Any]:
    """The body as a JSON object, read with a hard size limit."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge()
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge()
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        # RecursionError: a few KiB of nested brackets exhaust the decoder's stack.
        raise BadRequest("The body must be a JSON object.") from None
    if not isinstance(value, dict):
        raise BadRequest("The body must be a JSON object.")
    return value


def string_field(body: dict[str, Any], name: str, max_length: int) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'{name}' must be a non-empty string.")
    if len(value) > max_length:
        raise BadRequest(f"'{name}' is longer than {max_length} characters.")
    if not (value.isascii() and value.isprintable()):
        # WeChat codes, ciphertexts and IVs are printable ASCII; anything else
        # (a lone surrogate, control bytes) could not reach WeChat intact.
        raise BadRequest(f"'{name}' must be printable ASCII.")
    return value


class AuthEndpoints:
    def __init__(
        self,
        config: Config,
        services: Services,
        identity: IdentityResolver,
        rules: HeaderRules,
        router: Router,
        asserter: Asserter | None = None,
    ) -> None:
        self._config = config
        self._asserter = asserter
        self._router = router
        self._services = services
        self._identity = identity
        self._rules = rules
        rate = config.rate_limits.login_per_ip
        # Across instances on a shared store (one call per login), per process otherwise.
        self._login_limiter = (
            LoginLimiter(rate, services.storage, ipv6_prefix=config.rate_limits.ipv6_prefix)
            if rate
            else None
        )

    def endpoints(self) -> dict[str, dict[str, Endpoint]]:
        return {
            "/auth/login": {"POST": self.login},
            "/auth/logout": {"POST": self.logout},
            "/auth/me": {"GET": self.me},
            "/auth/phone": {"POST": self.phone},
            "/auth/decrypt": {"POST": self.decrypt},
            "/auth/verify": {"GET": self.verify, "HEAD": self.verify},
        }

    async def login(self, request: Request) -> web.StreamResponse:
        if self._login_limiter is not None:
            await self._login_limiter.check_client(
                self._rules.client_ip(request.headers, request.remote)
            )
        body = await read_json_object(request)
        code = string_field(body, "code", MAX_CODE_LENGTH)
        app = self._app_of(body)
        services = self._services
        session = await services.wechat.code2session(app, code)
        user = await services.storage.upsert_login(
            app.appid, session.openid, session.unionid, session.session_key, services.clock()
        )
        services.phones.remember(user.appid, user.openid, user.phone_number)
        token, claims = services.tokens.issue(
            user.openid, user.unionid, services.clock(), appid=app.appid, epoch=user.epoch
        )
        land(request, claims)
        return web.json_response(
            {
                "token": token,
                "token_type": "Bearer",
                "expires_in": claims.expires_at - claims.issued_at,
                "openid": user.openid,
                "unionid": user.unionid,
            }
        )

    def _app_of(self, body: dict[str, Any]) -> AppConfig:
        """The app a login is for: ``appid`` from the body, optional with one app."""
        apps = self._config.wechat
        if "appid" not in body or body["appid"] is None:
            if len(apps.apps) > 1:
                raise BadRequest("'appid' is required: this gateway serves several mini programs.")
            return apps.default_app
        appid = body["appid"]
        if not isinstance(appid, str) or not appid.strip():
            raise BadRequest("'appid' must be a non-empty string.")
        app = apps.app(appid)
        if app is None:
            raise UnknownApp()
        return app

    async def logout(self, request: Request) -> web.StreamResponse:
        who = self._identity.require(request)
        await self._services.sessions.revoke(who.session_id, who.expires_at)
        self._services.metrics.revocations += 1
        return web.json_response({"ok": True})

    async def me(self, request: Request) -> web.StreamResponse:
        who = self._identity.require(request)
        user = await self._services.storage.get_user(who.appid, who.openid)
        return web.json_response(
            {
                "openid": who.openid,
                "unionid": (user.unionid if user else None) or who.unionid,
                "phone_number": user.phone_number if user else None,
            }
        )

    async def phone(self, request: Request) -> web.StreamResponse:
        who = self._identity.require(request)
        body = await read_json_object(request)
        if "code" in body:
            code = string_field(body, "code", MAX_CODE_LENGTH)
            wechat = self._services.wechat
            tokens = self._services.access_tokens[who.appid]
            info = await tokens.call(lambda t: wechat.phone_number(code, t))
        elif "encrypted_data" in body or "iv" in body:
            data = await self._decrypt(who, body)
            try:
                info = phone_info_from(data)
            except Exception:
                raise DecryptFailed("The decrypted data holds no phone number.") from None
        else:
            raise BadRequest("Send {'code'} or {'encrypted_data', 'iv'}.")
        await self._store_phone(who, info)
        return web.json_response(info.as_json())

    async def decrypt(self, request: Request) -> web.StreamResponse:
        who = self._identity.require(request)
        data = await self._decrypt(who, await read_json_object(request))
        return web.json_response({"data": data})

    async def verify(self, request: Request) -> web.StreamResponse:
        """Forward-auth (nginx ``auth_request``, Traefik ForwardAuth, Caddy
        ``forward_auth``): 200 with the identity headers, or the 401 errors.

        From a trusted proxy, the original URI (``X-Forwarded-Uri``, else
        ``X-Original-URI``) picks the route whose ``auth`` policy applies, so
        ``public`` and ``optional`` routes behave as when proxied; without it,
        or from anyone else, a valid token is required.
        """
        policy: AuthPolicy = "required"
        route = None
        original = self._original_uri(request)
        if original is not None:
            try:
                path = normalise(split_target(original)[0])
            except BadPath as exc:
                raise BadRequest(f"Bad original URI: {exc}.") from None
            route = None if is_reserved(path.match) else self._router.match(path.match)
            if route is not None:
                policy = route.auth
        who = self._identity.identify(request, policy)
        if who is None:
            return web.json_response({"openid": None, "unionid": None})
        if route is not None and route.apps is not None and who.appid not in route.apps:
            # As the proxied request would be answered (a token of another app).
            raise AppForbidden()
        headers = {self._rules.openid_header: who.openid, self._rules.appid_header: who.appid}
        if who.unionid:
            headers[self._rules.unionid_header] = who.unionid
        if self._rules.phone_header is not None:
            phone = await self._phone_of(who)
            if phone:
                headers[self._rules.phone_header] = phone
        if self._asserter is not None:
            # For the route the proxy named; without one, "/" (no route's prefix
            # but the root's, so an upstream checking its own aud refuses it).
            audience = route.prefix if route is not None else "/"
            headers[self._asserter.header] = self._asserter.assertion(who, audience)
        # The bodies keep the contract's fields; the app is in X-AppId.
        return web.json_response({"openid": who.openid, "unionid": who.unionid}, headers=headers)

    async def _phone_of(self, who: Identity) -> str | None:
        phones = self._services.phones
        cached = phones.cached(who.appid, who.openid)
        if cached is MISSING:
            return await phones.load(who.appid, who.openid)
        return cast("str | None", cached)

    def _original_uri(self, request: Request) -> str | None:
        if not self._rules.is_trusted(request.remote):
            return None  # anyone could claim the URI of a public route
        for name in ("X-Forwarded-Uri", "X-Original-URI"):
            values = request.headers.getall(name, ())
            if len(values) > 1 or any(" " in v or "\t" in v for v in values):
                # A proxy that appends rather than replaces would let the client's
                # own value through: which one is the original is unknowable. (A
                # URI has no spaces; a folded "a, b" list has.)
                raise BadRequest(f"More than one {name}, or not a URI.")
            if values and values[0]:
                return values[0]
        return None

    async def _decrypt(self, who: Identity, body: dict[str, Any]) -> dict[str, Any]:
        encrypted = string_field(body, "encrypted_data", MAX_ENCRYPTED_LENGTH)
        iv = string_field(body, "iv", 64)
        user = await self._services.storage.get_user(who.appid, who.openid)
        if user is None or not user.session_key:
            raise SessionExpired()
        try:
            # The watermark must name the token's app: data encrypted for another
            # mini program of the same person is refused.
            data: dict[str, Any] = crypto.decrypt_payload(
                user.session_key, encrypted, iv, who.appid
            )
        except crypto.MalformedInput:
            raise BadRequest("encrypted_data or iv is not valid base64.") from None
        except crypto.DecryptFailed:
            raise DecryptFailed() from None
        return data

    async def _store_phone(self, who: Identity, info: PhoneInfo) -> None:
        services = self._services
        await services.storage.set_phone(who.appid, who.openid, info.phone_number, services.clock())
        services.phones.remember(who.appid, who.openid, info.phone_number)
