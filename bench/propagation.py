"""How fast a logout reaches another instance: push (Redis pub/sub) against the
poll alone (every 0.25 s), between two gateways in this process on one real
redis-server.

For each of ``--logouts`` logouts (200 by default), at a random moment: a token is minted, the
other gateway watches its session (the hook an open WebSocket uses, called the
moment that gateway learns of the logout: no probing), the logout is POSTed to
the first gateway over HTTP, and the time from sending it to the watcher firing
is recorded. That counts the logout itself (a Redis write) too, so it is an
upper bound on the time from the 200 to the other instance refusing the token.

"poll" is the release before push: the store offers no wake-up, so workers
read the feeds every 0.25 s only.

    python -m bench.propagation [--logouts 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import aiohttp

from gateway.config import build_config
from gateway.runtime.worker import Listener
from gateway.storage.redis import RedisStorage
from tests.support.redis import RedisServer

TOKEN_SECRET = "bench-token-secret-0123456789abcdef-0123456789"
SPREAD = 0.3  # seconds: more than one poll interval
WAIT_AT_MOST = 5.0  # per logout: a lost one ends the run instead of hanging it


def config(redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "drain_delay": 0},
        # No WeChat call is made: tokens are minted here, logouts need none.
        "wechat": {
            "appid": "wxbenchpropagation",
            "secret": "unused",
            "api_base": "http://127.0.0.1:9",
        },
        "token": {"secret": TOKEN_SECRET},
        "storage": {"url": redis_url, "prefix": prefix},
        "log": {"access": False, "level": "warning"},
        "routes": [{"prefix": "/api/", "upstream": "http://127.0.0.1:9", "auth": "required"}],
    }


@contextlib.contextmanager
def push(enabled: bool) -> Iterator[None]:
    if enabled:
        yield
        return
    with mock.patch.object(RedisStorage, "changes", lambda self: None):
        yield


async def run(redis_url: str, prefix: str, logouts: int) -> list[float]:
    raw = config(redis_url, prefix)
    one, two = Listener(build_config(raw, env={})), Listener(build_config(raw, env={}))
    await one.start()
    await two.start()
    delays: list[float] = []
    try:
        codec, watcher = one.gateway.services.tokens, two.gateway.services.sessions
        async with aiohttp.ClientSession() as http:
            for i in range(logouts):
                # Logouts come at random moments, not right after the other
                # gateway's last read (which would make every poll wait a full
                # interval).
                await asyncio.sleep(random.uniform(0, SPREAD))  # noqa: S311 - not a secret
                token, claims = codec.issue(f"o-bench-{i}", None, time.time())
                learnt = asyncio.Event()
                unwatch = watcher.watch(claims, learnt.set)
                sent = time.perf_counter()
                headers = {"Authorization": f"Bearer {token}"}
                url = f"http://127.0.0.1:{one.port}/auth/logout"
                async with http.post(url, headers=headers) as resp:
                    assert resp.status == 200, await resp.text()
                await asyncio.wait_for(learnt.wait(), WAIT_AT_MOST)
                delays.append(time.perf_counter() - sent)
                unwatch()
    finally:
        await two.stop()
        await one.stop()
    return delays


def report(mode: str, delays: list[float]) -> str:
    ms = sorted(d * 1000 for d in delays)
    p50 = statistics.median(ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)]
    return f"{mode:>5}: p50 {p50:7.2f} ms  p99 {p99:7.2f} ms  max {ms[-1]:7.2f} ms  (n={len(ms)})"


async def main_async(logouts: int) -> None:
    with tempfile.TemporaryDirectory(prefix="wxgw-propagation-") as tmp:
        server = RedisServer(Path(tmp) / "redis").start()
        try:
            for mode, enabled in (("push", True), ("poll", False)):
                with push(enabled):
                    delays = await run(server.url, f"bench-{mode}:", logouts)
                print(report(mode, delays), flush=True)
        finally:
            server.stop()
    print(f"({os.cpu_count()} CPUs; both gateways, Redis and this client share them)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logouts", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main_async(args.logouts))


if __name__ == "__main__":
    main()
