"""Who is calling: the token header turned into an :class:`Identity`, per route policy.

Fail closed: a token that is present is always verified (except on ``public``
routes, which never look at it), and any doubt is a 401. ``optional`` only
means "anonymous is allowed", never "a bad token is ignored".

The identity a request ends up with lands on its record in one place,
:func:`land` (the access log reads ``request.openid``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy

from gateway.auth.revocations import Revocations
from gateway.auth.tokens import Claims, TokenCodec, VerifiedTokens, bearer_from_header
from gateway.config import Config
from gateway.config.model import AuthPolicy
from gateway.errors import TokenInvalid, TokenMissing, TokenRevoked

if TYPE_CHECKING:
    from gateway.server.request import Request


# Who is calling is the verified token's claims: the object the verified-token
# cache already holds, so a proxied request builds no identity of its own.
Identity = Claims


def land(request: Request, who: Identity | None) -> None:
    """Note who made ``request`` on its record (None: anonymous)."""
    request.openid = who.openid if who is not None else None


class IdentityResolver:
    def __init__(
        self,
        config: Config,
        tokens: TokenCodec,
        revocations: Revocations,
        clock: Callable[[], float],
    ) -> None:
        self._header = config.token.header
        self._bearer = self._header.lower() == "authorization"
        self._tokens = VerifiedTokens(tokens, config.token.leeway)
        self._revocations = revocations
        self._clock = clock

    def identify(self, request: Request, policy: AuthPolicy) -> Identity | None:
        """The caller of ``request`` under ``policy`` (None: anonymous), landed on
        its record; or the contract's 401."""
        who = self._for_route(request.headers, policy)
        land(request, who)
        return who

    def require(self, request: Request) -> Identity:
        """The caller of ``request``, landed on its record, or the contract's 401
        (missing/invalid/expired/revoked)."""
        who = self._verify(request.headers)
        land(request, who)
        return who

    def _verify(self, headers: CIMultiDictProxy[str]) -> Identity:
        values = headers.getall(self._header, ())
        if len(values) > 1:
            # Two token headers: which one an upstream or log would read is unclear.
            raise TokenInvalid("More than one token header.")
        token = bearer_from_header(values[0] if values else None, self._bearer)
        claims = self._tokens.verify(token, self._clock())
        # A shared store unread for storage.max_staleness: 503, not a token judged
        # on revocations that old (one attribute test otherwise). Here, so the
        # proxy path, /auth/verify and every /auth/* call with a token obey it.
        self._revocations.check_fresh()
        if self._revocations.is_revoked(claims):
            raise TokenRevoked()
        return claims

    def _for_route(self, headers: CIMultiDictProxy[str], policy: AuthPolicy) -> Identity | None:
        if policy == "public":
            return None
        if policy == "optional":
            value = headers.get(self._header)
            if value is None or not value.strip():
                return None
        try:
            return self._verify(headers)
        except TokenMissing:
            if policy == "optional":
                return None
            raise
