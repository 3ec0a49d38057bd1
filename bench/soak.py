"""Soak: the gateway under steady mixed load for minutes, watched for leaks.

    python -m bench.soak [--minutes 10] [--capacity N] [--workers 1] [--warmup 10]
                         [--load-procs N] [--no-pin]

Starts an upstream (this script, ``--serve-upstream PORT``), the fake WeChat
(``gateway fake-wechat``) and the gateway (``gateway run``, SQLite in a temp
dir, routes ``/api/`` required, ``/public/`` public, ``/ws/`` required with
websockets, no login rate limit). Unless ``--capacity`` is given it measures
capacity first (``wrk -t1 -c32``, 10 s, ``GET /api/x`` with a valid token),
then runs ``--warmup`` seconds plus ``--minutes`` at 80% of it:

- an open-loop mix from a Python load process (a lean keep-alive client on 64
  connections; ``--load-procs`` splits it): ~85% ``GET /api/x`` (the answer
  must carry the caller's openid), ~8% ``POST /api/echo`` (the body must come
  back), ~5% ``GET /public/x`` (no identity may reach the upstream), ~2%
  ``POST /auth/login`` with a fresh code (a new user each time). Requests fall
  due at the target rate whatever the answers; the achieved rate and the
  latency from when each fell due are reported;
- 4 streams (``GET /public/stream``, 20 chunks over 2 s, restarted when done)
  and 4 WebSockets (``/ws/echo``, a message every 100 ms) all along;
- once a minute a login and a logout; 1 s later (the contract's bound for a
  logout to reach every worker) the token must be refused with
  ``token_revoked`` on 8 fresh connections.

With two CPUs the gateway (one worker) runs alone on CPU 0 and everything else
on CPU 1, as in bench/proxy.py; ``--workers 2`` is left unpinned.

The gateway's worker(s) are sampled every 10 s (VmRSS, open fds). It prints a
Markdown report: target and achieved req/s, counts by kind and status, errors,
WebSocket messages, RSS and fds at the start (after warm-up) and at the end,
max RSS. It exits 1 when there were errors, when fds grew by more than 20 or
RSS by more than 50% in a worker, or when a worker was replaced.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from bench.common import (
    ROOT,
    free_port,
    need_wrk,
    parse_wrk,
    pinned,
    rss_kib,
    stop,
    wait_http,
)

SECRET = "bench-token-secret-0123456789abcdef0123456789"
GW_CPU, LOAD_CPU = "0", "1"  # as in bench/proxy.py: the gateway alone on CPU 0
USERS = 64  # logged-in users whose tokens the load uses
CONNECTIONS = 64  # keep-alive connections of the paced mix, over all load processes
STREAM_CHUNKS, STREAM_PAUSE = 20, 0.1
STREAM_BODY = b"".join(f"chunk {i:02d} {'x' * 240}\n".encode() for i in range(STREAM_CHUNKS))
STREAMS, SOCKETS, WS_INTERVAL = 4, 4, 0.1
SAMPLE_EVERY = 10.0
MIX = (("api_get", 0.85), ("api_post", 0.08), ("public_get", 0.05), ("login", 0.02))
ECHO_BODY = b'{"order": 42, "items": ["tea", "cake"], "note": "soak"}'
MAX_FD_GROWTH, MAX_RSS_GROWTH = 20, 0.5


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed (as the gateway does)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --- the upstream (its own process: --serve-upstream PORT) --------------------


async def up_api(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path, "openid": request.headers.get("X-OpenId")})


async def up_echo(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/json")


async def up_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    for i in range(STREAM_CHUNKS):
        await response.write(STREAM_BODY[i * 250 : (i + 1) * 250])
        await asyncio.sleep(STREAM_PAUSE)
    await response.write_eof()
    return response


async def up_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type is web.WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


async def serve_upstream(port: int) -> None:
    app = web.Application()
    app.router.add_get("/public/stream", up_stream)
    app.router.add_get("/ws/echo", up_ws)
    app.router.add_post("/api/echo", up_echo)
    app.router.add_get("/api/{tail:.*}", up_api)
    app.router.add_get("/public/{tail:.*}", up_api)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    await asyncio.Event().wait()


# --- counting -----------------------------------------------------------------


@dataclass
class Tally:
    """What one process saw: requests by kind and outcome, errors, latencies."""

    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    errors: Counter[str] = field(default_factory=Counter)
    latency: Counter[int] = field(default_factory=Counter)  # 0.1 ms buckets
    extra: Counter[str] = field(default_factory=Counter)

    def ok(self, kind: str, status: int | str) -> None:
        self.counts[kind][str(status)] += 1

    def error(self, kind: str, status: int | str, what: str) -> None:
        self.counts[kind][str(status)] += 1
        self.errors[f"{kind}: {what}"[:160]] += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "counts": {k: dict(v) for k, v in self.counts.items()},
            "errors": dict(self.errors),
            "latency": {str(k): v for k, v in self.latency.items()},
            "extra": dict(self.extra),
        }

    def merge(self, data: dict[str, Any]) -> None:
        for kind, by_status in data["counts"].items():
            self.counts[kind].update(by_status)
        self.errors.update(data["errors"])
        self.latency.update({int(k): v for k, v in data["latency"].items()})
        self.extra.update(data["extra"])

    def percentile(self, pct: float) -> float:
        total, seen = sum(self.latency.values()), 0
        for bucket in sorted(self.latency):
            seen += self.latency[bucket]
            if seen >= total * pct / 100:
                return bucket / 10
        return 0.0


# --- the paced mix (its own processes: --load SPEC --load-index I) ------------
#
# A lean keep-alive HTTP/1.1 client on asyncio streams rather than aiohttp's
# ClientSession: at thousands of requests a second the session's own cost per
# request took more CPU than the gateway, on the same two cores.


CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)
CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.I)
CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.I)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the connection stays open (a regex on the head is
    enough for the answers this script asks for, and cheap)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    keep = CLOSE.search(head) is None
    if length := CONTENT_LENGTH.search(head):
        body = await reader.readexactly(int(length.group(1)))
    elif CHUNKED.search(head):
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body, keep = await reader.read(), False
    return status, body, keep


def http_request(
    method: str, path: str, host: str, token: str | None = None, body: bytes | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Mix:
    """One load process: requests are due at a fixed rate whatever the answers
    (open loop) and wait in a queue for one of ``connections`` keep-alive
    connections; latency counts from then (a 2 ms tick). A request due while
    more than a second's worth already wait is dropped (and counted)."""

    def __init__(self, spec: dict[str, Any], index: int) -> None:
        self.address = (spec["host"], spec["port"])
        self.host = f"{spec['host']}:{spec['port']}"
        self.rate, self.seconds = spec["rate"], spec["seconds"]
        self.connections = spec["connections"]
        self.index = index
        self.rng = random.Random(index)  # noqa: S311 - a load mix, not a secret
        self.tally = Tally()
        self.queue: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        self.logins = 0
        host, users = self.host, spec["users"]
        # Requests built once per user; a login's code differs every time.
        self.prebuilt = {
            "api_get": [(http_request("GET", "/api/x", host, t), o.encode()) for t, o in users],
            "api_post": [
                (http_request("POST", "/api/echo", host, t, ECHO_BODY), b"") for t, _ in users
            ],
            "public_get": [(http_request("GET", "/public/x", host, t), b"") for t, _ in users],
        }
        self.kinds = [kind for kind, _ in MIX]
        self.weights = [weight for _, weight in MIX]

    async def run(self) -> dict[str, Any]:
        workers = [asyncio.create_task(self.connection()) for _ in range(self.connections)]
        started = time.monotonic()
        scheduled, backlog = 0, max(10, int(self.rate))
        while (now := time.monotonic()) - started < self.seconds:
            for _ in range(int(self.rate * (now - started)) - scheduled):
                scheduled += 1
                if self.queue.qsize() >= backlog:
                    self.tally.extra["dropped"] += 1
                    continue
                kind = self.rng.choices(self.kinds, self.weights)[0]
                self.queue.put_nowait((now, kind))
            await asyncio.sleep(0.002)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(35):
                await self.queue.join()
        elapsed = time.monotonic() - started
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        result = self.tally.as_json()
        result["scheduled"], result["elapsed"] = scheduled, elapsed
        return result

    def build(self, kind: str) -> tuple[bytes, Callable[[bytes], bool]]:
        """The request's bytes and the check its 200 answer's body must pass."""
        if kind == "login":
            self.logins += 1
            code = f"soak-{self.index}-{self.logins}-{self.rng.getrandbits(40):x}"
            body = json.dumps({"code": code}).encode()
            request = http_request("POST", "/auth/login", self.host, None, body)
            return request, lambda b: b'"token"' in b
        request, openid = self.rng.choice(self.prebuilt[kind])
        if kind == "api_get":  # the upstream saw this caller's openid, no other
            return request, lambda b: b'"openid": "' + openid + b'"' in b
        if kind == "api_post":
            return request, lambda b: b == ECHO_BODY
        return request, lambda b: b'"openid": null' in b  # public: no identity passed on

    async def connection(self) -> None:
        writer: asyncio.StreamWriter | None = None
        while True:
            queued, kind = await self.queue.get()
            request, check = self.build(kind)
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(*self.address)
                writer.write(request)
                async with asyncio.timeout(30):
                    status, body, keep = await read_response(reader)
                if status != 200:
                    self.tally.error(kind, status, f"status {status}: {body[:80]!r}")
                elif not check(body):
                    self.tally.error(kind, "bad_body", f"unexpected body {body[:80]!r}")
                else:
                    self.tally.ok(kind, status)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.tally.error(kind, "conn", f"{type(exc).__name__}: {exc}")
                keep = False
            finally:
                self.tally.latency[int((time.monotonic() - queued) * 10_000)] += 1
                self.queue.task_done()
            if not keep and writer is not None:
                writer.close()
                writer = None


async def run_load(spec_path: str, index: int) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = await Mix(spec, index).run()
    sys.stdout.write(json.dumps(result) + "\n")


# --- the background: streams, WebSockets, logouts (in the main process) ---------


async def login(http: aiohttp.ClientSession, base: str, code: str) -> tuple[str, str]:
    async with http.post(base + "/auth/login", json={"code": code}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"login {code}: {resp.status} {await resp.text()}")
        data = await resp.json()
    return data["token"], data["openid"]


async def streams_forever(http: aiohttp.ClientSession, base: str, tally: Tally) -> None:
    """One stream after the other; the whole body must arrive, the first chunk early."""
    while True:
        started = time.monotonic()
        try:
            got, first = b"", None
            async with http.get(base + "/public/stream") as resp:
                async for chunk in resp.content.iter_any():
                    first = first if first is not None else time.monotonic() - started
                    got += chunk
            if resp.status != 200 or got != STREAM_BODY:
                tally.error("stream", resp.status, f"{len(got)} bytes, status {resp.status}")
            else:
                tally.ok("stream", 200)
                tally.extra["stream_first_chunk_ms_max"] = max(
                    tally.extra["stream_first_chunk_ms_max"], int((first or 0) * 1000)
                )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            tally.error("stream", "conn", f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1)


async def websocket_forever(
    http: aiohttp.ClientSession, base: str, token: str, n: int, tally: Tally
) -> None:
    """A WebSocket sending a numbered message every 100 ms; each must come back."""
    sent = 0
    while True:
        try:
            async with http.ws_connect(
                base + "/ws/echo", headers={"Authorization": f"Bearer {token}"}, heartbeat=None
            ) as ws:
                tally.ok("ws_connect", 101)
                while True:
                    sent += 1
                    message = f"ws-{n}-{sent}"
                    await ws.send_str(message)
                    reply = await ws.receive(timeout=10)
                    if reply.type is aiohttp.WSMsgType.TEXT and reply.data == message:
                        tally.extra["ws_echoed"] += 1
                    elif reply.type is aiohttp.WSMsgType.TEXT:
                        tally.extra["ws_mismatch"] += 1
                        tally.error("ws", "mismatch", f"sent {message}, got {reply.data[:40]}")
                    else:
                        tally.error("ws", "closed", f"{reply.type.name} {reply.data}")
                        break
                    await asyncio.sleep(WS_INTERVAL)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            tally.error("ws", "conn", f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(1)


async def fresh_get(base: str, headers: dict[str, str]) -> tuple[int, str]:
    """GET /api/x on a new connection (with several workers, any of them may answer)."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh,
        fresh.get(base + "/api/x", headers=headers) as resp,
    ):
        return resp.status, await resp.text()


async def logout_check(http: aiohttp.ClientSession, base: str, n: int, tally: Tally) -> None:
    """Log in, use the token, log out. A logout reaches every worker within 1 s (the
    contract): probes on fresh connections meanwhile measure how long it took; after
    1 s, 8 fresh connections must all get 401 token_revoked."""
    try:
        token, openid = await login(http, base, f"soak-logout-{n}-{random.getrandbits(40):x}")
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(base + "/api/x", headers=headers) as resp:
            if resp.status != 200 or openid not in await resp.text():
                tally.error("logout", resp.status, "token not accepted before logout")
                return
        async with http.post(base + "/auth/logout", headers=headers) as resp:
            if resp.status != 200:
                tally.error("logout", resp.status, f"logout answered {resp.status}")
                return
        logged_out = time.monotonic()
        while (since := time.monotonic() - logged_out) < 0.9:
            status, _ = await fresh_get(base, headers)
            if status == 200:
                tally.extra["logout_accepted_after"] += 1
                tally.extra["logout_lag_ms_max"] = max(
                    tally.extra["logout_lag_ms_max"], int(since * 1000)
                )
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - logged_out)))
        for _ in range(8):
            status, body = await fresh_get(base, headers)
            if status != 401 or "token_revoked" not in body:
                tally.error("logout", status, f"1 s after logout: {status} {body[:60]}")
                return
        tally.ok("logout", "revoked")
    except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError) as exc:
        tally.error("logout", "conn", f"{type(exc).__name__}: {exc}")


async def logouts_every_minute(
    http: aiohttp.ClientSession, base: str, warmup: float, tally: Tally
) -> None:
    await asyncio.sleep(warmup)
    n = 0
    while True:
        n += 1
        await logout_check(http, base, n, tally)
        await asyncio.sleep(60)


# --- watching the gateway -----------------------------------------------------


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def worker_pids(gateway: subprocess.Popen[bytes], workers: int) -> list[int]:
    return [gateway.pid] if workers == 1 else children(gateway.pid)


@dataclass
class Sample:
    at: float
    rss: dict[int, int]  # KiB per worker pid
    fds: dict[int, int]


def sample(pids: list[int], at: float) -> Sample:
    rss, fds = {}, {}
    for pid in pids:
        with contextlib.suppress(OSError):
            rss[pid] = rss_kib(pid)
            fds[pid] = len(os.listdir(f"/proc/{pid}/fd"))
    return Sample(at, rss, fds)


async def sample_every(
    pids: Callable[[], list[int]], started: float, warmup: float, samples: list[Sample]
) -> None:
    """A sample at the end of the warm-up (the start), then every 10 s."""
    await asyncio.sleep(warmup)
    while True:
        samples.append(sample(pids(), time.monotonic() - started))
        await asyncio.sleep(SAMPLE_EVERY)


def listening(pid: int, port: int) -> bool:
    """Whether ``pid`` holds a socket listening on 127.0.0.1:``port``."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(f"socket:[{fields[9]}]")
    with contextlib.suppress(OSError):
        return any(
            os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")
        )
    return False


def wait_workers(setup: Setup, timeout: float = 30.0) -> None:
    """Until every worker listens (the first answers /healthz before the others)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = worker_pids(setup.gateway, setup.workers)
        if len(pids) == setup.workers and all(listening(pid, setup.port) for pid in pids):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"the gateway did not start {setup.workers} listening workers")
        time.sleep(0.2)


# --- the run ------------------------------------------------------------------


@dataclass
class Setup:
    base: str
    port: int
    gateway: subprocess.Popen[bytes]
    workers: int
    tmp: Path
    load_cpu: str | None


def write_config(tmp: Path, gw_port: int, up_port: int, wechat_port: int, workers: int) -> Path:
    upstream = f"http://127.0.0.1:{up_port}"
    config = {
        "server": {"host": "127.0.0.1", "port": gw_port, "workers": workers},
        "wechat": {
            "appid": "wxsoak",
            "secret": "soak-secret",
            "api_base": f"http://127.0.0.1:{wechat_port}",
        },
        "token": {"secret": SECRET},
        "storage": {"url": f"sqlite:///{tmp}/soak.db"},
        "rate_limits": {"login_per_ip": 0},
        "routes": [
            {"prefix": "/api/", "upstream": upstream, "auth": "required"},
            {"prefix": "/public/", "upstream": upstream, "auth": "public"},
            {"prefix": "/ws/", "upstream": upstream, "auth": "required", "websocket": True},
        ],
    }
    path = tmp / "soak.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def spawn(argv: list[str], cpus: str | None, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``python argv`` from the repository root; standard error to ``log`` if given."""
    with log.open("wb") if log else contextlib.nullcontext(subprocess.DEVNULL) as err:
        return subprocess.Popen(
            pinned(cpus, [sys.executable, *argv]),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def measure_capacity(setup: Setup, token: str) -> float:
    """Closed loop, as bench/proxy.py: wrk -t1 -c32 on GET /api/x, 2 s warm-up, 10 s."""
    argv = [need_wrk(), "-t1", "-c32", "--latency", "-H", f"Authorization: Bearer {token}"]
    url = setup.base + "/api/x"
    outputs = [
        subprocess.run(
            pinned(setup.load_cpu, [*argv, duration, url]),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for duration in ("-d2s", "-d10s")
    ]
    result = parse_wrk(outputs[-1])
    if result["non2xx"] or result.get("socket_errors"):
        raise SystemExit(f"capacity run had errors: {result}")
    return result["rps"]


@dataclass
class Outcome:
    tally: Tally
    samples: list[Sample]
    load_seconds: float  # the whole run, as the main process saw it
    paced_seconds: float  # the load processes' own clocks (the longest)
    scheduled: int
    idle_before: Sample
    idle_after: Sample
    pids_start: list[int]
    pids_end: list[int]
    hwm: dict[int, int]


async def soak(setup: Setup, args: argparse.Namespace, target: float, users: list[Any]) -> Outcome:
    seconds = args.warmup + args.minutes * 60

    def pids() -> list[int]:
        return worker_pids(setup.gateway, setup.workers)

    pids_start = pids()
    await asyncio.sleep(2)  # the set-up's connections closed
    idle_before = sample(pids_start, 0.0)
    spec = {
        "host": "127.0.0.1",
        "port": setup.port,
        "rate": target / args.load_procs,
        "seconds": seconds,
        "users": users,
        "connections": CONNECTIONS // args.load_procs,
    }
    spec_path = setup.tmp / "load.json"
    spec_path.write_text(json.dumps(spec))
    tally, samples = Tally(), list[Sample]()
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    loads = [
        await asyncio.create_subprocess_exec(
            *pinned(
                setup.load_cpu,
                [
                    sys.executable,
                    "-m",
                    "bench.soak",
                    "--load",
                    str(spec_path),
                    "--load-index",
                    str(i),
                ],
            ),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
        )
        for i in range(args.load_procs)
    ]
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            background = [
                asyncio.create_task(sample_every(pids, started, args.warmup, samples)),
                asyncio.create_task(logouts_every_minute(http, setup.base, args.warmup, tally)),
                *(
                    asyncio.create_task(streams_forever(http, setup.base, tally))
                    for _ in range(STREAMS)
                ),
                *(
                    asyncio.create_task(websocket_forever(http, setup.base, users[n][0], n, tally))
                    for n in range(SOCKETS)
                ),
            ]
            await asyncio.sleep(max(0.0, seconds - 1.0))
            samples.append(sample(pids(), time.monotonic() - started))  # the end, under load
            pids_end = pids()
            hwm = {}
            for pid in pids_end:
                with contextlib.suppress(OSError):
                    hwm[pid] = rss_kib(pid, "VmHWM")
            outputs = await asyncio.gather(*(proc.communicate() for proc in loads))
            load_seconds = time.monotonic() - started
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
    finally:
        for proc in loads:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    scheduled, paced_seconds = 0, 0.0
    for proc, (out, _) in zip(loads, outputs, strict=True):
        if proc.returncode != 0 or not out:
            raise SystemExit(f"a load process failed (exit status {proc.returncode})")
        data = json.loads(out)
        tally.merge(data)
        scheduled += data["scheduled"]
        paced_seconds = max(paced_seconds, data["elapsed"])
    await asyncio.sleep(2)  # connections closed, nothing in flight
    idle_after = sample(pids(), time.monotonic() - started)
    return Outcome(
        tally,
        samples,
        load_seconds,
        paced_seconds,
        scheduled,
        idle_before,
        idle_after,
        pids_start,
        pids_end,
        hwm,
    )


async def log_in_users(base: str, count: int) -> list[tuple[str, str]]:
    async with aiohttp.ClientSession() as http:
        return list(
            await asyncio.gather(*(login(http, base, f"soak-user-{n}") for n in range(count)))
        )


# --- the report -----------------------------------------------------------------


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def report(
    args: argparse.Namespace, capacity: float, target: float, out: Outcome, log: Path
) -> int:
    tally = out.tally
    paced = sum(sum(tally.counts[kind].values()) for kind, _ in MIX)
    everything = sum(sum(c.values()) for c in tally.counts.values())
    errors = sum(tally.errors.values())
    achieved = paced / out.paced_seconds if out.paced_seconds else 0.0
    print(f"## Soak: {args.minutes:g} min (+{args.warmup:g} s warm-up), workers: {args.workers}\n")
    print(f"- duration: {out.load_seconds:.1f} s")
    how = "given" if args.capacity else "measured, wrk -t1 -c32 10 s"
    print(f"- capacity: {capacity:.0f} req/s ({how}); target {target:.0f} req/s (80%)")
    print(
        f"- achieved: {achieved:.0f} req/s ({achieved / target:.0%} of target) over "
        f"{args.load_procs} load process(es); scheduled {out.scheduled}, answered {paced}, "
        f"dropped {tally.extra['dropped']} (due while 1 s worth waited)"
    )
    print(
        f"- latency of the paced mix (queueing included): p50 {tally.percentile(50):.1f} ms, "
        f"p99 {tally.percentile(99):.1f} ms, max {max(tally.latency, default=0) / 10:.1f} ms"
    )
    if achieved < 0.95 * target:
        print(
            "- **the target was not reached**: the gateway, or the load side it shares the "
            "machine with (upstream, load process), ran out of CPU; see the latency"
        )
    print(f"- requests in all: {everything} (incl. streams, WebSocket connects, logout checks)")
    print(
        f"- WebSocket messages echoed: {tally.extra['ws_echoed']}, "
        f"mismatched: {tally.extra['ws_mismatch']}; slowest first stream chunk: "
        f"{tally.extra['stream_first_chunk_ms_max']} ms"
    )
    print(
        f"- logout checks passed: {tally.counts['logout']['revoked']}; probes on fresh "
        f"connections still let in after a logout: {tally.extra['logout_accepted_after']}"
        f" (latest {tally.extra['logout_lag_ms_max']} ms after it; the contract allows 1 s)"
    )
    print(f"- errors: {errors}\n")
    print("| kind | outcome | count |\n| --- | --- | ---: |")
    for kind in sorted(tally.counts):
        for status, count in sorted(tally.counts[kind].items()):
            print(f"| {kind} | {status} | {count} |")
    if tally.errors:
        print("\n| error | count |\n| --- | ---: |")
        for what, count in tally.errors.most_common(15):
            print(f"| {what.replace('|', '/')} | {count} |")
    failures = resources(out)
    failures += gateway_log(log)
    if errors:
        failures.append(f"{errors} errors")
    print(f"\n**{'FAIL: ' + '; '.join(failures) if failures else 'PASS'}**")
    return 1 if failures else 0


def resources(out: Outcome) -> list[str]:
    """The workers' RSS and fds table; what grew too much."""
    failures = []
    if out.pids_start != out.pids_end:
        failures.append(f"workers replaced: {out.pids_start} -> {out.pids_end}")
    start, end = out.samples[0], out.samples[-1]
    print(
        f"\nWorkers sampled every {SAMPLE_EVERY:g} s under load ({len(out.samples)} samples): "
        f"start at {start.at:.0f} s (after the warm-up), end at {end.at:.0f} s; "
        "idle: before the load and 2 s after it.\n"
    )
    print(
        "| worker pid | RSS idle MiB | RSS start | RSS end | RSS max sampled | VmHWM "
        "| fds idle | fds start | fds end | fds idle after |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for pid in out.pids_start:
        rss_max = max(s.rss.get(pid, 0) for s in out.samples)
        print(
            f"| {pid} | {mib(out.idle_before.rss.get(pid, 0))} | {mib(start.rss.get(pid, 0))} "
            f"| {mib(end.rss.get(pid, 0))} | {mib(rss_max)} | {mib(out.hwm.get(pid, 0))} "
            f"| {out.idle_before.fds.get(pid, '-')} | {start.fds.get(pid, '-')} "
            f"| {end.fds.get(pid, '-')} | {out.idle_after.fds.get(pid, '-')} |"
        )
        if pid not in end.rss or pid not in start.rss:
            continue
        if end.fds[pid] - start.fds[pid] > MAX_FD_GROWTH:
            failures.append(f"worker {pid}: fds {start.fds[pid]} -> {end.fds[pid]}")
        if end.rss[pid] > start.rss[pid] * (1 + MAX_RSS_GROWTH):
            failures.append(f"worker {pid}: RSS {mib(start.rss[pid])} -> {mib(end.rss[pid])} MiB")
    return failures


def gateway_log(log: Path) -> list[str]:
    """Warnings and errors the gateway logged (its standard error) during the run."""
    lines = [
        line
        for line in log.read_text(errors="replace").splitlines()
        if any(word in line for word in ("WARNING", "ERROR", "CRITICAL", "Traceback"))
    ]
    if not lines:
        return []
    print(f"\nGateway log: {len(lines)} warning/error lines; the first:\n")
    for line in lines[:10]:
        print(f"    {line[:200]}")
    errors = [line for line in lines if "WARNING" not in line]
    return [f"{len(errors)} error lines in the gateway log"] if errors else []


# --- main -----------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="measured run (default 10)")
    parser.add_argument("--capacity", type=float, help="req/s; measured with wrk when omitted")
    parser.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds before the start sample"
    )
    parser.add_argument(
        "--load-procs", type=int, default=1, help="processes for the paced mix (default 1)"
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    # The script's own children.
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--load-index", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve_upstream:
        run_async(serve_upstream(args.serve_upstream))
        return
    if args.load:
        run_async(run_load(args.load, args.load_index))
        return
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    # The gateway alone on CPU 0 (one worker; two need both CPUs), everything else on CPU 1.
    gw_cpu = GW_CPU if pin and args.workers == 1 else None
    load_cpu = LOAD_CPU if pin else None
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        up_port, wechat_port, gw_port = free_port(), free_port(), free_port()
        config = write_config(tmp, gw_port, up_port, wechat_port, args.workers)
        log = tmp / "gateway.log"
        try:
            procs.append(spawn(["-m", "bench.soak", "--serve-upstream", str(up_port)], load_cpu))
            procs.append(
                spawn(["-m", "gateway", "fake-wechat", "--port", str(wechat_port)], load_cpu)
            )
            gateway = spawn(["-m", "gateway", "run", "-c", str(config)], gw_cpu, log)
            procs.append(gateway)
            wait_http(f"http://127.0.0.1:{up_port}/api/up")
            wait_http(f"http://127.0.0.1:{wechat_port}/_fake/stats")
            wait_http(f"http://127.0.0.1:{gw_port}/healthz")
            setup = Setup(
                f"http://127.0.0.1:{gw_port}", gw_port, gateway, args.workers, tmp, load_cpu
            )
            wait_workers(setup)
            users = run_async(log_in_users(setup.base, USERS))
            capacity = args.capacity or measure_capacity(setup, users[0][0])
            target = 0.8 * capacity
            print(
                f"capacity {capacity:.0f} req/s, target {target:.0f} req/s for "
                f"{args.warmup:g} s + {args.minutes:g} min ...",
                file=sys.stderr,
                flush=True,
            )
            outcome = run_async(soak(setup, args, target, users))
        finally:
            for proc in reversed(procs):
                stop(proc)
        code = report(args, capacity, target, outcome, log)
        print(
            f"\n{'pinned: gateway on CPU 0, the rest on CPU 1' if gw_cpu else 'gateway not pinned'}"
        )
    sys.exit(code)


if __name__ == "__main__":
    main()
