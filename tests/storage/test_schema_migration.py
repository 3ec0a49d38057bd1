"""A database written by the last single-app release opens with this one, nothing lost
(issue 15).

The old files were made by the old release's own code and are committed
(``fixtures/schema_v1``, with ``write.py``, the script that made them): the
test needs no git history and no old checkout. Their users (one with a phone
and a unionid), access token, revocations and the tokens the old code issued
are read back through this release's code, the gateway included. Each test
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
import pytest

from gateway.storage import AccessToken, StorageError
from gateway.storage.sqlite import SCHEMA_VERSION, SQLiteStorage
from tests.support import ROOT
from tests.support.gateway import APPID, StartGateway

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


def sql(path: Path, statement: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(statement).fetchall()


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
            assert await store.get_user(OTHER_APP, before["openid"]) is None
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


async def test_tokens_issued_before_the_upgrade_stay_valid_and_revoked_stay_revoked(
    old_release: dict[str, Any], tmp_path: Path, start_gateway: StartGateway
) -> None:
    # The gateway's own config puts its database here, for app APPID.
    copy_of(old_release, "full", tmp_path / "gateway.db")
    tokens = old_release["full-out"]["tokens"]
    gw = await start_gateway()
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
        async with http.get(gw.url + "/api/x", headers=live) as resp:
            assert resp.status == 200
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


async def test_a_migration_that_fails_midway_changes_nothing(
    old_release: dict[str, Any], tmp_path: Path
) -> None:
    path = copy_of(old_release, "full", tmp_path / "gateway.db")
    # A leftover table makes the step fail after it has already moved the users.
    sql(path, "CREATE TABLE access_token_v2 (leftover INTEGER)")
    store = SQLiteStorage(path, default_appid=APPID)
    with pytest.raises(StorageError, match="access_token_v2"):
        await store.open()
    await store.close()
    assert sql(path, "PRAGMA user_version") == [(1,)]
    assert "appid" not in columns(path, "users")
    assert sql(path, "SELECT count(*) FROM users") == [(3,)]
    assert sql(path, "SELECT name FROM sqlite_master WHERE name = 'users_v2'") == []

    sql(path, "DROP TABLE access_token_v2")  # the operator removes it: the next start works
    store = SQLiteStorage(path, default_appid=APPID)
    await store.open()
    try:
        assert store.migrated == (1, SCHEMA_VERSION)
        assert await store.get_access_token(APPID) == AccessToken("old-access-token", 5000.0)
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
