"""What every storage backend must do, then what the SQLite file must survive.

The first half is parametrised over ``BACKENDS`` (SQLite, and Redis: a real
redis-server, tests/support/redis.py): a new backend adds one factory there and
runs every conformance test unchanged. Time is passed in (``now``), so
nothing here sleeps to make something expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.storage import (
    PHONE_EVENT_RETAIN,
    AccessToken,
    Storage,
    StorageError,
    UserEvent,
    UserRecord,
)
from gateway.storage.redis import RedisStorage
from gateway.storage.sqlite import SCHEMA_VERSION, SQLiteStorage, sqlite_path_from_url
from gateway.wechat.access_token import lease_name
from tests.support import ROOT
from tests.support.redis import RedisServer, redis_server, unique_prefix

__all__ = ["redis_server"]  # a fixture: imported for pytest to find

Factory = Callable[[], Storage]

# Two mini programs: an openid is only unique inside its app.
APP = "wx-app-a"
OTHER_APP = "wx-app-b"


def _sqlite(request: pytest.FixtureRequest, tmp: Path) -> Factory:
    # The parent directory does not exist yet: open() must create it.
    return lambda: SQLiteStorage(tmp / "state" / "gateway.db")


def _redis(request: pytest.FixtureRequest, tmp: Path) -> Factory:
    # One redis-server for the session; a prefix of its own is a fresh store.
    server: RedisServer = request.getfixturevalue("redis_server")
    prefix = unique_prefix()
    return lambda: RedisStorage(server.url, prefix=prefix)


# Each backend: a factory of fresh, unopened instances on the same data, so
# tests can close one and open another (persistence).
BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Factory]] = {
    "sqlite": _sqlite,
    "redis": _redis,
}


@pytest.fixture(params=sorted(BACKENDS))
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
async def storage(make_storage: Factory) -> AsyncIterator[Storage]:
    store = make_storage()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


# -- users ------------------------------------------------------------------


async def test_upsert_creates_then_updates_the_same_record(storage: Storage) -> None:
    first = await storage.upsert_login(APP, "o-1", "u-1", "key-1", now=100.0)
    assert (first.appid, first.openid, first.unionid, first.session_key) == (
        APP,
        "o-1",
        "u-1",
        "key-1",
    )
    assert first.created_at == first.last_login_at == 100.0
    assert first.phone_number is None

    second = await storage.upsert_login(APP, "o-1", "u-1", "key-2", now=200.0)
    assert second.session_key == "key-2"
    assert (second.created_at, second.last_login_at) == (100.0, 200.0)
    assert await storage.get_user(APP, "o-1") == second


async def test_a_login_without_unionid_keeps_the_known_one(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", "u-1", "k", now=1.0)
    assert (await storage.upsert_login(APP, "o-1", None, "k", now=2.0)).unionid == "u-1"
    assert (await storage.upsert_login(APP, "o-1", "u-2", "k", now=3.0)).unionid == "u-2"
    assert (await storage.upsert_login(APP, "o-2", None, "k", now=3.0)).unionid is None


async def test_get_user_missing(storage: Storage) -> None:
    assert await storage.get_user(APP, "nobody") is None


async def test_set_phone(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "key-1", now=1.0)
    await storage.set_phone(APP, "o-1", "+8613800138000", now=5.0)
    user = await storage.get_user(APP, "o-1")
    assert user is not None
    assert user.phone_number == "+8613800138000"
    assert (user.session_key, user.created_at, user.last_login_at) == ("key-1", 1.0, 1.0)
    # A later login does not forget the number.
    again = await storage.upsert_login(APP, "o-1", None, "key-2", now=9.0)
    assert again.phone_number == "+8613800138000"


async def test_set_phone_for_an_unknown_user_still_stores_it(storage: Storage) -> None:
    await storage.set_phone(APP, "o-new", "13800138000", now=7.0)
    user = await storage.get_user(APP, "o-new")
    assert user is not None
    assert (user.phone_number, user.session_key, user.unionid) == ("13800138000", None, None)


async def test_records_never_show_the_session_key(storage: Storage) -> None:
    user = await storage.upsert_login(APP, "o-1", None, "sEcReT-session-key", now=1.0)
    assert "sEcReT" not in repr(user)
    assert "sEcReT" not in repr(storage)


async def test_concurrent_logins_of_one_user_make_one_record(storage: Storage) -> None:
    results = await asyncio.gather(
        *(storage.upsert_login(APP, "o-same", None, f"key-{i}", now=float(i)) for i in range(50))
    )
    assert len({r.created_at for r in results}) == 1
    user = await storage.get_user(APP, "o-same")
    assert user is not None
    assert user.session_key in {f"key-{i}" for i in range(50)}
    assert user.created_at == results[0].created_at


# -- several apps -------------------------------------------------------------


async def test_the_same_openid_in_two_apps_is_two_records(storage: Storage) -> None:
    a = await storage.upsert_login(APP, "o-1", "u-1", "key-a", now=1.0)
    b = await storage.upsert_login(OTHER_APP, "o-1", None, "key-b", now=2.0)
    assert (a.appid, b.appid) == (APP, OTHER_APP)
    assert (b.unionid, b.session_key, b.created_at) == (None, "key-b", 2.0)

    # A login to one app leaves the other app's record alone.
    await storage.upsert_login(APP, "o-1", None, "key-a2", now=3.0)
    other = await storage.get_user(OTHER_APP, "o-1")
    assert other == b
    mine = await storage.get_user(APP, "o-1")
    assert mine is not None
    assert (mine.session_key, mine.unionid, mine.last_login_at) == ("key-a2", "u-1", 3.0)
    assert await storage.get_user("wx-app-unknown", "o-1") is None


async def test_a_phone_number_belongs_to_one_app(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "key-a", now=1.0)
    await storage.upsert_login(OTHER_APP, "o-1", None, "key-b", now=1.0)
    await storage.set_phone(OTHER_APP, "o-1", "13800138000", now=2.0)
    mine, other = await storage.get_user(APP, "o-1"), await storage.get_user(OTHER_APP, "o-1")
    assert mine is not None and other is not None
    assert (mine.phone_number, other.phone_number) == (None, "13800138000")
    assert (other.session_key, other.appid) == ("key-b", OTHER_APP)


async def test_users_by_unionid_finds_one_person_in_every_app(storage: Storage) -> None:
    assert await storage.users_by_unionid("u-person") == []
    await storage.upsert_login(OTHER_APP, "o-card", "u-person", "key-b", now=1.0)
    await storage.upsert_login(APP, "o-shop", "u-person", "key-a", now=2.0)
    await storage.upsert_login(APP, "o-else", "u-someone-else", "key-c", now=3.0)
    await storage.upsert_login(APP, "o-none", None, "key-d", now=4.0)
    # A record learns its unionid on a later login, and is found from then on.
    await storage.upsert_login(APP, "o-late", None, "key-e", now=5.0)
    await storage.upsert_login(APP, "o-late", "u-person", "key-e", now=6.0)

    found = await storage.users_by_unionid("u-person")
    assert [(u.appid, u.openid) for u in found] == [
        (APP, "o-late"),
        (APP, "o-shop"),
        (OTHER_APP, "o-card"),
    ]
    assert found[1] == await storage.get_user(APP, "o-shop")
    assert [u.openid for u in await storage.users_by_unionid("u-someone-else")] == ["o-else"]


async def test_access_tokens_are_per_app(storage: Storage) -> None:
    await storage.put_access_token(APP, AccessToken("tok-a", 100.0))
    assert await storage.get_access_token(OTHER_APP) is None
    await storage.put_access_token(OTHER_APP, AccessToken("tok-b", 200.0))
    assert await storage.get_access_token(APP) == AccessToken("tok-a", 100.0)

    # Clearing is by app and token: the same string under another app is not touched.
    await storage.clear_access_token(OTHER_APP, "tok-a")
    assert await storage.get_access_token(APP) == AccessToken("tok-a", 100.0)
    await storage.clear_access_token(APP, "tok-a")
    assert await storage.get_access_token(APP) is None
    assert await storage.get_access_token(OTHER_APP) == AccessToken("tok-b", 200.0)


async def test_each_apps_token_lease_is_independent(storage: Storage) -> None:
    # The names AccessTokens uses: a fetch for one app never waits for another's.
    a, b = lease_name(APP), lease_name(OTHER_APP)
    assert a != b
    assert await storage.acquire_lease(a, "worker-1", ttl=10.0, now=0.0)
    assert await storage.acquire_lease(b, "worker-2", ttl=10.0, now=0.0)
    assert not await storage.acquire_lease(a, "worker-2", ttl=10.0, now=1.0)
    await storage.release_lease(b, "worker-2")
    assert not await storage.acquire_lease(a, "worker-2", ttl=10.0, now=1.0)
    assert await storage.acquire_lease(b, "worker-1", ttl=10.0, now=1.0)


# -- revoking a user: epochs and the user-event feed ----------------------------


async def test_epoch_starts_at_zero_and_revoke_user_increments_it(storage: Storage) -> None:
    first = await storage.upsert_login(APP, "o-1", "u-1", "key-1", now=1.0)
    assert first.epoch == 0
    await storage.set_phone(APP, "o-1", "13800138000", now=2.0)

    revoked = await storage.revoke_user(APP, "o-1", now=3.0, until=500.0)
    assert revoked is not None
    assert revoked.epoch == 1
    # Only the epoch moved: the record is otherwise what it was.
    assert (
        revoked.appid,
        revoked.openid,
        revoked.unionid,
        revoked.session_key,
        revoked.phone_number,
        revoked.created_at,
        revoked.last_login_at,
    ) == (APP, "o-1", "u-1", "key-1", "13800138000", 1.0, 1.0)
    assert await storage.get_user(APP, "o-1") == revoked
    second = await storage.revoke_user(APP, "o-1", now=4.0, until=500.0)
    assert second is not None and second.epoch == 2


async def test_a_login_after_a_revoke_keeps_the_new_epoch(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "key-1", now=1.0)
    await storage.revoke_user(APP, "o-1", now=2.0, until=500.0)
    # The login after a ban issues tokens of the new epoch, so it must not reset it.
    again = await storage.upsert_login(APP, "o-1", None, "key-2", now=3.0)
    assert (again.epoch, again.session_key) == (1, "key-2")
    user = await storage.get_user(APP, "o-1")
    assert user is not None and user.epoch == 1
    # Nor does a phone number.
    await storage.set_phone(APP, "o-1", "13800138000", now=4.0)
    user = await storage.get_user(APP, "o-1")
    assert user is not None and user.epoch == 1


async def test_revoking_an_unknown_user_writes_nothing(storage: Storage) -> None:
    assert await storage.revoke_user(APP, "nobody", now=1.0, until=500.0) is None
    assert await storage.get_user(APP, "nobody") is None
    assert await storage.user_events_since(0) == ([], 0)
    # The same openid known in another app only is still unknown in this one.
    await storage.upsert_login(OTHER_APP, "o-1", None, "key-b", now=1.0)
    assert await storage.revoke_user(APP, "o-1", now=2.0, until=500.0) is None
    assert await storage.user_events_since(0) == ([], 0)


async def test_revoking_a_user_in_one_app_leaves_the_other_app_alone(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", "u-1", "key-a", now=1.0)
    other = await storage.upsert_login(OTHER_APP, "o-1", "u-1", "key-b", now=1.0)
    revoked = await storage.revoke_user(APP, "o-1", now=2.0, until=500.0)
    assert revoked is not None and (revoked.appid, revoked.epoch) == (APP, 1)
    assert await storage.get_user(OTHER_APP, "o-1") == other
    events, _ = await storage.user_events_since(0)
    assert events == [UserEvent("revoke", APP, "o-1", 1)]


async def test_user_events_are_ordered_behind_a_monotonic_cursor(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "k", now=1.0)
    await storage.upsert_login(OTHER_APP, "o-2", None, "k", now=1.0)
    assert await storage.user_events_since(0) == ([], 0)

    await storage.revoke_user(APP, "o-1", now=2.0, until=500.0)
    await storage.set_phone(OTHER_APP, "o-2", "13800138000", now=3.0)
    await storage.revoke_user(APP, "o-1", now=4.0, until=500.0)
    everything, cursor = await storage.user_events_since(0)
    assert everything == [
        UserEvent("revoke", APP, "o-1", 1),
        UserEvent("phone", OTHER_APP, "o-2", 0),
        UserEvent("revoke", APP, "o-1", 2),
    ]
    assert cursor > 0
    assert await storage.user_events_since(cursor) == ([], cursor)

    # Read part way: the rest comes after that cursor, and the cursor only grows.
    first = await storage.user_events_since(0)
    await storage.revoke_user(OTHER_APP, "o-2", now=5.0, until=500.0)
    newer, later = await storage.user_events_since(cursor)
    assert newer == [UserEvent("revoke", OTHER_APP, "o-2", 1)]
    assert later > cursor
    assert (await storage.user_events_since(0))[0] == [*first[0], *newer]


async def test_set_phone_appends_a_phone_event(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "k", now=1.0)
    await storage.revoke_user(APP, "o-1", now=2.0, until=500.0)
    _, cursor = await storage.user_events_since(0)

    await storage.set_phone(APP, "o-1", "13800138000", now=3.0)
    # A user the store had lost gets its record back, and workers hear of it too.
    await storage.set_phone(OTHER_APP, "o-new", "13900000000", now=4.0)
    events, _ = await storage.user_events_since(cursor)
    assert events == [
        UserEvent("phone", APP, "o-1", 1),  # the record's current epoch
        UserEvent("phone", OTHER_APP, "o-new", 0),
    ]


async def test_purge_drops_expired_user_events_only(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "k", now=1.0)
    await storage.upsert_login(APP, "o-2", None, "k", now=1.0)
    await storage.revoke_user(APP, "o-1", now=2.0, until=100.0)
    await storage.revoke_user(APP, "o-2", now=2.0, until=150.0)
    await storage.set_phone(APP, "o-2", "13800138000", now=10.0)  # until 10 + RETAIN
    await storage.revoke_session("s-1", expires_at=120.0, now=2.0)
    events, cursor = await storage.user_events_since(0)
    assert len(events) == 3

    # At 150 the first ban's event (until 100) and the revocation (120) are gone;
    # an event whose until is now is still kept, as revocations are.
    assert await storage.purge_expired(now=150.0) == 2
    assert (await storage.user_events_since(0))[0] == [
        UserEvent("revoke", APP, "o-2", 1),
        UserEvent("phone", APP, "o-2", 1),
    ]
    assert await storage.purge_expired(now=150.0) == 0
    # The phone event outlives the ban's, and goes once PHONE_EVENT_RETAIN has passed.
    assert await storage.purge_expired(now=10.0 + PHONE_EVENT_RETAIN) == 1
    assert (await storage.user_events_since(0))[0] == [UserEvent("phone", APP, "o-2", 1)]
    assert await storage.purge_expired(now=10.5 + PHONE_EVENT_RETAIN) == 1
    assert (await storage.user_events_since(0))[0] == []
    assert await storage.user_events_since(cursor) == ([], cursor)
    # Purging never moves the cursor back: the next event is after it.
    await storage.revoke_user(APP, "o-1", now=20.0, until=5000.0 + PHONE_EVENT_RETAIN)
    newer, later = await storage.user_events_since(cursor)
    assert newer == [UserEvent("revoke", APP, "o-1", 2)]
    assert later > cursor
    # Users are never purged with their events.
    user = await storage.get_user(APP, "o-2")
    assert user is not None and (user.epoch, user.phone_number) == (1, "13800138000")


async def test_a_revoked_record_never_shows_the_session_key(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "sEcReT-session-key", now=1.0)
    revoked = await storage.revoke_user(APP, "o-1", now=2.0, until=500.0)
    assert revoked is not None and revoked.session_key == "sEcReT-session-key"
    assert "sEcReT" not in repr(revoked)
    assert "sEcReT" not in repr(await storage.user_events_since(0))


# -- revocations --------------------------------------------------------------


async def test_revocations_and_cursor(storage: Storage) -> None:
    assert await storage.revoked_since(0) == ([], 0)
    await storage.revoke_session("s-1", expires_at=100.0, now=1.0)
    await storage.revoke_session("s-2", expires_at=200.0, now=2.0)
    ids, cursor = await storage.revoked_since(0)
    assert ids == ["s-1", "s-2"]
    assert await storage.revoked_since(cursor) == ([], cursor)

    await storage.revoke_session("s-1", expires_at=100.0, now=3.0)  # idempotent
    assert await storage.revoked_since(cursor) == ([], cursor)

    await storage.revoke_session("s-3", expires_at=300.0, now=4.0)
    ids, newer = await storage.revoked_since(cursor)
    assert ids == ["s-3"]
    assert newer > cursor


async def test_purge_drops_only_expired_revocations(storage: Storage) -> None:
    await storage.revoke_session("s-old", expires_at=100.0, now=1.0)
    await storage.revoke_session("s-edge", expires_at=150.0, now=1.0)
    await storage.revoke_session("s-live", expires_at=300.0, now=1.0)
    _, cursor = await storage.revoked_since(0)

    assert await storage.purge_expired(now=150.0) == 1
    assert (await storage.revoked_since(0))[0] == ["s-edge", "s-live"]
    assert await storage.purge_expired(now=150.0) == 0

    # The cursor only moves forward, even after the newest rows were purged.
    assert await storage.purge_expired(now=1000.0) == 2
    await storage.revoke_session("s-next", expires_at=2000.0, now=2.0)
    assert await storage.revoked_since(cursor) == (["s-next"], cursor + 1)


# -- access token -------------------------------------------------------------


async def test_access_token_put_get_clear(storage: Storage) -> None:
    assert await storage.get_access_token(APP) is None
    await storage.put_access_token(APP, AccessToken("tok-1", 100.0))
    assert await storage.get_access_token(APP) == AccessToken("tok-1", 100.0)

    await storage.put_access_token(APP, AccessToken("tok-2", 200.0))
    await storage.clear_access_token(APP, "tok-1")  # stale: the newer token stays
    assert await storage.get_access_token(APP) == AccessToken("tok-2", 200.0)

    await storage.clear_access_token(APP, "tok-2")
    assert await storage.get_access_token(APP) is None
    await storage.clear_access_token(APP, "tok-2")  # nothing to clear: no error


# -- leases -------------------------------------------------------------------


async def test_lease_one_holder_at_a_time(storage: Storage) -> None:
    assert await storage.acquire_lease("refresh", "a", ttl=10.0, now=0.0)
    assert not await storage.acquire_lease("refresh", "b", ttl=10.0, now=5.0)
    assert await storage.acquire_lease("other", "b", ttl=10.0, now=5.0)  # names are separate

    # Renewal by the holder pushes expiry to 8 + 10 = 18.
    assert await storage.acquire_lease("refresh", "a", ttl=10.0, now=8.0)
    assert not await storage.acquire_lease("refresh", "b", ttl=10.0, now=15.0)

    # Expired: another holder takes it, and the old one is now refused.
    assert await storage.acquire_lease("refresh", "b", ttl=10.0, now=18.0)
    assert not await storage.acquire_lease("refresh", "a", ttl=10.0, now=19.0)


async def test_lease_release_only_by_its_holder(storage: Storage) -> None:
    assert await storage.acquire_lease("refresh", "a", ttl=10.0, now=0.0)
    await storage.release_lease("refresh", "b")  # not b's: ignored
    assert not await storage.acquire_lease("refresh", "b", ttl=10.0, now=1.0)
    await storage.release_lease("refresh", "a")
    assert await storage.acquire_lease("refresh", "b", ttl=10.0, now=1.0)
    await storage.release_lease("never-taken", "a")


async def test_each_new_holding_gets_a_higher_fence(storage: Storage) -> None:
    first = await storage.acquire_lease("refresh", "a", ttl=10.0, now=0.0)
    assert first is not None and first >= 1
    assert await storage.acquire_lease("refresh", "a", ttl=10.0, now=5.0) == first  # renewal
    assert await storage.acquire_lease("refresh", "b", ttl=10.0, now=6.0) is None  # a's
    taken_over = await storage.acquire_lease("refresh", "b", ttl=10.0, now=15.0)  # expired
    assert taken_over is not None and taken_over > first
    await storage.release_lease("refresh", "b")
    # Released, then taken again (even by an earlier holder): a number never comes back.
    again = await storage.acquire_lease("refresh", "a", ttl=10.0, now=16.0)
    assert again is not None and again > taken_over
    # Each lease name counts on its own.
    assert await storage.acquire_lease("other", "a", ttl=10.0, now=16.0) == first


async def test_a_stalled_holders_late_write_is_refused(storage: Storage) -> None:
    # a takes the lease, then stalls past it (GC pause, slow WeChat); b takes it
    # over and stores a newer token; a wakes up and writes what it fetched.
    a = await storage.acquire_lease(lease_name(APP), "a", ttl=10.0, now=0.0)
    b = await storage.acquire_lease(lease_name(APP), "b", ttl=10.0, now=11.0)
    assert a is not None and b is not None
    assert await storage.put_access_token(APP, AccessToken("newer", 900.0), fence=b)
    assert not await storage.put_access_token(APP, AccessToken("stale", 800.0), fence=a)
    assert await storage.get_access_token(APP) == AccessToken("newer", 900.0)
    # A clear (WeChat rejected the token) does not forget the newest fence seen.
    await storage.clear_access_token(APP, "newer")
    assert not await storage.put_access_token(APP, AccessToken("stale", 800.0), fence=a)
    assert await storage.get_access_token(APP) is None
    # The fence is per app; the same fence writes again (b refreshing twice).
    assert await storage.put_access_token(OTHER_APP, AccessToken("other", 700.0), fence=a)
    assert await storage.put_access_token(APP, AccessToken("newest", 990.0), fence=b)
    assert await storage.get_access_token(APP) == AccessToken("newest", 990.0)


async def test_concurrent_fenced_writes_keep_the_newest(storage: Storage) -> None:
    # Writes racing in any order: the check and the write are one step, so the
    # highest fence wins whichever lands last.
    fences = []
    for i in range(8):
        fence = await storage.acquire_lease("race", f"h-{i}", ttl=1.0, now=float(i * 2))
        assert fence is not None
        fences.append(fence)
    written = await asyncio.gather(
        *(
            storage.put_access_token(APP, AccessToken(f"tok-{f}", 100.0 + f), fence=f)
            for f in reversed(fences)
        )
    )
    assert written[0]  # the newest, sent first, is always taken
    top = max(fences)
    assert await storage.get_access_token(APP) == AccessToken(f"tok-{top}", 100.0 + top)


# -- reading everything out and back in (migration) ---------------------------


async def test_all_users_lists_every_record_of_every_app(storage: Storage) -> None:
    # More than one page of every backend's batches (500), so paging is exercised.
    made = [(APP if i % 2 else OTHER_APP, f"o:{i}") for i in range(1100)]
    for i, (appid, openid) in enumerate(made):
        await storage.upsert_login(appid, openid, f"u-{i % 7}", f"key-{i}", now=float(i))
    await storage.set_phone(APP, "o-phone-only", "13800138000", now=5.0)
    await storage.revoke_user(APP, "o:1", now=6.0, until=500.0)

    found = [user async for user in storage.all_users()]
    assert sorted((u.appid, u.openid) for u in found) == sorted([*made, (APP, "o-phone-only")])
    by_key = {(u.appid, u.openid): u for u in found}
    assert by_key[(APP, "o:1")] == await storage.get_user(APP, "o:1")
    assert by_key[(APP, "o:1")].epoch == 1
    assert by_key[(APP, "o-phone-only")].phone_number == "13800138000"


async def test_all_users_of_an_empty_store(storage: Storage) -> None:
    assert [user async for user in storage.all_users()] == []


async def test_import_user_stores_the_record_as_given(storage: Storage) -> None:
    record = UserRecord(APP, "o-1", "u-1", "key-1", "13800138000", 10.0, 20.0, epoch=3)
    await storage.import_user(record)
    assert await storage.get_user(APP, "o-1") == record
    assert await storage.users_by_unionid("u-1") == [record]
    await storage.import_user(record)  # idempotent
    assert [u async for u in storage.all_users()] == [record]

    # Every field from the copy, the unionid index following it...
    moved = UserRecord(APP, "o-1", "u-2", None, None, 11.0, 21.0, epoch=5)
    await storage.import_user(moved)
    assert await storage.get_user(APP, "o-1") == moved
    assert await storage.users_by_unionid("u-1") == []
    assert await storage.users_by_unionid("u-2") == [moved]
    # ...but the epoch never goes down: that would bring revoked tokens back.
    await storage.import_user(record)
    user = await storage.get_user(APP, "o-1")
    assert user is not None and (user.epoch, user.unionid, user.session_key) == (5, "u-1", "key-1")
    # A login after an import is an ordinary login on that record.
    again = await storage.upsert_login(APP, "o-1", None, "key-9", now=30.0)
    assert (again.created_at, again.epoch, again.phone_number) == (10.0, 5, "13800138000")


async def test_live_revocations_are_the_ones_purge_keeps(storage: Storage) -> None:
    await storage.revoke_session("s-old", expires_at=100.0, now=1.0)
    await storage.revoke_session("s-edge", expires_at=150.0, now=1.0)
    await storage.revoke_session("s-live", expires_at=300.5, now=1.0)
    assert await storage.live_revocations(now=150.0) == [("s-edge", 150.0), ("s-live", 300.5)]
    await storage.purge_expired(now=150.0)
    assert await storage.live_revocations(now=0.0) == [("s-edge", 150.0), ("s-live", 300.5)]


async def test_live_user_events_and_append(storage: Storage) -> None:
    await storage.upsert_login(APP, "o-1", None, "k", now=1.0)
    await storage.revoke_user(APP, "o-1", now=2.0, until=100.0)
    await storage.revoke_user(APP, "o-1", now=3.0, until=400.0)
    await storage.set_phone(OTHER_APP, "o-2", "13800138000", now=4.0)
    assert await storage.live_user_events(now=200.0) == [
        (UserEvent("revoke", APP, "o-1", 2), 400.0),
        (UserEvent("phone", OTHER_APP, "o-2", 0), 4.0 + PHONE_EVENT_RETAIN),
    ]

    _, cursor = await storage.user_events_since(0)
    copied = UserEvent("revoke", OTHER_APP, "o-9", 7)
    await storage.append_user_event(copied, until=900.0, now=5.0)
    # Workers see a copied event like any other, after their cursor.
    assert (await storage.user_events_since(cursor))[0] == [copied]
    assert (await storage.live_user_events(now=500.0))[-1] == (copied, 900.0)


# -- lifecycle ----------------------------------------------------------------


async def test_data_survives_close_and_reopen(make_storage: Factory) -> None:
    store = make_storage()
    await store.open()
    await store.upsert_login(APP, "o-1", "u-1", "key-1", now=1.0)
    await store.set_phone(APP, "o-1", "13800138000", now=2.0)
    await store.revoke_session("s-1", expires_at=100.0, now=1.0)
    await store.put_access_token(APP, AccessToken("tok", 50.0))
    await store.revoke_user(APP, "o-1", now=3.0, until=500.0)
    await store.close()

    again = make_storage()
    await again.open()
    try:
        user = await again.get_user(APP, "o-1")
        assert user is not None
        assert (user.unionid, user.session_key, user.phone_number) == (
            "u-1",
            "key-1",
            "13800138000",
        )
        assert (await again.revoked_since(0))[0] == ["s-1"]
        assert await again.get_access_token(APP) == AccessToken("tok", 50.0)
        assert user.epoch == 1
        assert (await again.user_events_since(0))[0] == [
            UserEvent("phone", APP, "o-1", 0),
            UserEvent("revoke", APP, "o-1", 1),
        ]
    finally:
        await again.close()


async def test_ping_close_twice_and_use_after_close(make_storage: Factory) -> None:
    store = make_storage()
    await store.open()
    await store.ping()
    await store.close()
    await store.close()
    with pytest.raises(StorageError):
        await store.get_user(APP, "o-1")
    with pytest.raises(StorageError):
        await store.ping()


# -- SQLite specifics ---------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///./gateway.db", "./gateway.db"),
        ("sqlite:///gateway.db", "gateway.db"),
        ("sqlite:///data/gw.db", "data/gw.db"),
        ("sqlite:////var/lib/gw/gateway.db", "/var/lib/gw/gateway.db"),
        ("sqlite:///:memory:", ":memory:"),
    ],
)
def test_sqlite_path_from_url(url: str, path: str) -> None:
    assert sqlite_path_from_url(url) == path


@pytest.mark.parametrize(
    "url",
    [
        "postgres://db/gw",
        "sqlite://",
        "sqlite:///",
        "sqlite://host/gw.db",
        "sqlite:gw.db",
        "./gateway.db",
        "sqlite:///gw.db?mode=ro",
        "sqlite:///gw.db#x",
    ],
)
def test_sqlite_url_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="sqlite"):
        sqlite_path_from_url(url)


async def test_in_memory_database_works() -> None:
    store = SQLiteStorage(":memory:")
    await store.open()
    try:
        await store.upsert_login(APP, "o-1", None, "k", now=1.0)
        assert await store.get_user(APP, "o-1") is not None
        await store.ping()
    finally:
        await store.close()


async def test_schema_version_and_wal_recorded(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    store = SQLiteStorage(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    store = SQLiteStorage(path)
    with pytest.raises(StorageError, match="newer"):
        await store.open()
    await store.close()


@pytest.mark.parametrize("kind", ["directory", "garbage"])
async def test_unusable_file_is_a_storage_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "gw.db"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not a SQLite database, just bytes " * 100)
    store = SQLiteStorage(path)
    with pytest.raises(StorageError):
        await store.open()
    await store.close()


async def test_read_only_store_fails_ping_and_writes(tmp_path: Path) -> None:
    # Tests run as root, whom chmod does not stop, so make the connection itself
    # read-only (what a read-only remount looks like to SQLite): every write path
    # must turn that into StorageError, and reads keep working.
    store = SQLiteStorage(tmp_path / "gw.db")
    await store.open()
    try:
        await store.upsert_login(APP, "o-1", None, "key-1", now=1.0)
        conn = store._conn
        assert conn is not None
        await conn.execute("PRAGMA query_only = ON")
        with pytest.raises(StorageError):
            await store.ping()
        with pytest.raises(StorageError) as info:
            await store.upsert_login(APP, "o-1", None, "sEcReT-key", now=2.0)
        assert "sEcReT" not in str(info.value)
        assert await store.get_user(APP, "o-1") is not None
    finally:
        await store.close()


async def test_a_lock_held_forever_becomes_storage_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    store = SQLiteStorage(path, busy_timeout=0.05, attempts=2)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process's writer that never commits
        with pytest.raises(StorageError, match="locked"):
            await store.ping()
        with pytest.raises(StorageError, match="locked") as info:
            await store.upsert_login(APP, "o-1", None, "sEcReT-key", now=1.0)
        assert "sEcReT" not in str(info.value)
        assert await store.get_user(APP, "o-1") is None  # WAL readers are not blocked
        other.execute("ROLLBACK")
        await store.upsert_login(APP, "o-1", None, "key", now=1.0)
    finally:
        other.close()
        await store.close()


async def test_a_briefly_held_lock_is_retried(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    store = SQLiteStorage(path, busy_timeout=0.05, attempts=6)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, other.execute, ("ROLLBACK",))
    release.start()
    try:
        assert (await store.upsert_login(APP, "o-1", None, "key", now=1.0)).openid == "o-1"
    finally:
        release.join()
        other.close()
        await store.close()


async def test_a_cancelled_write_leaves_no_transaction_open(tmp_path: Path) -> None:
    # Shutdown cancels handlers mid-call; the shared connection must not be left
    # inside BEGIN IMMEDIATE, holding the write lock every other worker needs.
    path = tmp_path / "gw.db"
    store = SQLiteStorage(path)
    await store.open()
    try:
        for delay in (0, 0.0005, 0.001, 0.002):
            task = asyncio.create_task(store.upsert_login(APP, "o-1", None, "key", now=1.0))
            await asyncio.sleep(delay)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await store.ping()  # waits for the shielded transaction, then writes
            other = sqlite3.connect(path, isolation_level=None, timeout=0)
            try:
                other.execute("BEGIN IMMEDIATE")  # fails if our write lock is still held
                other.execute("ROLLBACK")
            finally:
                other.close()
    finally:
        await store.close()


def _run_python(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


WRITER = """
    import asyncio, pathlib, sys
    from gateway.storage.sqlite import SQLiteStorage

    async def main(path, tag, barrier):
        # Both processes start together, so opening (schema creation) and the
        # writes really overlap.
        pathlib.Path(barrier, tag).touch()
        while not pathlib.Path(barrier, "go").exists():
            await asyncio.sleep(0.005)
        store = SQLiteStorage(path)
        await store.open()
        try:
            for i in range(200):
                openid = f"{tag}-{i}" if i % 2 == 0 else f"shared-{i % 40}"
                await store.upsert_login("wx-app-a", openid, None, f"{tag}-key-{i}", float(i))
        finally:
            await store.close()

    asyncio.run(main(*sys.argv[1:]))
"""


async def test_two_processes_writing_at_once(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "gw.db"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_run_python(WRITER, str(path), tag, str(barrier)) for tag in ("p1", "p2")]
    try:
        while not all((barrier / tag).exists() for tag in ("p1", "p2")):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            await asyncio.sleep(0.01)
        (barrier / "go").touch()
        outputs = [await asyncio.to_thread(p.communicate, timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(err == "" for _, err in outputs), outputs

    with sqlite3.connect(path) as conn:
        (count,) = conn.execute("SELECT count(*) FROM users").fetchone()
    conn.close()
    assert count == 2 * 100 + 20  # each process's distinct openids plus the shared ones
    store = SQLiteStorage(path)
    await store.open()
    try:
        for openid in [f"p{n}-{i}" for n in (1, 2) for i in range(0, 200, 2)]:
            assert await store.get_user(APP, openid) is not None
    finally:
        await store.close()


KILLED = """
    import asyncio, os, signal, sys
    from gateway.storage.sqlite import SQLiteStorage

    async def main(path):
        store = SQLiteStorage(path)
        await store.open()
        await store.upsert_login("wx-app-a", "o-durable", "u-1", "key-1", 1.0)
        await store.revoke_session("s-durable", 100.0, 1.0)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint

    asyncio.run(main(sys.argv[1]))
"""


async def test_a_commit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "gw.db"
    proc = _run_python(KILLED, str(path))
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == -9, (out, err)
    store = SQLiteStorage(path)
    await store.open()
    try:
        user = await store.get_user(APP, "o-durable")
        assert user is not None and user.session_key == "key-1"
        assert (await store.revoked_since(0))[0] == ["s-durable"]
    finally:
        await store.close()
