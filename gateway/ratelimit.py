"""Token-bucket rate limits, per key (client network or openid), per worker process,
and the login limit, which counts across instances on a shared store.

Limits are kept in memory: a limit checked on every request cannot afford a
storage round trip. With ``workers: N`` each worker enforces the rate on the
connections the kernel gives it, so a client spread over N workers can reach up
to N times the configured rate (documented in docs/configuration.md).

A client is its IPv4 address, or its IPv6 network (``rate_limits.ipv6_prefix``,
a /64 by default): an ISP hands each subscriber a whole /64, so one client can
use billions of addresses, and counting each as a client would make the limit
meaningless (nginx-style limiters and CDNs group the same way).

With a shared store (Redis) ``rate_limits.login_per_ip`` is exact across
instances (:class:`LoginLimiter`: one atomic call per login) and route limits
count across instances from local shares (:mod:`gateway.ratelimit_shared`).
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.config import Rate
from gateway.errors import RateLimited
from gateway.storage import Storage
from gateway.storage.base import SharedCounters

# The most keys tracked. Buckets are kept in order of last use, so the oldest
# come first: a refilled one (it carries no information) is dropped as soon as
# it is the oldest, and past the cap the oldest goes whatever its state. Each
# check does O(1) work: no scan, however many keys a flood of addresses makes.
MAX_KEYS = 100_000


def client_network(address: str, ipv6_prefix: int) -> str:
    """The rate-limit identity of a client address: an IPv4 address as it is
    (an IPv4-mapped IPv6 address too), an IPv6 address as its network."""
    if ":" not in address:
        return address  # IPv4 (or a name a trusted proxy sent): as it is
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


class RateLimiter:
    def __init__(
        self,
        rate: Rate,
        clock: Callable[[], float] = time.monotonic,
        *,
        ipv6_prefix: int = 64,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._rate = rate.per_second
        self._burst = float(rate.burst)
        self._clock = clock
        self._ipv6_prefix = ipv6_prefix
        self._max_keys = max_keys
        # key -> (tokens, at), least recently used first
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def check_client(self, address: str) -> None:
        """:meth:`check` for a client address (grouped by IPv6 network)."""
        self.check("ip:" + client_network(address, self._ipv6_prefix))

    def check(self, key: str) -> None:
        """Take one token for ``key`` or raise RateLimited (with Retry-After)."""
        now = self._clock()
        buckets = self._buckets
        entry = buckets.pop(key, None)
        if entry is None:
            tokens = self._burst
        else:
            tokens = min(self._burst, entry[0] + (now - entry[1]) * self._rate)
        limited = tokens < 1.0
        buckets[key] = (tokens if limited else tokens - 1.0, now)  # now the newest
        self._trim(now)
        if limited:
            raise RateLimited(retry_after=math.ceil((1.0 - tokens) / self._rate))

    def _trim(self, now: float) -> None:
        buckets = self._buckets
        while buckets:
            key = next(iter(buckets))  # the least recently used (O(1) in an OrderedDict)
            tokens, at = buckets[key]
            refilled = tokens + (now - at) * self._rate >= self._burst
            if not refilled and len(buckets) <= self._max_keys:
                return
            del buckets[key]


class LoginLimiter:
    """``rate_limits.login_per_ip``: across instances on a shared store, per process
    otherwise."""

    def __init__(self, rate: Rate, storage: Storage, *, ipv6_prefix: int) -> None:
        self._rate = rate
        self._ipv6_prefix = ipv6_prefix
        self._shared = storage if isinstance(storage, SharedCounters) else None
        self._local = RateLimiter(rate, ipv6_prefix=ipv6_prefix)

    async def check_client(self, address: str) -> None:
        """Take one login for the client at ``address`` or raise RateLimited.
        StorageError when the shared store cannot answer (bounded by its timeout)."""
        if self._shared is None:
            self._local.check_client(address)
            return
        key = "login:" + client_network(address, self._ipv6_prefix)
        wait = await self._shared.take_token(key, self._rate.per_second, self._rate.burst)
        if wait > 0:
            raise RateLimited(retry_after=max(1, math.ceil(wait)))
