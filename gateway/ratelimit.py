"""Token-bucket rate limits, per key (client IP or openid), per worker process.

Limits are kept in memory: a limit checked on every request cannot afford a
storage round trip. With ``workers: N`` each worker enforces the rate on the
connections the kernel gives it, so a client spread over N workers can reach up
to N times the configured rate (documented in docs/configuration.md).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway.config import Rate
from gateway.errors import RateLimited

# Past this many tracked keys, buckets that have refilled are dropped (they carry
# no information), so a flood of distinct addresses cannot grow memory forever.
MAX_KEYS = 100_000


class RateLimiter:
    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate.per_second
        self._burst = float(rate.burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def check(self, key: str) -> None:
        """Take one token for ``key`` or raise RateLimited (with Retry-After)."""
        now = self._clock()
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise RateLimited(retry_after=math.ceil((1.0 - tokens) / self._rate))
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_KEYS:
            self._prune(now)

    def _prune(self, now: float) -> None:
        full = [
            k for k, (t, at) in self._buckets.items() if t + (now - at) * self._rate >= self._burst
        ]
        for key in full:
            del self._buckets[key]
