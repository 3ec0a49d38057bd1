"""Client-side limits: request-head and body timeouts, idle keep-alive timeout,
and the per-worker connection cap (server.header_timeout, body_timeout,
idle_timeout, max_connections).

Each limit is checked against its own timer: a close must not come before it
(a busy machine only makes it later) and must come well before the next timer
that could close the connection instead, which the bounds below name."""

from __future__ import annotations

import asyncio
import contextlib
import time

from tests.support.gateway import Running, StartGateway
from tests.support.upstream import Recorder
from tests.support.waiting import PROMPT, until


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> float:
    """Seconds until the gateway closes the connection (EOF or reset), failing
    past ``seconds``."""
    started = time.monotonic()

    async def to_eof() -> None:
        with contextlib.suppress(ConnectionResetError):
            while await reader.read(65536):
                pass

    await asyncio.wait_for(to_eof(), seconds)
    return time.monotonic() - started


async def _ok(gw: Running) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()


async def test_a_request_head_trickled_past_header_timeout_is_cut(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    gw = await start_gateway(server={"header_timeout": "600ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    writer.write(b"GET /public/slow HTTP/1.1\r\nHost: a\r\n")  # and never the blank line

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(300):  # 30 s of drip: far past any bound below
                await asyncio.sleep(0.1)
                writer.write(b"X-Drip: 1\r\n")  # bytes keep coming, the head never ends

    dripping = asyncio.create_task(trickle())
    try:
        took = await _closed_within(reader, 20.0)
    finally:
        dripping.cancel()
        writer.close()
    # A timer that each byte restarted would never fire while the drip goes on.
    assert 0.5 <= took < 10.0, took
    assert not seen.seen
    await _ok(gw)  # everyone else is still served


async def test_a_silent_new_connection_is_closed_after_header_timeout(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(server={"header_timeout": "500ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    took = await _closed_within(reader, 20.0)
    writer.close()
    # The next timer would be idle_timeout (75 s).
    assert 0.4 <= took < 10.0, took


async def test_idle_keep_alive_connection_closes_after_idle_timeout(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(server={"idle_timeout": "700ms", "header_timeout": "30s"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(
        next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")).split(b":")[
            1
        ]
    )
    await reader.readexactly(length)
    took = await _closed_within(reader, 20.0)
    writer.close()
    # The head timeout (30 s) would be later: the idle timeout closed it.
    assert 0.5 <= took < 10.0, took


async def test_a_body_that_stalls_past_body_timeout_fails_and_closes(
    start_gateway: StartGateway, seen: Recorder
) -> None:
    gw = await start_gateway(server={"body_timeout": "500ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    writer.write(
        b"POST /public/upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
    )
    started = time.monotonic()
    data = await asyncio.wait_for(reader.read(), 20.0)
    took = time.monotonic() - started
    writer.close()
    # Nothing else would end a request waiting for its body this soon (the
    # route timeout is 30 s, the idle timeout 75 s).
    assert 0.4 <= took < 10.0, took
    # Either a 4xx before the close, or just the close: never a complete 2xx.
    assert not data.startswith(b"HTTP/1.1 2"), data
    # The upstream never saw a complete 100-byte body.
    assert all(len(r.body) < 100 for r in seen.seen)


async def test_connections_past_max_connections_are_closed_at_once(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(server={"max_connections": 3})
    held = [await asyncio.open_connection("127.0.0.1", gw.listener.port) for _ in range(3)]
    http = gw.listener._http
    assert http is not None
    await until(lambda: len(http.connections) == 3, "the three connections accepted")
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    # Closed at once, nothing served: EOF or a reset, as the kernel picks.
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), PROMPT) == b""
    writer.close()
    # The held connections are served normally, and once one closes, a new one is too.
    r0, w0 = held[0]
    w0.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (await asyncio.wait_for(r0.read(), PROMPT)).startswith(b"HTTP/1.1 200")
    w0.close()
    await until(lambda: len(http.connections) < 3, "the gateway seeing the close")
    await _ok(gw)
    for _, w in held[1:]:
        w.close()


async def test_an_upload_refused_before_its_body_is_read_still_gets_its_answer(
    gw: Running, seen: Recorder
) -> None:
    """A 401 on a 4 MiB upload: the gateway answers without reading the body. It
    must say `Connection: close` and close gently (shut its side, drop what still
    arrives) so the client reads the 401 instead of a connection reset."""
    body = b"x" * (4 * 1024 * 1024)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.listener.port)
    writer.write(b"POST /api/upload HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body))

    async def send_body() -> None:
        try:
            for i in range(0, len(body), 65536):
                writer.write(body[i : i + 65536])
                await writer.drain()
        except ConnectionError:
            pass

    sending = asyncio.create_task(send_body())
    answer = await asyncio.wait_for(reader.read(), PROMPT)  # to EOF: no reset on the way
    await sending
    writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"connection: close" in head.lower()
    assert b"token_missing" in rest
    assert not seen.seen
