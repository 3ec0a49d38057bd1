"""What the Redis store adds to the feeds: wake-ups pushed to every worker, and
writes that wait for replicas.

Wake-ups. The scripts that append a revocation or a user event PUBLISH on one
channel (``<prefix>changes``) in the same script, and every worker subscribes:
a message means "read the feeds now". It carries nothing to trust: what changed
is always read from the feeds, so a message lost while a connection was down
costs time, never a revocation. To make that so, the listener also yields once
each time Redis confirms the subscription (the first time, and again after
redis-py reconnected and re-subscribed by itself), and the worker reads the
feeds then: that read finds whatever was appended while nobody listened.

A subscription sits silent for long stretches, and a connection that died
without a FIN or RST (a peer that vanished, a NAT that forgot it) would look
the same; so a silent listener pings, and one that gets no pong within a
heartbeat gives up (the worker subscribes again).

Replicas. ``WAIT n timeout`` counts the replicas that have every write this
connection made, so it must run on the connection of the write: both go in one
pipeline, which redis-py sends on one connection.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger("gateway.storage")

# Seconds a subscription may stay silent before it is pinged, and then without
# the pong before it is given up.
HEARTBEAT = 5.0


async def wake_ups(client: Redis, channel: str) -> AsyncGenerator[None, None]:
    """Yield once per subscription confirmed and once per message on ``channel``.
    Raises redis-py's errors when the connection fails (redis-py reconnects once
    by itself first: that shows as a new confirmation)."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        waiting_for_pong = False
        while True:
            message = await pubsub.get_message(timeout=HEARTBEAT)
            if message is None:
                if waiting_for_pong:
                    raise RedisConnectionError(f"no answer to PING within {HEARTBEAT:g} s")
                await pubsub.ping()
                waiting_for_pong = True
                continue
            waiting_for_pong = False  # anything at all proves the link alive
            if message["type"] in ("subscribe", "message"):
                yield None
    finally:
        await pubsub.aclose()


class Replicas:
    """How many replicas a revocation waits for (0: none), for how long, and
    whether they kept up: one warning when they fall behind and one line when
    they are back, not one per logout."""

    def __init__(self, count: int = 0, timeout: float = 0.0) -> None:
        self.count = count
        self.timeout = timeout
        self._behind = False

    def acknowledged(self, acknowledged: int) -> None:
        behind = acknowledged < self.count
        if behind and not self._behind:
            log.warning(
                "storage: a revocation reached %d of %d replicas within %g s "
                "(storage.wait_replicas); answered all the same: a failover to a "
                "replica without it would forget it",
                acknowledged, self.count, self.timeout,
            )  # fmt: skip
        elif self._behind and not behind:
            log.info("storage: revocations reach %d replicas again", self.count)
        self._behind = behind


async def write_and_wait(
    client: Redis, script: Any, keys: list[str], args: list[Any], replicas: Replicas
) -> tuple[Any, int]:
    """Run ``script`` (a redis-py Script), then ``WAIT`` for ``replicas`` on the
    same connection: its result and how many replicas acknowledged the write."""
    pipe = client.pipeline(transaction=False)
    # A Script queues its EVALSHA (and loads itself first if Redis lacks it).
    await script(keys=keys, args=args, client=pipe)
    pipe.execute_command("WAIT", replicas.count, math.ceil(replicas.timeout * 1000))
    result, acknowledged = await pipe.execute()
    return result, int(acknowledged)
