"""No framing state outlives its message (issue 12; contract section 8, last bullets).

Each test drives a real gateway over raw sockets, against raw asyncio upstreams
that record the exact bytes they receive and answer with exactly the bytes a
test chooses (trailers, unsolicited responses, stalls). One test or a few per
item of issue 12: 1-6, 9, 10 and 12 (7, 8 and 11 are tested elsewhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.support.errors import assert_error
from tests.support.gateway import Running, StartGateway, base_config
from tests.support.metrics import samples
from tests.support.procs import rss_kib, spawn
from tests.support.rawhttp import Conn, Response, exchange, parse_responses, request_once
from tests.support.rawupstream import RawUpstream, ok
from tests.support.sockets import gateway_holds
from tests.support.waiting import PROMPT, until

MIB = 1024 * 1024
# Long, so that an answer "at once" and one at the body timeout cannot be confused
# however busy the machine.
BODY_TIMEOUT = 30.0


# -- a raw upstream ---------------------------------------------------------------------
@dataclass
class Seen:
    """One request as the upstream received it."""

    conn: int  # which upstream connection carried it: 0, 1, ... in order of opening
    method: str
    target: str
    headers: list[tuple[str, str]]
    raw: bytes  # every byte of it: head, body, chunk framing and trailers

    @property
    def query(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.target).query).items()}


# What a handler answers: bytes written as they are, pieces streamed one by one,
# or None to close the connection without answering.
Answer = bytes | AsyncIterator[bytes] | None


async def echo(seen: Seen) -> Answer:
    """200 with the request target as the body, after ``?sleep=N`` seconds if asked."""
    if "sleep" in seen.query:
        await asyncio.sleep(float(seen.query["sleep"]))
    return ok(seen.target.encode())


async def read_request(reader: asyncio.StreamReader, conn: int) -> Seen | None:
    """One request read as framed (Content-Length or chunked with trailers)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head[:-4].decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
    fields = {k.lower(): v for k, v in headers}
    raw = bytearray(head)
    if "chunked" in fields.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                break
            raw += await reader.readexactly(size + 2)
        while True:  # the trailer section, up to its empty line
            line = await reader.readuntil(b"\r\n")
            raw += line
            if line == b"\r\n":
                break
    elif "content-length" in fields:
        raw += await reader.readexactly(int(fields["content-length"]))
    return Seen(conn, method, target, headers, bytes(raw))


class RecordingUpstream(RawUpstream):
    """A keep-alive HTTP/1.1 upstream over raw sockets that records each request
    as framed; ``answer`` serves each one."""

    def __init__(self) -> None:
        super().__init__(self._requests)
        self.answer: Callable[[Seen], Awaitable[Answer]] = echo
        self.seen: list[Seen] = []

    async def wait_seen(self, count: int) -> None:
        await until(lambda: len(self.seen) >= count, f"{count} requests upstream")

    async def _requests(
        self, _: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = self.connections - 1
        while (seen := await read_request(reader, conn)) is not None:
            self.seen.append(seen)
            answer = await self.answer(seen)
            if answer is None:
                return
            if isinstance(answer, bytes):
                writer.write(answer)
                await writer.drain()
            else:
                async for piece in answer:
                    writer.write(piece)
                    await writer.drain()


@pytest.fixture
async def recording_upstream() -> AsyncIterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    await upstream.start()
    yield upstream
    await upstream.close()


async def serving(
    start_gateway: StartGateway,
    upstream: RecordingUpstream,
    route: dict[str, Any] | None = None,
    **sections: Any,
) -> Running:
    """A gateway whose /private/ (auth required) and /public/ routes go to ``upstream``,
    with ``route`` settings on both and ``sections`` overriding the config's."""
    route = route or {}
    return await start_gateway(
        routes=[
            {"prefix": "/private/", "upstream": upstream.url, "auth": "required", **route},
            {"prefix": "/public/", "upstream": upstream.url, "auth": "public", **route},
        ],
        **sections,
    )


# -- raw clients ------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def plain_socket(
    port: int, *, rcvbuf: int | None = None, sndbuf: int | None = None
) -> AsyncIterator[socket.socket]:
    """A connected non-blocking socket that, unlike asyncio streams, reads nothing
    in the background: bytes stay in the kernel until the test asks for them.
    Small buffers keep what is sent or answered from hiding in the kernel."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    try:
        # Before connect: the receive buffer sets the window the gateway sees.
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), PROMPT)
        yield sock
    finally:
        sock.close()


async def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """What arrives within ``timeout``, and whether the gateway ended the
    connection (EOF or reset) in that time."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    end = loop.time() + timeout
    while (left := end - loop.time()) > 0:
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, MIB), left)
        except TimeoutError:
            break
        except ConnectionError:
            return bytes(data), True
        if not chunk:
            return bytes(data), True
        data += chunk
    return bytes(data), False


def error_code(response: Response) -> str:
    """The `error` of an answer, once it has the contract's error shape."""
    return str(assert_error(response, None)["error"])


# -- 1. request trailers ------------------------------------------------------------------
def post_with_trailers(trailers: list[str]) -> bytes:
    return (
        "POST /public/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\n" + "".join(f"{line}\r\n" for line in trailers) + "\r\n"
    ).encode()


def assert_no_trailer_fields(seen: Seen, token: str) -> None:
    raw = seen.raw.lower()
    for leaked in (b"x-foo", b"authorization", b"x-openid", token.lower().encode()):
        assert leaked not in raw, f"{leaked!r} reached the upstream: {seen.raw!r}"


async def send_after_trailers(
    gw: Running, trailers: list[str], then: bytes, pipelined: bool
) -> Conn:
    """A chunked POST ending with ``trailers``, then ``then`` on the same connection,
    in the same send or once the POST is answered."""
    conn = await Conn.open(gw.listener.port)
    post = post_with_trailers(trailers)
    if pipelined:
        await conn.send(post + then)
    else:
        await conn.send(post)
        first = await conn.responses(1)
        assert [r.status for r in first] == [200]
        await conn.send(then)
    return conn


@pytest.mark.parametrize("pipelined", [True, False], ids=["same-send", "after-answer"])
async def test_request_trailer_does_not_authenticate_the_next_request(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, pipelined: bool
) -> None:
    gw = await serving(start_gateway, recording_upstream)
    token = gw.token("o-alice")
    # Alice's token comes last: a parser that keeps its pending field across
    # messages carries exactly the last trailer field into the next head.
    trailers = ["X-Foo: bar", f"Authorization: Bearer {token}"]
    conn = await send_after_trailers(
        gw, trailers, b"GET /private/y HTTP/1.1\r\nHost: gw\r\n\r\n", pipelined
    )
    try:
        answers = await conn.responses(2)
    finally:
        await conn.close()
    assert answers and answers[0].status == 200
    if len(answers) == 2:
        assert answers[1].status == 401 and error_code(answers[1]) == "token_missing"
    else:
        assert conn.closed  # refusing to go on after the trailer is also safe
    # The anonymous GET never reached the upstream (as Alice or anyone).
    assert [s.target for s in recording_upstream.seen] == ["/public/upload"]
    assert_no_trailer_fields(recording_upstream.seen[0], token)
    assert b"hello" in recording_upstream.seen[0].raw


@pytest.mark.parametrize("pipelined", [True, False], ids=["same-send", "after-answer"])
async def test_request_trailer_fields_reach_no_upstream(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, pipelined: bool
) -> None:
    gw = await serving(start_gateway, recording_upstream)
    token = gw.token("o-alice")
    # X-Foo last this time (a public route drops Authorization whatever its origin).
    trailers = [f"Authorization: Bearer {token}", "X-Foo: bar"]
    conn = await send_after_trailers(
        gw, trailers, b"GET /public/z HTTP/1.1\r\nHost: gw\r\n\r\n", pipelined
    )
    try:
        answers = await conn.responses(2)
    finally:
        await conn.close()
    assert answers and answers[0].status == 200
    assert len(answers) == 2 or conn.closed
    for seen in recording_upstream.seen:  # the POST and, if it was served, the GET
        assert_no_trailer_fields(seen, token)
    if len(answers) == 2:
        assert answers[1].status == 200
        assert [s.target for s in recording_upstream.seen] == ["/public/upload", "/public/z"]


# -- 2. response trailers -----------------------------------------------------------------
async def test_upstream_response_trailer_reaches_no_client(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    async def answer(seen: Seen) -> Answer:
        if seen.target == "/public/alice":
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nalice\r\n0\r\nX-Checksum: alice-secret\r\n\r\n"
            )
        return ok(b"bob")

    recording_upstream.answer = answer
    gw = await serving(start_gateway, recording_upstream)
    received = []
    # Alice, then Bob on another client connection (the pooled upstream one is shared).
    for user in ("alice", "bob"):
        conn = await Conn.open(gw.listener.port)
        try:
            await conn.send(f"GET /public/{user} HTTP/1.1\r\nHost: gw\r\n\r\n".encode())
            answers = await conn.responses(1)
        finally:
            await conn.close()
        assert [(r.status, r.body) for r in answers] == [(200, user.encode())]
        received.append(conn.received)
    assert b"alice-secret" not in received[0]  # response trailers are not relayed
    assert b"alice-secret" not in received[1], received[1]


# -- 3. the route timeout on a reused upstream connection ---------------------------------
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_route_timeout_holds_on_a_reused_upstream_connection(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, method: str
) -> None:
    upstream = recording_upstream.url
    gw = await start_gateway(
        routes=[
            {"prefix": "/long/", "upstream": upstream, "auth": "public", "timeout": "30s"},
            {"prefix": "/short/", "upstream": upstream, "auth": "public", "timeout": "1s"},
        ]
    )
    # The end of each request's head, and its body if any.
    rest = b"Content-Length: 4\r\n\r\nbody" if method == "POST" else b"\r\n"
    conn = await Conn.open(gw.listener.port)
    try:
        await conn.send(f"{method} /long/warm HTTP/1.1\r\nHost: gw\r\n".encode() + rest)
        assert [r.status for r in await conn.responses(1)] == [200]
        # The upstream would answer in 20 s, on the connection the /long/ request
        # used: a 504 before that is the /short/ route's 1 s timeout (the /long/
        # one's 30 s would let the 200 through first).
        started = time.monotonic()
        await conn.send(f"{method} /short/a?sleep=20 HTTP/1.1\r\nHost: gw\r\n".encode() + rest)
        answers = await conn.responses(2, timeout=15.0)
        elapsed = time.monotonic() - started
    finally:
        await conn.close()
    assert [r.status for r in answers] == [200, 504], answers
    assert error_code(answers[1]) == "upstream_timeout"
    assert elapsed >= 0.9, f"the 1 s route timeout fired after {elapsed:.1f} s"


# -- 4. a split Connection header with Upgrade --------------------------------------------
SPLIT_UPGRADE = (
    b"GET /public/up HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive\r\n"
    b"Connection: upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


async def test_split_connection_upgrade_on_a_plain_route_is_400(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await serving(start_gateway, recording_upstream)  # /public/ has no websocket: true
    result = await exchange(gw.listener.port, SPLIT_UPGRADE)
    assert result.statuses() == [400]
    assert error_code(result.responses[0]) == "bad_request"
    await asyncio.sleep(0.2)  # an absence has no event to wait for: a grace
    assert recording_upstream.seen == []  # nothing reached the upstream


async def test_bytes_after_a_refused_split_upgrade_are_not_buffered(
    tmp_path: Path, recording_upstream: RecordingUpstream
) -> None:
    # A real process, so that its memory is its own. The upstream would take 10 s
    # to answer, should the request reach it: long past the flood below.
    url = recording_upstream.url
    raw = base_config(tmp_path, url, "http://127.0.0.1:9")
    raw["routes"] = [{"prefix": "/public/", "upstream": url, "auth": "public"}]
    proc = await spawn(tmp_path, raw)
    port = raw["server"]["port"]
    try:
        before = rss_kib(proc.pid)
        sent = 0
        block = b"\x00" * (256 * 1024)
        async with plain_socket(port) as sock:
            loop = asyncio.get_running_loop()
            request = SPLIT_UPGRADE.replace(b"/public/up", b"/public/up?sleep=10")
            end = loop.time() + 5.0
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(loop.sock_sendall(sock, request), 2.0)
                # Bytes for the gateway to drop, refuse or stop reading, not to keep.
                while sent < 48 * MIB and loop.time() < end:
                    await asyncio.wait_for(loop.sock_sendall(sock, block), end - loop.time())
                    sent += len(block)
            await asyncio.sleep(0.3)
            grown = rss_kib(proc.pid) - before
        assert grown < 16 * 1024, f"RSS grew by {grown} KiB after {sent // MIB} MiB sent"
        assert recording_upstream.seen == []
    finally:
        proc.stop()


# -- 5. a client that stops reading -------------------------------------------------------
STREAMED = 32 * MIB
WHOLE, PIPELINED = 100_000, 60


async def stream_chunked(size: int) -> AsyncIterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    block = b"%x\r\n%b\r\n" % (64 * 1024, b"s" * 64 * 1024)
    for _ in range(size // (64 * 1024)):
        yield block
    yield b"0\r\n\r\n"


@pytest.mark.parametrize("shape", ["streamed", "whole"])
async def test_a_client_that_stops_reading_is_disconnected(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, shape: str
) -> None:
    async def answer(seen: Seen) -> Answer:
        if seen.target == "/public/stream":
            return stream_chunked(STREAMED)
        return ok(b"w" * WHOLE)  # small enough to reach the gateway in one read

    recording_upstream.answer = answer
    # The route timeout is long: only the client's own stall may end its connection.
    gw = await serving(
        start_gateway, recording_upstream, {"timeout": "30s"}, server={"idle_timeout": "1s"}
    )
    if shape == "streamed":
        request, total = b"GET /public/stream HTTP/1.1\r\nHost: gw\r\n\r\n", STREAMED
    else:
        # Many whole answers, each written at once: megabytes queued in the gateway.
        request = b"GET /public/whole HTTP/1.1\r\nHost: gw\r\n\r\n" * PIPELINED
        total = WHOLE * PIPELINED
    loop = asyncio.get_running_loop()
    # A small receive window: the kernel cannot take the answer off the gateway's hands.
    async with plain_socket(gw.listener.port, rcvbuf=16 * 1024) as sock:
        await asyncio.wait_for(loop.sock_sendall(sock, request), PROMPT)
        client_port = sock.getsockname()[1]
        # Not reading: once idle_timeout (1 s) passes without progress, the
        # gateway lets go of the connection (what it had queued goes with it).
        await until(
            lambda: not gateway_holds(gw.listener.port, client_port),
            "the gateway dropping a client that stopped reading",
            timeout=30.0,
            every=0.1,
        )
        data, ended = await read_to_end(sock, PROMPT)
    assert ended, f"still connected after {len(data)} bytes"
    assert len(data) < total, "the whole answer waited for a client that had stopped reading"


# -- 6. an unsolicited extra response -----------------------------------------------------
EXTRA = {
    "complete": ok(b"unsolicited"),
    "unframed": b"HTTP/1.1 200 OK\r\n\r\n",  # a body that would run until the close
    "partial": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nunsol",
}


@pytest.mark.parametrize("extra", list(EXTRA))
async def test_unsolicited_response_is_not_the_next_requests_answer(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, extra: str
) -> None:
    async def answer(seen: Seen) -> Answer:
        reply = ok(seen.target.encode())
        if seen.target == "/public/first":
            reply += EXTRA[extra]  # in the same write as the real answer
        return reply

    recording_upstream.answer = answer
    gw = await serving(start_gateway, recording_upstream, {"timeout": "2s"})
    conn = await Conn.open(gw.listener.port)
    try:
        await conn.send(b"GET /public/first HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert [(r.status, r.body) for r in await conn.responses(1)] == [(200, b"/public/first")]
        await conn.send(b"GET /public/second HTTP/1.1\r\nHost: gw\r\n\r\n")
        answers = await conn.responses(2, timeout=6.0)
    finally:
        await conn.close()
    assert [(r.status, r.body) for r in answers[1:]] == [(200, b"/public/second")]
    # The connection that carried the extra bytes was not reused.
    assert [(s.target, s.conn) for s in recording_upstream.seen] == [
        ("/public/first", 0),
        ("/public/second", 1),
    ]


# -- 9. a fast-lane request whose client resets -------------------------------------------
async def test_fast_lane_request_of_a_client_that_resets_is_finished(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    capfd: pytest.CaptureFixture[str],
) -> None:
    gw = await serving(start_gateway, recording_upstream, {"timeout": "10s"}, log={"access": True})
    gateway = gw.listener.gateway
    port = gw.listener.port
    warm = await exchange(port, b"GET /public/warm HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert warm.statuses() == [200]
    conn = await Conn.open(port)
    await conn.send(b"GET /public/slow?sleep=3 HTTP/1.1\r\nHost: gw\r\n\r\n")
    await recording_upstream.wait_seen(2)
    # The warm request's pooled upstream connection carries it: the fast lane.
    assert [s.conn for s in recording_upstream.seen] == [0, 0]
    assert gateway.inflight == 1
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.writer.transport.abort()  # linger 0: the close is a reset
    await until(lambda: gateway.inflight == 0, "the abandoned request finished")
    # One read of the captured stdout, once the access log's writer thread has
    # written everything and stopped: a read while that thread writes can lose
    # the line (capfd's snapshot truncates the file it shares with stdout).
    access_log = gateway.access_log
    assert access_log is not None
    await asyncio.to_thread(access_log.close)
    out = capfd.readouterr().out
    paths = [json.loads(line)["path"] for line in out.splitlines() if line.startswith("{")]
    assert "/public/slow" in paths, f"no access log line for it: {paths}"
    # And it is counted in /metrics, next to the warm request.
    metrics = await request_once(
        port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    counted = sum(
        count
        for (name, labels), count in samples(metrics.body.decode()).items()
        if name == "wxgateway_requests_total" and ("route", "/public/") in labels
    )
    assert counted == 2


# -- 12. an early answer to a client still uploading --------------------------------------
async def read_answer(sock: socket.socket, timeout: float) -> list[Response]:
    """The first complete answer (or what there is when the connection ends or
    ``timeout`` passes), read off a socket whose bytes waited in the kernel."""
    loop = asyncio.get_running_loop()
    data, closed = b"", False
    end = loop.time() + timeout
    while not closed and (left := end - loop.time()) > 0:
        answers, _ = parse_responses(data, closed)
        if answers:
            return answers
        try:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, MIB), left)
        except TimeoutError:
            break
        except ConnectionError:
            chunk = b""
        closed = not chunk
        data += chunk
    return parse_responses(data, closed)[0]


def upload_head(token: str, size: int) -> bytes:
    return (
        f"POST /private/upload HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
    ).encode()


async def revoked_token(gw: Running) -> str:
    token = gw.token("o-leaving")
    logout = await request_once(
        gw.listener.port,
        f"POST /auth/logout HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )
    assert logout.status == 200
    return token


async def send_all(sock: socket.socket, data: bytes) -> str | None:
    """Send ``data`` whole; the error that stopped it (a reset, a broken pipe), if any."""
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, data), PROMPT)
    except (OSError, TimeoutError) as exc:
        return repr(exc)
    return None


@pytest.mark.parametrize("kind", ["revoked", "invalid"])
async def test_early_401_reaches_a_client_still_uploading(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, kind: str
) -> None:
    gw = await serving(start_gateway, recording_upstream)
    token = await revoked_token(gw) if kind == "revoked" else "not-a-token"
    size = 600 * 1024
    request = upload_head(token, size) + b"u" * size
    got = []
    for _ in range(10):
        # Like curl or wx.uploadFile: the whole body is written before anything is
        # read, and a failed write (EPIPE, ECONNRESET) is a network error for them.
        async with plain_socket(gw.listener.port, sndbuf=16 * 1024) as sock:
            failed = await send_all(sock, request)
            answers = await read_answer(sock, PROMPT)
        got.append((failed, [(r.status, error_code(r)) for r in answers]))
    assert got == [(None, [(401, f"token_{kind}")])] * 10
    assert recording_upstream.seen == []


async def test_early_401_reaches_a_slow_uploader_then_the_gateway_lets_go(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    gw = await serving(start_gateway, recording_upstream)
    token = await revoked_token(gw)
    piece, pieces = 16 * 1024, 40
    async with plain_socket(gw.listener.port, sndbuf=16 * 1024) as sock:
        client_port = sock.getsockname()[1]
        failed = await send_all(sock, upload_head(token, piece * pieces))
        # A slow uplink: the body trickles in for about 3.5 s after the 401.
        for _ in range(pieces):
            if failed:
                break
            await asyncio.sleep(0.09)
            failed = await send_all(sock, b"u" * piece)
        answers = await read_answer(sock, PROMPT)
        assert failed is None, "the gateway stopped taking the body"
        assert [(r.status, error_code(r)) for r in answers] == [(401, "token_revoked")]
        # The client now goes quiet without closing: the discarding is bounded
        # (5 s between reads, 30 s in all).
        await until(
            lambda: not gateway_holds(gw.listener.port, client_port),
            "the gateway letting go of a quiet uploader",
            timeout=40.0,
            every=0.1,
        )


# -- 10. transfer codings other than a lone chunked ------------------------------------------
@pytest.mark.parametrize(
    ("codings", "status"),
    [
        ([b"gzip, chunked"], 501),
        ([b"identity, chunked"], 501),
        ([b"GZIP ,chunked"], 501),
        ([b"gzip", b"chunked"], 400),  # the same list over two lines: llhttp refuses it
    ],
    ids=["gzip-chunked", "identity-chunked", "odd-case", "two-lines"],
)
async def test_a_transfer_coding_besides_chunked_is_refused(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    codings: list[bytes],
    status: int,
) -> None:
    # llhttp frames these as chunked; forwarding them as bare chunked would drop
    # a coding the upstream was told about. Refused, closed, nothing forwarded.
    gw = await serving(start_gateway, recording_upstream)
    head = b"POST /public/x HTTP/1.1\r\nHost: gw\r\n" + b"".join(
        b"Transfer-Encoding: " + coding + b"\r\n" for coding in codings
    )
    result = await exchange(
        gw.listener.port, head + b"\r\n5\r\nhello\r\n0\r\n\r\n" + GET_PUBLIC_AFTER
    )
    assert result.statuses() == [status]
    assert error_code(result.responses[0]) == "bad_request"
    assert result.responses[0].header("connection") == "close"
    await asyncio.sleep(0.2)  # an absence has no event to wait for: a grace
    assert recording_upstream.seen == []  # neither the POST nor the request behind it


GET_PUBLIC_AFTER = b"GET /public/after HTTP/1.1\r\nHost: gw\r\n\r\n"


async def test_a_head_refused_for_its_transfer_coding_gets_no_body(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    # An answer to HEAD carries no body, whatever its Content-Length says: body
    # bytes after the head would be read as the start of the next answer.
    gw = await serving(start_gateway, recording_upstream)
    request = (
        b"HEAD /public/x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    )
    async with plain_socket(gw.listener.port) as sock:
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, request), PROMPT)
        data, ended = await read_to_end(sock, PROMPT)
    head, sep, after = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 501 "), data
    assert b"content-length: " in head.lower()  # the length a GET's answer would have
    assert after == b"", f"body bytes after a HEAD's answer: {after!r}"
    assert ended
    assert recording_upstream.seen == []


# -- bodies that cannot end: every request is answered or failed at once -------------------
async def answer_within(conn: Conn, seconds: float) -> tuple[list[Response], float]:
    started = time.monotonic()
    answers = await conn.responses(1, timeout=seconds)
    return answers, time.monotonic() - started


async def test_a_trailer_error_in_the_read_that_ends_a_chunk_fails_the_body_at_once(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    # The read that brings the CRLF ending a data chunk also brings a trailer
    # section llhttp refuses (a second Host). aiohttp's body reader is woken by the
    # chunk's end, with no data, and would wait again without seeing the error set
    # in the same pass: the request, its body half forwarded, got neither an
    # answer nor a failure until body_timeout (found by the differential test).
    gw = await serving(
        start_gateway, recording_upstream, server={"body_timeout": f"{BODY_TIMEOUT:g}s"}
    )
    conn = await Conn.open(gw.listener.port)
    try:
        await conn.send(
            b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r"
        )
        await asyncio.sleep(0.3)  # the body is being forwarded; its reader waits for more
        await conn.send(b"\n0\r\nHost: trailer.example\r\nX-A: 1\r\n\r\n")
        answers, took = await answer_within(conn, PROMPT)
    finally:
        await conn.close()
    assert [(r.status, error_code(r)) for r in answers] == [(400, "bad_request")]
    assert answers[0].header("connection") == "close"
    assert took < BODY_TIMEOUT / 3, f"answered after {took:.1f} s: at the body timeout?"
    assert recording_upstream.seen == []  # the upstream never got a complete request


async def test_a_malformed_trailer_section_is_answered_at_once(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream
) -> None:
    # The body's last chunk came in an earlier read; its trailer section, refused
    # by llhttp, comes later. The request being served learns at once, rather
    # than when body_timeout runs out.
    gw = await serving(
        start_gateway, recording_upstream, server={"body_timeout": f"{BODY_TIMEOUT:g}s"}
    )
    conn = await Conn.open(gw.listener.port)
    try:
        await conn.send(
            b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n"
        )
        await asyncio.sleep(0.3)
        await conn.send(b"Host: trailer.example\r\nX-A: 1\r\n\r\n")
        answers, took = await answer_within(conn, PROMPT)
    finally:
        await conn.close()
    assert [(r.status, error_code(r)) for r in answers] == [(400, "bad_request")]
    assert took < BODY_TIMEOUT / 3, f"answered after {took:.1f} s: at the body timeout?"
    assert recording_upstream.seen == []


async def test_a_client_that_half_closes_mid_body_gets_400(
    start_gateway: StartGateway,
    recording_upstream: RecordingUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The client ends its side before Content-Length is reached: the body is
    # malformed (400), not an error of the gateway's (500, logged as unhandled).
    gw = await serving(
        start_gateway, recording_upstream, server={"body_timeout": f"{BODY_TIMEOUT:g}s"}
    )
    conn = await Conn.open(gw.listener.port)
    try:
        await conn.send(
            b"POST /public/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n\r\nonly ten b"
        )
        await asyncio.sleep(0.3)
        conn.writer.write_eof()
        answers, took = await answer_within(conn, PROMPT)
        # Nothing more can come from the client: no lingering close to wait out.
        # (Not seen from outside: the client has had the gateway's FIN either way.)
        # Lingering would hold it at least 5 s (the wait between reads).
        http = gw.listener._http
        assert http is not None
        await until(
            lambda: not http.connections,
            "the gateway closing a connection the client had half-closed",
            timeout=4.0,
        )
    finally:
        await conn.close()
    assert [(r.status, error_code(r)) for r in answers] == [(400, "bad_request")]
    assert took < BODY_TIMEOUT / 3, f"answered after {took:.1f} s: at the body timeout?"
    unhandled = [r.getMessage() for r in caplog.records if "unhandled error" in r.getMessage()]
    assert unhandled == []
    assert recording_upstream.seen == []


@pytest.mark.parametrize(
    ("field", "served"),
    [("Proxy-Connection: keep-alive", 1), ("Connection: keep-alive", 2)],
    ids=["proxy-connection", "connection"],
)
async def test_http10_persists_only_on_connection_keep_alive(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, field: str, served: int
) -> None:
    # llhttp keeps an HTTP/1.0 connection on Proxy-Connection too; RFC 9112 9.3
    # (and h11) only on "Connection: keep-alive". A second request pipelined
    # behind the first is served only on a connection that persists.
    gw = await serving(start_gateway, recording_upstream)
    conn = await Conn.open(gw.listener.port)
    try:
        await conn.send(
            f"GET /public/first HTTP/1.0\r\n{field}\r\n\r\n"
            "GET /public/second HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode()
        )
        answers = await conn.responses(2)
    finally:
        await conn.close()
    assert [(r.status, r.body) for r in answers] == [
        (200, b"/public/first"),
        (200, b"/public/second"),
    ][:served]
    if served == 1:
        assert answers[0].header("connection") == "close"
        assert conn.closed
    else:
        assert answers[0].header("connection") == "keep-alive"
    await asyncio.sleep(0.2)  # an absence has no event to wait for: a grace
    assert [s.target for s in recording_upstream.seen] == ["/public/first", "/public/second"][
        :served
    ]


@pytest.mark.parametrize(
    "pieces",
    [
        [b"HEAD /public/x HTTP/1.1\r\nHost: gw\r\nHost: gw\r\n\r\n"],
        # Over several reads, the method itself split.
        [b"H", b"E", b"AD /public/x HTTP/1.1\r\n", b"Host: gw\r\nHost: gw\r\n\r\n"],
        # The HEAD is lost with the request behind it, refused in the same read
        # (aiohttp's parser raises for the whole read): the client pairs the 400
        # with its HEAD.
        [
            b"HEAD /public/x HTTP/1.1\r\nHost: gw\r\n\r\nGET /public/y HTTP/1.1\r\nHost: gw\r\nHost: gw\r\n\r\n"
        ],
    ],
    ids=["refused-head", "refused-head-in-pieces", "head-lost-with-a-refused-request"],
)
async def test_a_parser_refusal_a_client_may_pair_with_a_head_has_no_body(
    start_gateway: StartGateway, recording_upstream: RecordingUpstream, pieces: list[bytes]
) -> None:
    # The gateway cannot tell which request the parser refused; the client reads
    # the refusal as the answer to its first unanswered request. A body after an
    # answer to HEAD would be read as the start of the next answer: no body, and
    # Content-Length 0, framed alike whichever request it is paired with.
    gw = await serving(start_gateway, recording_upstream)
    loop = asyncio.get_running_loop()
    async with plain_socket(gw.listener.port) as sock:
        for piece in pieces:
            await asyncio.wait_for(loop.sock_sendall(sock, piece), PROMPT)
            await asyncio.sleep(0.05)  # each piece a read of its own
        data, ended = await read_to_end(sock, PROMPT)
    head, sep, after = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 400 "), data
    assert b"\r\ncontent-length: 0\r\n" in head.lower() + b"\r\n"
    assert after == b"", f"body bytes after the refusal: {after!r}"
    assert ended
    assert recording_upstream.seen == []
