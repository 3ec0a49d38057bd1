"""The gateway's own tokens: HS256 JWTs, a ``kid`` per key for rotation.

Signing uses ``token.secret`` only; verification accepts it and every
``token.previous_secrets`` entry, picked by the ``kid`` header, so an old key
can be retired on a schedule instead of logging everyone out at once.
Only HS256 is accepted: pyjwt is given the one algorithm explicitly, which
rejects ``none`` and algorithm-confusion tricks.

Claims beyond the registered ones: ``sid`` (the session, for logout), ``uid``
(unionid), ``appid`` (the mini program; a token from a single-app release has
none and belongs to the default app, the first configured) and ``epoch`` (the
user's epoch at issue, when above 0: ``gateway users revoke`` bumps it).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.config import Config, Secret, TokenConfig
from gateway.errors import TokenExpired, TokenInvalid, TokenMissing

ALGORITHM = "HS256"
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "sub", "sid"]
# A JWT is three base64url parts; anything much longer is garbage or abuse.
MAX_TOKEN_LENGTH = 4096
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def key_id(secret: Secret) -> str:
    """A stable, non-reversible name for a key (HMAC of a label under the key)."""
    digest = hmac.new(secret.reveal().encode(), b"wx-gateway key id", hashlib.sha256)
    return digest.hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Claims:
    openid: str
    unionid: str | None
    session_id: str
    issued_at: int
    expires_at: int
    appid: str
    epoch: int = 0


class TokenCodec:
    """Issues and verifies tokens with the keys compiled once from the config."""

    def __init__(self, config: TokenConfig, appids: Sequence[str]) -> None:
        """``appids``: the configured apps, the default (first) one first."""
        self._config = config
        self._default_appid = appids[0]
        self._appids = frozenset(appids)
        self._signing_key = config.secret.reveal().encode()
        self._signing_kid = key_id(config.secret)
        self._keys: dict[str, bytes] = {
            key_id(s): s.reveal().encode() for s in (*config.previous_secrets, config.secret)
        }
        self.ttl = int(config.ttl)

    @classmethod
    def for_config(cls, config: Config) -> TokenCodec:
        return cls(config.token, [app.appid for app in config.wechat.apps])

    def issue(
        self,
        openid: str,
        unionid: str | None,
        now: float,
        *,
        appid: str | None = None,
        epoch: int = 0,
    ) -> tuple[str, Claims]:
        """A token for ``openid`` of app ``appid`` (None: the default app)."""
        appid = appid or self._default_appid
        claims = Claims(
            openid=openid,
            unionid=unionid,
            session_id=secrets.token_urlsafe(16),
            issued_at=int(now),
            expires_at=int(now) + self.ttl,
            appid=appid,
            epoch=epoch,
        )
        payload: dict[str, Any] = {
            "sub": claims.openid,
            "iss": self._config.issuer,
            "iat": claims.issued_at,
            "exp": claims.expires_at,
            "sid": claims.session_id,
            "appid": appid,
        }
        if unionid:
            payload["uid"] = unionid
        if epoch:
            payload["epoch"] = epoch
        token = jwt.encode(
            payload, self._signing_key, algorithm=ALGORITHM, headers={"kid": self._signing_kid}
        )
        return token, claims

    def verify(self, token: str, now: float) -> Claims:
        """Claims of a valid token; TokenInvalid / TokenExpired otherwise."""
        if len(token) > MAX_TOKEN_LENGTH or not _COMPACT_JWS.fullmatch(token):
            # Only the compact form, base64url without padding (RFC 7515 2): a
            # decoder that tolerates `=` would accept variants of one token.
            raise TokenInvalid()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenInvalid() from None
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenInvalid("The token was not signed by a known key.")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                issuer=self._config.issuer,
                leeway=self._config.leeway,
                # Time claims are judged below against the injected clock only, so
                # one request has one "now" (and tests control it).
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired() from None
        except jwt.PyJWTError:
            raise TokenInvalid() from None
        exp, iat = payload["exp"], payload["iat"]
        if not all(isinstance(v, int) for v in (exp, iat)):
            raise TokenInvalid()
        if exp + self._config.leeway <= now:
            raise TokenExpired()
        if iat > now + self._config.leeway:
            raise TokenInvalid("The token was issued in the future.")
        sub, sid, uid = payload["sub"], payload["sid"], payload.get("uid")
        if not isinstance(sub, str) or not sub or not isinstance(sid, str) or not sid:
            raise TokenInvalid()
        # sub and uid become header values upstream: no control characters, ever.
        if _CONTROL.search(sub) or (isinstance(uid, str) and _CONTROL.search(uid)):
            raise TokenInvalid()
        appid = payload.get("appid", self._default_appid)
        if not isinstance(appid, str) or appid not in self._appids:
            # Signed by us, for an app no longer configured (or not a string).
            raise TokenInvalid("The token's app is not configured.")
        epoch = payload.get("epoch", 0)
        if type(epoch) is not int or epoch < 0:
            raise TokenInvalid()
        return Claims(sub, uid if isinstance(uid, str) else None, sid, iat, exp, appid, epoch)


def make_room(cache: dict[Any, Any], limit: int) -> None:
    """Before adding to a bounded per-worker cache: when it holds ``limit``
    entries, drop the oldest tenth in one go (dicts keep insertion order), so
    eviction costs nothing on most additions."""
    if len(cache) >= limit:
        for old in list(cache)[: limit // 10 or 1]:
            del cache[old]


class VerifiedTokens:
    """Claims of tokens already verified, keyed by the exact token string.

    Verifying an HS256 JWT (base64, JSON, HMAC) is a large share of a proxied
    request's cost, and a mini program sends the same token for hours. The
    signature of a given string never changes verdict while the keys are fixed,
    so a hit only re-checks ``exp`` against the injected clock (revocation is
    checked by the caller on every request). Bounded: when full, the oldest
    entries go first.
    """

    def __init__(self, codec: TokenCodec, leeway: float, max_entries: int = 50_000) -> None:
        self._codec = codec
        self._leeway = leeway
        self._max = max_entries
        self._claims: dict[str, Claims] = {}

    def verify(self, token: str, now: float) -> Claims:
        claims = self._claims.get(token)
        if claims is None:
            claims = self._codec.verify(token, now)
            make_room(self._claims, self._max)
            self._claims[token] = claims
        elif claims.expires_at + self._leeway <= now:
            del self._claims[token]
            raise TokenExpired()
        return claims


def bearer_from_header(value: str | None, bearer: bool) -> str:
    """The token carried by the token header's value, or TokenMissing / TokenInvalid.

    With ``Authorization`` the value is ``Bearer <token>``; a custom header carries
    the bare token."""
    if value is None or not value.strip():
        raise TokenMissing()
    value = value.strip()
    if not bearer:
        return value
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenInvalid("The Authorization header must be 'Bearer <token>'.")
    return token.strip()
