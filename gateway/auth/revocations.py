"""Logout: revoked session ids, shared through storage, checked in memory.

Every worker keeps the set of revoked session ids and polls storage for new
ones a few times a second, so a logout reaches every worker well within the
contract's 1 s while a proxied request never waits on a storage query.

What outlives a request (an open WebSocket) watches its session id: the
watcher is called the moment this worker learns of the revocation, by its own
logout or by the poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from gateway.storage import Storage, StorageError

log = logging.getLogger("gateway.sessions")

POLL_INTERVAL = 0.25
PURGE_INTERVAL = 600.0


class Revocations:
    def __init__(
        self,
        storage: Storage,
        clock: Callable[[], float],
        *,
        retain: float,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._storage = storage
        self._clock = clock
        # A revoked id is remembered locally for `retain` seconds (longer than any
        # token lives); after that its token is expired anyway.
        self._retain = retain
        self._poll_interval = poll_interval
        self._revoked: dict[str, float] = {}
        self._cursor = 0
        self._task: asyncio.Task[None] | None = None
        self._watchers: dict[str, set[Callable[[], None]]] = {}

    def is_revoked(self, session_id: str) -> bool:
        return session_id in self._revoked

    def watch(self, session_id: str, on_revoked: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_revoked`` once when ``session_id`` is revoked; returns the
        function that stops watching (call it when the watcher's socket ends)."""
        watchers = self._watchers.setdefault(session_id, set())
        watchers.add(on_revoked)

        def unwatch() -> None:
            watchers.discard(on_revoked)
            if not watchers and self._watchers.get(session_id) is watchers:
                del self._watchers[session_id]

        return unwatch

    def _revoked_now(self, session_id: str, now: float) -> None:
        if session_id in self._revoked:
            return
        self._revoked[session_id] = now
        for on_revoked in self._watchers.pop(session_id, ()):
            try:
                on_revoked()
            except Exception:
                log.exception("a revocation watcher failed")

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._poll(), name="revocation-poll")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def revoke(self, session_id: str, expires_at: float) -> None:
        """Store the revocation (durable before it returns), then apply it here."""
        now = self._clock()
        await self._storage.revoke_session(session_id, expires_at, now)
        self._revoked_now(session_id, now)

    async def refresh(self) -> None:
        ids, self._cursor = await self._storage.revoked_since(self._cursor)
        now = self._clock()
        for session_id in ids:
            self._revoked_now(session_id, now)

    async def _poll(self) -> None:
        last_purge = self._clock()
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.refresh()
                if self._clock() - last_purge > PURGE_INTERVAL:
                    last_purge = self._clock()
                    await self._storage.purge_expired(last_purge)
                    self._forget_old(last_purge)
            except StorageError as exc:
                # Keep serving with what is known; readiness reports the storage fault.
                log.warning("revocation poll failed: %s", exc)

    def _forget_old(self, now: float) -> None:
        cutoff = now - self._retain
        for session_id in [s for s, t in self._revoked.items() if t < cutoff]:
            del self._revoked[session_id]
