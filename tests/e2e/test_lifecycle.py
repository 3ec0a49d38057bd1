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
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.errors import assert_error
from tests.support.gateway import Running, StartGateway, config_for, url_of
from tests.support.procs import GatewayProcess, spawn, wait_workers
from tests.support.rawhttp import Conn, Cut
from tests.support.sockets import owner_of
from tests.support.upstream import Recorder, served, write_paced
from tests.support.waiting import PROMPT, answers, until, within

# "At once": how long after SIGTERM (or the drain delay) the listener may still
# accept, and an idle keep-alive connection stay open. Generous for a busy
# machine; the in-flight requests that keep each process up outlast it, so a
# refusal seen here is the listener's, not an exit.
AT_ONCE = 3.0

SLOW_BODY = b"slow-body:" + b"s" * 4000
STREAM_CHUNK = b"chunk %03d " + b"c" * 500 + b"\n"


CHUNKS = 100  # the chunks of the stream that the grace cuts


def chunk(i: int) -> bytes:
    return STREAM_CHUNK % i


# -- the upstream: /slow?ms=N waits then answers, /stream writes chunks over time ------------


@dataclass
class Arrivals:
    slow: int = 0
    stream: int = 0
    # A gated stream (?gated=1) writes chunk i+1 once the test sets gates[i].
    gates: defaultdict[int, asyncio.Event] = field(
        default_factory=lambda: defaultdict(asyncio.Event)
    )


ARRIVALS = web.AppKey("arrivals", Arrivals)


async def slow(request: web.Request) -> web.StreamResponse:
    arrivals = request.app[ARRIVALS]
    arrivals.slow += 1
    await asyncio.sleep(int(request.query.get("ms", "1000")) / 1000)
    return web.Response(body=SLOW_BODY, content_type="text/plain")


async def stream(request: web.Request) -> web.StreamResponse:
    """``n`` chunks, one every ``interval`` seconds (10 x 0.2 s: about 2 s); with
    ``gated=1``, each once the test has seen the one before."""
    arrivals = request.app[ARRIVALS]
    arrivals.stream += 1
    count = int(request.query.get("n", "10"))
    interval = float(request.query.get("interval", "0.2"))
    gated = request.query.get("gated") == "1"
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    pieces = [chunk(i) for i in range(count)]
    await write_paced(response, pieces, interval, arrivals.gates if gated else None)
    await response.write_eof()
    return response


@pytest.fixture
async def slow_upstream() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[ARRIVALS] = Arrivals()
    app.router.add_get("/slow", slow)
    app.router.add_get("/stream", stream)
    async with served(app) as server:
        yield server


def arrivals(server: TestServer) -> Arrivals:
    return server.app[ARRIVALS]


# -- the gateway as a real process ---------------------------------------------------------


@dataclass
class Gateway:
    proc: GatewayProcess

    @property
    def url(self) -> str:
        return self.proc.url

    @property
    def port(self) -> int:
        assert self.proc.port is not None
        return self.proc.port

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

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
    raw = config_for(tmp_path, upstream, wechat)
    raw["server"].update(shutdown_grace=grace, workers=workers, drain_delay=drain_delay)
    raw["routes"] = [
        {"prefix": "/up/", "upstream": url_of(upstream), "auth": "public", "strip_prefix": True}
    ]
    return Gateway(await spawn(tmp_path, raw))


# -- raw HTTP/1.1 on one socket: exact framing, and we know the socket's local port ---------


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode()


async def refused_within(port: int, alive: Callable[[], bool], timeout: float) -> float:
    """Seconds until a new connection to ``port`` is not accepted (refused, or
    reset before an answer: whichever the kernel picks), polling from now; fails
    if it is still served after ``timeout``, or if the check only succeeds
    because the process already exited (``alive``)."""
    started = time.monotonic()
    while await answers(port):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"still accepting and answering {timeout:g} s after SIGTERM")
        await asyncio.sleep(0.02)
    assert alive(), "the listener closed only because the process had exited"
    return time.monotonic() - started


async def signal_handled(port: int) -> None:
    """Once /readyz, asked on fresh connections, is no longer 200: the gateway has
    handled the signal sent just before (during a drain delay it still accepts)."""

    async def ready() -> int:
        conn = await Conn.open(port)
        try:
            await conn.send(get("/readyz"))
            return (await conn.next()).status
        finally:
            await conn.close()

    async def poll() -> None:
        while await ready() == 200:
            await asyncio.sleep(0.02)

    await within(poll(), "/readyz turning 503 after the signal")


async def outcome(conn: Conn, timeout: float) -> tuple[float, str]:
    """When the answer on ``conn`` ended, and how: answered, or cut."""
    try:
        answer = await conn.next(timeout)
    except Cut as exc:
        return time.monotonic(), f"cut: {exc}"
    return time.monotonic(), f"answered {answer.status}"


# -- aiohttp clients that note when things happened -----------------------------------------


@dataclass
class Fetched:
    status: int | None = None
    body: bytes = b""
    error: BaseException | None = None
    chunk_times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # the bytes of each arrival
    ended: float = 0.0

    def bytes_after(self, instant: float) -> int:
        """How many body bytes arrived after ``instant``."""
        return sum(
            size for at, size in zip(self.chunk_times, self.sizes, strict=True) if at > instant
        )


async def fetch(http: aiohttp.ClientSession, url: str, first_byte: asyncio.Event) -> Fetched:
    """GET ``url``, reading the body as it arrives; errors are recorded, not raised."""
    result = Fetched()
    try:
        async with http.get(url) as resp:
            result.status = resp.status
            async for data in resp.content.iter_any():
                result.body += data
                result.chunk_times.append(time.monotonic())
                result.sizes.append(len(data))
                first_byte.set()
    except (aiohttp.ClientError, ConnectionError) as exc:
        result.error = exc
    result.ended = time.monotonic()
    return result


async def fetch_gated(
    http: aiohttp.ClientSession, url: str, seen: Arrivals, first: asyncio.Event, go: asyncio.Event
) -> Fetched:
    """GET a gated stream line by line: once its first chunk is in, wait for
    ``go``; then let each next chunk out as soon as the one before has arrived."""
    result = Fetched()
    try:
        async with http.get(url) as resp:
            result.status = resp.status
            i = 0
            while line := await resp.content.readline():
                result.body += line
                result.chunk_times.append(time.monotonic())
                result.sizes.append(len(line))
                if i == 0:
                    first.set()
                    await go.wait()
                seen.gates[i].set()
                i += 1
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
            stream_started, slow_started, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
            # Gated: chunk i+1 leaves the upstream once chunk i has reached the client.
            streaming = asyncio.create_task(
                fetch_gated(http, gw.url + "/up/stream?gated=1", seen, stream_started, go)
            )
            slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=1500", slow_started))
            await until(lambda: seen.slow == 1 and seen.stream == 1, "both requests upstream")
            await within(stream_started.wait(), "the stream's first chunk")
            signalled = gw.sigterm()
            go.set()
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
    # The stream kept flowing during the drain: the nine chunks after the signal
    # each left the upstream only once the one before had reached the client, so
    # a gateway holding them back until the end would have delivered none.
    assert all(t > signalled for t in stream_result.chunk_times[1:]), stream_result.chunk_times
    assert code == 0, output
    # Not a whole second grace period waited out after the work was done.
    assert exited < 2 * grace, f"exited {exited:.2f} s after SIGTERM (grace {grace} s)"


# -- (b) no new connections; idle keep-alive closed; readyz 503 during the drain ------------


async def test_sigterm_refuses_new_connections_and_closes_idle_keep_alive(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    grace = 8.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="8s")
    seen = arrivals(slow_upstream)
    idle = await Conn.open(gw.port)
    try:
        # A real keep-alive connection: one request answered, the connection kept open.
        await idle.send(get("/readyz"))
        ready = await idle.next()
        assert ready.status == 200 and ready.header("connection") != "close"
        async with aiohttp.ClientSession() as http:
            # Something in flight well past the checks, so the process is still up
            # (draining) during them.
            slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=6000", asyncio.Event()))
            await until(lambda: seen.slow == 1, "the slow request upstream")
            signalled = gw.sigterm()
            closed = asyncio.create_task(idle.closed_at(AT_ONCE))
            refused_after = await refused_within(gw.port, gw.alive, AT_ONCE)
            idle_closed = await closed
            assert not slowing.done(), "the in-flight request ended before the checks"
            slow_result = await slowing
        code = await gw.exit_code(grace + 10)
    finally:
        await idle.close()
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
    url = url_of(upstream)
    # A grace far longer than the work, so that a drain waiting it out is told
    # apart from one that ends with the work, however busy the machine.
    gw: Running = await start_gateway(
        server={"shutdown_grace": "10s"},
        routes=[{"prefix": "/public/", "upstream": url, "auth": "public"}],
    )
    port = gw.listener.port
    before = await Conn.open(port)
    try:
        await before.send(get("/readyz"))
        ready = await before.next()
        assert ready.status == 200, ready  # so the 503 below is the drain's doing
    finally:
        await before.close()

    conn = await Conn.open(port)
    stopping: asyncio.Task[None] | None = None
    try:
        await conn.send(get("/public/slow?delay=1.5") + get("/readyz"))
        await until(lambda: len(seen.seen) == 1, "the slow request upstream")
        started = time.monotonic()
        stopping = asyncio.create_task(gw.listener.stop())
        await until(lambda: gw.listener.gateway.draining, "the drain to start")
        # Refused or reset, whichever the kernel picks: not accepted.
        assert not await answers(port), "a new connection was served during the drain"
        first = await conn.next()
        assert first.status == 200, first
        assert first.json["path"] == "/public/slow?delay=1.5"
        if (first.header("connection") or "").lower() == "close":
            observed = "slow answer carried Connection: close; queued /readyz not served"
            assert await conn.closed_at(PROMPT) is not None, "connection left open"
        else:
            second = await conn.next()
            observed = f"queued /readyz served during the drain: {second.status}"
            assert_error(second, 503, "not_ready")
            assert (second.header("connection") or "").lower() == "close"
            assert await conn.closed_at(PROMPT) is not None, "connection left open during the drain"
        await within(stopping, "the drain's end")
        stopped = time.monotonic() - started
    finally:
        await conn.close()
        if stopping is not None and not stopping.done():
            stopping.cancel()
            with contextlib.suppress(BaseException):
                await stopping
    print(f"{observed}; drain finished {stopped:.2f} s after it started")
    # Nothing left in flight: the drain ends with the work (1.5 s), not at the grace.
    assert stopped < gw.config.server.shutdown_grace


# -- (c) past the grace: cut at the deadline, still exit 0 ----------------------------------


async def test_requests_longer_than_the_grace_are_cut_at_the_deadline(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    grace = 2.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="2s")
    seen = arrivals(slow_upstream)
    raw: Conn | None = None
    try:
        async with aiohttp.ClientSession() as http:
            stream_started = asyncio.Event()
            # 100 chunks x 0.2 s: a 20 s stream; and an answer that takes 20 s to
            # start. Both far past the grace, so a cut is the deadline's.
            streaming = asyncio.create_task(
                fetch(http, gw.url + f"/up/stream?n={CHUNKS}&interval=0.2", stream_started)
            )
            # Over a raw socket: aiohttp would retry an idempotent request cut before its
            # answer, and report the retry's refused connection instead of the cut.
            raw = await Conn.open(gw.port)
            await raw.send(get("/up/slow?ms=20000"))
            await until(lambda: seen.slow == 1 and seen.stream == 1, "both requests upstream")
            await within(stream_started.wait(), "the stream's first chunk")
            signalled = gw.sigterm()
            slow_outcome, stream_result = await within(
                asyncio.gather(outcome(raw, grace + 15), streaming), "the cuts", grace + 15
            )
        code = await gw.exit_code(grace + 10)
        exited = time.monotonic() - signalled
    finally:
        if raw is not None:
            await raw.close()
        gw.proc.stop(signal.SIGKILL)
    output = gw.proc.output()
    slow_ended, slow_what = slow_outcome
    slow_cut = slow_ended - signalled
    stream_cut = stream_result.ended - signalled
    after = stream_result.bytes_after(signalled)
    print(
        f"slow request ended {slow_cut:.2f} s after SIGTERM ({slow_what}); stream cut "
        f"{stream_cut:.2f} s after with {len(stream_result.body)} of "
        f"{CHUNKS * len(chunk(0))} bytes ({after} during the drain); exited "
        f"{exited:.2f} s after with {code}"
    )
    # The client sees a broken exchange, never a complete-looking one.
    assert not slow_what.startswith("answered"), slow_what
    assert stream_result.status == 200 and stream_result.error is not None, stream_result
    full = b"".join(chunk(i) for i in range(CHUNKS))
    assert len(stream_result.body) < len(full) and full.startswith(stream_result.body)
    # Cut at the deadline: not before the grace ran out, and long before the 20 s
    # the upstream would have taken (a busy machine only makes the cut later).
    for cut in (slow_cut, stream_cut):
        assert grace - 0.2 < cut < grace + 6, f"cut {cut:.2f} s after SIGTERM"
    # The stream kept flowing until the cut (about 10 chunks in 2 s): counted in
    # bytes, as a busy client may read several chunks at once.
    assert after >= 3 * len(chunk(0)), (after, stream_result.chunk_times)
    assert code == 0, output
    assert exited < grace + 6, f"exited {exited:.2f} s after SIGTERM (grace {grace} s)"


# -- (d) workers: 2, the signal reaches every worker ----------------------------------------


async def test_sigterm_reaches_every_worker_and_each_drains(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    grace = 8.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="8s", workers=2)
    seen = arrivals(slow_upstream)
    conns: list[Conn] = []
    try:
        workers = await wait_workers(gw.proc, 2)
        # Open keep-alive connections until each worker has accepted two (the kernel
        # spreads connections over the SO_REUSEPORT listeners by hash; a worker
        # still starting up is simply not chosen yet).
        by_worker: dict[int, list[Conn]] = {pid: [] for pid in workers}
        deadline = time.monotonic() + 20
        while min(len(v) for v in by_worker.values()) < 2:
            assert time.monotonic() < deadline, {p: len(v) for p, v in by_worker.items()}
            conn = await Conn.open(gw.port)
            conns.append(conn)
            await conn.send(get("/healthz"))
            assert (await conn.next()).status == 200
            owner = owner_of(gw.port, conn.local_port, workers)
            assert owner in by_worker, f"no worker holds connection {conn.local_port}"
            if len(by_worker[owner]) < 2:
                by_worker[owner].append(conn)
        chosen = [(pid, conn) for pid, group in by_worker.items() for conn in group]
        # In flight well past the checks below, so every process is still up then.
        for _, conn in chosen:
            await conn.send(get("/up/slow?ms=6000"))
        await until(lambda: seen.slow == len(chosen), "every slow request upstream")
        signalled = gw.sigterm()

        def all_alive() -> bool:
            return gw.proc.proc.poll() is None and all(
                Path(f"/proc/{pid}").exists() for pid in workers
            )

        # Refused only once *both* listeners are closed: with SO_REUSEPORT a worker
        # that missed the signal would still accept.
        refused_after = await refused_within(gw.port, all_alive, AT_ONCE)
        replies = await asyncio.gather(*(conn.next() for _, conn in chosen))
        code = await gw.exit_code(grace + 10)
        exited = time.monotonic() - signalled
    finally:
        for conn in conns:
            await conn.close()
        gw.proc.stop(signal.SIGKILL)
    output = gw.proc.output()
    print(
        f"workers {workers}, in flight {[pid for pid, _ in chosen]}: refused new connections "
        f"{refused_after:.3f} s after SIGTERM; "
        f"supervisor exited {exited:.2f} s after with {code}"
    )
    for (pid, _), answer in zip(chosen, replies, strict=True):
        assert answer.status == 200 and answer.body == SLOW_BODY, (pid, answer, output)
    assert code == 0, output
    # The work ends at 6 s; well before the supervisor's own kill deadline
    # (grace + 5 s): the workers exited by themselves.
    assert exited < grace + 3, f"exited {exited:.2f} s after SIGTERM (grace {grace} s)"
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), output


# -- (f) server.drain_delay: still accepting, /readyz 503, then the drain -----------------


async def test_during_drain_delay_new_connections_are_served_and_readyz_is_503(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    # A delay long enough for the checks below on a busy machine; the slow request
    # is in flight past it, so the process is still up (draining) when the
    # listener closes, and a refusal below is the listener's, not an exit.
    delay = 5.0
    gw = await launch(tmp_path, slow_upstream, wechat, grace="6s", drain_delay="5s")
    held = await Conn.open(gw.port)
    http = aiohttp.ClientSession()
    try:
        await held.send(get("/readyz"))
        ready = await held.next()
        assert ready.status == 200 and ready.header("connection") != "close"
        slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=8000", asyncio.Event()))
        await until(lambda: arrivals(slow_upstream).slow == 1, "the slow request upstream")
        signalled = gw.sigterm()
        # A keep-alive connection opened before the signal can still ask. (Asked
        # once the signal is handled: a /readyz already under way when it comes
        # may still say 200, with Connection: close.)
        await signal_handled(gw.port)
        await held.send(get("/readyz"))
        draining = await held.next()
        assert_error(draining, 503, "not_ready")
        assert draining.header("connection") == "close"
        # New connections are still accepted: /readyz is 503, proxied requests served,
        # every answer closing its connection so that clients reconnect elsewhere.
        fresh = await Conn.open(gw.port)
        await fresh.send(get("/readyz"))
        answer = await fresh.next()
        await fresh.close()
        assert answer.status == 503 and answer.header("connection") == "close"
        fresh = await Conn.open(gw.port)
        await fresh.send(get("/up/slow?ms=10"))
        served = await fresh.next()
        await fresh.close()
        assert served.status == 200 and served.body == SLOW_BODY
        assert served.header("connection") == "close"
        assert time.monotonic() - signalled < delay, "the checks took longer than the delay"
        # Then the listener closes; the request in flight still finishes.
        polling = time.monotonic()
        refused_after = await refused_within(gw.port, gw.alive, delay + AT_ONCE)
        refused_at = polling + refused_after - signalled
        slow_result = await slowing
        code = await gw.exit_code(20)
    finally:
        await held.close()
        await http.close()
        gw.proc.stop(signal.SIGKILL)
    print(f"new connections refused {refused_at:.3f} s after SIGTERM (delay {delay} s)")
    assert refused_at <= delay + AT_ONCE
    assert slow_result.status == 200 and slow_result.body == SLOW_BODY, slow_result
    assert code == 0, gw.proc.output()


async def test_listener_stays_open_for_the_whole_drain_delay(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    gw = await launch(tmp_path, slow_upstream, wechat, grace="10s", drain_delay="1.2s")
    try:
        async with aiohttp.ClientSession() as http:
            # In flight well past the delay, so the process outlives the listener.
            slowing = asyncio.create_task(fetch(http, gw.url + "/up/slow?ms=6000", asyncio.Event()))
            await until(lambda: arrivals(slow_upstream).slow == 1, "the slow request upstream")
            signalled = gw.sigterm()
            refused_after = await refused_within(gw.port, gw.alive, 1.2 + AT_ONCE)
            slow_result = await slowing
        code = await gw.exit_code(20)
        exited = time.monotonic() - signalled
    finally:
        gw.proc.stop(signal.SIGKILL)
    print(f"refused {refused_after:.3f} s after SIGTERM, exited after {exited:.3f} s")
    assert refused_after >= 1.0, f"refused after {refused_after:.3f} s, before the 1.2 s delay"
    assert slow_result.status == 200 and slow_result.body == SLOW_BODY, slow_result
    # With the work done (6 s), not after the delay plus the whole grace (11.2 s).
    assert exited < 9.0, f"exited {exited:.2f} s after SIGTERM"
    assert code == 0, gw.proc.output()


async def test_sigint_skips_the_drain_delay(
    tmp_path: Path, slow_upstream: TestServer, wechat: TestServer
) -> None:
    gw = await launch(tmp_path, slow_upstream, wechat, grace="3s", drain_delay="30s")
    try:
        gw.proc.proc.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        code = await gw.exit_code(40)
        exited = time.monotonic() - interrupted
    finally:
        gw.proc.stop(signal.SIGKILL)
    assert code == 0, gw.proc.output()
    assert exited < 15.0, f"Ctrl-C waited {exited:.2f} s: the 30 s drain delay was not skipped"
