"""The gateway's errors, and the one place that turns them into JSON responses.

Every failure a client can see is a :class:`GatewayError` carrying the
contract's status and stable ``error`` code (contract section 4)::

    GatewayError
    ├── BadRequest            400 bad_request
    ├── DecryptFailed         400 decrypt_failed
    ├── UnknownApp            400 unknown_app
    ├── AuthError             401 (sends WWW-Authenticate)
    │   ├── TokenMissing      token_missing
    │   ├── TokenInvalid      token_invalid
    │   ├── TokenExpired      token_expired
    │   ├── TokenRevoked      token_revoked
    │   ├── SessionExpired    session_expired
    │   └── InvalidCode       invalid_code (WeChat 40029/40163)
    ├── WechatUserBlocked     403 wechat_user_blocked
    ├── AppForbidden          403 app_forbidden
    ├── NoRoute               404 no_route
    ├── MethodNotAllowed      405 method_not_allowed
    ├── BodyTooLarge          413 body_too_large
    ├── RateLimited           429 rate_limited
    ├── WechatRateLimited     429 wechat_rate_limited
    ├── InternalError         500 internal_error
    ├── UpstreamUnavailable   502 upstream_unavailable
    ├── WechatError           502 wechat_error
    ├── NotReady              503 not_ready
    ├── StorageUnavailable    503 storage_unavailable
    ├── UpstreamTimeout       504 upstream_timeout
    └── WechatTimeout         504 wechat_timeout

Messages are fixed sentences written here or by the raiser; they never carry a
secret, a token or a session key.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, ClassVar

from aiohttp import web


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    default_message: ClassVar[str] = "Internal error."

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        self.message = message or self.default_message
        self.extra = extra
        super().__init__(self.message)

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(GatewayError):
    status, code, default_message = 400, "bad_request", "The request is malformed."


class DecryptFailed(GatewayError):
    status, code, default_message = 400, "decrypt_failed", "The data could not be decrypted."


class UnknownApp(GatewayError):
    status, code, default_message = 400, "unknown_app", "This appid is not served here."


class AuthError(GatewayError):
    status = 401

    def headers(self) -> dict[str, str]:
        # RFC 6750 section 3: a 401 for a bearer-protected resource names the scheme.
        return {
            "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{self.code}"'
        }


class TokenMissing(AuthError):
    code, default_message = "token_missing", "A token is required."

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class TokenInvalid(AuthError):
    code, default_message = "token_invalid", "The token is not valid."


class TokenExpired(AuthError):
    code, default_message = "token_expired", "The token has expired."


class TokenRevoked(AuthError):
    code = "token_revoked"
    default_message = "The token was revoked (a logout, or every session of the user)."


class SessionExpired(AuthError):
    code, default_message = "session_expired", "No WeChat session is stored; log in again."


class InvalidCode(AuthError):
    code, default_message = "invalid_code", "The login code is invalid or was already used."


class WechatUserBlocked(GatewayError):
    status, code, default_message = 403, "wechat_user_blocked", "WeChat refused this user."


class AppForbidden(GatewayError):
    status, code = 403, "app_forbidden"
    default_message = "This route does not take tokens of this mini program."


class NoRoute(GatewayError):
    status, code, default_message = 404, "no_route", "No route matches this path."


class MethodNotAllowed(GatewayError):
    status, code, default_message = 405, "method_not_allowed", "Method not allowed."

    def __init__(self, allowed: tuple[str, ...] = (), message: str | None = None) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)} if self.allowed else {}


class BodyTooLarge(GatewayError):
    status, code, default_message = 413, "body_too_large", "The request body is too large."


class RateLimited(GatewayError):
    status, code, default_message = 429, "rate_limited", "Too many requests."

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class WechatRateLimited(GatewayError):
    status, code, default_message = 429, "wechat_rate_limited", "WeChat is rate limiting us."


class InternalError(GatewayError):
    pass


class UpstreamUnavailable(GatewayError):
    status, code, default_message = 502, "upstream_unavailable", "The upstream is unavailable."


class WechatError(GatewayError):
    status, code, default_message = 502, "wechat_error", "WeChat returned an error."


class NotReady(GatewayError):
    status, code, default_message = 503, "not_ready", "The gateway is not ready."


class StorageUnavailable(GatewayError):
    status, code, default_message = 503, "storage_unavailable", "Storage is unavailable; retry."


class UpstreamTimeout(GatewayError):
    status, code, default_message = 504, "upstream_timeout", "The upstream did not answer in time."


class WechatTimeout(GatewayError):
    status, code, default_message = 504, "wechat_timeout", "WeChat did not answer in time."


# Statuses aiohttp itself produces (parser errors, handler timeouts) mapped onto codes.
_STATUS_CODES = {
    400: "bad_request",
    404: "no_route",
    405: "method_not_allowed",
    413: "body_too_large",
    414: "bad_request",
    431: "bad_request",
    501: "bad_request",
    504: "upstream_timeout",
}


def json_error(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body: dict[str, Any] = {"error": code, "message": message, **extra}
    if request_id:
        body["request_id"] = request_id
    response = web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )
    return response


def error_response(exc: GatewayError, request_id: str | None = None) -> web.Response:
    return json_error(
        exc.status,
        exc.code,
        exc.message,
        request_id=request_id,
        headers={**exc.headers(), **({"X-Request-Id": request_id} if request_id else {})},
        **exc.extra,
    )


def status_error(status: int, message: str | None = None) -> web.Response:
    """A JSON error for a bare status (aiohttp's own 400/413/500...), with a fresh
    request id: a request the parser refused has no trustworthy one of its own."""
    code = _STATUS_CODES.get(status, "internal_error" if status >= 500 else "bad_request")
    text = message or ("Internal error." if status >= 500 else "The request is malformed.")
    request_id = uuid.uuid4().hex
    return json_error(
        status, code, text, request_id=request_id, headers={"X-Request-Id": request_id}
    )
