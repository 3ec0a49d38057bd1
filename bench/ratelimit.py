"""The cost of one rate-limit check as the number of tracked keys grows.

A flood of distinct client addresses fills the limiter's map; each check must
stay O(1) however many keys it holds (issue 13: the earlier limiter rescanned
every key on each check past its cap).

    python -m bench.ratelimit            # microseconds per check at 1k, 10k, 100k keys
"""

from __future__ import annotations

import argparse
import time

from gateway.config import Rate
from gateway.ratelimit import MAX_KEYS, RateLimiter


def per_check(keys: int, checks: int) -> float:
    # A slow rate: no bucket refills during the run, the worst case for pruning.
    limiter = RateLimiter(Rate(5, 3600.0))
    for i in range(keys):
        limiter.check(f"ip:10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    started = time.perf_counter()
    for i in range(checks):
        limiter.check(f"ip:new-{i}")  # a new client each time, as in a flood
    return (time.perf_counter() - started) / checks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=2000)
    args = parser.parse_args()
    for keys in (1_000, 10_000, MAX_KEYS):
        print(f"{keys:>7} keys: {per_check(keys, args.checks):8.2f} us per check")


if __name__ == "__main__":
    main()
