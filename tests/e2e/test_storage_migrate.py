"""``gateway storage migrate --from URL --to URL`` as an operator runs it: a real
subprocess, a SQLite file and a real redis-server (contract section 10).

SQLite -> Redis -> SQLite loses nothing an instance needs: users of every app
with their epochs and phone numbers, the revocations and bans still in force.
Running it twice gives the same store and prints the same counts.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from gateway.storage import Storage, UserEvent, UserRecord
from gateway.storage.redis import RedisStorage
from gateway.storage.sqlite import SQLiteStorage
from gateway.storage.urls import store_for
from tests.support import ROOT
from tests.support.redis import RedisServer, own_redis
from tests.support.waiting import PROMPT

__all__ = ["own_redis"]  # a fixture: imported for pytest to find

APP, OTHER_APP = "wx-app-a", "wx-app-b"
PASSWORD = "migrate-pw-never-shown"
FIXTURES = ROOT / "tests" / "storage" / "fixtures" / "schema_v1"


@dataclass
class Run:
    code: int
    out: str
    err: str


def migrate(*args: str) -> Run:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-m", "gateway", "storage", "migrate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3 * PROMPT,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@dataclass
class Contents:
    users: list[UserRecord]
    revocations: list[tuple[str, float]]
    bans: list[tuple[UserEvent, float]]


async def contents(store: Storage, now: float) -> Contents:
    await store.open()
    try:
        users = sorted([u async for u in store.all_users()], key=lambda u: (u.appid, u.openid))
        bans = [(e, u) for e, u in await store.live_user_events(now) if e.kind == "revoke"]
        return Contents(users, sorted(await store.live_revocations(now)), bans)
    finally:
        await store.close()


async def fill(store: Storage, now: float) -> None:
    await store.open()
    try:
        await store.upsert_login(APP, "o-1", "u-person", "key-1", now=now - 50)
        await store.upsert_login(OTHER_APP, "o-1", "u-person", "key-b", now=now - 40)
        await store.upsert_login(APP, "o-plain", None, "key-2", now=now - 30)
        await store.set_phone(APP, "o-1", "13800138000", now=now - 20)
        await store.set_phone(OTHER_APP, "o-phone-only", "13900000000", now=now - 20)
        await store.revoke_user(APP, "o-1", now=now - 10, until=now + 7200)  # a live ban
        await store.revoke_user(APP, "o-plain", now=now - 10, until=now - 5)  # one that ended
        await store.revoke_session("s-live", expires_at=now + 3600, now=now - 10)
        await store.revoke_session("s-dead", expires_at=now - 1, now=now - 10)
    finally:
        await store.close()


async def test_sqlite_to_redis_and_back_loses_nothing(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    now = time.time()
    source = tmp_path / "old.db"
    await fill(SQLiteStorage(source), now)
    before = await contents(SQLiteStorage(source), now)
    assert len(before.users) == 4 and len(before.revocations) == 1 and len(before.bans) == 1

    to_redis = ("--from", f"sqlite:///{source}", "--to", own_redis.url, "--to-prefix", "gw:")
    first = migrate(*to_redis)
    assert first.code == 0, first.err
    assert "copied 4 users, 1 live revocations, 1 live bans" in first.out
    on_redis = await contents(RedisStorage(own_redis.url, prefix="gw:"), now)
    assert on_redis == before
    # Idempotent: a second run prints the same counts and changes nothing.
    again = migrate(*to_redis)
    assert (again.code, again.out) == (0, first.out)
    assert await contents(RedisStorage(own_redis.url, prefix="gw:"), now) == before

    back = tmp_path / "new" / "back.db"
    to_sqlite = ("--from", own_redis.url, "--from-prefix", "gw:", "--to", f"sqlite:///{back}")
    for _ in range(2):
        run = migrate(*to_sqlite)
        assert run.code == 0, run.err
        assert "copied 4 users, 1 live revocations, 1 live bans" in run.out
        assert await contents(SQLiteStorage(back), now) == before


async def test_a_ban_survives_the_move(tmp_path: Path, own_redis: RedisServer) -> None:
    # What a worker on the new store is told at start (cursor 0): the ban, at the
    # copied epoch, so tokens of the old epoch stay refused.
    now = time.time()
    source = tmp_path / "old.db"
    await fill(SQLiteStorage(source), now)
    assert migrate("--from", f"sqlite:///{source}", "--to", own_redis.url).code == 0
    store = RedisStorage(own_redis.url)  # the default prefix, wxgw:
    await store.open()
    try:
        events, _ = await store.user_events_since(0)
        user = await store.get_user(APP, "o-1")
    finally:
        await store.close()
    assert events == [UserEvent("revoke", APP, "o-1", 1)]
    assert user is not None and (user.epoch, user.phone_number) == (1, "13800138000")


async def test_a_single_app_file_needs_its_appid(tmp_path: Path, own_redis: RedisServer) -> None:
    source = tmp_path / "v1.db"
    shutil.copy2(FIXTURES / "gateway.db", source)
    refused = migrate("--from", f"sqlite:///{source}", "--to", own_redis.url)
    assert refused.code == 1
    assert "appid" in refused.err

    # From a config (its first app) or --default-appid: the records go to that app.
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "wechat": {"appid": APP, "secret": "s" * 16},
                "token": {"secret": "t" * 40},
                "storage": {"url": f"sqlite:///{source}", "prefix": "cfg:"},
            }
        )
    )
    run = migrate("-c", str(config), "--from", f"sqlite:///{source}", "--to", own_redis.url)
    assert run.code == 0, run.err
    users = (await contents(RedisStorage(own_redis.url, prefix="cfg:"), time.time())).users
    assert users and {u.appid for u in users} == {APP}


async def test_the_password_is_never_printed(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    try:
        source = tmp_path / "old.db"
        await fill(SQLiteStorage(source), time.time())
        run = migrate("--from", f"sqlite:///{source}", "--to", server.url)
        assert run.code == 0, run.err
        assert PASSWORD not in run.out + run.err and "***" in run.out
        server.stop()
        failed = migrate("--from", f"sqlite:///{source}", "--to", server.url)
    finally:
        server.stop()
    assert failed.code == 1
    assert PASSWORD not in failed.out + failed.err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--from", "sqlite:///{tmp}/missing.db", "--to", "redis://127.0.0.1:1/0"), "no database"),
        (("--from", "sqlite:///{tmp}/a.db", "--to", "sqlite:///{tmp}/a.db"), "same store"),
        (("--from", "mysql://x/y", "--to", "sqlite:///{tmp}/b.db"), "must start with"),
    ],
)
def test_bad_arguments_exit_2(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    (tmp_path / "a.db").touch()
    run = migrate(*(a.format(tmp=tmp_path) for a in args))
    assert run.code == 2 and says in run.err, run


def test_store_for_names_each_backend(tmp_path: Path) -> None:
    assert isinstance(store_for(f"sqlite:///{tmp_path}/x.db", default_appid=None), SQLiteStorage)
    redis_store = store_for("rediss://:pw@h:6380/2", default_appid=None, prefix="x:")
    assert isinstance(redis_store, RedisStorage) and redis_store.prefix == "x:"
