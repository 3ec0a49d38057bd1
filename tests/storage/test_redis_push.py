"""Logouts pushed to every worker on Redis, a catch-up read after each
subscription, and revocations that wait for replicas (Redis WAIT).

Workers here are :class:`Revocations` on their own :class:`RedisStorage` (one
client each, as two processes would have), on a real redis-server. The poll is
set far above the bounds asserted, so only the push can meet them. Last, the
configuration keys of this part as the loader reads them.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.auth.revocations import Revocations
from gateway.config import ConfigError, build_config
from gateway.storage.redis import RedisStorage
from tests.support.redis import RedisServer, own_redis, redis_server, unique_prefix
from tests.support.waiting import until, until_sync

__all__ = ["own_redis", "redis_server"]  # fixtures: imported for pytest to find

APP = "wx-app-a"
# The poll, set so far above the bounds below that only a push meets them.
SLOW_POLL = 10.0
# The contract's 1 s for a logout to reach every instance.
PUSHED_WITHIN = 1.0
FAR = time.time() + 3600


@dataclass
class Session:
    session_id: str
    appid: str = APP
    openid: str = "o-1"
    epoch: int = 0


def sync_client(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)


def subscribers(server: RedisServer | redis.Redis, channel: str) -> int:
    """How many clients listen on ``channel`` (asked on ``server``'s own connection
    when given a client: a new one may not get in)."""
    if isinstance(server, redis.Redis):
        return int(dict(server.pubsub_numsub(channel))[channel])
    with sync_client(server) as client:
        return subscribers(client, channel)


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStorage, RedisStorage]]:
    """Two clients of one store: the writer (a worker that logs out) and the reader's."""
    prefix = unique_prefix()
    writer = RedisStorage(redis_server.url, prefix=prefix)
    reader = RedisStorage(redis_server.url, prefix=prefix)
    await writer.open()
    await reader.open()
    yield writer, reader
    await reader.close()
    await writer.close()


async def listening_worker(store: RedisStorage, server: RedisServer) -> Revocations:
    worker = Revocations(
        store, time.time, retain=7200.0, poll_interval=SLOW_POLL, max_staleness=30.0
    )
    await worker.start()
    # Subscribed (Redis counts it) before anything is written: what follows is push.
    await until(lambda: subscribers(server, store.channel) >= 1, "the worker subscribing")
    return worker


async def test_a_logout_is_pushed_far_below_the_poll_interval(
    stores: tuple[RedisStorage, RedisStorage], redis_server: RedisServer
) -> None:
    writer, store = stores
    worker = await listening_worker(store, redis_server)
    try:
        session = Session("s-pushed")
        assert not worker.is_revoked(session)
        await writer.revoke_session(session.session_id, FAR, time.time())
        await until(lambda: worker.is_revoked(session), "the pushed logout", PUSHED_WITHIN)

        # A ban travels on the other feed, woken the same way.
        await writer.upsert_login(APP, "o-2", None, "key", time.time())
        banned = Session("s-of-o-2", openid="o-2")
        await writer.revoke_user(APP, "o-2", time.time(), FAR)
        await until(lambda: worker.is_revoked(banned), "the pushed ban", PUSHED_WITHIN)
    finally:
        await worker.close()


async def test_a_killed_subscription_comes_back_and_its_catch_up_finds_the_logout(
    own_redis: RedisServer, tmp_path: Path
) -> None:
    """The worker's subscription is killed (CLIENT KILL) and cannot come back
    (Redis asks for a password new connections do not have; the worker's open
    connections stay in); a logout is stored while nobody listens; once the
    subscription is back, the read that follows it finds the logout, long before
    the poll would."""
    prefix = unique_prefix()
    writer = RedisStorage(own_redis.url, prefix=prefix)
    store = RedisStorage(own_redis.url, prefix=prefix)
    await writer.open()
    await store.open()
    worker = await listening_worker(store, own_redis)
    admin = sync_client(own_redis)
    try:
        await writer.ping()  # the writer's connection is open before the door closes
        admin.config_set("requirepass", "not-known-to-the-worker")
        assert admin.client_kill_filter(_type="pubsub") == 1
        await until(lambda: subscribers(admin, store.channel) == 0, "the subscription gone")

        session = Session("s-while-unsubscribed")
        await writer.revoke_session(session.session_id, FAR, time.time())
        # Published to nobody: the worker has not heard of it.
        assert not worker.is_revoked(session)

        admin.config_set("requirepass", "")
        await until(lambda: worker.is_revoked(session), "the catch-up read", SLOW_POLL / 2)
        assert subscribers(own_redis, store.channel) == 1
    finally:
        admin.config_set("requirepass", "")
        admin.close()
        await worker.close()
        await store.close()
        await writer.close()


# -- WAIT: a revocation on the replicas before it is answered ---------------------


def replica_of(primary: RedisServer, directory: Path) -> RedisServer:
    replica = RedisServer(directory).start()
    with sync_client(replica) as client:
        client.execute_command("REPLICAOF", "127.0.0.1", str(primary.port))

    def linked() -> bool:
        with sync_client(replica) as client:
            return bool(client.info("replication").get("master_link_status") == "up")

    until_sync(linked, "the replica in sync")
    return replica


def replica_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "replicas" in r.getMessage()]


async def test_a_revocation_waits_for_a_real_replica(
    own_redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    replica = replica_of(own_redis, tmp_path / "replica")
    store = RedisStorage(own_redis.url, prefix="wait:")
    store.wait_for_replicas(1, 1.0)
    await store.open()
    caplog.set_level(logging.INFO, logger="gateway.storage")
    try:
        await store.revoke_session("s-replicated", FAR, time.time())
        # WAIT returned only once the replica had it: it is there now, no retry.
        with sync_client(replica) as client:
            assert client.zscore("wait:rev:ids", "s-replicated") is not None
        assert replica_warnings(caplog) == []

        # The replica stops answering: each revocation waits the configured 1 s,
        # then is answered all the same; one warning for the two.
        assert replica.process is not None
        os.kill(replica.process.pid, signal.SIGSTOP)
        try:
            await store.revoke_session("s-while-stalled", FAR, time.time())
            await store.revoke_session("s-still-stalled", FAR, time.time())
        finally:
            os.kill(replica.process.pid, signal.SIGCONT)
        assert len(replica_warnings(caplog)) == 1, replica_warnings(caplog)
        assert "reached 0 of 1 replicas" in replica_warnings(caplog)[0]
        ids, _ = await store.revoked_since(0)
        assert {"s-while-stalled", "s-still-stalled"} <= set(ids)

        # Back in step: the next revocation reaches it again, said once.
        await store.revoke_session("s-after", FAR, time.time())
        assert replica_warnings(caplog)[1:] == ["storage: revocations reach 1 replicas again"]
    finally:
        await store.close()
        replica.stop()


async def test_without_a_replica_the_wait_times_out_and_the_logout_stands(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisStorage(redis_server.url, prefix=unique_prefix())
    store.wait_for_replicas(1, 0.2)
    await store.open()
    try:
        await store.revoke_session("s-unreplicated", FAR, time.time())
        ids, _ = await store.revoked_since(0)
        assert ids == ["s-unreplicated"]  # stored: the primary has it
        assert [m for m in replica_warnings(caplog) if "reached 0 of 1" in m]
    finally:
        await store.close()


def test_a_wait_must_end_before_the_reply_timeout() -> None:
    store = RedisStorage("redis://127.0.0.1:1/0", timeout=2.0)
    with pytest.raises(ValueError, match="below the reply timeout"):
        store.wait_for_replicas(1, 2.0)


# -- the storage keys of this part, as the loader reads them ----------------------


def storage_config(**storage: Any) -> dict[str, Any]:
    return {
        "wechat": {"appid": APP, "secret": "s"},
        "token": {"secret": "test-token-secret-0123456789abcdef-0123456789"},
        "storage": {"url": "redis://127.0.0.1:6379/0", **storage},
    }


def test_the_storage_keys_default_and_parse() -> None:
    defaults = build_config(storage_config(), env={}).storage
    assert (defaults.wait_replicas, defaults.wait_timeout, defaults.max_staleness) == (0, 1.0, 30.0)
    given = build_config(
        storage_config(wait_replicas=2, wait_timeout="250ms", max_staleness="5s"), env={}
    ).storage
    assert (given.wait_replicas, given.wait_timeout, given.max_staleness) == (2, 0.25, 5.0)


@pytest.mark.parametrize(
    ("storage", "problem"),
    [
        ({"wait_timeout": "2s"}, "storage.wait_timeout: must be at least 0.001s and at most 1.5s"),
        ({"max_staleness": "500ms"}, "storage.max_staleness: must be at least 1s"),
        ({"wait_replicas": -1}, "storage.wait_replicas: must be between 0 and 64"),
        (
            {"url": "sqlite:///./x.db", "wait_replicas": 1},
            "storage.wait_replicas: only for a Redis store",
        ),
    ],
)
def test_bad_storage_keys_are_named(storage: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(storage_config(**storage), env={})
    assert any(line.startswith(problem) for line in caught.value.problems), caught.value.problems
