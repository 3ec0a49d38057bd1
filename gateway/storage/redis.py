"""The shared store: Redis, for several gateway instances acting as one.

Why it is shaped this way:

* Every key starts with ``prefix`` (``storage.prefix``, default ``wxgw:``), so
  several gateways share one Redis without seeing each other's data.
* Writes the interface calls atomic are Lua scripts (``redis_lua``): a login
  returns its record with its epoch, a ban bumps the epoch and appends its event
  together, a phone number and its event go together, a lease is taken only if
  free, expired or already ours and given back only by its holder.
* Feeds (revocations, user events) are a counter and sorted sets scored by its
  ids, so a cursor is an int as with SQLite; their keys get TTLs so nothing
  lives forever if no purge runs, the counter excepted (a cursor never goes back).
* Every call is bounded (``redis_url``: connect and reply timeouts, one retry,
  and a deadline around the whole call): a Redis that is down or stalled raises
  StorageError within seconds, never hangs, and the same object works again
  once Redis is back (redis-py reconnects on the next call).
* Error messages name the URL with its password masked, never the password.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError

from gateway.storage import redis_lua as lua
from gateway.storage import redis_push as push
from gateway.storage.base import (
    PHONE_EVENT_RETAIN,
    AccessToken,
    SharedCounters,
    Storage,
    StorageError,
    UserEvent,
    UserEventKind,
    UserRecord,
)
from gateway.storage.redis_url import Connected, connect, masked

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisStorage"]

log = logging.getLogger("gateway.storage")

T = TypeVar("T")

DEFAULT_PREFIX = "wxgw:"
# Connect and per-reply timeout. A login already waits on WeChat for seconds;
# two more for a store that answers in a millisecond when healthy is plenty.
DEFAULT_TIMEOUT = 2.0
# A feed key outlives its newest entry's expiry by this much: purge_expired
# (every worker, every few minutes) does the exact work; the TTL is the backstop.
TTL_MARGIN = 3600.0
PURGE_BATCH = 500
SCAN_BATCH = 500
_KINDS: dict[str, UserEventKind] = {"revoke": "revoke", "phone": "phone"}


def _part(text: str) -> str:
    """One component of a key: ``:`` (the separator) and ``%`` escaped, so an
    appid or openid holding a colon cannot name another user's key."""
    return text.replace("%", "%25").replace(":", "%3A")


def _ttl(until: float, now: float) -> int:
    return math.ceil(max(until - now, 0.0) + TTL_MARGIN)


class RedisStorage(Storage, SharedCounters):
    """The store in the Redis at ``url``, every key under ``prefix``.

    ``default_appid`` is accepted for symmetry with SQLite: a Redis store never
    holds data from the single-app era (migrate copies it with its app).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        default_appid: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.url = masked(url)
        self.prefix = prefix
        self.default_appid = default_appid
        self._raw_url = url
        self._timeout = timeout
        # The whole call, retry included: two connect attempts and a reply.
        self._deadline = 3 * timeout + 1.0
        self._conn: Connected | None = None
        self._scripts: dict[str, Any] = {}  # script text -> redis-py Script, per client
        p = prefix
        self._users = p + "users"
        self._unionid = p + "unionid:"
        self._rev = (p + "rev:seq", p + "rev:ids", p + "rev:exp")
        self._ev = (p + "ev:seq", p + "ev:feed", p + "ev:until")
        # Every append to a feed publishes here (redis_push: wake-ups).
        self.channel = p + "changes"
        self._replicas = push.Replicas()

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"RedisStorage(url={self.url!r}, prefix={self.prefix!r}, {state})"

    # -- keys --------------------------------------------------------------
    def _member(self, appid: str, openid: str) -> str:
        return f"{_part(appid)}:{_part(openid)}"

    def _user_key(self, member: str) -> str:
        return f"{self.prefix}u:{member}"

    def _user_keys(self, appid: str, openid: str) -> tuple[str, str, str]:
        member = self._member(appid, openid)
        return member, self._user_key(member), self._users

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            self._conn = connect(self._raw_url, self._timeout)
            self._scripts = {}
        except ValueError as exc:
            raise StorageError(f"storage: {self._scrub(str(exc))}") from None
        try:
            await self._call("open", lambda r: r.ping())
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        for client in (conn.client, *conn.extra):
            try:
                await client.aclose()
            except (RedisError, OSError) as exc:  # closing a dead connection
                log.debug("storage: closing %s: %s", self.url, type(exc).__name__)

    async def ping(self) -> None:
        async def check(r: Any) -> None:
            # A write and a read: a replica that became read-only fails here.
            await r.set(self.prefix + "ping", "1", ex=60)
            await r.get(self.prefix + "ping")

        await self._call("ping", check)

    # -- push and replicas (redis_push) --------------------------------------
    def changes(self) -> AsyncGenerator[None, None]:
        return self._changes()

    async def _changes(self) -> AsyncGenerator[None, None]:
        conn = self._conn
        if conn is None:
            raise StorageError("storage: changes called while the store is closed")
        try:
            async with contextlib.aclosing(push.wake_ups(conn.client, self.channel)) as wakes:
                async for _ in wakes:
                    yield None
        except RedisError as exc:
            reason = self._scrub(f"{type(exc).__name__}: {exc}")
            raise StorageError(f"storage: listening on {self.url} failed ({reason})") from None

    def wait_for_replicas(self, replicas: int, timeout: float) -> None:
        """Make each revocation (a logout, a ban) wait, before it returns, until
        ``replicas`` replicas have it or ``timeout`` seconds passed (Redis ``WAIT``).
        Fewer acknowledgements are logged, not raised: the primary has the write
        and every worker already learns it from there (docs/deployment.md)."""
        if not 0 < timeout < self._timeout:
            raise ValueError(f"must be above 0 and below the reply timeout ({self._timeout:g} s)")
        self._replicas = push.Replicas(replicas, timeout)

    async def _replicated(self, what: str, script: str, keys: list[str], args: list[Any]) -> Any:
        """``_script``, then WAIT for the replicas when asked to."""
        replicas = self._replicas
        if not replicas.count:
            return await self._script(what, script, keys, args)

        async def run(r: Any) -> tuple[Any, int]:
            if script not in self._scripts:
                self._scripts[script] = r.register_script(script)
            return await push.write_and_wait(r, self._scripts[script], keys, args, replicas)

        result, acknowledged = await self._call(what, run)
        replicas.acknowledged(acknowledged)
        return result

    # -- users -------------------------------------------------------------
    async def upsert_login(
        self, appid: str, openid: str, unionid: str | None, session_key: str, now: float
    ) -> UserRecord:
        member, key, users = self._user_keys(appid, openid)
        args = [member, unionid or "", session_key, repr(now), self._unionid]
        fields = await self._script("upsert_login", lua.UPSERT_LOGIN, [key, users], args)
        return _user(appid, openid, _pairs(fields))

    async def get_user(self, appid: str, openid: str) -> UserRecord | None:
        _, key, _ = self._user_keys(appid, openid)
        fields = await self._call("get_user", lambda r: r.hgetall(key))
        return _user(appid, openid, fields) if fields else None

    async def set_phone(self, appid: str, openid: str, phone_number: str, now: float) -> None:
        member, key, users = self._user_keys(appid, openid)
        until = now + PHONE_EVENT_RETAIN
        args = [member, phone_number, repr(now), appid, openid, repr(until), _ttl(until, now)]
        args.append(self.channel)
        await self._script("set_phone", lua.SET_PHONE, [key, users, *self._ev], args)

    async def users_by_unionid(self, unionid: str) -> list[UserRecord]:
        index = self._unionid + unionid
        members = await self._call("users_by_unionid", lambda r: r.smembers(index))
        found = [u for u in await self._users_of(sorted(members)) if u.unionid == unionid]
        return sorted(found, key=lambda u: (u.appid, u.openid))

    async def _users_of(self, members: list[str]) -> list[UserRecord]:
        async def read(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for member in members:
                pipe.hgetall(self._user_key(member))
            return list(await pipe.execute())

        if not members:
            return []
        rows = await self._call("read users", read)
        return [_user_of(member, row) for member, row in zip(members, rows, strict=True) if row]

    async def revoke_user(
        self, appid: str, openid: str, now: float, until: float
    ) -> UserRecord | None:
        _, key, users = self._user_keys(appid, openid)
        args = [appid, openid, repr(until), _ttl(until, now), self.channel]
        keys = [key, users, *self._ev]
        fields = await self._replicated("revoke_user", lua.REVOKE_USER, keys, args)
        return _user(appid, openid, _pairs(fields)) if fields else None

    async def user_events_since(self, cursor: int) -> tuple[list[UserEvent], int]:
        found, cursor = await self._since("user_events_since", self._ev, cursor)
        events = []
        for member in found:
            event = _event(member)
            if event is not None:
                events.append(event[0])
        return events, cursor

    # -- sessions ----------------------------------------------------------
    async def revoke_session(self, session_id: str, expires_at: float, now: float) -> None:
        args = [session_id, repr(expires_at), _ttl(expires_at, now), self.channel]
        await self._replicated("revoke_session", lua.REVOKE_SESSION, list(self._rev), args)

    async def revoked_since(self, cursor: int) -> tuple[list[str], int]:
        return await self._since("revoked_since", self._rev, cursor)

    async def _since(
        self, what: str, keys: tuple[str, str, str], cursor: int
    ) -> tuple[list[str], int]:
        reply = await self._script(what, lua.SINCE, [keys[0], keys[1]], [cursor])
        seq, pairs = int(reply[0]), reply[1:]
        members = pairs[0::2]
        newest = int(float(pairs[-1])) if pairs else min(cursor, seq)
        return members, newest

    async def purge_expired(self, now: float) -> int:
        gone = 0
        for keys in ((self._rev[1], self._rev[2]), (self._ev[1], self._ev[2])):
            while True:
                batch = int(
                    await self._script(
                        "purge_expired", lua.PURGE, list(keys), [repr(now), PURGE_BATCH]
                    )
                )
                gone += batch
                if batch < PURGE_BATCH:
                    break
        return gone

    # -- reading everything out (migration) --------------------------------
    async def all_users(self) -> AsyncIterator[UserRecord]:
        cursor = 0
        while True:

            def scan(r: Any, at: int = cursor) -> Awaitable[tuple[int, list[str]]]:
                return r.sscan(self._users, at, count=SCAN_BATCH)  # type: ignore[no-any-return]

            cursor, members = await self._call("all_users", scan)
            for user in await self._users_of(sorted(members)):
                yield user
            if cursor == 0:
                return

    async def import_user(self, user: UserRecord) -> None:
        member, key, users = self._user_keys(user.appid, user.openid)
        args = [
            member,
            user.unionid or "",
            user.session_key or "",
            user.phone_number or "",
            repr(user.created_at),
            repr(user.last_login_at),
            user.epoch,
            self._unionid,
        ]
        await self._script("import_user", lua.IMPORT_USER, [key, users], args)

    async def live_revocations(self, now: float) -> list[tuple[str, float]]:
        rows = await self._call(
            "live_revocations",
            lambda r: r.zrangebyscore(self._rev[2], repr(now), "+inf", withscores=True),
        )
        return [(sid, float(expires_at)) for sid, expires_at in rows]

    async def live_user_events(self, now: float) -> list[tuple[UserEvent, float]]:
        rows = await self._call(
            "live_user_events",
            lambda r: r.zrangebyscore(self._ev[2], repr(now), "+inf", withscores=True),
        )
        found = [(_event(member), float(until)) for member, until in rows]
        live = [(event, until) for event, until in found if event is not None]
        live.sort(key=lambda item: item[0][1])  # feed order: by id
        return [(event, until) for (event, _), until in live]

    async def append_user_event(self, event: UserEvent, until: float, now: float) -> None:
        args = [event.kind, event.appid, event.openid, event.epoch, repr(until), _ttl(until, now)]
        args.append(self.channel)
        await self._script("append_user_event", lua.APPEND_EVENT, list(self._ev), args)

    # -- WeChat access token -----------------------------------------------
    async def get_access_token(self, appid: str) -> AccessToken | None:
        key = f"{self.prefix}at:{_part(appid)}"
        token, expires_at = await self._call(
            "get_access_token", lambda r: r.hmget(key, ["token", "expires_at"])
        )
        return AccessToken(token, float(expires_at)) if token is not None else None

    async def put_access_token(self, appid: str, token: AccessToken, fence: int = 0) -> bool:
        key = f"{self.prefix}at:{_part(appid)}"
        args = [token.token, repr(token.expires_at), fence]
        return bool(await self._script("put_access_token", lua.PUT_IF_NEWER_FENCE, [key], args))

    async def clear_access_token(self, appid: str, token: str) -> None:
        key = f"{self.prefix}at:{_part(appid)}"
        await self._script("clear_access_token", lua.FORGET_IF_SAME, [key], [token])

    # -- leases ------------------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> int | None:
        key = f"{self.prefix}lease:{_part(name)}"
        keys = [key, f"{self.prefix}fence:{_part(name)}"]
        args = [holder, repr(now + ttl), repr(now), _ttl(now + ttl, now)]
        fence = int(await self._script("acquire_lease", lua.ACQUIRE_LEASE, keys, args))
        return fence or None

    async def release_lease(self, name: str, holder: str) -> None:
        key = f"{self.prefix}lease:{_part(name)}"
        await self._script("release_lease", lua.RELEASE_LEASE, [key], [holder])

    # -- counters shared by every instance (rate limits) --------------------
    async def take_token(self, key: str, per_second: float, burst: int) -> float:
        args = [repr(1.0 / per_second), burst]
        return float(await self._script("take_token", lua.GCRA_TAKE, [self._rl(key)], args))

    async def claim_shares(
        self,
        member: str,
        claims: Sequence[tuple[str, int, int, int]],
        *,
        ttl: float,
        live_for: float,
    ) -> tuple[int, list[int]]:
        keys = [self.prefix + "rl:live", *(self._rl(claim[0]) for claim in claims)]
        args: list[Any] = [member, repr(live_for), math.ceil(ttl * 1000)]
        for _, delta, want, limit in claims:
            args += [delta, want, limit]
        reply = await self._script("claim_shares", lua.CLAIM_SHARES, keys, args)
        return int(reply[0]), [int(grant) for grant in reply[1:]]

    def _rl(self, key: str) -> str:
        return f"{self.prefix}rl:{key}"

    # -- calls -------------------------------------------------------------
    async def _script(self, what: str, script: str, keys: list[str], args: list[Any]) -> Any:
        def run(r: Any) -> Awaitable[Any]:
            # EVALSHA, loading the script on NOSCRIPT (a restarted Redis forgot it).
            if script not in self._scripts:
                self._scripts[script] = r.register_script(script)
            return self._scripts[script](keys=keys, args=args)  # type: ignore[no-any-return]

        return await self._call(what, run)

    async def _call(self, what: str, op: Callable[[Any], Awaitable[T]]) -> T:
        conn = self._conn
        if conn is None:
            raise StorageError(f"storage: {what} called while the store is closed")
        try:
            async with asyncio.timeout(self._deadline):
                return await op(conn.client)
        except TimeoutError:
            raise StorageError(
                f"storage: {what}: {self.url} did not answer within {self._deadline:g} s"
            ) from None
        except RedisError as exc:
            # from None: the message is scrubbed; redis-py's own is not ours to trust.
            reason = self._scrub(f"{type(exc).__name__}: {exc}")
            raise StorageError(f"storage: {what} failed on {self.url} ({reason})") from None

    def _scrub(self, text: str) -> str:
        password = self._conn.password if self._conn is not None else None
        return text.replace(password, "***") if password else text


def _pairs(flat: list[str]) -> dict[str, str]:
    """A script's HGETALL reply (a flat list) as a dict."""
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def _user(appid: str, openid: str, fields: dict[str, str]) -> UserRecord:
    return UserRecord(
        appid=appid,
        openid=openid,
        unionid=fields.get("unionid"),
        session_key=fields.get("session_key"),
        phone_number=fields.get("phone_number"),
        created_at=float(fields["created_at"]),
        last_login_at=float(fields["last_login_at"]),
        epoch=int(fields.get("epoch", 0)),
    )


def _unpart(text: str) -> str:
    return text.replace("%3A", ":").replace("%25", "%")


def _user_of(member: str, fields: dict[str, str]) -> UserRecord:
    appid, _, openid = member.partition(":")
    return _user(_unpart(appid), _unpart(openid), fields)


def _event(member: str) -> tuple[UserEvent, int] | None:
    event_id, kind, appid, openid, epoch = json.loads(member)
    known = _KINDS.get(kind)
    if known is None:
        # A later release's kind (rolling upgrade): skipped, as SQLite does.
        log.warning("storage: skipping user event %s of unknown kind", event_id)
        return None
    return UserEvent(known, appid, openid, int(epoch)), int(event_id)
