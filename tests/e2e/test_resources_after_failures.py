"""After 10,000 failing requests the gateway's file descriptors and RSS are back
where they started.

One `gateway run` process (a single worker, so the process is the worker) serves
routes to upstreams that fail every way the contract names: nothing listening
(502), a reset after the request (502), garbage instead of HTTP (502), no answer
at all past a 50 ms route timeout (504); plus bad and missing tokens (401) and
malformed requests over raw sockets (400). Every answer must carry its contract
status and JSON `error`; afterwards the open fds must be back to the level
measured after a warm-up, and RSS must not have grown by more than a few MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.support.gateway import base_config, free_port, url_of
from tests.support.procs import GatewayProcess, children, rss_kib, write_config
from tests.support.rawhttp import Response, parse_responses, read_to_close
from tests.support.rawupstream import RawUpstream
from tests.support.waiting import PROMPT, until

CONCURRENCY = 32
FD_SLACK = 5
RSS_GROWTH_MIB = 15
# Requests after the warm-up, per kind: 10,000 in all.
MEASURED = {
    "refused": 2000,
    "reset": 2000,
    "garbage": 2000,
    "timeout": 300,
    "token_invalid": 1200,
    "token_missing": 1000,
    "malformed": 1500,
}
WARM_UP = {kind: (100 if kind == "timeout" else 500) for kind in MEASURED}
assert sum(MEASURED.values()) == 10_000

# kind -> (status, error) the contract requires.
EXPECTED = {
    "refused": (502, "upstream_unavailable"),
    "reset": (502, "upstream_unavailable"),
    "garbage": (502, "upstream_unavailable"),
    "timeout": (504, "upstream_timeout"),
    "token_invalid": (401, "token_invalid"),
    "token_missing": (401, "token_missing"),
    "malformed": (400, "bad_request"),
}

# Requests the gateway must refuse with 400 `bad_request`, each on its own
# connection: framing errors caught by the parser, and paths the gateway refuses.
MALFORMED = [
    b"GET /refused/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1x\r\n\r\n",
    b"GET /refused/x HTTP/1.1\r\nHost: gw\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    b"G\x01T /refused/x HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /refused/x HTTP/1.1\r\nHost: gw\r\nBad Header: x\r\n\r\n",
    b"GET /refused/a%2Fb HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /refused/../../x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
]


# -- upstreams that fail -------------------------------------------------------------------


async def reset(_: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # linger 0: the close is a RST


async def garbage(
    _: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"\x00\x17garbage, not HTTP at all\r\n\r\n\xff\xfe")
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def hang(_: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Never answer; hold the connection until the gateway closes its end.
    await reader.readuntil(b"\r\n\r\n")
    while await reader.read(65536):
        pass


@contextlib.asynccontextmanager
async def fault_servers() -> AsyncIterator[dict[str, RawUpstream]]:
    started: dict[str, RawUpstream] = {}
    try:
        for name, behaviour in (("reset", reset), ("garbage", garbage), ("hang", hang)):
            started[name] = await RawUpstream(behaviour).start()
        yield started
    finally:
        for server in started.values():
            await server.close()


# -- the gateway process ---------------------------------------------------------------------


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int, at_most: int | None = None, timeout: float = PROMPT) -> int:
    """The fd count once it stops moving (or is down to ``at_most``), within ``timeout``."""
    deadline = time.monotonic() + timeout
    last = fds(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = fds(pid)
        if (at_most is not None and now <= at_most) or (at_most is None and now == last):
            return now
        last = now
    return fds(pid)


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Tally:
    answers: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)

    def check(self, kind: str, status: int, content_type: str, body: bytes) -> None:
        want = EXPECTED[kind]
        try:
            error = (
                json.loads(body)["error"] if content_type.startswith("application/json") else None
            )
        except (ValueError, KeyError, TypeError):
            error = None
        if (status, error) == want:
            self.answers[kind] += 1
        elif len(self.wrong) < 20:
            self.wrong.append(f"{kind}: {status} {content_type} {body[:200]!r}")
        else:
            self.wrong.append(kind)


async def raw_malformed(port: int, payload: bytes) -> tuple[int, str, bytes]:
    """Send ``payload`` on a fresh connection; the answer, read until the gateway
    closes (status 0 for anything that is not an HTTP answer: tallied as wrong)."""
    data = await read_to_close(port, payload)
    if not data.startswith(b"HTTP/1.1 "):
        return 0, "", data
    answers, _ = parse_responses(data, closed=True)
    first = answers[0] if answers else Response(0, [], data)
    return first.status, first.header("Content-Type") or "", first.body


async def send_all(url: str, port: int, plan: dict[str, int], seed: int) -> Tally:
    jobs = [kind for kind, count in plan.items() for _ in range(count)]
    random.Random(seed).shuffle(jobs)  # noqa: S311 - an order, not a secret
    queue = iter(enumerate(jobs))
    tally = Tally()
    paths = {
        "refused": "/refused/x",
        "reset": "/reset/x",
        "garbage": "/garbage/x",
        "timeout": "/hang/x",
        "token_invalid": "/secure/x",
        "token_missing": "/secure/x",
    }
    bad_token = {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.bm90LWEtc2ln"}

    async def worker(http: aiohttp.ClientSession) -> None:
        for i, kind in queue:
            if kind == "malformed":
                status, content_type, body = await raw_malformed(
                    port, MALFORMED[i % len(MALFORMED)]
                )
                tally.check(kind, status, content_type, body)
                continue
            headers = bad_token if kind == "token_invalid" else {}
            async with http.get(url + paths[kind], headers=headers) as resp:
                tally.check(
                    kind, resp.status, resp.headers.get("Content-Type", ""), await resp.read()
                )

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    return tally


async def test_fds_and_rss_return_after_10000_failing_requests(
    tmp_path: Path, wechat: TestServer
) -> None:
    async with fault_servers() as faults:
        port = free_port()
        raw = base_config(tmp_path, "http://127.0.0.1:9", url_of(wechat))
        raw["server"]["port"] = port
        raw["routes"] = [
            {
                "prefix": "/refused/",
                "upstream": f"http://127.0.0.1:{free_port()}",
                "auth": "public",
            },
            {"prefix": "/reset/", "upstream": faults["reset"].url, "auth": "public"},
            {"prefix": "/garbage/", "upstream": faults["garbage"].url, "auth": "public"},
            {
                "prefix": "/hang/",
                "upstream": faults["hang"].url,
                "auth": "public",
                "timeout": "50ms",
            },
            {
                "prefix": "/secure/",
                "upstream": f"http://127.0.0.1:{free_port()}",
                "auth": "required",
            },
        ]
        config = write_config(tmp_path / "gw.yaml", raw)
        # Its output goes to files, as in production (a log collector reads them):
        # a pipe nobody reads would stall the access log and distort the measure.
        proc = GatewayProcess(["run", "-c", str(config)], port=port)
        url = proc.url
        try:
            await proc.healthy()
            pid = proc.pid
            assert children(pid) == [], "a single worker runs in the process itself"
            fds_fresh = fds(pid)

            started = time.monotonic()
            warm = await send_all(url, port, WARM_UP, seed=1)
            assert warm.wrong == [], warm.wrong[:20]
            warm_elapsed = time.monotonic() - started
            fds_start = await settled_fds(pid)
            rss_start = rss_kib(pid)

            started = time.monotonic()
            tally = await send_all(url, port, MEASURED, seed=2)
            elapsed = time.monotonic() - started
            fds_end = await settled_fds(pid, at_most=fds_start + FD_SLACK)
            rss_end = rss_kib(pid)
            # The gateway closes its end of every exchange it gave up on; the hang
            # server sees each close once it gets to read it.
            hang = faults["hang"]
            with contextlib.suppress(AssertionError):
                await until(lambda: hang.open <= FD_SLACK, "hanging upstream connections closed")
            hanging = hang.open
            assert proc.proc.poll() is None, "the gateway died under the load"
        finally:
            code = await asyncio.to_thread(proc.stop)
    stderr = proc.stderr
    sent = sum(tally.answers.values()) + len(tally.wrong)
    print(
        f"\nwarm-up: {sum(WARM_UP.values())} requests in {warm_elapsed:.1f} s; measured: {sent} "
        f"requests in {elapsed:.1f} s ({sent / elapsed:.0f}/s) {dict(tally.answers)}\n"
        f"fds: {fds_fresh} fresh, {fds_start} after warm-up, {fds_end} after the load; "
        f"RSS: {rss_start / 1024:.1f} MiB after warm-up, {rss_end / 1024:.1f} MiB after "
        f"(+{(rss_end - rss_start) / 1024:.1f} MiB); upstream connections left hanging: {hanging}"
    )
    assert tally.wrong == [], f"{len(tally.wrong)} wrong answers, e.g. {tally.wrong[:20]}"
    assert dict(tally.answers) == MEASURED
    assert fds_end <= fds_start + FD_SLACK, f"fds {fds_start} -> {fds_end}"
    # The gateway closed its end of every upstream exchange it gave up on.
    assert hanging <= FD_SLACK, f"{hanging} upstream connections still open"
    assert (rss_end - rss_start) / 1024 < RSS_GROWTH_MIB, f"RSS {rss_start} -> {rss_end} KiB"
    assert code == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
