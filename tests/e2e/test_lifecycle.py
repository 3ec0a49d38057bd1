"""SIGTERM drain, against real `python -m gateway run` processes and a slow,
streaming upstream on loopback.

The behaviour under test: on SIGTERM `/readyz` turns 503 at once; after
`server.drain_delay` (0 here unless a test says otherwise) the gateway stops
accepting, idle keep-alive connections are closed, requests and
streams already under way finish within `server.shutdown_grace` (and are cut at
its end), and the process exits 0. With `workers > 1` the supervisor passes the
signal to every worker and each drains its own requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import Running, StartGateway, base_config, free_port
from tests.support.procs import GatewayProcess, children, wait_healthy, write_config
from tests.support.upstream import Recorder

# Slack on a 2-core machine shared with other work: enough to absorb scheduling
# noise, small enough that waiting out a whole extra grace period would fail.
MARGIN = 1.5
# "At once": how long after SIGTERM the listener may still accept.
PROMPT = 1.0

SLOW_BODY = b"slow-body:" + b"s" * 4000
STREAM_CHUNK = b"chunk %02d " + b"c" * 500 + b"\n"


def chunk(i: int) -> bytes:
    return STREAM_CHUNK % i


# -- the upstream: /slow?ms=N waits then answers, /stream writes chunks over time ------------


@dataclass
class Arrivals:
    slow: int = 0
    stream: int = 0


ARRIVALS = web.AppKey("arrivals", Arrivals)


async def slow(request: web.Request) -> web.StreamResponse:
    arrivals = request.app[ARRIVALS]
    arrivals.slow += 1
    await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
    return web.Response(body=SLOW_BODY, content_type="text/plain")


async def stream(request: web.Request) -> web.StreamResponse:
    """``n`` chunks, one every ``interval`` seconds (10 x 0.2 s: about 2 s)."""
    arrivals = request.app[ARRIVALS]
    arrivals.stream += 1
    count = int(request.query.get("n", "10"))
    interval = float(request.query.get("interval", "0.2"))
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    for i in range(count):
        await response.write(chunk(i))
        await asyncio.sleep(interval)
    await response.write_eof()
    return response


@pytest.fixture
async def slow_upstream() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[ARRIVALS] = Arrivals()
    app.router.add_get("/slow", slow)
    app.router.add_get("/stream", stream)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def arrivals(server: TestServer) -> Arrivals:
    return server.app[ARRIVALS]


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.01)


# -- the gateway as a real process ---------------------------------------------------------


@dataclass
class Gateway:
    proc: GatewayProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sigterm(self) -> float:
        self.proc.proc.send_signal(signal.SIGTERM)
        return time.monotonic()

    async def exit_code(self, timeout: float) -> int | None:
        """The exit status, or None if the process is still running after ``timeout``."""
        try:
            return await asyncio.to_thread(self.proc.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            return None


async def launch(
    tmp_path: Path,
    upstream: TestServer,
    wechat: TestServer,
    *,
    grace: str,
    workers: int = 1,
    drain_delay: str = "0s",
) -> Gateway:
    port = free_port()
    raw = base_config(
        tmp_path, str(upstream.make_url("")).rstrip("/"), str(wechat.make_url("")).rstrip("/")
    )
    raw["server"].update(port=port, shutdown_grace=grace, workers=workers, drain_delay=drain_delay)
    raw["routes"] = [
        {
            "prefix": "/up/",
            "upstream": str(upstream.make_url("")).rstrip("/"),
            "auth": "public",
            "strip_prefix": True,
        }
    ]
    proc = GatewayProcess(["run", "-c", str(write_config(tmp_path / "gw.yaml", raw))])
    gateway = Gateway(proc, port)
    try:
        await asyncio.to_thread(wait_healthy, gateway.url, proc.proc)
    except BaseException:
        proc.stop(signal.SIGKILL)
        raise
    return gateway


# -- raw HTTP/1.1 on one socket: exact framing, and we know the socket's local port ---------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class RawConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.local_port: int = writer.get_extra_info("sockname")[1]

    @classmethod
    async def open(cls, port: int) -> RawConn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, timeout: float = 15.0) -> RawResponse:
        return await asyncio.wait_for(self._response(), timeout)

    async def _response(self) -> RawResponse:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(parts)
        else:
            body = await self.reader.read()
        return RawResponse(status, headers, body)

    async def closed_by_peer(self, timeout: float) -> bool:
        """True if the peer closes (EOF or reset) within ``timeout`` with nothing sent."""
        return await self.closed_at(timeout) is not None

    async def closed_at(self, timeout: float) -> float | None:
        """When the peer closed (EOF or reset) with nothing sent; None if still open
        after ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except ConnectionError:
            return time.monotonic()
        except TimeoutError:
            return None
        assert data == b"", f"unexpected bytes on an idle connection: {data!r}"
        return time.monotonic()

    def close(self) -> None:
        self.writer.close()


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()


async def refused_within(port: int, alive: Callable[[], bool], timeout: float) -> float:
    """Seconds until a new connection to ``port`` is refused (or reset before an
    answer), polling from now; fails if it is still served after ``timeout``, or if
    the check only succeeds because the process already exited (``alive``)."""
    started = time.monotonic()
    while True:
        try:
            conn = await RawConn.open(port)
        except (ConnectionRefusedError, ConnectionResetError):
            # A reset during connect is the kernel dropping a connection the
            # closing listener had queued: not accepted, like a refusal.
            assert alive(), "the listener closed only because the process had exited"
            return time.monotonic() - started
        try:
            await conn.send(get("/healthz"))
            await conn.response(timeout=2.0)
        except (ConnectionError, asyncio.IncompleteReadError):
            # Accepted by the kernel just before the listener closed, then reset.
            assert alive(), "the connection was reset only because the process had exited"
            return time.monotonic() - started
        finally:
            conn.close()
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still accepting and answering {timeout:g} s after SIGTERM")
        await asyncio.sleep(0.02)


async def outcome(conn: RawConn, timeout: float) -> tuple[float, str]:
    """When the answer on ``conn`` ended, and how: answered, or cut."""
    try:
        answer = await conn.response(timeout)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        return time.monotonic(), f"cut: {exc!r}"
    return time.monotonic(), f"answered {answer.status}"


# -- aiohttp clients that note when things happened -----------------------------------------


@dataclass
class Fetched:
    status: int | None = None
    body: bytes = b""
    error: BaseException | None = None
    chunk_times: list[float] = field(default_factory=list)
    ended: float = 0.0


async def fetch(http: aiohttp.ClientSession, url: str, first_byte: asyncio.Event) -> Fetched:
    """GET ``url``, reading the body as it arrives; errors are recorded, not raised."""
    result = Fetched()
    try:
        async with http.get(url) as resp:
            result.status = resp.status
            async for data in resp.content.iter_any():
                result.body += data
                result.chunk_times.append(time.monotonic())
                first_byte.set()
    except (aiohttp.ClientError, ConnectionError) as exc:
        result.error = exc
    result.ended = time.monotonic()
    return result


# -- (a) in-flight requests and streams finish, then exit 0 ---------------------------------


async def test_sigterm_lets_in_flight_request_and_stream_finish_then_exits_0(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    grace = 3.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="3s")
    seen = arrivals(slow_upstream)
    try:
        async with aiohttp.ClientSession() as http:
            stream_started, slow_started = asyncio.Event(), asyncio.Event()
            streaming = asyncio.create_task(fetch(http, gw.url + "/up/stream", stream_started))
            slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=1500", slow_started))
            await until(lambda: seen.slow == 1 and seen.stream == 1, "both requests upstream")
            await asyncio.wait_for(stream_started.wait(), 10)
            signalled = gw.sigterm()
            slow_result, stream_result = await asyncio.gather(slowing, streaming)
        code = await gw.exit_code(grace + 10)
        exited = time.monotonic() - signalled
    finally:
        gw.proc.stop(signal.SIGKILL)
    output = gw.proc.output()
    print(
        f"slow answered {slow_result.ended - signalled:.2f} s after SIGTERM, stream ended "
        f"{stream_result.ended - signalled:.2f} s after, process exited {exited:.2f} s after "
        f"with {code}"
    )
    # Both were really in flight: they completed after the signal.
    assert slow_result.ended > signalled and stream_result.chunk_times[-1] > signalled
    assert slow_result.error is None and slow_result.status == 200, (slow_result, output)
    assert slow_result.body == SLOW_BODY
    assert stream_result.error is None and stream_result.status == 200, (stream_result, output)
    assert stream_result.body == b"".join(chunk(i) for i in range(10))
    # The stream kept flowing during the drain (not held back and flushed at the end).
    after = [t for t in stream_result.chunk_times if t > signalled]
    assert len(after) >= 2, stream_result.chunk_times
    assert code == 0, output
    assert exited < grace + MARGIN, f"exited {exited:.2f} s after SIGTERM (grace {grace} s)"


# -- (b) no new connections; idle keep-alive closed; readyz 503 during the drain ------------


async def test_sigterm_refuses_new_connections_and_closes_idle_keep_alive(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    grace = 3.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="3s")
    seen = arrivals(slow_upstream)
    idle = await RawConn.open(gw.port)
    try:
        # A real keep-alive connection: one request answered, the connection kept open.
        await idle.send(get("/readyz"))
        ready = await idle.response()
        assert ready.status == 200 and ready.headers.get("connection") != "close"
        async with aiohttp.ClientSession() as http:
            # Something in flight, so the process is still up (draining) during the checks.
            slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=2500", asyncio.Event()))
            await until(lambda: seen.slow == 1, "the slow request upstream")
            signalled = gw.sigterm()
            closed = asyncio.create_task(idle.closed_at(PROMPT))
            refused_after = await refused_within(
                gw.port, lambda: gw.proc.proc.poll() is None, PROMPT
            )
            idle_closed = await closed
            assert not slowing.done(), "the in-flight request ended before the checks"
            slow_result = await slowing
        code = await gw.exit_code(grace + 10)
    finally:
        idle.close()
        gw.proc.stop(signal.SIGKILL)
    output = gw.proc.output()
    assert idle_closed is not None, "the idle keep-alive connection was left open by the drain"
    print(
        f"new connections refused {refused_after:.3f} s after SIGTERM; idle keep-alive closed "
        f"{idle_closed - signalled:.3f} s after SIGTERM"
    )
    assert slow_result.error is None and slow_result.status == 200, (slow_result, output)
    assert slow_result.body == SLOW_BODY
    assert code == 0, output


async def test_readyz_is_503_during_the_drain(
    start_gateway: StartGateway, upstream: TestServer, seen: Recorder
) -> None:
    """/readyz while a shutdown is under way, over HTTP.

    Once a drain starts the listener is closed and idle connections are closed, so
    the only request that can still reach /readyz is one the gateway has already
    received: here a /readyz pipelined behind a slow request on the same
    connection, both sent before the drain starts. After the slow answer the
    gateway may either serve the queued /readyz (it must then be 503 `not_ready`)
    or, if the slow answer carried `Connection: close`, close without serving it
    (RFC 9112 section 9.6). The test accepts those two and says which it saw;
    anything else (a 200 readyz, a missing or truncated slow answer, a connection
    left open) fails.
    """
    url = str(upstream.make_url("")).rstrip("/")
    gw: Running = await start_gateway(
        routes=[{"prefix": "/public/", "upstream": url, "auth": "public"}]
    )
    port = gw.listener.port
    before = await RawConn.open(port)
    try:
        await before.send(get("/readyz"))
        ready = await before.response()
        assert ready.status == 200, ready  # so the 503 below is the drain's doing
    finally:
        before.close()

    conn = await RawConn.open(port)
    stopping: asyncio.Task[None] | None = None
    try:
        await conn.send(get("/public/slow?delay=1.5") + get("/readyz"))
        await until(lambda: len(seen.seen) == 1, "the slow request upstream")
        started = time.monotonic()
        stopping = asyncio.create_task(gw.listener.stop())
        await until(lambda: gw.listener.gateway.draining, "the drain to start")
        with pytest.raises(ConnectionRefusedError):
            await RawConn.open(port)
        first = await conn.response()
        assert first.status == 200, first
        assert json.loads(first.body)["path"] == "/public/slow?delay=1.5"
        if first.headers.get("connection", "").lower() == "close":
            observed = "slow answer carried Connection: close; queued /readyz not served"
            assert await conn.closed_by_peer(PROMPT)
        else:
            second = await conn.response()
            observed = f"queued /readyz served during the drain: {second.status}"
            assert second.status == 503, second
            assert second.headers["content-type"].startswith("application/json")
            assert second.json()["error"] == "not_ready", second
            assert second.headers.get("connection", "").lower() == "close"
            assert await conn.closed_by_peer(PROMPT), "connection left open during the drain"
        await asyncio.wait_for(stopping, 10)
        stopped = time.monotonic() - started
    finally:
        conn.close()
        if stopping is not None and not stopping.done():
            stopping.cancel()
            with contextlib.suppress(BaseException):
                await stopping
    print(f"{observed}; drain finished {stopped:.2f} s after it started")
    # Nothing left in flight: the drain ends with the work, not at the 2 s grace.
    assert stopped < gw.config.server.shutdown_grace


# -- (c) past the grace: cut at the deadline, still exit 0 ----------------------------------


async def test_requests_longer_than_the_grace_are_cut_at_the_deadline(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    grace = 2.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="2s")
    seen = arrivals(slow_upstream)
    raw: RawConn | None = None
    try:
        async with aiohttp.ClientSession() as http:
            stream_started = asyncio.Event()
            # 40 chunks x 0.2 s: an 8 s stream; and an answer that takes 8 s to start.
            streaming = asyncio.create_task(
                fetch(http, gw.url + "/up/stream?n=40&interval=0.2", stream_started)
            )
            # Over a raw socket: aiohttp would retry an idempotent request cut before its
            # answer, and report the retry's refused connection instead of the cut.
            raw = await RawConn.open(gw.port)
            await raw.send(get("/up/slow?ms=8000"))
            await until(lambda: seen.slow == 1 and seen.stream == 1, "both requests upstream")
            await asyncio.wait_for(stream_started.wait(), 10)
            signalled = gw.sigterm()
            slow_outcome, stream_result = await asyncio.wait_for(
                asyncio.gather(outcome(raw, grace + 10), streaming), grace + 10
            )
        code = await gw.exit_code(grace + 10)
        exited = time.monotonic() - signalled
    finally:
        if raw is not None:
            raw.close()
        gw.proc.stop(signal.SIGKILL)
    output = gw.proc.output()
    slow_ended, slow_what = slow_outcome
    slow_cut = slow_ended - signalled
    stream_cut = stream_result.ended - signalled
    after = [t for t in stream_result.chunk_times if t > signalled]
    print(
        f"slow request ended {slow_cut:.2f} s after SIGTERM ({slow_what}); stream cut "
        f"{stream_cut:.2f} s after with {len(stream_result.body)} of "
        f"{40 * len(chunk(0))} bytes ({len(after)} chunks during the drain); exited "
        f"{exited:.2f} s after with {code}"
    )
    # The client sees a broken exchange, never a complete-looking one.
    assert not slow_what.startswith("answered"), slow_what
    assert stream_result.status == 200 and stream_result.error is not None, stream_result
    full = b"".join(chunk(i) for i in range(40))
    assert len(stream_result.body) < len(full) and full.startswith(stream_result.body)
    # Cut at the deadline: not before the grace ran out, not long after.
    for cut in (slow_cut, stream_cut):
        assert grace - 0.2 < cut < grace + MARGIN, f"cut {cut:.2f} s after SIGTERM"
    # The stream kept flowing until the cut (about 10 chunks in 2 s).
    assert len(after) >= 5, stream_result.chunk_times
    assert code == 0, output
    assert exited < grace + MARGIN, f"exited {exited:.2f} s after SIGTERM (grace {grace} s)"


# -- (d) workers: 2, the signal reaches every worker ----------------------------------------


def _socket_inode(local_port: int, remote_port: int) -> str | None:
    """The inode of the TCP socket 127.0.0.1:local_port <-> 127.0.0.1:remote_port."""
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.split(":")[1], 16) == local_port
                and int(remote.split(":")[1], 16) == remote_port
            ):
                return fields[9]
    return None


def owner_of(gateway_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the accepted end of the client's connection."""
    inode = _socket_inode(gateway_port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if fd.readlink().as_posix() == target:
                        return pid
    return None


async def test_sigterm_reaches_every_worker_and_each_drains(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    grace = 3.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="3s", workers=2)
    seen = arrivals(slow_upstream)
    conns: list[RawConn] = []
    try:
        await until(lambda: len(children(gw.proc.pid)) == 2, "two workers", timeout=20)
        workers = children(gw.proc.pid)
        # Open keep-alive connections until each worker has accepted two (the kernel
        # spreads connections over the SO_REUSEPORT listeners by hash; a worker
        # still starting up is simply not chosen yet).
        by_worker: dict[int, list[RawConn]] = {pid: [] for pid in workers}
        deadline = time.monotonic() + 20
        while min(len(v) for v in by_worker.values()) < 2:
            assert time.monotonic() < deadline, {p: len(v) for p, v in by_worker.items()}
            conn = await RawConn.open(gw.port)
            conns.append(conn)
            await conn.send(get("/healthz"))
            assert (await conn.response()).status == 200
            owner = owner_of(gw.port, conn.local_port, workers)
            assert owner in by_worker, f"no worker holds connection {conn.local_port}"
            if len(by_worker[owner]) < 2:
                by_worker[owner].append(conn)
        chosen = [(pid, conn) for pid, group in by_worker.items() for conn in group]
        for _, conn in chosen:
            await conn.send(get("/up/slow?ms=1500"))
        await until(lambda: seen.slow == len(chosen), "every slow request upstream")
        signalled = gw.sigterm()

        def all_alive() -> bool:
            return gw.proc.proc.poll() is None and all(
                Path(f"/proc/{pid}").exists() for pid in workers
            )

        # Refused only once *both* listeners are closed: with SO_REUSEPORT a worker
        # that missed the signal would still accept.
        refused_after = await refused_within(gw.port, all_alive, PROMPT)
        answers = await asyncio.gather(*(conn.response() for _, conn in chosen))
        code = await gw.exit_code(grace + 10)
        exited = time.monotonic() - signalled
    finally:
        for conn in conns:
            conn.close()
        gw.proc.stop(signal.SIGKILL)
    output = gw.proc.output()
    print(
        f"workers {workers}, in flight {[pid for pid, _ in chosen]}: refused new connections "
        f"{refused_after:.3f} s after SIGTERM; "
        f"supervisor exited {exited:.2f} s after with {code}"
    )
    for (pid, _), answer in zip(chosen, answers, strict=True):
        assert answer.status == 200 and answer.body == SLOW_BODY, (pid, answer, output)
    assert code == 0, output
    # Well before the supervisor's own kill deadline (grace + 5 s): the workers
    # exited by themselves.
    assert exited < grace + MARGIN, f"exited {exited:.2f} s after SIGTERM (grace {grace} s)"
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), output


# -- (f) server.drain_delay: still accepting, /readyz 503, then the drain -----------------


async def test_during_drain_delay_new_connections_are_served_and_readyz_is_503(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    delay = 1.5
    gw = await launch(tmp_path, slow_upstream, wechat, grace="3s", drain_delay="1.5s")
    held = await RawConn.open(gw.port)
    http = aiohttp.ClientSession()
    try:
        await held.send(get("/readyz"))
        ready = await held.response()
        assert ready.status == 200 and ready.headers.get("connection") != "close"
        # In flight past the delay: the process is still up (draining) when the
        # listener closes, so a refusal below is the listener's, not an exit.
        slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=3000", asyncio.Event()))
        await until(lambda: arrivals(slow_upstream).slow == 1, "the slow request upstream")
        signalled = gw.sigterm()
        await asyncio.sleep(0.2)  # the signal handled
        # A keep-alive connection opened before the signal can still ask.
        await held.send(get("/readyz"))
        draining = await held.response()
        assert draining.status == 503 and draining.json()["error"] == "not_ready", draining
        assert draining.headers.get("connection") == "close"
        # New connections are still accepted: /readyz is 503, proxied requests served,
        # every answer closing its connection so that clients reconnect elsewhere.
        fresh = await RawConn.open(gw.port)
        await fresh.send(get("/readyz"))
        answer = await fresh.response()
        fresh.close()
        assert answer.status == 503 and answer.headers.get("connection") == "close"
        fresh = await RawConn.open(gw.port)
        await fresh.send(get("/up/slow?ms=10"))
        served = await fresh.response()
        fresh.close()
        assert served.status == 200 and served.body == SLOW_BODY
        assert served.headers.get("connection") == "close"
        assert time.monotonic() - signalled < delay, "the checks took longer than the delay"
        # Then the listener closes; the request in flight still finishes.
        polling = time.monotonic()
        refused_after = await refused_within(
            gw.port, lambda: gw.proc.proc.poll() is None, delay + PROMPT
        )
        refused_at = polling + refused_after - signalled
        slow_result = await slowing
        code = await gw.exit_code(10)
    finally:
        held.close()
        await http.close()
        gw.proc.stop(signal.SIGKILL)
    print(f"new connections refused {refused_at:.3f} s after SIGTERM (delay {delay} s)")
    assert refused_at <= delay + PROMPT
    assert slow_result.status == 200 and slow_result.body == SLOW_BODY, slow_result
    assert code == 0, gw.proc.output()


async def test_listener_stays_open_for_the_whole_drain_delay(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    gw = await launch(tmp_path, slow_upstream, wechat, grace="3s", drain_delay="1.2s")
    try:
        async with aiohttp.ClientSession() as http:
            # In flight past the delay, so the process outlives the listener.
            slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=2500", asyncio.Event()))
            await until(lambda: arrivals(slow_upstream).slow == 1, "the slow request upstream")
            signalled = gw.sigterm()
            refused_after = await refused_within(gw.port, lambda: gw.proc.proc.poll() is None, 3.0)
            slow_result = await slowing
        code = await gw.exit_code(10)
        exited = time.monotonic() - signalled
    finally:
        gw.proc.stop(signal.SIGKILL)
    print(f"refused {refused_after:.3f} s after SIGTERM, exited after {exited:.3f} s")
    assert refused_after >= 1.0, f"refused after {refused_after:.3f} s, before the 1.2 s delay"
    assert slow_result.status == 200 and slow_result.body == SLOW_BODY, slow_result
    assert exited < 2.5 + MARGIN, f"exited {exited:.2f} s after SIGTERM"
    assert code == 0, gw.proc.output()


async def test_sigint_skips_the_drain_delay(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    gw = await launch(tmp_path, slow_upstream, wechat, grace="3s", drain_delay="5s")
    try:
        gw.proc.proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        code = await gw.exit_code(10)
        exited = time.monotonic() - interrupted
    finally:
        gw.proc.stop(signal.SIGKILL)
    assert code == 0, gw.proc.output()
    assert exited < 3.0, f"Ctrl-C waited {exited:.2f} s: the 5 s drain delay was not skipped"
