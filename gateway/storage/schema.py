"""The SQLite schema: its versions, the steps between them, and running them.

The version is ``PRAGMA user_version``. A step is keyed by the version it
produces and never changes once released, since files in the field already ran
it; a later version appends a key. :func:`migrate` runs inside the caller's
``BEGIN IMMEDIATE`` transaction (``SQLiteStorage.open``): all the missing steps
commit together or not at all, and of several workers starting at once one
migrates while the others wait for the write lock, then find the new version.
"""

from __future__ import annotations

import aiosqlite

from gateway.storage.base import StorageError

__all__ = ["SCHEMA_VERSION", "migrate", "scalar"]

# Statements may use ``:default_appid``: the app that owns rows written before
# apps existed (see SQLiteStorage).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE users (
            openid TEXT PRIMARY KEY, unionid TEXT, session_key TEXT, phone_number TEXT,
            created_at REAL NOT NULL, last_login_at REAL NOT NULL)""",
        # AUTOINCREMENT: ids are never reused, even after purging the newest rows,
        # so a worker's cursor cannot hide a later revocation behind a recycled id.
        """CREATE TABLE revocations (
            id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL UNIQUE,
            expires_at REAL NOT NULL, revoked_at REAL NOT NULL)""",
        "CREATE INDEX revocations_expires_at ON revocations (expires_at)",
        # One row at most: the token every worker shares.
        """CREATE TABLE access_token (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            token TEXT NOT NULL, expires_at REAL NOT NULL)""",
        """CREATE TABLE leases (
            name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at REAL NOT NULL)""",
    ),
    # Several mini programs (issue 15): users keyed by (appid, openid), one access
    # token per appid. Rows written by a single-app release belong to the default
    # app. Revocations and leases are unchanged.
    2: (
        """CREATE TABLE users_v2 (
            appid TEXT NOT NULL, openid TEXT NOT NULL, unionid TEXT, session_key TEXT,
            phone_number TEXT, created_at REAL NOT NULL, last_login_at REAL NOT NULL,
            PRIMARY KEY (appid, openid))""",
        """INSERT INTO users_v2
            (appid, openid, unionid, session_key, phone_number, created_at, last_login_at)
            SELECT :default_appid, openid, unionid, session_key, phone_number,
                created_at, last_login_at
            FROM users""",
        "DROP TABLE users",
        "ALTER TABLE users_v2 RENAME TO users",
        # unionid links one person's records across apps (users_by_unionid).
        "CREATE INDEX users_unionid ON users (unionid)",
        """CREATE TABLE access_token_v2 (
            appid TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL)""",
        """INSERT INTO access_token_v2 (appid, token, expires_at)
            SELECT :default_appid, token, expires_at FROM access_token""",
        "DROP TABLE access_token",
        "ALTER TABLE access_token_v2 RENAME TO access_token",
    ),
    # Revoking every session of one user (issue 15): an epoch per user, copied into
    # its tokens, and the feed of user events workers poll. Existing users start at
    # epoch 0, which is what every token issued before the upgrade carries.
    3: (
        "ALTER TABLE users ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0",
        # AUTOINCREMENT for the reason revocations has it: a worker's cursor must
        # never hide a later event behind an id reused after a purge. No CHECK on
        # kind: SQLite cannot alter one, so a new kind would cost a table rebuild.
        """CREATE TABLE user_events (
            id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
            appid TEXT NOT NULL, openid TEXT NOT NULL,
            epoch INTEGER NOT NULL, until REAL NOT NULL)""",
        "CREATE INDEX user_events_until ON user_events (until)",
    ),
    # Fencing (issue 16): each new holding of a lease gets a higher number, and the
    # access token keeps the newest number it was written with, so a holder that
    # stalled past its lease cannot overwrite a newer token. A released lease keeps
    # its row (holder '') and a cleared token its row (token NULL): the numbers
    # must outlive both. The token table is rebuilt for that NULL (SQLite cannot
    # drop a NOT NULL), as step 2 rebuilt it.
    4: (
        "ALTER TABLE leases ADD COLUMN fence INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE access_token_v4 (
            appid TEXT PRIMARY KEY, token TEXT, expires_at REAL,
            fence INTEGER NOT NULL DEFAULT 0)""",
        """INSERT INTO access_token_v4 (appid, token, expires_at)
            SELECT appid, token, expires_at FROM access_token""",
        "DROP TABLE access_token",
        "ALTER TABLE access_token_v4 RENAME TO access_token",
    ),
}
# Tables whose existing rows a step hands to the default app: with rows there and
# no default appid, that step cannot run (nothing is guessed).
_NEEDS_DEFAULT_APPID: dict[int, tuple[str, ...]] = {2: ("users", "access_token")}
SCHEMA_VERSION = max(_MIGRATIONS)


async def migrate(
    conn: aiosqlite.Connection,
    path: str,
    default_appid: str | None,
    target: int = SCHEMA_VERSION,
) -> int:
    """Bring the schema up to date; returns the version the file had.

    ``target`` stops at an older version: the migration tests make the file an
    older release wrote with that release's own (frozen) steps. The gateway never
    passes it.
    """
    if target not in _MIGRATIONS:
        raise ValueError(f"no schema version {target}")
    version = await scalar(conn, "PRAGMA user_version")
    if version > SCHEMA_VERSION:
        raise StorageError(
            f"storage: {path!r} has schema version {version}, newer than this "
            f"gateway's {SCHEMA_VERSION}; upgrade the gateway instead"
        )
    params = {"default_appid": default_appid}
    for step in range(version + 1, target + 1):
        if default_appid is None:
            await _refuse_rows_of_unknown_app(conn, path, step)
        for statement in _MIGRATIONS[step]:
            await conn.execute(statement, params)
        await conn.execute(f"PRAGMA user_version = {int(step)}")
    return version


async def _refuse_rows_of_unknown_app(conn: aiosqlite.Connection, path: str, step: int) -> None:
    for table in _NEEDS_DEFAULT_APPID.get(step, ()):
        if await scalar(conn, f"SELECT count(*) FROM {table}"):  # noqa: S608 (a constant)
            raise StorageError(
                f"storage: {path!r} holds data of a single-app release (schema "
                f"{step - 1}); open it with the appid that data belongs to "
                "(the gateway passes its default app)"
            )


async def scalar(conn: aiosqlite.Connection, sql: str) -> int:
    rows = list(await conn.execute_fetchall(sql))
    return int(rows[0][0])
