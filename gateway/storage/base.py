"""The storage interface every backend implements.

Why an ABC: the SQLite store is the embedded default, but teams will want a
shared database later. Every backend runs the same conformance tests
(``tests/storage/test_storage_conformance.py``), so the gateway never depends on one
backend's quirks. Times are passed in (``now``, epoch seconds) rather than read
from the clock here, so tests control time without patching.

Keyed by app: one gateway serves several mini programs (contract section 9), so
a user is one record per (appid, openid) (an openid is only unique inside its
app) and the WeChat access token is one per appid. ``unionid`` is the one key
that crosses apps: :meth:`Storage.users_by_unionid` finds a person's records in
every app. Revocations are keyed by session id alone: a session id is random and
belongs to one token, whatever its app.

Revoking every session of one user (a ban) does not list its tokens, which the
gateway never stores: each user record has an ``epoch``, copied into every token
issued to it, and :meth:`Storage.revoke_user` increments it, so every token of an
older epoch is refused and the next login's token (new epoch) works. Workers learn
of bans, and of phone numbers that changed, from one feed of user events polled
like the revocations (:meth:`Storage.user_events_since`). Epochs compare exactly,
where issue times would be at the mercy of clocks on different machines.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

# How long a ``phone`` event stays in the feed: far longer than any worker's poll
# interval, so a worker that was busy for a while still sees it.
PHONE_EVENT_RETAIN = 3600.0


class StorageError(Exception):
    """The store cannot serve the call (unreachable, read-only, corrupt, busy too long)."""


@dataclass(frozen=True, slots=True)
class UserRecord:
    appid: str
    openid: str
    unionid: str | None
    # session_key is a WeChat secret: it never leaves the server, so it is kept
    # out of repr (logs of a record must not leak it).
    session_key: str | None
    phone_number: str | None
    created_at: float
    last_login_at: float
    # Tokens carry the epoch they were issued in; revoke_user increments it.
    epoch: int = 0

    def __repr__(self) -> str:
        return (
            f"UserRecord(appid={self.appid!r}, openid={self.openid!r}, "
            f"unionid={self.unionid!r}, "
            f"session_key=<hidden>, phone_number={self.phone_number!r}, "
            f"created_at={self.created_at!r}, last_login_at={self.last_login_at!r}, "
            f"epoch={self.epoch!r})"
        )


UserEventKind = Literal["revoke", "phone"]


@dataclass(frozen=True, slots=True)
class UserEvent:
    """Something workers must learn about a user: ``revoke`` (every token of an
    epoch below ``epoch`` is revoked) or ``phone`` (the stored phone number changed;
    ``epoch`` is the record's current one)."""

    kind: UserEventKind
    appid: str
    openid: str
    epoch: int


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A WeChat server-API access token and when the gateway stops using it."""

    token: str
    expires_at: float

    def __repr__(self) -> str:
        return f"AccessToken(token=<hidden>, expires_at={self.expires_at!r})"


class Storage(abc.ABC):
    """Users per app, revoked sessions, each app's shared access token and
    cross-process leases."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and create or migrate the schema. Called once per process."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections. Safe to call twice."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StorageError unless the store can be read *and* written (readiness)."""

    def changes(self) -> AsyncGenerator[None, None] | None:
        """Push, for a store that has it (optional; the default is None: workers poll).

        An async generator that yields once as soon as it listens (read the feeds
        then: that read catches up on whatever was appended while nobody listened)
        and once whenever a revocation or user event may have been appended since.
        It raises StorageError when it stops listening; call again to listen anew.
        A wake-up only: what changed is always read from the feeds, so a lost or
        duplicated wake-up costs time, never a revocation."""
        return None

    # -- users -------------------------------------------------------------
    @abc.abstractmethod
    async def upsert_login(
        self, appid: str, openid: str, unionid: str | None, session_key: str, now: float
    ) -> UserRecord:
        """Record a login to app ``appid``: create the user or update session_key/last_login
        (and unionid when one is given; a login without unionid keeps a known one).
        Durable (committed) when it returns."""

    @abc.abstractmethod
    async def get_user(self, appid: str, openid: str) -> UserRecord | None: ...

    @abc.abstractmethod
    async def set_phone(self, appid: str, openid: str, phone_number: str, now: float) -> None:
        """Store the number on the user, creating the record if it is gone."""

    @abc.abstractmethod
    async def users_by_unionid(self, unionid: str) -> list[UserRecord]:
        """One person's records in every app, ordered by (appid, openid); [] if none."""

    @abc.abstractmethod
    async def revoke_user(
        self, appid: str, openid: str, now: float, until: float
    ) -> UserRecord | None:
        """Revoke every session of one user: increment the record's epoch and append a
        ``revoke`` event (kept until ``until``, when every older token has expired), in
        one transaction. Returns the updated record, or None (nothing written) when
        there is no such user."""

    @abc.abstractmethod
    async def user_events_since(self, cursor: int) -> tuple[list[UserEvent], int]:
        """User events appended after ``cursor``, oldest first, and the new cursor.
        ``cursor=0`` returns every event still stored. ``set_phone`` appends a
        ``phone`` event in the same transaction as the number."""

    # -- sessions ----------------------------------------------------------
    @abc.abstractmethod
    async def revoke_session(self, session_id: str, expires_at: float, now: float) -> None:
        """Revoke one session until ``expires_at`` (the token's exp; after that the
        record may be purged, the token being dead anyway). Idempotent."""

    @abc.abstractmethod
    async def revoked_since(self, cursor: int) -> tuple[list[str], int]:
        """Session ids revoked after ``cursor`` and the new cursor. ``cursor=0`` returns
        every revocation still stored. Workers poll this to keep a local revocation set."""

    @abc.abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Drop revocations whose token has expired, and user events past their
        ``until`` (a ``phone`` event is kept for PHONE_EVENT_RETAIN); returns how
        many rows went."""

    # -- reading everything out and back in (``gateway storage migrate``) ---
    @abc.abstractmethod
    def all_users(self) -> AsyncIterator[UserRecord]:
        """Every user record of every app, in batches (a store may hold millions)."""

    @abc.abstractmethod
    async def import_user(self, user: UserRecord) -> None:
        """Store a record copied from another store: every field as given, except
        that the epoch never goes down (a lower one would bring revoked tokens
        back). Idempotent."""

    @abc.abstractmethod
    async def live_revocations(self, now: float) -> list[tuple[str, float]]:
        """``(session_id, expires_at)`` of every revocation still in force at ``now``
        (the ones ``purge_expired(now)`` would keep), oldest first."""

    @abc.abstractmethod
    async def live_user_events(self, now: float) -> list[tuple[UserEvent, float]]:
        """``(event, until)`` of every user event ``purge_expired(now)`` would keep,
        in feed order."""

    @abc.abstractmethod
    async def append_user_event(self, event: UserEvent, until: float, now: float) -> None:
        """Append a copy of ``event`` as it is (kept until ``until``) to the feed."""

    # -- WeChat access tokens: one per app, shared by all workers ----------
    @abc.abstractmethod
    async def get_access_token(self, appid: str) -> AccessToken | None: ...

    @abc.abstractmethod
    async def put_access_token(self, appid: str, token: AccessToken, fence: int = 0) -> bool:
        """Store app ``appid``'s token, written under lease fence ``fence`` (what
        :meth:`acquire_lease` returned). Refused, nothing written, False, when a write
        with a newer fence was seen for this app (kept even when the token is
        cleared): a holder that stalled past its lease (GC pause, slow WeChat) must
        not overwrite the token of whoever took the lease after it. The check and
        the write are one atomic step. ``fence=0``: an unfenced write, refused once
        any fenced one was seen."""

    @abc.abstractmethod
    async def clear_access_token(self, appid: str, token: str) -> None:
        """Forget app ``appid``'s cached token if it is still ``token`` (a newer one is
        kept)."""

    # -- leases: one holder at a time across processes ---------------------
    @abc.abstractmethod
    async def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> int | None:
        """Take lease ``name`` for ``holder`` if free or expired. Returns its fencing
        number, or None when someone else holds it. Each new holding gets a number
        higher than any before it for ``name`` (1 first, never reused, whatever
        releases or expiries came between); a renewal by the holder keeps its
        number. Writes made under the lease pass the number on, so the store can
        refuse a holder that lost the lease without knowing it (fencing)."""

    @abc.abstractmethod
    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease back if ``holder`` still holds it."""


class SharedCounters(abc.ABC):
    """Counters every instance on one shared store sees: rate limits across
    instances (:mod:`gateway.ratelimit_shared`). Only a store several gateways
    share implements it; on SQLite each process counts on its own. Both calls read
    the store's clock, so instances whose clocks differ still agree."""

    @abc.abstractmethod
    async def take_token(self, key: str, per_second: float, burst: int) -> float:
        """Take one request from bucket ``key`` (``per_second`` refill, ``burst``
        deep) in one atomic step: 0.0 when taken, else the seconds until one would
        be (nothing taken)."""

    @abc.abstractmethod
    async def claim_shares(
        self,
        member: str,
        claims: Sequence[tuple[str, int, int, int]],
        *,
        ttl: float,
        live_for: float,
    ) -> tuple[int, list[int]]:
        """In one atomic step: mark ``member`` (one worker) live and forget members
        silent for ``live_for`` seconds; then for each ``(counter, delta, want,
        limit)``, add ``delta`` to the counter (what this worker spent beyond what
        it had claimed, or, negative, what it gives back), then grant it up to
        ``want`` more of what ``limit`` leaves, adding the grant too. Counters
        expire ``ttl`` seconds after their last change. Returns the number of live
        members and each grant, in order."""
