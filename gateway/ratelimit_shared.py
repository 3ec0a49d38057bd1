"""Rate limits that count across every instance on a shared store (contract section 10).

Two limits, two designs, because they sit on two very different paths:

* ``rate_limits.login_per_ip`` (:class:`gateway.ratelimit.LoginLimiter`, there
  because ``gateway.auth`` may import that module): one atomic call to the
  store per login (a GCRA token bucket in Redis, ``SharedCounters.take_token``),
  so the limit is exact whichever instance a login reaches. A login already
  waits on WeChat; one more round trip to Redis is noise.
* Route ``rate_limit`` (:class:`RouteLimits`): checked on every proxied request,
  which must not wait on Redis. Each worker spends from a local *share* of each
  key's budget for the current window (the rate's period: 1 s for ``N/s``, 60 s
  for ``N/m``). A key first seen in a window starts with ``limit / live
  workers``, taken without asking. Every ``SYNC_EVERY`` a background task makes
  one call for all its active keys: it counts those blind shares into a shared
  per-window counter of *claims*, then, for a key still asked for, claims a top
  up (back to ``limit / live workers`` unspent) from what the counter leaves,
  and gives back what an idle key holds. Claims are granted atomically and
  never add up past the limit, so only the blind shares can overshoot it (their
  random rounding, and a worker that first sees a key late in a window);
  measured in bench/ratelimit_cluster.py, documented in docs/configuration.md. A
  client seen by one worker gets its whole budget within a few syncs.

Why not the ``limits`` library (it has an async Redis storage): it opens its own
connection pool from its own URL syntax (no ``redis+sentinel://host/service/db``
as the store parses it, no ``storage.prefix``, no bounded per-call deadline that
turns an outage into StorageError), and it has no local-share mode, so the proxy
path would pay a round trip per request. The two Lua scripts (``redis_lua``) are
40 lines on the store's one client.

When the store is unreachable: a login answers 503 ``storage_unavailable`` (the
login needs the store anyway); a route falls back, after ``STALE_AFTER`` without
a successful sync, to the per-process token bucket it has on SQLite, and returns
to shared counting on the first sync that succeeds. The proxy path never waits
on the store either way.

Without a shared store (SQLite) both are the per-process limiters of
:mod:`gateway.ratelimit`, as before.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.config import Rate
from gateway.errors import RateLimited
from gateway.ratelimit import MAX_KEYS, client_network
from gateway.storage import Storage, StorageError
from gateway.storage.base import SharedCounters

if TYPE_CHECKING:
    from gateway.proxy.routing import Route

log = logging.getLogger("gateway")

# How often each worker adds what it spent and takes new shares: the accuracy
# knob. Shares handed out between two syncs are what can overshoot.
SYNC_EVERY = 0.1
# Without a successful sync for this long, routes count per process again.
STALE_AFTER = 1.0
# A worker that has not synced for this long no longer counts as live (it died,
# or its gateway stopped): the others' shares grow back.
LIVE_FOR = 2.0
# A window's first syncs only count the shares workers took blind (see _sync_batch).
GRACE_SYNCS = 3
# Keys per call to the store (a flood of client addresses makes many).
SYNC_BATCH = 500


def _escaped(text: str) -> str:
    # The counter name is route:window:key; a colon in a route prefix must not
    # make two routes' counters one.
    return text.replace("%", "%25").replace(":", "%3A")


def _share(amount: float) -> int:
    """``amount`` rounded down or up at random, by its fraction: three workers
    splitting 100 hand out 33 or 34 each, 100 in expectation, where rounding
    down would lose one request a window for good and rounding up overshoot."""
    whole = math.floor(amount)
    return whole + (random.random() < amount - whole)  # noqa: S311 (not a secret)


@dataclass(slots=True)
class _Share:
    """One key's budget on this worker for one window."""

    allowed: int  # passes this worker may make in the window (resized at each sync)
    passed: int = 0
    held: int = 0  # what the shared counter holds for this worker (spent + claimed)
    asked: int = 0  # requests since the last sync, refused ones too (the demand)
    reported: bool = False  # the first share (taken without the store) is counted


@dataclass(slots=True)
class _Window:
    """One route's shares for the current window."""

    name: str
    rate: Rate
    number: int = -1
    shares: dict[str, _Share] = field(default_factory=dict)

    def counter(self, key: str) -> str:
        return f"route:{self.name}:{self.number}:{key}"


class RouteLimits:
    """Route ``rate_limit`` for a set of routes: shared shares when ``storage`` is
    shared and in sync, else each route's own per-process limiter."""

    def __init__(
        self,
        routes: Sequence[Route],
        storage: Storage,
        *,
        ipv6_prefix: int,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sync_every: float = SYNC_EVERY,
    ) -> None:
        self._ipv6_prefix = ipv6_prefix
        # Windows follow ``clock`` (wall time: instances agree on it within NTP's
        # milliseconds); staleness follows ``monotonic`` (never jumps).
        self._clock = clock
        self._monotonic = monotonic
        self._sync_every = sync_every
        self._shared = storage if isinstance(storage, SharedCounters) else None
        self._windows: dict[str, _Window] = {}
        if self._shared is not None:
            for route in routes:
                rate = route.config.rate_limit
                if rate is not None:
                    self._windows[route.prefix] = _Window(_escaped(route.prefix), rate)
        # One member per worker process; the random part tells a restarted pid apart.
        self.member = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.live = 1  # workers syncing, as the last sync saw them
        self.syncs = 0  # successful syncs (tests wait on it)
        self._synced_at = -math.inf  # monotonic time of the last successful sync
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    # -- the request path: no I/O --------------------------------------------
    def check(self, route: Route, key: str) -> None:
        """Take one request for ``key`` on ``route`` (which has a limiter) or raise
        RateLimited."""
        window = self._windows.get(route.prefix)
        if window is None or not self.syncing:
            assert route.limiter is not None
            route.limiter.check(key)
            return
        now = self._clock()
        number = int(now // window.rate.period)
        if number != window.number:  # a new window: last one's shares are spent
            window.number, window.shares = number, {}
        share = window.shares.get(key)
        if share is None:
            if len(window.shares) >= MAX_KEYS:  # a flood of addresses: memory stays bounded
                assert route.limiter is not None
                route.limiter.check(key)
                return
            share = window.shares[key] = _Share(_share(window.rate.count / self.live))
        share.asked += 1
        if share.passed >= share.allowed:
            left = (number + 1) * window.rate.period - now
            raise RateLimited(retry_after=max(1, math.ceil(left)))
        share.passed += 1

    def check_client(self, route: Route, address: str) -> None:
        """:meth:`check` for a client address (grouped by IPv6 network)."""
        self.check(route, "ip:" + client_network(address, self._ipv6_prefix))

    # -- the background sync ---------------------------------------------------
    async def start(self) -> None:
        """Sync once (bounded: a store that is down leaves the routes per process)
        and keep syncing in the background."""
        if self._shared is None or not self._windows:
            return
        await self.sync()
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._sync_every)
            await self.sync()

    async def sync(self) -> bool:
        """Add what was spent since the last sync and size new shares; False (and
        nothing lost: the counts go with the next sync) when the store fails."""
        shared = self._shared
        assert shared is not None
        spent = [(w, key, s) for w in self._windows.values() for key, s in w.shares.items()]
        try:
            async with asyncio.timeout(STALE_AFTER):
                if not spent:  # still a heartbeat: the others count this worker
                    live, _ = await self._claim(shared, [])
                    self.live = max(1, live)
                for at in range(0, len(spent), SYNC_BATCH):
                    await self._sync_batch(shared, spent[at : at + SYNC_BATCH])
        except (StorageError, TimeoutError) as exc:
            if not self._failing:  # one line per outage, not one per sync
                self._failing = True
                reason = str(exc) or f"no answer within {STALE_AFTER:g} s"
                log.warning(
                    "rate limits: shared counters unavailable (%s); routes count per "
                    "process after %g s of it",
                    reason,
                    STALE_AFTER,
                )
            return False
        if self._failing:
            self._failing = False
            log.info("rate limits: shared counters back; routes count across instances")
        self._synced_at = self._monotonic()
        self.syncs += 1
        return True

    @property
    def syncing(self) -> bool:
        """True while routes count across instances (the last sync is recent)."""
        return self._monotonic() - self._synced_at <= STALE_AFTER

    async def _sync_batch(
        self, shared: SharedCounters, batch: list[tuple[_Window, str, _Share]]
    ) -> None:
        # Per key, what the counter should hold for this worker (``hold``) and how
        # much more it asks for (``want``). First: the share it took without asking
        # (the others took theirs blind too: nothing more until all are counted).
        # While the key is asked for: all it holds (what it has not spent yet it
        # may be spending while this call is out), topped up to one live worker's
        # part of the limit. Idle: what it spent plus one (a lone request still
        # passes); the rest goes back to the others.
        # No top-up in a window's first GRACE_SYNCS syncs: until every worker has
        # counted its blind share, what the counter says is left is not left.
        claims, plans = [], []
        now = self._clock()
        for w, key, s in batch:
            part = _share(w.rate.count / self.live)
            young = now - w.number * w.rate.period < GRACE_SYNCS * self._sync_every
            if not s.reported:
                hold, want = s.allowed, 0
            elif s.asked:
                hold, want = s.allowed, 0 if young else max(0, part - (s.allowed - s.passed))
            else:
                hold, want = min(s.allowed, s.passed + 1), 0
            claims.append((w.counter(key), hold - s.held, want, w.rate.count))
            plans.append((s, hold, s.asked))
        live, grants = await self._claim(shared, claims)
        self.live = max(1, live)
        for (s, hold, asked), grant in zip(plans, grants, strict=True):
            s.held = s.allowed = hold + grant
            s.asked -= asked
            s.reported = True

    async def _claim(
        self, shared: SharedCounters, claims: list[tuple[str, int, int, int]]
    ) -> tuple[int, list[int]]:
        ttl = max(w.rate.period for w in self._windows.values()) * 2 + 10
        return await shared.claim_shares(self.member, claims, ttl=ttl, live_for=LIVE_FOR)
