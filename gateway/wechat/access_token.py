"""WeChat access tokens: cached, shared by every worker, fetched by one at a time.

The token lives in storage so all workers (and gateways on one database) share
it. A cross-process lease in storage makes one caller fetch while the others
wait for the result: ``stable_token`` is rate limited, and a thundering herd
at expiry would burn the quota. ``stable_token`` is used rather than
``cgi-bin/token`` because it does not invalidate the token others hold.

The lease expires (a holder may die), so a holder that stalled past it (a GC
pause, a slow WeChat) may wake up after another took the lease over and stored
a newer token. Each holding carries a fencing number and the store refuses a
write older than the newest it has seen: the late write is dropped and the
stalled holder takes the stored token instead.

Each app (appid) has its own token, so one :class:`AccessTokens` serves one app:
its stored token, its cache, its lease. Two apps never wait for each other.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.config import AppConfig
from gateway.errors import WechatError, WechatTimeout
from gateway.storage import AccessToken, Storage
from gateway.wechat.client import AccessTokenRejected, WechatClient

log = logging.getLogger("gateway.wechat")

LEASE_PREFIX = "wechat-access-token"
# Treat a token as expired this long before WeChat would (never more than a tenth of its life).
MAX_MARGIN = 300.0
WAIT_STEP = 0.05
T = TypeVar("T")


def lease_name(appid: str) -> str:
    """The storage lease that makes one caller at a time fetch app ``appid``'s token."""
    return f"{LEASE_PREFIX}:{appid}"


class AccessTokens:
    """App ``appid``'s access token."""

    def __init__(
        self,
        client: WechatClient,
        storage: Storage,
        clock: Callable[[], float],
        *,
        app: AppConfig,
        lease_ttl: float,
        on_fetch: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.appid = app.appid
        self._lease = lease_name(app.appid)
        self._client = client
        self._on_fetch = on_fetch  # called with "refresh" (rejected token) or "expired"
        self._storage = storage
        self._clock = clock
        self._lease_ttl = lease_ttl
        self._holder = secrets.token_hex(8)
        self._cached: AccessToken | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0

    def _usable(self, token: AccessToken | None, not_this: str | None) -> bool:
        return token is not None and token.expires_at > self._clock() and token.token != not_this

    async def get(self, *, not_this: str | None = None) -> str:
        """A valid token; ``not_this`` names one WeChat just rejected."""
        cached = self._cached
        if cached is not None and self._usable(cached, not_this):
            return cached.token
        async with self._lock:  # single flight inside this process ...
            deadline = self._clock() + self._lease_ttl * 2
            while True:
                stored = await self._storage.get_access_token(self.appid)
                if stored is not None and self._usable(stored, not_this):
                    self._cached = stored
                    return stored.token
                # ... and across processes through the storage lease.
                fence = await self._storage.acquire_lease(
                    self._lease, self._holder, self._lease_ttl, self._clock()
                )
                if fence is not None:
                    try:
                        # The previous holder may have stored a fresh token just
                        # before releasing: look once more before calling WeChat.
                        stored = await self._storage.get_access_token(self.appid)
                        if stored is not None and self._usable(stored, not_this):
                            self._cached = stored
                            return stored.token
                        return await self._fetch(fence, force=not_this is not None)
                    finally:
                        await self._storage.release_lease(self._lease, self._holder)
                if self._clock() > deadline:
                    raise WechatTimeout("Timed out waiting for another worker's access token.")
                await asyncio.sleep(WAIT_STEP)

    async def _fetch(self, fence: int, *, force: bool) -> str:
        self.fetches += 1
        if self._on_fetch is not None:
            self._on_fetch("refresh" if force else "expired")
        token, expires_in = await self._client.stable_token(self.app, force_refresh=force)
        margin = min(MAX_MARGIN, expires_in / 10)
        entry = AccessToken(token, self._clock() + expires_in - margin)
        if not await self._storage.put_access_token(self.appid, entry, fence):
            # We lost the lease while WeChat answered, and a newer holder stored its
            # token: that one is the app's token now (ours may be the one it replaced).
            log.warning(
                "access token of %s: lease lost mid-fetch; using the newer token", self.appid
            )
            stored = await self._storage.get_access_token(self.appid)
            if stored is not None and self._usable(stored, None):
                entry = stored
        self._cached = entry
        return entry.token

    async def invalidate(self, token: str) -> None:
        if self._cached is not None and self._cached.token == token:
            self._cached = None
        await self._storage.clear_access_token(self.appid, token)

    async def call(self, api: Callable[[str], Awaitable[T]]) -> T:
        """Run ``api(token)``; on a rejected token refetch once and retry once."""
        token = await self.get()
        try:
            return await api(token)
        except AccessTokenRejected:
            await self.invalidate(token)
        token = await self.get(not_this=token)
        try:
            return await api(token)
        except AccessTokenRejected as exc:
            await self.invalidate(token)
            raise WechatError(
                f"WeChat rejected a fresh access token (errcode {exc.errcode}).",
                wechat_errcode=exc.errcode,
            ) from None
