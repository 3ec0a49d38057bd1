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
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.conftest import base_config, free_port
from tests.support.procs import ROOT, children, rss_kib, wait_healthy, write_config

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


@dataclass
class FaultServer:
    """A raw TCP server on loopback that reads a request head, then misbehaves."""

    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    server: asyncio.Server | None = None
    open_connections: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        self.writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await reader.readuntil(b"\r\n\r\n")
                await self.behaviour(reader, writer)
        finally:
            self.writers.discard(writer)
            self.open_connections -= 1
            writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()


async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # linger 0: the close is a RST


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"\x00\x17garbage, not HTTP at all\r\n\r\n\xff\xfe")
    with contextlib.suppress(ConnectionError):
        await writer.drain()


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # Never answer; hold the connection until the gateway closes its end.
    while await reader.read(65536):
        pass


@contextlib.asynccontextmanager
async def fault_servers() -> AsyncIterator[dict[str, tuple[FaultServer, str]]]:
    servers = {
        "reset": FaultServer(reset),
        "garbage": FaultServer(garbage),
        "hang": FaultServer(hang),
    }
    started = {}
    try:
        for name, server in servers.items():
            started[name] = (server, await server.start())
        yield started
    finally:
        for server, _ in started.values():
            await server.close()


# -- the gateway process ---------------------------------------------------------------------


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def settled_fds(pid: int, at_most: int | None = None, timeout: float = 3.0) -> int:
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
    """Send ``payload`` on a fresh connection; the answer, read until the gateway closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/1.1 ") else 0
    content_type = next(
        (
            line.split(":", 1)[1].strip()
            for line in lines[1:]
            if line.lower().startswith("content-type:")
        ),
        "",
    )
    return status, content_type, body


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
        raw = base_config(tmp_path, "http://127.0.0.1:9", str(wechat.make_url("")).rstrip("/"))
        raw["server"]["port"] = port
        raw["routes"] = [
            {
                "prefix": "/refused/",
                "upstream": f"http://127.0.0.1:{free_port()}",
                "auth": "public",
            },
            {"prefix": "/reset/", "upstream": faults["reset"][1], "auth": "public"},
            {"prefix": "/garbage/", "upstream": faults["garbage"][1], "auth": "public"},
            {
                "prefix": "/hang/",
                "upstream": faults["hang"][1],
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
        # Output to files, as in production (a log collector reads them): a pipe
        # nobody reads would stall the access log and distort what is measured.
        out = (tmp_path / "stdout.log").open("wb")
        err = (tmp_path / "stderr.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(config)],
            cwd=ROOT,
            stdout=out,
            stderr=err,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            await asyncio.to_thread(wait_healthy, url, proc)
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
            hanging = faults["hang"][0].open_connections
            assert proc.poll() is None, "the gateway died under the load"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            out.close()
            err.close()
    stderr = (tmp_path / "stderr.log").read_text(errors="replace")
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
