"""The identity assertion: a JWT, signed ES256, that lets an upstream verify the
gateway (contract section 11).

An upstream on a shared network cannot trust ``X-OpenId`` by where it comes
from. With ``identity.assertion`` set, every request forwarded with an identity
carries a short-lived JWT naming the caller (``sub``, ``appid``, ``unionid``)
and the route it was meant for (``aud``, the route prefix), signed with a key
whose public half is served at ``/.well-known/jwks.json``.

No signature per request: an ES256 signature costs tens of microseconds, a
cache lookup well under one. An assertion is kept per (session, route) and
signed again once it is within :data:`REFRESH_BEFORE` of its ``exp`` (or a fifth
of its life, for a short ``ttl``), so what an upstream receives always has a
margin left. The cache is bounded like the verified-token cache.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.auth.tokens import Claims, make_room
from gateway.config.model import AssertionConfig

ALGORITHM = "ES256"
# Re-sign this long before exp (at most a fifth of the ttl): an assertion is
# checked by the upstream some time after it left the gateway.
REFRESH_BEFORE = 60.0
# JWKS answers may be cached this long by upstreams (and their JWK clients):
# a rotation adds a key and waits at least this long before it signs.
JWKS_MAX_AGE = 300


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    """The public half of ``key`` as a JWK (RFC 7517/7518), ``kid`` its RFC 7638
    thumbprint: a stable name derived from the key, the same on every instance."""
    numbers = key.public_key().public_numbers()
    size = (key.curve.key_size + 7) // 8
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(size, "big")),
        "y": _b64(numbers.y.to_bytes(size, "big")),
    }
    # The thumbprint hashes the required members in lexicographic order, no spaces.
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    kid = _b64(hashlib.sha256(canonical).digest())
    return {**members, "kid": kid, "use": "sig", "alg": ALGORITHM}


class Asserter:
    """Signs (and caches) the assertion of one identity on one route."""

    def __init__(
        self,
        config: AssertionConfig,
        issuer: str,
        clock: Callable[[], float],
        max_entries: int = 50_000,
    ) -> None:
        self.header = config.header
        self._ttl = int(config.ttl)
        self._refresh = min(REFRESH_BEFORE, config.ttl / 5)
        self._issuer = issuer
        self._clock = clock
        self._max = max_entries
        # The first key signs; every key is published (rotation).
        self._key = config.keys[0].key
        self.jwks = [public_jwk(k.key) for k in config.keys]
        self._kid = self.jwks[0]["kid"]
        self.jwks_body = json.dumps({"keys": self.jwks}).encode()
        # (session id, route prefix) -> (assertion, when to sign again)
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self.signed = 0  # signatures made (the benchmark and tests read it)

    def assertion(self, who: Claims, audience: str) -> str:
        key = (who.session_id, audience)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and now < hit[1]:
            return hit[0]
        token, exp = self._sign(who, audience, now)
        if hit is None:
            make_room(self._cache, self._max)
        self._cache[key] = (token, exp - self._refresh)
        return token

    def _sign(self, who: Claims, audience: str, now: float) -> tuple[str, float]:
        iat = int(now)
        # Never longer than the session it speaks for.
        exp = min(iat + self._ttl, who.expires_at)
        payload: dict[str, Any] = {
            "iss": self._issuer,
            "aud": audience,
            "sub": who.openid,
            "appid": who.appid,
            "iat": iat,
            "exp": exp,
        }
        if who.unionid:
            payload["unionid"] = who.unionid
        self.signed += 1
        token = jwt.encode(payload, self._key, algorithm=ALGORITHM, headers={"kid": self._kid})
        return token, float(exp)
