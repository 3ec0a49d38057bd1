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

Push, where the store has it (Redis: :meth:`Storage.changes`): a wake-up makes
the worker read the feeds at once instead of at the next poll. The poll stays,
as the catch-up and the only way with SQLite; and after each (re)subscription
the feeds are read once, so a wake-up missed while disconnected is never a
missed revocation. Push and poll only wake one reader, so reads never overlap.

A shared store can be unreachable while the worker goes on serving (contract
section 10). Then the local set is only as good as the last feed read: with
``max_staleness`` set (a shared store), once no read has succeeded for that
long, :meth:`Revocations.check_fresh` refuses tokens (503) until one does, so a
revocation made through another instance cannot go unseen longer than that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from gateway.errors import StorageUnavailable
from gateway.storage import Storage, StorageError

log = logging.getLogger("gateway.sessions")

POLL_INTERVAL = 0.25
PURGE_INTERVAL = 600.0
# After a subscription failed: soon enough to be back within a second or so of
# the store, rare enough to cost nothing while it is down (the poll goes on).
RESUBSCRIBE_DELAY = 1.0


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
        max_staleness: float | None = None,
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
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()  # push: read the feeds now
        self.freshness = Freshness(max_staleness)
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

    def check_fresh(self) -> None:
        """Raise StorageUnavailable (503) when the revocations known here are older
        than ``max_staleness``: a token cannot be judged on them any more. On the
        path of every request with a token: one attribute test."""
        if self.freshness.stale:
            raise StorageUnavailable()

    async def start(self) -> None:
        """Read the feeds, then keep reading them. Without ``max_staleness`` (a
        local store) a first read that fails is fatal, as an unusable file is;
        with it (a shared store) the worker starts degraded and tokens are refused
        until a read succeeds."""
        if self.freshness.max_staleness is None:
            await self.refresh()
            self.freshness.read()
        else:
            await self._read_feeds()
        self._tasks.append(asyncio.create_task(self._reader(), name="revocation-feeds"))
        self._tasks.append(asyncio.create_task(self._follow(), name="revocation-push"))

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.freshness.close()

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

    async def _read_feeds(self) -> None:
        try:
            await self.refresh()
        except StorageError as exc:
            # Serve with what is known; Freshness logs the outage once and,
            # past max_staleness, refuses tokens.
            self.freshness.failed(exc)
        else:
            self.freshness.read()

    async def _reader(self) -> None:
        """The one task that reads the feeds: on a wake-up, or every poll interval."""
        last_purge = self._clock()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            # Cleared before the read: a wake-up during the read means another.
            self._wake.clear()
            await self._read_feeds()
            if self.freshness.up and self._clock() - last_purge > PURGE_INTERVAL:
                last_purge = self._clock()
                try:
                    await self._storage.purge_expired(last_purge)
                except StorageError as exc:
                    log.warning("storage: purging expired revocations failed: %s", exc)
                self._forget_old(last_purge)

    async def _follow(self) -> None:
        """Wake the reader whenever the store says the feeds changed, and once
        after each subscription (the catch-up); subscribe again after a failure."""
        while True:
            changes = self._storage.changes()
            if changes is None:
                return  # no push (SQLite): the poll alone
            try:
                async with contextlib.aclosing(changes):
                    async for _ in changes:
                        self._wake.set()
            except StorageError as exc:
                # The outage itself is reported by the feed reads (Freshness).
                log.debug("revocation push: %s", exc)
            await asyncio.sleep(RESUBSCRIBE_DELAY)

    def _forget_old(self, now: float) -> None:
        cutoff = now - self._retain
        for session_id in [s for s, t in self._revoked.items() if t < cutoff]:
            del self._revoked[session_id]
        for user in [u for u, (_, t) in self._bans.items() if t < cutoff]:
            del self._bans[user]


class Freshness:
    """How recent this worker's view of the feeds is: ``up`` (the last read
    succeeded), the age of the last successful read (``/metrics``), and ``stale``
    (no successful read for ``max_staleness`` seconds; None: never stale).

    The outage is logged once when it starts and once when it ends, not per
    poll. ``stale`` is a flag a timer sets, re-armed by each successful read, so
    the request path tests an attribute instead of reading a clock."""

    def __init__(self, max_staleness: float | None) -> None:
        self.max_staleness = max_staleness
        self.up: bool | None = None  # None: no read tried yet
        # With a bound, nothing is known before the first read: tokens wait for it.
        self.stale = max_staleness is not None
        self._last_read = time.monotonic()  # the start counts as a read for the age
        self._down_since = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def age(self) -> float:
        """Seconds since the last successful read (since the start, before one)."""
        return time.monotonic() - self._last_read

    def read(self) -> None:
        now = time.monotonic()
        if self.up is False:
            log.info(
                "storage: revocations read again after %.1f s of outage", now - self._down_since
            )
        self.up, self._last_read = True, now
        if self.max_staleness is not None:
            self.stale = False
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(self.max_staleness, self._expire)

    def failed(self, exc: StorageError) -> None:
        if self.up is not False:
            self._down_since = time.monotonic()
            bound = self.max_staleness
            then = (
                f"tokens are accepted on what is known for {bound:g} s after the last read "
                "(storage.max_staleness), then refused with 503 until the store is back"
                if bound is not None
                else "serving with the revocations known"
            )
            log.warning("storage: revocations cannot be read (%s); %s", exc, then)
        self.up = False

    def _expire(self) -> None:
        self.stale, self._timer = True, None
        log.warning(
            "storage: no revocation read for %g s (storage.max_staleness): requests "
            "with a token are answered 503 storage_unavailable until the store is back",
            self.max_staleness,
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
