"""The embedded store: one SQLite file shared by every worker process.

Why it is shaped this way:

* One aiosqlite connection per process, and an asyncio lock around every
  transaction: coroutines of one process would otherwise interleave statements
  inside each other's transactions on the shared connection.
* WAL lets readers run beside the one writer; writes take the write lock up
  front (``BEGIN IMMEDIATE``) so two processes never deadlock upgrading a read
  lock, and stay short. SQLite serialises writers, so revocation ids become
  visible in id order and a cursor never skips a late commit.
* "database is locked" is retried with backoff after ``busy_timeout``, then
  becomes StorageError; every sqlite error does. SQLite's messages name tables
  and columns, never bound values, and every value here is bound, so no session
  key or token can end up in a message.
* The schema (``schema``) is brought up to date at open, in one ``BEGIN
  IMMEDIATE`` transaction: all or nothing, and once however many workers start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from gateway.storage import files, schema
from gateway.storage.base import (
    PHONE_EVENT_RETAIN,
    AccessToken,
    Storage,
    StorageError,
    UserEvent,
    UserEventKind,
    UserRecord,
)
from gateway.storage.schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SQLiteStorage", "sqlite_path_from_url"]

log = logging.getLogger("gateway.storage")

T = TypeVar("T")
Op = Callable[[aiosqlite.Connection], Awaitable[T]]

DEFAULT_BUSY_TIMEOUT = 5.0  # seconds SQLite itself waits for another process's lock
DEFAULT_ATTEMPTS = 4  # then "database is locked" becomes StorageError
MEMORY = ":memory:"
_URL_PREFIX = "sqlite:///"
_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

_USER_COLUMNS = (
    "appid, openid, unionid, session_key, phone_number, created_at, last_login_at, epoch"
)
_UPSERT_LOGIN = f"""INSERT INTO users
    (appid, openid, unionid, session_key, phone_number, created_at, last_login_at)
    VALUES (?, ?, ?, ?, NULL, ?, ?)
    ON CONFLICT (appid, openid) DO UPDATE SET
        unionid = COALESCE(excluded.unionid, users.unionid),
        session_key = excluded.session_key,
        last_login_at = excluded.last_login_at
    RETURNING {_USER_COLUMNS}"""  # noqa: S608 (constants only)
_SELECT_USERS = f"SELECT {_USER_COLUMNS} FROM users"  # noqa: S608 (constants only)
_SELECT_USER = _SELECT_USERS + " WHERE appid = ? AND openid = ?"
_SELECT_BY_UNIONID = _SELECT_USERS + " WHERE unionid = ? ORDER BY appid, openid"
# An upsert, not an UPDATE: if the record is gone (a wiped database while the
# token lives on) the number is still stored rather than silently dropped.
_SET_PHONE = """INSERT INTO users
    (appid, openid, unionid, session_key, phone_number, created_at, last_login_at)
    VALUES (?, ?, NULL, NULL, ?, ?, ?)
    ON CONFLICT (appid, openid) DO UPDATE SET phone_number = excluded.phone_number
    RETURNING epoch"""
# A ban leaves every other column alone: the next login finds the record intact,
# at the new epoch (upsert_login never touches epoch).
_REVOKE_USER = f"""UPDATE users SET epoch = epoch + 1 WHERE appid = ? AND openid = ?
    RETURNING {_USER_COLUMNS}"""  # noqa: S608 (constants only)
_INSERT_EVENT = """INSERT INTO user_events (kind, appid, openid, epoch, until)
    VALUES (?, ?, ?, ?, ?)"""
_KINDS: dict[str, UserEventKind] = {"revoke": "revoke", "phone": "phone"}
# A migration's copy of a record: the epoch never goes down (a lower one would
# bring revoked tokens back).
_IMPORT_USER = """INSERT INTO users
    (appid, openid, unionid, session_key, phone_number, created_at, last_login_at, epoch)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (appid, openid) DO UPDATE SET
        unionid = excluded.unionid, session_key = excluded.session_key,
        phone_number = excluded.phone_number, created_at = excluded.created_at,
        last_login_at = excluded.last_login_at, epoch = MAX(users.epoch, excluded.epoch)"""
# Fencing (Storage.acquire_lease): a new holding counts the fence up, a renewal
# (same holder) keeps it, unless it has none yet (a holding from before schema 4).
# SET expressions read the row as it was.
_ACQUIRE_LEASE = """INSERT INTO leases (name, holder, expires_at, fence) VALUES (?, ?, ?, 1)
    ON CONFLICT (name) DO UPDATE SET
        fence = CASE WHEN leases.holder = excluded.holder AND leases.fence > 0
            THEN leases.fence ELSE leases.fence + 1 END,
        holder = excluded.holder, expires_at = excluded.expires_at
    WHERE leases.holder = excluded.holder OR leases.expires_at <= ?
    RETURNING fence"""
_PUT_IF_NEWER_FENCE = """INSERT INTO access_token (appid, token, expires_at, fence)
    VALUES (?, ?, ?, ?)
    ON CONFLICT (appid) DO UPDATE SET
        token = excluded.token, expires_at = excluded.expires_at, fence = excluded.fence
    WHERE excluded.fence >= access_token.fence
    RETURNING fence"""
_USERS_AFTER = _SELECT_USERS + " WHERE (appid, openid) > (?, ?) ORDER BY appid, openid LIMIT ?"
USERS_BATCH = 500


def sqlite_path_from_url(url: str) -> str:
    """``sqlite:///./gateway.db`` -> ``./gateway.db``; ``sqlite:////abs.db`` -> ``/abs.db``;
    ``sqlite:///:memory:`` -> ``:memory:`` (one process only: tests)."""
    if not url.startswith(_URL_PREFIX):
        raise ValueError(
            f"{url!r} is not a SQLite URL: use sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    path = url[len(_URL_PREFIX) :]
    if not path:
        raise ValueError(f"{url!r} names no database file (e.g. sqlite:///./gateway.db)")
    # Options are not supported: refusing them beats silently ignoring a typo.
    if any(char in path for char in "?#\x00"):
        raise ValueError(f"{url!r}: query strings, fragments and NUL are not supported")
    return path


class SQLiteStorage(Storage):
    """The store in the SQLite file at ``path``.

    ``default_appid`` is the app that owns data written before the store knew of
    apps (schema 1, a single-app release): its users and its access token. The
    file cannot tell which app that was, only the configuration can (the single
    configured app, or the first of ``wechat.apps``), so whoever opens the store
    for the gateway passes it. Without it, such a file is refused at open rather
    than given to a guessed app; a new or empty file does not need it.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        default_appid: str | None = None,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        self.path = str(path)
        self.default_appid = default_appid
        # (from, to) schema versions when this open() migrated the file, for the log.
        self.migrated: tuple[int, int] | None = None
        self._busy_timeout = busy_timeout
        self._attempts = max(1, attempts)
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        state = "open" if self._conn is not None else "closed"
        return f"SQLiteStorage(path={self.path!r}, {state})"

    # -- lifecycle ---------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        if sqlite3.sqlite_version_info < (3, 35, 0):
            # RETURNING (used by upsert_login and acquire_lease) arrived in 3.35.
            raise StorageError(f"SQLite {sqlite3.sqlite_version} is too old; 3.35+ is needed")
        try:
            if self.path != MEMORY:
                files.prepare(self.path)  # 0700 directories, a 0600 file: it holds session keys
            # isolation_level=None: we write BEGIN/COMMIT ourselves, so the sqlite3
            # module never opens a transaction behind our back.
            pending = aiosqlite.connect(self.path, isolation_level=None, timeout=self._busy_timeout)
            try:
                self._conn = await pending
            except BaseException:
                # A failed connect stops aiosqlite's thread without waiting for it;
                # wait here so it cannot call back into a loop that is closing.
                await asyncio.to_thread(pending._thread.join, 5.0)
                raise
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"storage: cannot open {self.path!r} ({_describe(exc)})") from exc
        self._conn.row_factory = sqlite3.Row
        try:
            await self._run("configure", self._configure, write=False)
            found = await self._run("migrate", self._migrate)
        except BaseException:
            await self.close()
            raise
        if found < SCHEMA_VERSION:
            self.migrated = (found, SCHEMA_VERSION)
        if 0 < found < SCHEMA_VERSION:  # a new file is not news; an upgraded one is
            log.info(
                "storage: migrated %s from schema %d to %d (earlier data belongs to app %s)",
                self.path,
                found,
                SCHEMA_VERSION,
                self.default_appid,
            )

    async def _configure(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        # WAL + synchronous=NORMAL: a commit is appended to the WAL before COMMIT
        # returns, so it survives kill -9 of the process (only an OS crash or power
        # loss can drop the last commits, and never corrupts the file).
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")

    async def _migrate(self, conn: aiosqlite.Connection) -> int:
        return await schema.migrate(conn, self.path, self.default_appid)

    async def close(self) -> None:
        # Under the lock: a transaction already under way finishes first.
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await conn.close()
                # aiosqlite's worker thread may still be delivering a result; wait for
                # it, so nothing calls back into an event loop that is about to close.
                thread = getattr(conn, "_thread", None)
                if thread is not None and thread.is_alive():
                    await asyncio.to_thread(thread.join, 5.0)

    async def ping(self) -> None:
        async def check(conn: aiosqlite.Connection) -> None:
            await schema.scalar(conn, "SELECT count(*) FROM access_token")

        # write=True: taking the write lock is the check that a read-only or
        # wedged file fails. One attempt: readiness should answer, not wait.
        await self._run("ping", check, attempts=1)

    # -- users -------------------------------------------------------------
    async def upsert_login(
        self, appid: str, openid: str, unionid: str | None, session_key: str, now: float
    ) -> UserRecord:
        async def upsert(conn: aiosqlite.Connection) -> UserRecord:
            rows = await conn.execute_fetchall(
                _UPSERT_LOGIN, (appid, openid, unionid, session_key, now, now)
            )
            return _user(next(iter(rows)))

        return await self._run("upsert_login", upsert, single=True)

    async def get_user(self, appid: str, openid: str) -> UserRecord | None:
        async def get(conn: aiosqlite.Connection) -> UserRecord | None:
            rows = await conn.execute_fetchall(_SELECT_USER, (appid, openid))
            return next((_user(row) for row in rows), None)

        return await self._run("get_user", get, write=False)

    async def set_phone(self, appid: str, openid: str, phone_number: str, now: float) -> None:
        # One transaction: a worker that sees the event reads the new number, and
        # a number is never stored without the event that tells workers of it.
        async def store(conn: aiosqlite.Connection) -> None:
            rows = await conn.execute_fetchall(_SET_PHONE, (appid, openid, phone_number, now, now))
            epoch = next(iter(rows))["epoch"]
            until = now + PHONE_EVENT_RETAIN
            await conn.execute(_INSERT_EVENT, ("phone", appid, openid, epoch, until))

        await self._run("set_phone", store)

    async def users_by_unionid(self, unionid: str) -> list[UserRecord]:
        async def find(conn: aiosqlite.Connection) -> list[UserRecord]:
            rows = await conn.execute_fetchall(_SELECT_BY_UNIONID, (unionid,))
            return [_user(row) for row in rows]

        return await self._run("users_by_unionid", find, write=False)

    async def revoke_user(
        self, appid: str, openid: str, now: float, until: float
    ) -> UserRecord | None:
        # ``now`` is not stored: the feed keeps ``until`` only (a backend with
        # TTLs uses both).
        async def revoke(conn: aiosqlite.Connection) -> UserRecord | None:
            rows = list(await conn.execute_fetchall(_REVOKE_USER, (appid, openid)))
            if not rows:
                return None  # nothing updated, so no event: COMMIT writes nothing
            user = _user(rows[0])
            await conn.execute(_INSERT_EVENT, ("revoke", appid, openid, user.epoch, until))
            return user

        return await self._run("revoke_user", revoke)

    async def user_events_since(self, cursor: int) -> tuple[list[UserEvent], int]:
        async def since(conn: aiosqlite.Connection) -> tuple[list[UserEvent], int]:
            rows = list(
                await conn.execute_fetchall(
                    "SELECT id, kind, appid, openid, epoch FROM user_events "
                    "WHERE id > ? ORDER BY id",
                    (cursor,),
                )
            )
            return _events(rows), (rows[-1]["id"] if rows else cursor)

        return await self._run("user_events_since", since, write=False)

    # -- sessions ----------------------------------------------------------
    async def revoke_session(self, session_id: str, expires_at: float, now: float) -> None:
        await self._write(
            "revoke_session",
            "INSERT OR IGNORE INTO revocations (session_id, expires_at, revoked_at) "
            "VALUES (?, ?, ?)",
            (session_id, expires_at, now),
        )

    async def revoked_since(self, cursor: int) -> tuple[list[str], int]:
        async def since(conn: aiosqlite.Connection) -> tuple[list[str], int]:
            rows = list(
                await conn.execute_fetchall(
                    "SELECT id, session_id FROM revocations WHERE id > ? ORDER BY id",
                    (cursor,),
                )
            )
            return [row["session_id"] for row in rows], (rows[-1]["id"] if rows else cursor)

        return await self._run("revoked_since", since, write=False)

    async def purge_expired(self, now: float) -> int:
        async def purge(conn: aiosqlite.Connection) -> int:
            gone = 0
            for sql in (
                "DELETE FROM revocations WHERE expires_at < ?",
                "DELETE FROM user_events WHERE until < ?",
            ):
                async with conn.execute(sql, (now,)) as cursor:
                    gone += cursor.rowcount
            return gone

        return await self._run("purge_expired", purge)

    # -- reading everything out (migration) --------------------------------
    async def all_users(self) -> AsyncIterator[UserRecord]:
        # Keyset pages: no transaction stays open between two batches.
        after = ("", "")
        while True:

            async def page(conn: aiosqlite.Connection, key: tuple[str, str] = after) -> list[Any]:
                return list(await conn.execute_fetchall(_USERS_AFTER, (*key, USERS_BATCH)))

            rows = await self._run("all_users", page, write=False)
            for row in rows:
                yield _user(row)
            if len(rows) < USERS_BATCH:
                return
            after = (rows[-1]["appid"], rows[-1]["openid"])

    async def import_user(self, user: UserRecord) -> None:
        await self._write(
            "import_user",
            _IMPORT_USER,
            (
                user.appid,
                user.openid,
                user.unionid,
                user.session_key,
                user.phone_number,
                user.created_at,
                user.last_login_at,
                user.epoch,
            ),
        )

    async def live_revocations(self, now: float) -> list[tuple[str, float]]:
        async def live(conn: aiosqlite.Connection) -> list[tuple[str, float]]:
            rows = await conn.execute_fetchall(
                "SELECT session_id, expires_at FROM revocations WHERE expires_at >= ? ORDER BY id",
                (now,),
            )
            return [(row["session_id"], row["expires_at"]) for row in rows]

        return await self._run("live_revocations", live, write=False)

    async def live_user_events(self, now: float) -> list[tuple[UserEvent, float]]:
        async def live(conn: aiosqlite.Connection) -> list[tuple[UserEvent, float]]:
            rows = list(
                await conn.execute_fetchall(
                    "SELECT id, kind, appid, openid, epoch, until FROM user_events "
                    "WHERE until >= ? ORDER BY id",
                    (now,),
                )
            )
            known = [row for row in rows if row["kind"] in _KINDS]
            return list(zip(_events(known), (row["until"] for row in known), strict=True))

        return await self._run("live_user_events", live, write=False)

    async def append_user_event(self, event: UserEvent, until: float, now: float) -> None:
        await self._write(
            "append_user_event",
            _INSERT_EVENT,
            (event.kind, event.appid, event.openid, event.epoch, until),
        )

    # -- WeChat access token -----------------------------------------------
    async def get_access_token(self, appid: str) -> AccessToken | None:
        async def get(conn: aiosqlite.Connection) -> AccessToken | None:
            rows = await conn.execute_fetchall(
                "SELECT token, expires_at FROM access_token WHERE appid = ? AND token IS NOT NULL",
                (appid,),
            )
            return next((AccessToken(row["token"], row["expires_at"]) for row in rows), None)

        return await self._run("get_access_token", get, write=False)

    async def put_access_token(self, appid: str, token: AccessToken, fence: int = 0) -> bool:
        async def put(conn: aiosqlite.Connection) -> bool:
            # The DO UPDATE's WHERE refuses an older fence; then no row comes back.
            rows = await conn.execute_fetchall(
                _PUT_IF_NEWER_FENCE, (appid, token.token, token.expires_at, fence)
            )
            return any(True for _ in rows)

        return await self._run("put_access_token", put, single=True)

    async def clear_access_token(self, appid: str, token: str) -> None:
        # The row stays, with its fence: a stalled holder's late write is still refused.
        await self._write(
            "clear_access_token",
            "UPDATE access_token SET token = NULL, expires_at = NULL WHERE appid = ? AND token = ?",
            (appid, token),
        )

    # -- leases ------------------------------------------------------------
    async def acquire_lease(self, name: str, holder: str, ttl: float, now: float) -> int | None:
        async def acquire(conn: aiosqlite.Connection) -> int | None:
            # The DO UPDATE's WHERE refuses a live lease held by someone else; then no
            # row comes back. Insert, renewal and takeover are one statement.
            rows = await conn.execute_fetchall(_ACQUIRE_LEASE, (name, holder, now + ttl, now))
            return next((int(row["fence"]) for row in rows), None)

        return await self._run("acquire_lease", acquire, single=True)

    async def release_lease(self, name: str, holder: str) -> None:
        # The row stays (no holder, expired) so the next holding's fence counts on.
        await self._write(
            "release_lease",
            "UPDATE leases SET holder = '', expires_at = 0 WHERE name = ? AND holder = ?",
            (name, holder),
        )

    # -- transactions ------------------------------------------------------
    async def _write(self, what: str, sql: str, params: tuple[Any, ...]) -> int:
        async def write(conn: aiosqlite.Connection) -> int:
            async with conn.execute(sql, params) as cursor:
                return cursor.rowcount

        return await self._run(what, write, single=True)

    async def _run(
        self,
        what: str,
        op: Op[T],
        *,
        write: bool = True,
        attempts: int | None = None,
        single: bool = False,
    ) -> T:
        # single: one write statement, which SQLite runs as its own transaction
        # (autocommit): no BEGIN/COMMIT round trips to the database thread, a
        # third of the thread hops of a login. Several statements, or a read
        # then a write, need the explicit BEGIN IMMEDIATE.
        # Shielded: a cancelled caller (shutdown, client gone) must not leave the
        # shared connection inside an open transaction holding the write lock
        # that every other worker is waiting for.
        explicit = write and not single
        return await asyncio.shield(self._locked(what, op, explicit, attempts or self._attempts))

    async def _locked(self, what: str, op: Op[T], write: bool, attempts: int) -> T:
        async with self._lock:
            attempt = 1
            while True:
                conn = self._conn
                if conn is None:
                    raise StorageError(f"storage: {what} called while the store is closed")
                try:
                    return await _transaction(conn, op, write)
                except sqlite3.Error as exc:
                    if not _is_busy(exc) or attempt >= attempts:
                        raise StorageError(f"storage: {what} failed ({_describe(exc)})") from exc
                # Jitter keeps workers that collided from colliding again in step.
                await asyncio.sleep(0.05 * 2**attempt * (0.5 + random.random()))  # noqa: S311
                attempt += 1


async def _transaction(conn: aiosqlite.Connection, op: Op[T], write: bool) -> T:
    if write:
        await conn.execute("BEGIN IMMEDIATE")
    try:
        result = await op(conn)
        if write:
            await conn.execute("COMMIT")
        return result
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
        raise


def _user(row: sqlite3.Row) -> UserRecord:
    return UserRecord(
        appid=row["appid"],
        openid=row["openid"],
        unionid=row["unionid"],
        session_key=row["session_key"],
        phone_number=row["phone_number"],
        created_at=row["created_at"],
        last_login_at=row["last_login_at"],
        epoch=row["epoch"],
    )


def _events(rows: list[sqlite3.Row]) -> list[UserEvent]:
    events = []
    for row in rows:
        kind = _KINDS.get(row["kind"])
        if kind is None:
            # A kind this release does not know (a later release's, written during
            # a rolling upgrade) is skipped, not raised: one such row must not
            # wedge every worker's poll.
            log.warning("storage: skipping user event %d of unknown kind", row["id"])
            continue
        events.append(UserEvent(kind, row["appid"], row["openid"], row["epoch"]))
    return events


def _is_busy(exc: sqlite3.Error) -> bool:
    # Extended codes (SQLITE_BUSY_SNAPSHOT, ...) carry the primary code in the low byte.
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF) in _BUSY_CODES


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    return f"{name}: {exc}"
