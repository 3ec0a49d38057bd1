"""A database written by an older release opens with this one, nothing lost
(issue 15).

Schema 1 (the last single-app release): the files were made by that release's
own code and are committed (``fixtures/schema_v1``, with ``write.py``, the
script that made them): the test needs no git history and no old checkout.
Their users (one with a phone and a unionid), access token, revocations and the
tokens the old code issued are read back through this release's code, the
gateway included.

Schema 2 (apps, no epochs): made here, from a copy of the schema-1 file, by
running only steps 1-2 (``schema.migrate(target=2)``). Released steps never
change, so that is the very file the schema-2 code left; rows only schema 2 can
hold (a second app's user and token) are then added with its columns. Each test
works on a copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import aiosqlite
import pytest
from aiohttp.test_utils import TestServer

from gateway.storage import AccessToken, StorageError, UserEvent, schema
from gateway.storage.sqlite import SCHEMA_VERSION, SQLiteStorage
from tests.support import ROOT
from tests.support.gateway import APPID, StartGateway, config_for
from tests.support.upstream import Recorder

OTHER_APP = "wx-another-app"
# Written by release 0.1.0 (schema 1) with its own code: write.py beside them
# says how, and how to make them again.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "schema_v1"


def python(script: str, *args: str) -> list[str]:
    return [sys.executable, "-W", "error", "-c", textwrap.dedent(script), *args]


@pytest.fixture(scope="module")
def old_release() -> dict[str, Any]:
    """The databases the old release wrote (``full`` and ``empty``), and what the
    old code itself read back from ``full`` (``full-out``)."""
    made: dict[str, Any] = {
        "full": FIXTURES / "gateway.db",
        "empty": FIXTURES / "empty.db",
        "full-out": json.loads((FIXTURES / "written.json").read_text()),
    }
    for mode in ("full", "empty"):
        assert sql(made[mode], "PRAGMA user_version") == [(1,)], mode
    return made


def copy_of(old_release: dict[str, Any], mode: str, to: Path) -> Path:
    source: Path = old_release[mode]
    to.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):  # the old code closed cleanly: normally no WAL is left
        if Path(f"{source}{suffix}").exists():
            shutil.copy2(f"{source}{suffix}", f"{to}{suffix}")
    return to


def sql(path: Path, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    # closing() alone: the sqlite3 context manager would leave a transaction open.
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        return conn.execute(statement, params).fetchall()


def rows_of(path: Path, table: str) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.row_factory = sqlite3.Row
        rows = conn.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()  # noqa: S608
        return [dict(row) for row in rows]


async def migrate_only_to(path: Path, target: int, default_appid: str | None) -> None:
    """Run the released steps up to ``target`` alone, as that release's open() did."""
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await conn.execute("BEGIN IMMEDIATE")
        await schema.migrate(conn, str(path), default_appid, target=target)
        await conn.execute("COMMIT")


async def schema_v2_file(old_release: dict[str, Any], to: Path) -> Path:
    """A schema-2 file: the old users as APPID's, plus what only schema 2 can hold."""
    path = copy_of(old_release, "full", to)
    await migrate_only_to(path, 2, APPID)
    assert sql(path, "PRAGMA user_version") == [(2,)]
    assert "epoch" not in columns(path, "users")
    sql(
        path,
        "INSERT INTO users (appid, openid, unionid, session_key, phone_number, "
        "created_at, last_login_at) VALUES (?, 'o-phone', 'u-person', 'key-other', NULL, "
        "3000.0, 3100.0)",
        (OTHER_APP,),
    )
    sql(
        path,
        "INSERT INTO access_token (appid, token, expires_at) VALUES (?, 'other-token', 6000.0)",
        (OTHER_APP,),
    )
    return path


def test_the_schema_version_is_4() -> None:
    # A new version needs a migration test of the version before it: this line
    # changing is the reminder.
    assert SCHEMA_VERSION == 4


async def test_a_schema_3_token_and_lease_survive_and_fencing_starts(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    await migrate_only_to(path, 3, APPID)
    sql(path, "INSERT INTO access_token (appid, token, expires_at) VALUES (?, 'tok', 5000.0)",
        (APPID,))  # fmt: skip
    sql(path, "INSERT INTO leases (name, holder, expires_at) VALUES ('refresh', 'w-1', 100.0)")
    store = SQLiteStorage(path)
    await store.open()
    try:
        assert store.migrated == (3, 4)
        assert await store.get_access_token(APPID) == AccessToken("tok", 5000.0)
        # The holding from before the upgrade is still one: w-2 waits, w-1 renews
        # and, having no number yet, gets the first.
        assert await store.acquire_lease("refresh", "w-2", ttl=10.0, now=50.0) is None
        assert await store.acquire_lease("refresh", "w-1", ttl=10.0, now=50.0) == 1
        assert await store.put_access_token(APPID, AccessToken("tok-2", 6000.0), fence=1)
        assert not await store.put_access_token(APPID, AccessToken("old", 7000.0), fence=0)
        assert await store.get_access_token(APPID) == AccessToken("tok-2", 6000.0)
    finally:
        await store.close()


def columns(path: Path, table: str) -> list[str]:
    return [row[1] for row in sql(path, f"PRAGMA table_info({table})")]


async def test_every_user_token_and_revocation_survives(
    old_release: dict[str, Any], tmp_path: Path
) -> None:
    path = copy_of(old_release, "full", tmp_path / "gateway.db")
    old = old_release["full-out"]
    assert sql(path, "PRAGMA user_version") == [(1,)]

    store = SQLiteStorage(path, default_appid=APPID)
    await store.open()
    try:
        assert store.migrated == (1, SCHEMA_VERSION)
        for before in old["users"]:
            after = await store.get_user(APPID, before["openid"])
            assert after is not None
            assert {**before, "appid": APPID} == {
                name: getattr(after, name) for name in (*before, "appid")
            }
            assert after.epoch == 0  # what every token issued before the upgrade carries
            assert await store.get_user(OTHER_APP, before["openid"]) is None
        assert await store.user_events_since(0) == ([], 0)
        assert [u.openid for u in await store.users_by_unionid("u-person")] == ["o-phone"]
        # Same ids, same cursor: a worker's revocation set is what it was.
        assert list(await store.revoked_since(0)) == old["revoked"]
        assert await store.get_access_token(APPID) == AccessToken("old-access-token", 5000.0)
        assert await store.get_access_token(OTHER_APP) is None
        # The next login of a migrated user updates that record, history kept.
        again = await store.upsert_login(APPID, "o-phone", None, "key-new", now=9000.0)
        assert (again.created_at, again.unionid, again.phone_number) == (
            1000.0,
            "u-person",
            "13800138000",
        )
    finally:
        await store.close()
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(path, "SELECT count(*) FROM users") == [(3,)]

    # A second open is a no-op.
    again_store = SQLiteStorage(path, default_appid=APPID)
    await again_store.open()
    try:
        assert again_store.migrated is None
        user = await again_store.get_user(APPID, "o-phone")
        assert user is not None and user.session_key == "key-new"
        assert len((await again_store.revoked_since(0))[0]) == 2
    finally:
        await again_store.close()
    assert sql(path, "SELECT count(*) FROM users") == [(3,)]


@pytest.mark.parametrize("several", [False, True], ids=["one-app", "first-of-two-apps"])
async def test_tokens_issued_before_the_upgrade_stay_valid_and_revoked_stay_revoked(
    old_release: dict[str, Any],
    tmp_path: Path,
    start_gateway: StartGateway,
    upstream: TestServer,
    wechat: TestServer,
    seen: Recorder,
    several: bool,
) -> None:
    # The gateway's own config puts its database here, for app APPID.
    copy_of(old_release, "full", tmp_path / "gateway.db")
    tokens = old_release["full-out"]["tokens"]
    raw = config_for(tmp_path, upstream, wechat)
    if several:
        # The old data and tokens belong to the first app listed (contract section 9).
        section = raw["wechat"]
        section["apps"] = [
            {"appid": section.pop("appid"), "secret": section.pop("secret"), "name": "old"},
            {"appid": OTHER_APP, "secret": "another-secret", "name": "new"},
        ]
    gw = await start_gateway(raw)
    async with aiohttp.ClientSession() as http:
        live = {"Authorization": f"Bearer {tokens['live']}"}
        async with http.get(gw.url + "/auth/me", headers=live) as resp:
            assert resp.status == 200
            assert await resp.json() == {
                "openid": "o-phone",
                "unionid": "u-person",
                "phone_number": "13800138000",
            }
        async with http.get(gw.url + "/auth/verify", headers=live) as resp:
            assert resp.status == 200
            assert resp.headers["X-OpenId"] == "o-phone"
            assert resp.headers["X-AppId"] == APPID
        async with http.get(gw.url + "/api/x", headers=live) as resp:
            assert resp.status == 200
        assert seen.last.header("X-AppId") == APPID
        revoked = {"Authorization": f"Bearer {tokens['revoked']}"}
        for path in ("/auth/me", "/api/x"):
            async with http.get(gw.url + path, headers=revoked) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"] == "token_revoked"


async def test_data_of_unknown_app_is_refused_and_left_as_it_was(
    old_release: dict[str, Any], tmp_path: Path
) -> None:
    path = copy_of(old_release, "full", tmp_path / "gateway.db")
    store = SQLiteStorage(path)  # no default app: whose users are these?
    with pytest.raises(StorageError, match="appid"):
        await store.open()
    await store.close()
    assert sql(path, "PRAGMA user_version") == [(1,)]
    assert "appid" not in columns(path, "users")

    # An old file with nothing in it needs no app.
    empty = copy_of(old_release, "empty", tmp_path / "empty.db")
    store = SQLiteStorage(empty)
    await store.open()
    try:
        assert store.migrated == (1, SCHEMA_VERSION)
        await store.upsert_login(APPID, "o-1", None, "k", now=1.0)
    finally:
        await store.close()
    assert sql(empty, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


@pytest.mark.parametrize(
    "leftover",
    [
        # Step 2 fails after it has already moved the users.
        "access_token_v2",
        # Step 3 fails after step 2 ran whole and step 3 added the epoch column:
        # both steps are undone, not just the failing one.
        "user_events",
    ],
)
async def test_a_migration_that_fails_midway_changes_nothing(
    old_release: dict[str, Any], tmp_path: Path, leftover: str
) -> None:
    path = copy_of(old_release, "full", tmp_path / "gateway.db")
    sql(path, f"CREATE TABLE {leftover} (leftover INTEGER)")
    store = SQLiteStorage(path, default_appid=APPID)
    with pytest.raises(StorageError, match=leftover):
        await store.open()
    await store.close()
    assert sql(path, "PRAGMA user_version") == [(1,)]
    assert "appid" not in columns(path, "users")
    assert "epoch" not in columns(path, "users")
    assert sql(path, "SELECT count(*) FROM users") == [(3,)]
    assert sql(path, "SELECT name FROM sqlite_master WHERE name = 'users_v2'") == []

    sql(path, f"DROP TABLE {leftover}")  # the operator removes it: the next start works
    store = SQLiteStorage(path, default_appid=APPID)
    await store.open()
    try:
        assert store.migrated == (1, SCHEMA_VERSION)
        assert await store.get_access_token(APPID) == AccessToken("old-access-token", 5000.0)
    finally:
        await store.close()


async def test_a_schema_2_file_migrates_to_3_with_nothing_lost(
    old_release: dict[str, Any], tmp_path: Path
) -> None:
    path = await schema_v2_file(old_release, tmp_path / "gateway.db")
    before = {t: rows_of(path, t) for t in ("users", "revocations", "access_token")}
    sequence = rows_of(path, "sqlite_sequence")
    assert len(before["users"]) == 4

    # No default app: step 3 hands nothing to an app, so it needs none.
    store = SQLiteStorage(path)
    await store.open()
    try:
        assert store.migrated == (2, SCHEMA_VERSION)
        other = await store.get_user(OTHER_APP, "o-phone")
        assert other is not None
        assert (other.session_key, other.created_at, other.epoch) == ("key-other", 3000.0, 0)
        assert await store.get_access_token(OTHER_APP) == AccessToken("other-token", 6000.0)
        assert await store.user_events_since(0) == ([], 0)
        # The new column and table work on the migrated rows.
        revoked = await store.revoke_user(APPID, "o-phone", now=9000.0, until=9500.0)
        assert revoked is not None and (revoked.epoch, revoked.phone_number) == (
            1,
            "13800138000",
        )
        assert (await store.user_events_since(0))[0] == [UserEvent("revoke", APPID, "o-phone", 1)]
    finally:
        await store.close()
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    # Every row as it was, each user at epoch 0 (but the one just revoked).
    users = rows_of(path, "users")
    assert [{k: v for k, v in u.items() if k != "epoch"} for u in users] == before["users"]
    assert [(u["appid"], u["openid"], u["epoch"]) for u in users] == [
        (APPID, "o-phone", 1),
        (APPID, "o-plain", 0),
        (APPID, "o-no-login", 0),
        (OTHER_APP, "o-phone", 0),
    ]
    assert rows_of(path, "revocations") == before["revocations"]
    # Each token as it was, with no fence yet (step 4).
    tokens = rows_of(path, "access_token")
    assert [{k: v for k, v in t.items() if k != "fence"} for t in tokens] == before["access_token"]
    assert {t["fence"] for t in tokens} == {0}
    # The revocation cursor is where it was; the events have their own.
    assert [r for r in rows_of(path, "sqlite_sequence") if r["name"] == "revocations"] == [
        r for r in sequence if r["name"] == "revocations"
    ]


async def test_a_step_3_that_fails_leaves_schema_2_intact(
    old_release: dict[str, Any], tmp_path: Path
) -> None:
    path = await schema_v2_file(old_release, tmp_path / "gateway.db")
    before = {t: rows_of(path, t) for t in ("users", "revocations", "access_token")}
    # Fails on CREATE TABLE user_events, after the ALTER TABLE that added epoch.
    sql(path, "CREATE TABLE user_events (leftover INTEGER)")
    store = SQLiteStorage(path)
    with pytest.raises(StorageError, match="user_events"):
        await store.open()
    await store.close()
    assert sql(path, "PRAGMA user_version") == [(2,)]
    assert "epoch" not in columns(path, "users")
    assert columns(path, "user_events") == ["leftover"]
    assert {t: rows_of(path, t) for t in before} == before

    sql(path, "DROP TABLE user_events")
    store = SQLiteStorage(path)
    await store.open()
    try:
        assert store.migrated == (2, SCHEMA_VERSION)
        user = await store.get_user(OTHER_APP, "o-phone")
        assert user is not None and user.epoch == 0
    finally:
        await store.close()


OPENER = """
    import asyncio, json, pathlib, sys
    from gateway.storage.sqlite import SQLiteStorage

    async def main(path, appid, ready):
        pathlib.Path(ready).touch()
        store = SQLiteStorage(path, default_appid=appid)
        await store.open()
        try:
            user = await store.get_user(appid, "o-phone")
            print(json.dumps({"migrated": store.migrated, "phone": user.phone_number}))
        finally:
            await store.close()

    asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_workers_opening_at_once_migrate_once(
    old_release: dict[str, Any], tmp_path: Path
) -> None:
    path = copy_of(old_release, "full", tmp_path / "gateway.db")
    # Hold the write lock while both start, so both queue for the migration's
    # transaction and are let go together.
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    ready = [tmp_path / f"ready-{n}" for n in (1, 2)]
    procs = [
        subprocess.Popen(
            python(OPENER, str(path), APPID, str(flag)),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        while not all(flag.exists() for flag in ready):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            await asyncio.sleep(0.01)
        lock.execute("ROLLBACK")
        outputs = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
    finally:
        lock.close()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [err for _, err in outputs] == ["", ""]
    results = [json.loads(out) for out, _ in outputs]
    assert sorted(results, key=lambda r: r["migrated"] is None) == [
        {"migrated": [1, SCHEMA_VERSION], "phone": "13800138000"},
        {"migrated": None, "phone": "13800138000"},
    ]
    assert sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert sql(path, "SELECT count(*) FROM users") == [(3,)]
