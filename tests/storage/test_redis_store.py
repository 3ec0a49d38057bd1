"""What the Redis store must do beyond the conformance suite: stay in its prefix,
fail fast and recover by itself, never show its password, speak TLS and
Sentinel. Every test runs a real redis-server (tests/support/redis.py)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import pytest

from gateway.storage import AccessToken, StorageError
from gateway.storage.redis import RedisStorage
from gateway.storage.redis_url import masked, password_of
from gateway.storage.urls import store_for
from tests.support.gateway import free_port
from tests.support.redis import RedisServer, own_redis, redis_binary, redis_server, unique_prefix
from tests.support.waiting import PROMPT, eventually

__all__ = ["own_redis", "redis_server"]  # fixtures: imported for pytest to find

APP = "wx-app-a"
PASSWORD = "pA55-w0rd-never-shown"
# Generous: it only tells "a few seconds" from "hangs"; the store's own bound
# with timeout=0.5 is 3 * 0.5 + 1 = 2.5 s.
BOUND = 10.0


async def _fill(store: RedisStorage) -> None:
    await store.upsert_login(APP, "o-1", "u-1", "key-1", now=1.0)
    await store.set_phone(APP, "o-1", "13800138000", now=2.0)
    await store.revoke_user(APP, "o-1", now=3.0, until=500.0)
    await store.revoke_session("s-1", expires_at=100.0, now=1.0)
    await store.put_access_token(APP, AccessToken("tok", 50.0))
    assert await store.acquire_lease("refresh", "w-1", ttl=10.0, now=1.0)
    await store.ping()


@pytest.fixture
async def opened(redis_server: RedisServer) -> AsyncIterator[RedisStorage]:
    store = RedisStorage(redis_server.url, prefix=unique_prefix())
    await store.open()
    yield store
    await store.close()


# -- namespacing ----------------------------------------------------------------


async def test_every_key_is_under_the_prefix(own_redis: RedisServer) -> None:
    store = RedisStorage(own_redis.url, prefix="gw-one:")
    await store.open()
    try:
        await _fill(store)
    finally:
        await store.close()
    keys = own_redis.all_keys()
    assert keys, "the store wrote nothing"
    assert [k for k in keys if not k.startswith("gw-one:")] == []


async def test_two_prefixes_on_one_redis_do_not_see_each_other(redis_server: RedisServer) -> None:
    one = RedisStorage(redis_server.url, prefix=unique_prefix())
    two = RedisStorage(redis_server.url, prefix=unique_prefix())
    await one.open()
    await two.open()
    try:
        await _fill(one)
        assert await two.get_user(APP, "o-1") is None
        assert await two.users_by_unionid("u-1") == []
        assert await two.revoked_since(0) == ([], 0)
        assert await two.user_events_since(0) == ([], 0)
        assert await two.get_access_token(APP) is None
        assert [u async for u in two.all_users()] == []
        # The lease one holds is free under the other prefix.
        assert await two.acquire_lease("refresh", "w-2", ttl=10.0, now=1.0)
        assert await two.purge_expired(now=10_000.0) == 0
        assert (await one.revoked_since(0))[0] == ["s-1"]
    finally:
        await one.close()
        await two.close()


async def test_a_colon_in_an_openid_names_no_other_users_key(opened: RedisStorage) -> None:
    # "a:b" + "c" and "a" + "b:c" must be two records, not one key.
    await opened.upsert_login("a:b", "c", None, "key-1", now=1.0)
    await opened.upsert_login("a", "b:c", None, "key-2", now=1.0)
    first, second = await opened.get_user("a:b", "c"), await opened.get_user("a", "b:c")
    assert first is not None and second is not None
    assert (first.session_key, second.session_key) == ("key-1", "key-2")
    found = sorted([(u.appid, u.openid) async for u in opened.all_users()])
    assert found == [("a", "b:c"), ("a:b", "c")]


# -- nothing lives forever --------------------------------------------------------


async def test_feeds_expire_without_a_purge_but_cursors_never_go_back(
    own_redis: RedisServer,
) -> None:
    import redis

    store = RedisStorage(own_redis.url, prefix="p:")
    await store.open()
    try:
        await _fill(store)
    finally:
        await store.close()
    client = redis.Redis(port=own_redis.port, decode_responses=True)
    try:
        ttls = {key: client.ttl(key) for key in own_redis.all_keys()}
    finally:
        client.close()
    # Feeds and leases carry a TTL (the revocation's life plus the margin)...
    for key in ("p:rev:ids", "p:rev:exp", "p:ev:feed", "p:ev:until", "p:lease:refresh"):
        assert ttls[key] > 0, key
    # ...the counters do not (a reset counter would make every worker's cursor
    # skip new revocations), nor do users (never purged, as with SQLite).
    assert ttls["p:rev:seq"] == ttls["p:ev:seq"] == -1
    assert ttls["p:u:wx-app-a:o-1"] == -1


async def test_a_cursor_ahead_of_a_reset_store_rereads_everything(own_redis: RedisServer) -> None:
    # A Redis without persistence restarted (or a failover to a replica behind):
    # the counters start again, and a worker's cursor is ahead of them.
    store = RedisStorage(own_redis.url, prefix="p:")
    await store.open()
    try:
        for i in range(3):
            await store.revoke_session(f"s-{i}", expires_at=100.0, now=1.0)
        _, cursor = await store.revoked_since(0)
        assert cursor == 3
        own_redis.stop()
        own_redis.start()
        await store.revoke_session("s-new", expires_at=100.0, now=1.0)
        # Not ([], 3) forever: what is stored, and a cursor the counter can pass.
        assert await store.revoked_since(cursor) == (["s-new"], 1)
    finally:
        await store.close()


# -- an unreachable or stalled Redis --------------------------------------------


async def _timed_failure(call: Awaitable[object]) -> tuple[StorageError, float]:
    start = time.monotonic()
    with pytest.raises(StorageError) as caught:
        await call
    return caught.value, time.monotonic() - start


async def test_a_stopped_redis_fails_fast_then_the_same_object_recovers(
    own_redis: RedisServer,
) -> None:
    store = RedisStorage(own_redis.url, prefix="p:", timeout=0.5)
    await store.open()
    try:
        await store.upsert_login(APP, "o-1", None, "key-1", now=1.0)
        own_redis.stop()
        for call in (
            store.ping(),
            store.get_user(APP, "o-1"),
            store.upsert_login(APP, "o-2", None, "k", now=2.0),
            store.revoked_since(0),
            store.revoke_session("s-1", expires_at=100.0, now=1.0),
        ):
            error, took = await _timed_failure(call)
            assert took < BOUND, f"{error}: {took:.1f} s"
            assert "127.0.0.1" in str(error)
        own_redis.start()  # same port; nothing persisted (--save "")

        async def works() -> bool:
            try:
                await store.ping()
            except StorageError:
                return False
            return True

        await eventually(works, "the store answering again once Redis is back")
        # Scripts too: the restarted Redis forgot them, redis-py loads them again.
        user = await store.upsert_login(APP, "o-1", None, "key-2", now=3.0)
        assert (user.session_key, user.epoch) == ("key-2", 0)
    finally:
        await store.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a stalled Redis."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def test_a_redis_that_never_answers_is_an_error_not_a_hang(silent_port: int) -> None:
    store = RedisStorage(f"redis://127.0.0.1:{silent_port}/0", prefix="p:", timeout=0.5)
    error, took = await _timed_failure(store.open())
    assert took < BOUND
    assert "127.0.0.1" in str(error)


async def test_nothing_listening_is_an_error_at_open() -> None:
    store = RedisStorage(f"redis://127.0.0.1:{free_port()}/0", prefix="p:", timeout=0.5)
    error, took = await _timed_failure(store.open())
    assert took < BOUND
    assert "open" in str(error)


# -- the password ----------------------------------------------------------------


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", password=PASSWORD).start()
    yield server
    server.stop()


async def test_the_password_is_used_and_never_shown(locked_redis: RedisServer) -> None:
    store = RedisStorage(locked_redis.url, prefix="p:", timeout=0.5)
    assert PASSWORD in locked_redis.url
    assert PASSWORD not in repr(store) and "***" in repr(store)
    await store.open()
    try:
        await _fill(store)
        assert PASSWORD not in repr(store)
        locked_redis.stop()
        error, _ = await _timed_failure(store.get_user(APP, "o-1"))
        assert PASSWORD not in str(error) and "***" in str(error)
    finally:
        await store.close()


@pytest.mark.parametrize("password", [None, "wrong-" + PASSWORD])
async def test_a_refused_login_names_no_password(
    locked_redis: RedisServer, password: str | None
) -> None:
    auth = f":{password}@" if password else ""
    store = RedisStorage(f"redis://{auth}127.0.0.1:{locked_redis.port}/0", prefix="p:")
    error, _ = await _timed_failure(store.open())
    assert PASSWORD not in str(error)
    assert "Authentication" in str(error) or "NOAUTH" in str(error) or "auth" in str(error)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
        (
            "rediss://h:6380/1?password=s3cret&ssl_cert_reqs=none",
            "rediss://h:6380/1?password=***&ssl_cert_reqs=none",
        ),
        ("redis+sentinel://:s3cret@a:1,b:2/main/0", "redis+sentinel://:***@a:1,b:2/main/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_urls_are_shown_masked(url: str, shown: str) -> None:
    assert masked(url) == shown
    assert password_of(url) == (None if shown == url else "s3cret")


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://a:1/",  # no service
        "redis+sentinel://:s3cret@a:x/main/0",  # not a port
        "redis+sentinel://a:1/main/zero",  # not a db
    ],
)
async def test_bad_sentinel_urls_fail_at_open_without_the_password(url: str) -> None:
    with pytest.raises(StorageError) as caught:
        await store_for(url, default_appid=None).open()
    assert "s3cret" not in str(caught.value)


# -- TLS and Sentinel --------------------------------------------------------------


async def test_rediss_speaks_tls(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", tls=True).start()
    try:
        assert server.url.startswith("rediss://")
        store = store_for(server.url, default_appid=None, prefix="p:")
        await store.open()
        try:
            await store.upsert_login(APP, "o-1", None, "key-1", now=1.0)
            assert (await store.get_user(APP, "o-1")) is not None
        finally:
            await store.close()
        # The same port without TLS is not a Redis one can talk to.
        plain = RedisStorage(f"redis://127.0.0.1:{server.port}/0", prefix="p:", timeout=0.5)
        await _timed_failure(plain.open())
    finally:
        server.stop()


@pytest.fixture
def sentinel(own_redis: RedisServer, tmp_path: Path) -> Iterator[int]:
    """A real Sentinel (redis-server --sentinel) watching ``own_redis`` as ``main``."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"  # Sentinel rewrites its config: a file of its own
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor main 127.0.0.1 {own_redis.port} 1\n"
    )
    process = subprocess.Popen(
        [redis_binary(), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=PROMPT)


async def test_redis_sentinel_finds_the_master(sentinel: int, own_redis: RedisServer) -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{sentinel}/main/0"
    store = store_for(url, default_appid=None, prefix="p:")

    async def opens() -> bool:
        try:
            await store.open()
        except StorageError:
            return False  # the Sentinel is still starting
        return True

    await eventually(opens, "opening through the Sentinel")
    try:
        await store.upsert_login(APP, "o-1", None, "key-1", now=1.0)
    finally:
        await store.close()
    # Written to the master the Sentinel named (the first, dead Sentinel skipped).
    assert "p:u:wx-app-a:o-1" in own_redis.all_keys()
