"""The revocation set and the user-event feed, one worker's view, on a real SQLite file.

Two :class:`Revocations` on one file stand for two workers: what one stores, the
other learns by polling. The end-to-end proofs (real processes, the CLI, sockets)
are in tests/e2e/test_users_revoke.py; here each rule is pinned down alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.auth.phones import MISSING, Phones
from gateway.auth.revocations import Revocations
from gateway.storage.sqlite import SQLiteStorage

SHOP, CARD = "wx-shop", "wx-card"
NOW = 1_000_000.0


@dataclass
class Session:
    session_id: str
    appid: str
    openid: str
    epoch: int = 0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStorage]:
    storage = SQLiteStorage(tmp_path / "gateway.db")
    await storage.open()
    yield storage
    await storage.close()


async def worker(store: SQLiteStorage, clock: Clock, phones: Phones | None = None) -> Revocations:
    # No background poll: each test calls refresh() where a poll would run.
    revocations = Revocations(
        store, clock, retain=100.0, on_phone=phones.forget if phones else None
    )
    await revocations.refresh()
    return revocations


async def test_a_ban_refuses_older_epochs_only_and_only_that_user(store: SQLiteStorage) -> None:
    clock = Clock()
    await store.upsert_login(SHOP, "o-1", "u-1", "key", NOW)
    await store.upsert_login(CARD, "o-1", "u-1", "key", NOW)  # same openid text, other app
    revocations = await worker(store, clock)
    before = Session("s-before", SHOP, "o-1", epoch=0)
    assert not revocations.is_revoked(before)

    record = await store.revoke_user(SHOP, "o-1", NOW, NOW + 50)
    assert record is not None and record.epoch == 1
    assert not revocations.is_revoked(before)  # not yet polled
    await revocations.refresh()
    assert revocations.is_revoked(before)
    assert not revocations.is_revoked(Session("s-after", SHOP, "o-1", epoch=1))
    assert not revocations.is_revoked(Session("s-card", CARD, "o-1", epoch=0))
    assert not revocations.is_revoked(Session("s-other", SHOP, "o-2", epoch=0))


async def test_a_worker_started_after_the_ban_knows_it(store: SQLiteStorage) -> None:
    clock = Clock()
    await store.upsert_login(SHOP, "o-1", None, "key", NOW)
    await store.revoke_user(SHOP, "o-1", NOW, NOW + 50)
    await store.revoke_user(SHOP, "o-1", NOW, NOW + 50)  # twice: epoch 2
    late = await worker(store, clock)
    assert late.is_revoked(Session("s", SHOP, "o-1", epoch=1))
    assert not late.is_revoked(Session("s", SHOP, "o-1", epoch=2))


async def test_an_older_ban_arriving_late_never_lowers_the_epoch(store: SQLiteStorage) -> None:
    clock = Clock()
    await store.upsert_login(SHOP, "o-1", None, "key", NOW)
    for _ in range(3):
        await store.revoke_user(SHOP, "o-1", NOW, NOW + 50)
    revocations = await worker(store, clock)
    # The feed held epochs 1, 2 and 3 in order; the kept one is 3 whatever the order.
    revocations._banned_now(SHOP, "o-1", 1, NOW)
    assert revocations.is_revoked(Session("s", SHOP, "o-1", epoch=2))


async def test_watchers_of_the_banned_user_fire_once_and_others_do_not(
    store: SQLiteStorage,
) -> None:
    clock = Clock()
    await store.upsert_login(SHOP, "o-1", None, "key", NOW)
    revocations = await worker(store, clock)
    fired: list[str] = []
    old = Session("s-old", SHOP, "o-1", epoch=0)
    revocations.watch(old, lambda: fired.append("old"))
    revocations.watch(Session("s-new", SHOP, "o-1", epoch=1), lambda: fired.append("new"))
    revocations.watch(Session("s-card", CARD, "o-1"), lambda: fired.append("card"))
    unwatch = revocations.watch(Session("s-gone", SHOP, "o-1"), lambda: fired.append("gone"))
    unwatch()  # its socket ended before the ban: never called

    await store.revoke_user(SHOP, "o-1", NOW, NOW + 50)
    await revocations.refresh()
    assert fired == ["old"]
    await revocations.refresh()  # the same event is not applied twice
    assert fired == ["old"]


async def test_a_logout_fires_the_session_watcher_and_not_the_users_other_sessions(
    store: SQLiteStorage,
) -> None:
    clock = Clock()
    revocations = await worker(store, clock)
    fired: list[str] = []
    revocations.watch(Session("s-1", SHOP, "o-1"), lambda: fired.append("s-1"))
    revocations.watch(Session("s-2", SHOP, "o-1"), lambda: fired.append("s-2"))
    await revocations.revoke("s-1", NOW + 50)
    assert fired == ["s-1"]


async def test_bans_are_forgotten_after_retain_like_logouts(store: SQLiteStorage) -> None:
    clock = Clock()
    await store.upsert_login(SHOP, "o-1", None, "key", NOW)
    revocations = await worker(store, clock)
    await store.revoke_user(SHOP, "o-1", NOW, NOW + 50)
    await revocations.refresh()
    clock.now += 99
    revocations._forget_old(clock.now)
    assert revocations.is_revoked(Session("s", SHOP, "o-1"))
    clock.now += 2  # past retain (100 s): every token of the old epoch has expired
    revocations._forget_old(clock.now)
    assert not revocations.is_revoked(Session("s", SHOP, "o-1"))


async def test_a_phone_set_elsewhere_invalidates_the_cache_through_the_feed(
    store: SQLiteStorage,
) -> None:
    clock = Clock()
    await store.upsert_login(SHOP, "o-1", None, "key", NOW)
    phones = Phones(store)
    revocations = await worker(store, clock, phones)
    assert phones.cached(SHOP, "o-1") is MISSING
    assert await phones.load(SHOP, "o-1") is None
    assert phones.cached(SHOP, "o-1") is None  # "no number" is cached too

    await store.set_phone(SHOP, "o-1", "13800138000", NOW)  # another worker's /auth/phone
    assert phones.cached(SHOP, "o-1") is None  # stale until the poll
    await revocations.refresh()
    assert phones.cached(SHOP, "o-1") is MISSING
    assert await phones.load(SHOP, "o-1") == "13800138000"
    assert phones.cached(CARD, "o-1") is MISSING  # per app


async def test_a_load_racing_a_change_does_not_cache_the_old_number(
    store: SQLiteStorage,
) -> None:
    await store.upsert_login(SHOP, "o-1", None, "key", NOW)
    phones = Phones(store)
    loading = asyncio.create_task(phones.load(SHOP, "o-1"))
    await asyncio.sleep(0)  # the load is now waiting on the database thread
    assert not loading.done()
    phones.forget(SHOP, "o-1")  # the feed reports a change while the read is under way
    await loading
    assert phones.cached(SHOP, "o-1") is MISSING


def test_the_phone_cache_is_bounded() -> None:
    phones = Phones(storage=None, max_entries=10)  # type: ignore[arg-type]
    for i in range(25):
        phones.remember(SHOP, f"o-{i}", None)
    assert len(phones._numbers) <= 10
    assert phones.cached(SHOP, "o-24") is None  # the newest stay
    assert phones.cached(SHOP, "o-0") is MISSING
