"""Logout and bans: revoked sessions and users, shared through storage, checked in memory.

Every worker keeps the set of revoked session ids and polls storage for new
ones a few times a second, so a logout reaches every worker well within the
contract's 1 s while a proxied request never waits on a storage query.

A ban (``gateway users revoke``) revokes every session of one user at once: the
storage bumps the user's epoch and appends a user event, and each worker keeps,
per (appid, openid), the epoch below which tokens are refused. The same feed
says when a user's phone number changed (``on_phone``: the phone header's cache).

What outlives a request (an open WebSocket) watches its session: the watcher is
called the moment this worker learns of the logout or the ban, by its own hand
or by the poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from gateway.storage import Storage, StorageError

log = logging.getLogger("gateway.sessions")

POLL_INTERVAL = 0.25
PURGE_INTERVAL = 600.0


class Session(Protocol):
    """What a revocation is judged on: a token's session, user and epoch."""

    @property
    def session_id(self) -> str: ...
    @property
    def appid(self) -> str: ...
    @property
    def openid(self) -> str: ...
    @property
    def epoch(self) -> int: ...


class Revocations:
    def __init__(
        self,
        storage: Storage,
        clock: Callable[[], float],
        *,
        retain: float,
        poll_interval: float = POLL_INTERVAL,
        on_phone: Callable[[str, str], None] | None = None,
    ) -> None:
        self._storage = storage
        self._clock = clock
        # A revoked id is remembered locally for `retain` seconds (longer than any
        # token lives); after that its token is expired anyway.
        self._retain = retain
        self._poll_interval = poll_interval
        self._revoked: dict[str, float] = {}
        self._cursor = 0
        # (appid, openid) -> (epoch below which tokens are revoked, when learnt).
        self._bans: dict[tuple[str, str], tuple[int, float]] = {}
        self._event_cursor = 0
        self._on_phone = on_phone
        self._task: asyncio.Task[None] | None = None
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self._user_watchers: dict[tuple[str, str], set[tuple[int, Callable[[], None]]]] = {}

    def is_revoked(self, session: Session) -> bool:
        if session.session_id in self._revoked:
            return True
        # Bans are rare: an empty dict costs the proxy path one truth test.
        if self._bans:
            ban = self._bans.get((session.appid, session.openid))
            return ban is not None and session.epoch < ban[0]
        return False

    def watch(self, session: Session, on_revoked: Callable[[], None]) -> Callable[[], None]:
        """Call ``on_revoked`` once when ``session`` is logged out or its user banned;
        returns the function that stops watching (call it when the socket ends)."""
        session_id, user = session.session_id, (session.appid, session.openid)
        watchers = self._watchers.setdefault(session_id, set())
        watchers.add(on_revoked)
        entry = (session.epoch, on_revoked)
        by_user = self._user_watchers.setdefault(user, set())
        by_user.add(entry)

        def unwatch() -> None:
            watchers.discard(on_revoked)
            if not watchers and self._watchers.get(session_id) is watchers:
                del self._watchers[session_id]
            by_user.discard(entry)
            if not by_user and self._user_watchers.get(user) is by_user:
                del self._user_watchers[user]

        return unwatch

    def _banned_now(self, appid: str, openid: str, epoch: int, now: float) -> None:
        user = (appid, openid)
        known = self._bans.get(user)
        if known is not None and known[0] >= epoch:
            return
        self._bans[user] = (epoch, now)
        watchers = self._user_watchers.get(user)
        for watched_epoch, on_revoked in list(watchers or ()):
            if watched_epoch < epoch:
                self._notify(on_revoked)

    @staticmethod
    def _notify(on_revoked: Callable[[], None]) -> None:
        try:
            on_revoked()
        except Exception:
            log.exception("a revocation watcher failed")

    def _revoked_now(self, session_id: str, now: float) -> None:
        if session_id in self._revoked:
            return
        self._revoked[session_id] = now
        for on_revoked in self._watchers.pop(session_id, ()):
            self._notify(on_revoked)

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
        events, self._event_cursor = await self._storage.user_events_since(self._event_cursor)
        now = self._clock()
        for session_id in ids:
            self._revoked_now(session_id, now)
        for event in events:
            if event.kind == "revoke":
                self._banned_now(event.appid, event.openid, event.epoch, now)
            elif event.kind == "phone" and self._on_phone is not None:
                self._on_phone(event.appid, event.openid)

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
        for user in [u for u, (_, t) in self._bans.items() if t < cutoff]:
            del self._bans[user]
