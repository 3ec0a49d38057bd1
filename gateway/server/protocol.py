"""The HTTP/1.1 server of one worker: aiohttp's llhttp parser, fed directly.

Why not aiohttp's ``web.Server``: once the upstream side was lean, profiling
the proxy path showed most of a request's time in the server's generality: a
``BaseRequest`` with its lazy properties, a ``StreamResponse`` and a
``StreamWriter`` per answer, headers serialised through multidicts, a task per
request. Here a connection is one protocol object and one task, a request is
the parser's ``RawRequestMessage`` plus its body ``StreamReader`` in one
record (:class:`gateway.server.request.Request`), and a complete answer leaves
in one ``transport.write``.

What stays aiohttp's tested code: the request parser (llhttp: framing, limits,
smuggling checks), body streams with their flow control, and WebSocket, which is
handed to aiohttp's ``WebSocketResponse`` through a real ``BaseRequest`` bound
to this protocol (:mod:`gateway.server.websocket`).

Flow control is :class:`gateway.server.flow.FlowControl`, the interface of
aiohttp's ``BaseProtocol`` (``_parser``, ``_upgraded``, ``_reading_paused``,
``_buffer_paused`` and their helpers, ``_drain_helper``) that aiohttp's body
streams and WebSocket drive: private to aiohttp 3.14, listed in docs/design.md
("aiohttp internals we rely on"), guarded by the ``<3.15`` pin.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from aiohttp.http_websocket import WebSocketReader
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web import RequestPayloadError

from gateway.errors import status_error
from gateway.server.batching import WriteBatch
from gateway.server.flow import FlowControl, as_aiohttp, as_asyncio
from gateway.server.framing import holds_bytes
from gateway.server.heads import RequestHead
from gateway.server.request import Request, reason_phrase

log = logging.getLogger("gateway.server")

READ_LIMIT = 2**16
MAX_LINE = 8190  # request line and each header line, as aiohttp's server
MAX_HEADERS = 128
# Pipelined requests parsed ahead of the one being served; past this the socket
# is not read until the queue drains (a client cannot make us buffer without end).
MAX_QUEUED = 32
# After an answer sent before its request body was read (401, 413...), the rest
# of the body is read and dropped so the client, still sending, gets to read the
# answer (nginx's lingering close): for at most LINGER_TIME in all, and at most
# LINGER_TIMEOUT between two reads (nginx's lingering_time and lingering_timeout).
LINGER_TIME = 30.0
LINGER_TIMEOUT = 5.0

# Answers a request: at once or through a callback (returns None and calls
# ``request.finish()`` when done), or by returning an awaitable to run as a task.
Handler = Callable[[Request], Awaitable[None] | None]


def _only_chunked(raw_headers: tuple[tuple[bytes, bytes], ...]) -> bool:
    """Whether the request's transfer codings are exactly ``chunked``: the
    gateway applies no other coding and must not forward one as if absent."""
    codings = [
        coding.strip().lower()
        for name, value in raw_headers
        if name.lower() == b"transfer-encoding"
        for coding in value.split(b",")
    ]
    return codings == [b"chunked"]


def _maybe_head(window: bytes) -> bool:
    """Whether the request the parser refused may be a HEAD, or be behind one
    lost with it (aiohttp's parser raises for the whole read): the client pairs
    the refusal with the first request it has no answer to, and a body after an
    answer to HEAD would be read as the start of the next answer. ``window``:
    the reads since the last one that completed a request head, which hold
    that first request's start (a false "yes" only costs the JSON body)."""
    return window.startswith(b"HEAD ") or b"\nHEAD " in window


class HttpProtocol(FlowControl):
    """One client connection: parse, queue, serve one request at a time, in order."""

    # Read by aiohttp's BaseRequest / WebSocketResponse when a WebSocket is handed over.
    ssl_context: ClassVar[None] = None
    max_field_size: ClassVar[int] = MAX_LINE
    max_headers: ClassVar[int] = MAX_HEADERS
    _timeout_ceil_threshold: ClassVar[int] = 5

    def __init__(self, server: HttpServer) -> None:
        loop = server.loop
        super().__init__(loop, self._new_parser(loop))
        self.loop = loop
        self.server = server
        self.remote: str | None = None
        self.peername: Any = None
        self.sockname: Any = None
        self.chunked = False
        self.busy = False
        self._queue: collections.deque[tuple[RequestHead | HttpProcessingError, Any]] = (
            collections.deque()
        )
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None
        self._processing = False
        self._closed = False
        self._ws_parser: WebSocketReader | None = None
        self._ws_callback: Callable[[], None] | None = None
        self._tail = b""
        # The reads since the last one that completed a request head (references,
        # no copies; at most 2 * READ_LIMIT bytes), only looked at if the parser
        # refuses a read: they hold the start of the first request not delivered
        # (see _maybe_head).
        self._prev = b""
        self._since: list[bytes] | None = None
        self._since_size = 0
        self._refused_head: bool | None = False
        self._stop_reading = False
        self._eof = False
        self._idle_since = 0.0
        self._last_read = 0.0
        # Set while part of a request head has arrived (or, on a new connection,
        # since it opened): the client has server.header_timeout to finish it.
        self._head_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Set while a proxied exchange waits on its upstream: a client that hangs
        # up then cancels the exchange instead of leaving it to the route timeout.
        self.cancel_on_lost = False
        # Answers held until the end of the loop's pass (gateway.server.batching).
        self._out: list[bytes] | None = None
        # The body of the last chunked request this parser read, until it is
        # complete: then the parser is replaced (see _sever).
        self._chunked: StreamReader | None = None
        # Set once no request after the one being parsed may be served: bytes
        # past it could not be framed exactly. That request is answered with
        # Connection: close, and what follows is dropped.
        self.last_served = False
        # Answer bytes the client has not taken yet (the transport's buffer), and
        # since when it has taken none: a client that stops reading is cut off
        # after server.idle_timeout without progress.
        self._unsent = 0
        self._unsent_since = 0.0
        self._lingering = False
        self._linger_until = 0.0

    def _new_parser(self, loop: asyncio.AbstractEventLoop) -> HttpRequestParser:
        return HttpRequestParser(
            as_aiohttp(self),
            loop,
            READ_LIMIT,
            max_line_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            max_field_size=MAX_LINE,
            payload_exception=RequestPayloadError,
            # A proxy forwards bodies as sent: Content-Encoding is the upstream's business.
            auto_decompress=False,
        )

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.peername = transport.get_extra_info("peername")
        self.sockname = transport.get_extra_info("sockname")
        if isinstance(self.peername, tuple | list) and self.peername:
            self.remote = str(self.peername[0])
        if len(self.server.connections) >= self.server.max_connections:
            # Over the cap the connection is closed at once, before reading a
            # byte: the client sees a refused connection, the worker stays responsive.
            log.warning("server.max_connections (%d) reached", self.server.max_connections)
            self._closed = True
            transport.close()
            return
        self.server.connections.add(self)
        now = self.loop.time()
        self._idle_since = self._last_read = now
        self._head_since = now
        self._arm(now + self.server.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._ws_parser is not None:
            if self._ws_callback is not None:
                self._ws_callback()
            self._ws_parser.feed_data(data)
            return
        if self._stop_reading:
            if self._lingering:
                self._linger_on()
            return
        if self._upgraded:
            # The parser took the request for a protocol switch; until the
            # gateway has decided (a refused upgrade goes back to HTTP), what
            # follows is held, up to one read's worth, then reading pauses.
            self._tail += data
            if len(self._tail) >= READ_LIMIT and not self._buffer_paused:
                self._pause_reading_for_buffer()
            return
        assert self._parser is not None
        self._last_read = now = self.loop.time()
        messages: Any
        try:
            # Through Any: the C parser's tuples are not the lists its stubs
            # declare, and compiled code checks a call's declared result type
            # (see gateway.server.heads).
            parser: Any = self._parser
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            # Nothing after a framing error can be trusted: answer it, then close.
            # A body under way (its trailer section was the bad part) cannot end
            # now: its handler learns at once, rather than at body_timeout.
            self._stop_reading = True
            self._fail_payloads(exc)
            reads = [self._prev, *(self._since or ()), data]
            self._refused_head = None if _maybe_head(b"".join(reads)) else False
            messages, upgraded, tail = [(exc, None)], False, b""
        else:
            if messages:
                self._prev, self._since = data, None
            else:
                self._keep_read(data)
        if upgraded:
            self._upgraded = True
            self._tail = tail
        if self._chunked is not None:
            messages = self._sever(messages)
        elif messages and not self._stop_reading:
            for message, _ in messages:
                if message.chunked:
                    messages = self._sever(messages)
                    break
        if not messages:
            if self._head_since is None and self._current is None and not self._queue and data:
                # A request head has started to arrive (slowloris clients stop here).
                self._head_since = now
                self._arm(now + self.server.header_timeout)
        else:
            self._head_since = None
            self._queue.extend(messages)
            if len(self._queue) >= MAX_QUEUED and not self._buffer_paused:
                self._pause_reading_for_buffer()
            self._process()

    def _keep_read(self, data: bytes) -> None:
        since = self._since
        if since is None:
            self._since, self._since_size = [data], len(data)
            return
        since.append(data)
        self._since_size += len(data)
        if self._since_size > 2 * READ_LIMIT:
            # A body, or a head longer than this: its start is far behind.
            self._prev, self._since, self._since_size = b"", [data], len(data)

    def _sever(self, messages: Any) -> Any:
        """Give each chunked request's successor a parser of its own.

        llhttp delivers trailer fields (after the last chunk) through the same
        callbacks as header fields, and aiohttp's parser keeps the last one
        pending until the *next* message's first header: a trailer would become
        a header of the next request (an ``Authorization`` included). So once a
        chunked request is complete, its parser, trailer and all, is dropped and
        the bytes after it go to a fresh one. Bytes the old parser had already
        read past that request (pipelined in the same read, rare) cannot be
        handed over: the connection serves up to the chunked request, answers it
        with ``Connection: close`` and reads nothing more. Costs a parser per
        chunked request; requests with a Content-Length keep theirs.
        """
        pending = self._chunked
        kept = messages
        if pending is None:
            for index, (message, payload) in enumerate(messages):
                if not isinstance(message, HttpProcessingError) and message.chunked:
                    pending = payload
                    kept, rest = messages[: index + 1], messages[index + 1 :]
                    break
            else:
                return messages
        else:
            kept, rest = [], messages
        if not pending.is_eof() and pending.exception() is None:
            # The body is still coming: llhttp reads nothing past it until it ends.
            self._chunked = pending
            return kept
        self._chunked = None
        old = self._parser
        assert old is not None
        self._parser = self._new_parser(self.loop)
        if rest or holds_bytes(old):
            self.last_served = True
            self._stop_reading = True
            if self._buffer_paused:
                self._resume_reading_for_buffer()
        if rest:
            # The requests in ``rest`` were parsed by the old parser: never served.
            for _, payload in rest:
                if payload is not None and payload is not EMPTY_PAYLOAD and not payload.is_eof():
                    payload.set_exception(RequestPayloadError("not served"))
        return kept

    def eof_received(self) -> bool:
        # The client finished sending (it may still read: a half-closed socket
        # gets its answers). A body still expected is cut short.
        if self._ws_parser is not None or self._upgraded:
            return False
        self._eof = True
        if self._stop_reading and self._current is None:
            self.close()  # lingering (or refused) and the client is done sending
            return True
        if self._parser is not None and not self._stop_reading:
            try:
                self._parser.feed_eof()
            except HttpProcessingError as exc:
                self._fail_payloads(exc)
        if self._current is None and not self._queue:
            self.close()
        return True

    def _fail_payloads(self, exc: BaseException) -> None:
        if isinstance(exc, HttpProcessingError):
            # What the handlers know as a broken body (400, never a 500).
            exc = RequestPayloadError("the request body is malformed")
        current = self._current.content if self._current is not None else None
        payloads = [current, *(queued for _, queued in self._queue)]
        for payload in payloads:
            if payload is not None and payload is not EMPTY_PAYLOAD and not payload.is_eof():
                payload.set_exception(exc)
                # aiohttp's StreamReader wakes its reader at the end of each chunk,
                # data or not, and a woken read() waits again without looking at
                # the exception: a reader woken earlier in this pass (the read that
                # failed also ended a chunk) would miss it and wait for ever, its
                # request neither answered nor failed. Set once more after that
                # reader has resumed, the exception reaches its new wait.
                self.loop.call_soon(payload.set_exception, exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._out = None
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ws_parser is not None:
            self._ws_parser.feed_eof()
        self._fail_payloads(ConnectionResetError("the client closed the connection"))
        self._queue.clear()
        current = self._current
        if current is not None and current.on_lost is not None:
            current.on_lost()
        if self.cancel_on_lost and self._task is not None:
            self._task.cancel()

    # -- what aiohttp's WebSocketResponse calls on its protocol ---------------------
    def set_parser(
        self, parser: WebSocketReader, data_received_cb: Callable[[], None] | None = None
    ) -> None:
        self._ws_parser = parser
        self._ws_callback = data_received_cb
        if self._tail:
            parser.feed_data(self._tail)
            self._tail = b""

    def keep_alive(self, val: bool) -> None:
        pass  # a WebSocket connection ends with its handler

    # -- writing ----------------------------------------------------------------------
    def write_soon(self, data: bytes) -> None:
        """Write ``data`` at the end of the loop's current pass (gateway.server.batching)."""
        out = self._out
        if out is None:
            self._out = [data]
            self.server.batch.hold(self)
        else:
            out.append(data)

    def flush_out(self) -> None:
        out = self._out
        if out is None:
            return
        self._out = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        self.flush_out()
        transport.write(data)
        if self.writing_paused:
            await self._drain_helper()

    def pause_writing(self) -> None:
        # The transport holds more than its high-water mark: from now on the
        # client must keep reading (checked by _check_timers, the one timer).
        super().pause_writing()
        if not self._unsent and self.transport is not None:
            self._watch_unsent(self.transport)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._queue and self._current is None:
            self._process()  # pipelined requests held while the client was not reading

    def _watch_unsent(self, transport: asyncio.Transport) -> None:
        size = transport.get_write_buffer_size()
        if size:
            self._unsent = size
            self._unsent_since = now = self.loop.time()
            self._arm(now + self.server.idle_timeout)

    def _send_stalled(self, transport: asyncio.Transport, now: float) -> bool:
        """Whether answer bytes have waited ``idle_timeout`` with none taken."""
        size = transport.get_write_buffer_size()
        if size == 0:
            self._unsent = 0
            return False
        if self._unsent == 0 or size < self._unsent:
            self._unsent = size  # the client took some: progress
            self._unsent_since = now
            return False
        self._unsent = size
        return now - self._unsent_since >= self.server.idle_timeout

    def close(self) -> None:
        self._closed = True
        self.flush_out()
        transport = self.transport
        if transport is not None:
            # The transport sends what it holds before it closes; the timer
            # still cuts a client that stopped reading (_check_timers).
            transport.close()
            if not self._unsent:
                self._watch_unsent(transport)

    # -- serving, in order ------------------------------------------------------------
    def _process(self) -> None:
        """Serve queued requests in order until one has to wait for I/O.

        Runs inside ``data_received`` (and after each answer): a request the
        gateway can answer without waiting, or by a callback from the upstream
        connection, costs no task and no loop iteration.
        """
        if self._processing:
            return
        self._processing = True
        try:
            # While the client is not taking its answers (writing paused), the
            # next pipelined request waits: answers never pile up unbounded.
            while (
                self._queue
                and self._current is None
                and not self._closed
                and not self.writing_paused
            ):
                message, payload = self._queue.popleft()
                if self._buffer_paused and len(self._queue) <= MAX_QUEUED // 2:
                    self._resume_reading_for_buffer()
                if isinstance(message, HttpProcessingError):
                    self._refuse(message, head=self._refused_head)
                    self.close()
                    return
                if message.chunked and not _only_chunked(message.raw_headers):
                    # llhttp frames "gzip, chunked" as chunked; forwarding that as
                    # bare chunked would drop a coding silently (contract section 8).
                    self._refuse(
                        HttpProcessingError(code=501, message="unsupported transfer coding"),
                        head=message.method == "HEAD",
                    )
                    self.close()
                    return
                request = Request(self, message, payload)
                self._current = request
                self.busy = True
                if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                    # The rest of the body must keep coming (server.body_timeout).
                    self._arm(self._last_read + self.server.body_timeout)
                try:
                    pending = self.server.handler(request)
                except Exception:
                    log.exception("unhandled error serving a request")
                    self._fail_request(request)
                    continue
                if pending is not None:
                    self.run_pending(request, pending)
            if self._current is None and not self._queue and not self._lingering:
                self.busy = False
                self._idle_since = now = self.loop.time()
                self._arm(now + self.server.idle_timeout)
                if self._eof or self._stop_reading or self.server.draining:
                    self.close()
        finally:
            self._processing = False

    def run_pending(self, request: Request, pending: Awaitable[None]) -> None:
        """Finish answering ``request`` in a task (I/O to wait on)."""
        self._task = self.loop.create_task(self._run_pending(request, pending))

    async def _run_pending(self, request: Request, pending: Awaitable[None]) -> None:
        try:
            await pending
        except (ConnectionError, RequestPayloadError, asyncio.CancelledError):
            self._task = None
            self.cancel_on_lost = False
            request.client_gone()  # the client went away mid-answer
            return
        except Exception:
            log.exception("unhandled error serving a request")
            self._fail_request(request)
        finally:
            self._task = None
            self.cancel_on_lost = False
        request.finish()

    def _fail_request(self, request: Request) -> None:
        request.keep_alive = False
        if not request.responded:
            request.send_response(status_error(500))
        request.finish()

    def request_done(self, request: Request) -> None:
        if request is not self._current:
            return
        self._current = None
        self.cancel_on_lost = False
        owner = request.owner
        if owner is not None:
            owner.request_done(request)  # the gateway that handled it, perhaps retired since
        if self.transport is None:
            return
        if self._upgraded and self._ws_parser is None and request.keep_alive:
            # The parser took CONNECT or an Upgrade as the end of HTTP, but the
            # gateway refused it: the bytes after it are HTTP requests again.
            self._upgraded = False
            assert self._parser is not None
            self._parser.set_upgraded(False)
            tail, self._tail = self._tail, b""
            if self._buffer_paused and len(self._queue) < MAX_QUEUED:
                self._resume_reading_for_buffer()  # held while the tail was parked
            if tail:
                self.data_received(tail)
        # A body the handler did not read to its end would be parsed as the next
        # request by a naive server; this one closes instead.
        if not request.content.is_eof():
            self._linger()
            return
        if not request.keep_alive or self._upgraded or self.last_served:
            self.close()
            return
        self._process()

    def _linger(self) -> None:
        """Close after an answer sent before the body was read, gently.

        Closing a socket with unread bytes makes the kernel send a reset, and
        the client's stack then often discards the answer it had (a 401 on an
        upload would surface as a network error). So the sending side is shut
        (the client sees the end after the answer) and what still arrives is
        read and dropped, until the client closes, stays silent LINGER_TIMEOUT
        or LINGER_TIME has passed (the timer, :meth:`_check_timers`).
        """
        transport = self.transport
        if transport is None:
            return
        if self._eof:
            # The client has finished sending: nothing left to read and drop.
            self.close()
            return
        self._stop_reading = True
        self._lingering = True
        self._queue.clear()
        self.flush_out()
        try:
            if transport.can_write_eof():
                transport.write_eof()
        except OSError:
            # The client reset first (ENOTCONN): nothing left to linger for.
            self.close()
            return
        if self._reading_paused or self._buffer_paused:
            self._reading_paused = self._buffer_paused = False
            self._resume_transport_reading()
        now = self.loop.time()
        self._linger_until = now + LINGER_TIME
        self._last_read = now
        self._arm(now + LINGER_TIMEOUT)

    def _linger_on(self) -> None:
        self._last_read = self.loop.time()

    def _refuse(self, exc: HttpProcessingError, *, head: bool | None = False) -> None:
        """Answer a request that cannot be served, then the connection closes.
        ``head``: True, it was a HEAD, whose answer carries no body; None, it may
        have been one (bytes the parser refused): no body and ``Content-Length:
        0``, an answer framed alike whichever request the client pairs it with."""
        # The class and status only: the parser's message quotes the offending
        # bytes, which may be a token or a query string (never logged).
        log.debug("refused a malformed request (%s, %d)", type(exc).__name__, exc.code)
        status = exc.code if 400 <= exc.code < 500 or exc.code == 501 else 400
        response = status_error(
            status, "The transfer coding is not supported." if status == 501 else None
        )
        transport = self.transport
        if transport is None:
            return
        lines = [
            f"{name}: {value}\r\n".encode()
            for name, value in response.headers.items()
            if name.lower() != "content-length"
        ]
        body = response.body if isinstance(response.body, bytes) else b""
        length = len(body) if head is not None else 0
        self.flush_out()
        transport.write(
            b"HTTP/1.1 %d %s\r\n%bContent-Length: %d\r\nConnection: close\r\n\r\n%b"
            % (
                status,
                reason_phrase(status).encode(),
                b"".join(lines),
                length,
                body if head is False else b"",
            )
        )

    # -- client timeouts ---------------------------------------------------------------
    # One timer per connection, moved only when a deadline comes earlier than the
    # armed one: no timer churn per request on a busy keep-alive connection.
    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is not None:
            if self._timer_at <= when:
                return
            timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._check_timers)

    def _check_timers(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is None:
            return
        server = self.server
        now = self.loop.time()
        watch = math.inf
        if self._unsent:
            # Part of an answer waits for the client to read it.
            if self._send_stalled(transport, now):
                log.debug("closing a connection: the client stopped reading its answer")
                transport.abort()
                return
            if self._unsent:
                watch = self._unsent_since + server.idle_timeout
        if self._closed:
            if watch < math.inf:
                self._arm(watch)
            return
        if self._lingering:
            deadline = min(self._linger_until, self._last_read + LINGER_TIMEOUT)
            if now >= deadline:
                self.close()
                if self._unsent:
                    self._arm(self._unsent_since + server.idle_timeout)
                return
            self._arm(min(deadline, watch))
            return
        current = self._current
        if self._head_since is not None:
            deadline = self._head_since + server.header_timeout
            if now >= deadline:
                log.debug("closing a connection: no complete request head in time")
                self.close()
                return
        elif current is None and not self._queue:
            deadline = self._idle_since + server.idle_timeout
            if now >= deadline:
                self.close()
                if watch < math.inf:
                    self._arm(watch)
                return
        elif current is not None and not current.content.is_eof() and not self._reading_paused:
            # A body is expected and we are reading: the client must keep sending.
            deadline = self._last_read + server.body_timeout
            if now >= deadline:
                current.content.set_exception(
                    RequestPayloadError("the client stopped sending the request body")
                )
                self.close()
                return
        else:
            deadline = now + 1.0  # busy on the gateway's side: look again later
        self._arm(max(min(deadline, watch), now + 0.01))

    def close_if_idle(self) -> bool:
        if not self.busy and not self._queue:
            self.close()
            return True
        return False


class HttpServer:
    """The protocol factory and the set of live connections (for draining)."""

    def __init__(
        self,
        handler: Handler,
        *,
        idle_timeout: float = 75.0,
        header_timeout: float = 10.0,
        body_timeout: float = 60.0,
        max_connections: int = 10_000,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.handler = handler
        self.idle_timeout = idle_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.loop = loop or asyncio.get_running_loop()
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self.batch = WriteBatch(self.loop)

    def __call__(self) -> asyncio.Protocol:
        return as_asyncio(HttpProtocol(self))

    async def drain(self, grace: float) -> None:
        """Finish what is under way (up to ``grace`` seconds), then close the rest.

        Idle keep-alive connections close at once; a busy one answers its
        current request with ``Connection: close`` and closes after it.
        """
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
            for conn in list(self.connections):
                conn.close_if_idle()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
