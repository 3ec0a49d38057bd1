"""A lean HTTP/1.1 client for the proxy path: keep-alive connections per target.

Why not ``ClientSession.request``: profiling showed it spending more time on
generality (URL objects, cookie and auth handling, default headers, tracing)
than on I/O. Here a request is one pre-built head written to a pooled
connection, and the response is parsed by aiohttp's llhttp parser
(``HttpResponseParser``), whose body ``StreamReader`` brings aiohttp's flow
control. The body streams both ways; nothing is buffered whole.

An exchange reports the response head through a callback, not a future, so
the proxy's fast lane (:mod:`gateway.proxy.forward`) can answer the client from inside
``data_received`` with no task switch; :meth:`HostPool.request` wraps the same
callback in a future for the coroutine path.

One timer per connection implements the route timeout: the wait for the head
once the request is sent, then the longest silence while the body streams. It
is re-armed lazily, not per read.

A keep-alive connection the upstream closed while idle is the one fault that is
retried: only for a request with no body whose response had not started, on a
fresh connection (RFC 9110 9.2.2: idempotent requests may be retried).

So that the fault stays rare, idle connections are closed by us first, after
``server.upstream_idle_timeout`` (default 4 s: under the keep-alive timeouts of
Node, uvicorn and Apache, 5 s). A request sent just as the upstream closes its
end fails (a POST cannot be retried), and one sent on a connection a NAT or
firewall forgot silently waits out the route timeout. The sweep costs the hot
path one comparison: the idle list is a stack, so the entries below its lowest
point since the last sweep have not been touched for a whole sweep interval.

An https target's connections are opened with its route's :class:`UpstreamTLS`
(the CA it trusts, the client certificate it shows, the name it expects), and
pools are keyed by it: two routes to one host:port that show different client
certificates never share a connection. A handshake that fails, or an upstream
that drops a new TLS connection before its first byte (how TLS 1.3 servers
refuse a client certificate: after the handshake), is :class:`ConnectFailed`
with OpenSSL's reason, so the caller can name it and try the next target.

This module and :mod:`gateway.server` are the only places that use aiohttp's
internal modules (``tests/test_layout.py`` checks it): here the llhttp
response parser driven through the flow control aiohttp's body streams expect
(:class:`gateway.server.flow.FlowControl`), and the connection under a client
WebSocket. Private to
aiohttp 3.14, listed in docs/design.md, guarded by the ``<3.15`` pin.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from aiohttp import ClientPayloadError, ClientWebSocketResponse, ServerTimeoutError
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpParser, HttpResponseParser
from aiohttp.streams import StreamReader

from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.proxy.tls import CLOSED_AFTER_HANDSHAKE, UpstreamTLS, tls_reason
from gateway.server.batching import WriteBatch
from gateway.server.flow import FlowControl, as_aiohttp, as_asyncio
from gateway.server.framing import holds_bytes
from gateway.server.heads import ResponseHead

__all__ = [
    "CLOSED_AFTER_HANDSHAKE",
    "IDEMPOTENT",
    "ConnectFailed",
    "ExchangeFailed",
    "HostPool",
    "PoolKey",
    "UpstreamConnection",
    "UpstreamPools",
    "UpstreamResponse",
    "UpstreamTLS",
    "build_head",
    "drop_websocket",
    "tls_reason",
    "websocket_transport",
]

MAX_IDLE_PER_TARGET = 256
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


# (scheme, host, port, TLS): one HostPool each; routing.Target computes its own once.
PoolKey = tuple[str, str, int, UpstreamTLS | None]


class ConnectFailed(Exception):
    """The upstream's application saw nothing: the connection could not be
    opened (refused or timed out) or its TLS handshake failed (``tls_reason``,
    OpenSSL's words). ``body_spent``: a request body had started out (into a
    TLS connection the upstream then refused), so no other target can have it."""

    def __init__(
        self, timed_out: bool, tls_reason: str | None = None, *, body_spent: bool = False
    ) -> None:
        super().__init__("connect timed out" if timed_out else tls_reason or "connection refused")
        self.timed_out = timed_out
        self.tls_reason = tls_reason
        self.body_spent = body_spent


class ExchangeFailed(Exception):
    """The upstream gave no usable response head."""

    def __init__(
        self, *, timed_out: bool = False, stale: bool = False, tls_reason: str | None = None
    ) -> None:
        super().__init__("timed out" if timed_out else "failed")
        self.timed_out = timed_out
        # Closed before sending a single byte of the response: a keep-alive
        # connection the upstream had dropped while it sat idle.
        self.stale = stale
        # A new TLS connection lost before its first byte: the upstream refused
        # the handshake after it completed on our side (a TLS 1.3 server checks
        # the client certificate then).
        self.tls_reason = tls_reason


OnHead = Callable[[ResponseHead | None, StreamReader | None, ExchangeFailed | None], None]


class UpstreamConnection(FlowControl):
    """One connection to an upstream, carrying one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: HostPool) -> None:
        super().__init__(loop, None)
        self.loop = loop
        self.pool = pool
        self.should_close = False
        self.message: ResponseHead | None = None
        self.payload: StreamReader | None = None
        self._on_head: OnHead | None = None
        self._received = False
        self._timeout = 0.0
        self._timing = False
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._complete = False  # this exchange's response has been read to its end
        self._reusable: HttpResponseParser | None = None
        self._head_only = False
        self._out: bytes | None = None  # a request head held for the loop's pass
        self._answered = False  # any byte ever received: the TLS handshake was accepted

    # -- one exchange -----------------------------------------------------------------
    def begin(self, method: str, timeout: float, on_head: OnHead, *, timing: bool) -> None:
        """Expect a response to a request about to be written. With ``timing``
        false the clock starts later, by :meth:`start_timeout` (after the body)."""
        head_only = method == "HEAD"
        if self._reusable is None or self._head_only != head_only:
            # llhttp is ready for the next response once one is complete, so a
            # parser serves the connection's life (HEAD needs its own mode),
            # except after a chunked response, whose trailer it may still hold
            # (see data_received).
            self._reusable = HttpResponseParser(
                as_aiohttp(self),
                self.loop,
                2**16,
                response_with_body=not head_only,
                read_until_eof=True,
                auto_decompress=False,
            )
            self._head_only = head_only
        self._parser = self._reusable
        self.message = None
        self.payload = None
        self._on_head = on_head
        self._received = False
        self._complete = False
        self._timeout = timeout
        if timing:
            self.start_timeout()

    def start_timeout(self) -> None:
        self._timing = True
        self._last = now = self.loop.time()
        deadline = now + self._timeout
        timer = self._timer
        if timer is not None:
            # Left armed by an earlier exchange, perhaps of a route with a longer
            # timeout: it must not fire later than this exchange's deadline.
            if self._timer_at <= deadline:
                return  # it fires first and re-checks against this timeout
            timer.cancel()
        self._arm(deadline)

    def _arm(self, when: float) -> None:
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._check_timer)

    def finished(self) -> bool:
        """The response is complete and the connection may carry another."""
        payload = self.payload
        return (
            payload is not None
            and payload.is_eof()
            and payload.exception() is None
            and self.message is not None
            and not self.message.should_close
            and not self.should_close
        )

    def write_soon(self, head: bytes, batch: WriteBatch) -> None:
        """Send a request head at the end of the loop's pass (gateway.server.batching).
        Only a head with no body goes this way: nothing else is written until
        its response arrives, so nothing can overtake it."""
        self._out = head
        batch.hold(self)

    def flush_out(self) -> None:
        head, self._out = self._out, None
        transport = self.transport
        if head is not None and transport is not None and not transport.is_closing():
            transport.write(head)

    def end(self) -> None:
        self._timing = False
        self._on_head = None
        self._parser = None

    # -- asyncio.Protocol ---------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or self._complete:
            if not data:
                return  # flow control resuming after the exchange ended
            # Bytes past the response, or with no request outstanding: nothing on
            # this connection can be trusted to frame the next response.
            self.should_close = True
            if parser is None:
                self.close()
            return
        self._received = self._answered = True
        if self._timing:
            self._last = self.loop.time()
        try:
            # Through Any: not the list the stubs declare (see gateway.server.heads).
            feed: Any = parser.feed_data
            messages = feed(data)[0]
        except HttpProcessingError:
            self.should_close = True
            self._fail(ExchangeFailed())
            self.close()
            return
        head = False
        for message, payload in messages:
            if self.message is not None:
                # A second final response to one request: the upstream and the
                # gateway no longer agree on where answers start.
                self.should_close = True
                break
            if 100 <= message.code < 200 and message.code != 101:
                # An interim answer (100 Continue, 103 Early Hints): the final
                # one follows on this exchange. Dropped, as nginx does: passing
                # it on as the answer would leave the client waiting forever.
                continue
            self.message, self.payload = message, payload
            head = True
        body = self.payload
        if body is not None and body.is_eof():
            self._completed(parser)
        if head:
            callback = self._on_head
            self._on_head = None
            if callback is not None:
                callback(self.message, self.payload, None)

    def _completed(self, parser: HttpParser[Any]) -> None:
        """The response is read to its end: decide, before anyone releases the
        connection, whether it may carry another exchange."""
        self._complete = True
        self._timing = False
        if holds_bytes(parser):
            self.should_close = True  # an unsolicited extra response, or its start
        if self.message is not None and self.message.chunked:
            # Its trailer fields may still sit in the parser, waiting to become
            # headers of the next response: the next exchange gets a fresh one.
            self._reusable = None

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.should_close = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        parser = self._parser
        payload = self.payload
        if payload is not None and not payload.is_eof():
            # A body read until the connection closes ends here; any other body
            # was cut short.
            try:
                if parser is not None:
                    parser.feed_eof()
            except HttpProcessingError:
                pass
            if not payload.is_eof():
                payload.set_exception(ClientPayloadError("the upstream closed mid-body"))
        refused = None
        if self.pool.tls is not None and not self._answered:
            refused = tls_reason(exc)
        self._fail(ExchangeFailed(stale=not self._received, tls_reason=refused))

    def _fail(self, error: ExchangeFailed) -> None:
        callback = self._on_head
        self._on_head = None
        if callback is not None:
            callback(None, None, error)

    def _check_timer(self) -> None:
        self._timer = None
        if not self._timing or self.transport is None:
            return
        if self.payload is not None and self.payload.is_eof():
            self._timing = False
            return
        deadline = self._last + self._timeout
        if self.loop.time() < deadline:
            self._arm(deadline)
            return
        self.should_close = True
        if self.payload is not None and not self.payload.is_eof():
            self.payload.set_exception(ServerTimeoutError("the upstream went silent"))
        self._fail(ExchangeFailed(timed_out=True))
        self.close()

    def close(self) -> None:
        self._out = None  # an exchange given up: its request is not sent
        if self.transport is not None:
            self.transport.close()

    def release(self, reuse: bool) -> None:
        self.end()
        self.pool.release(self, reuse=reuse)


class HostPool:
    def __init__(
        self,
        host: str,
        port: int,
        tls: UpstreamTLS | None,
        idle_timeout: float,
    ) -> None:
        self._host = host
        self._port = port
        self.tls = tls
        self._context = tls.context if tls is not None else None
        # Sent as SNI and checked against the certificate.
        self._server_name = (tls.server_name or host) if tls is not None else None
        # Most recently released last: taken from the end, so the hot connections
        # stay hot and the ones at the front are the longest idle.
        self._idle: list[UpstreamConnection] = []
        # The sweep runs every half timeout and closes what sat untouched for a
        # whole interval: an idle connection lives between half and all of it.
        self._sweep_every = idle_timeout / 2
        self._low = 0  # the idle list's lowest length since the last sweep
        self._sweeper: asyncio.TimerHandle | None = None

    async def connect(self, connect_timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, made = await asyncio.wait_for(
                loop.create_connection(
                    lambda: as_asyncio(UpstreamConnection(loop, self)),
                    self._host,
                    self._port,
                    ssl=self._context,
                    server_hostname=self._server_name,
                ),
                connect_timeout,
            )
        except TimeoutError:
            raise ConnectFailed(timed_out=True) from None
        except ssl.SSLError as exc:  # before OSError, its base
            raise ConnectFailed(False, tls_reason(exc)) from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
            # Connected, then cut: over TLS, during the handshake.
            reason = f"the connection was cut during the TLS handshake ({exc.strerror})"
            raise ConnectFailed(False, reason if self.tls is not None else None) from None
        except OSError:
            raise ConnectFailed(timed_out=False) from None
        return cast(UpstreamConnection, made)

    def take_idle(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if len(idle) < self._low:
                self._low = len(idle)
            if conn.transport is not None and not conn.should_close:
                return conn
            conn.close()
        return None

    def release(self, conn: UpstreamConnection, *, reuse: bool) -> None:
        if reuse and conn.transport is not None and len(self._idle) < MAX_IDLE_PER_TARGET:
            self._idle.append(conn)
            if self._sweeper is None:
                self._low = len(self._idle) - 1  # only what is idle from now on counts
                self._arm_sweep()
        else:
            conn.close()

    def _sweep(self) -> None:
        stale, self._idle[: self._low] = self._idle[: self._low], []
        for conn in stale:
            conn.close()
        self._low = len(self._idle)
        self._sweeper = None
        if self._idle:
            self._arm_sweep()

    def _arm_sweep(self) -> None:
        # Only ever called from the loop (a release, a sweep): no loop to store.
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_every, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in self._idle:
            conn.close()
        self._idle.clear()
        self._low = 0

    async def request(
        self,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        read_timeout: float,
    ) -> UpstreamResponse:
        conn = self.take_idle()
        if conn is not None:
            try:
                return await _exchange(conn, method, head, body, chunked, read_timeout)
            except _StaleConnection:
                pass  # the upstream closed an idle connection: one fresh try below
        conn = await self.connect(read_timeout)
        try:
            return await _exchange(conn, method, head, body, chunked, read_timeout)
        except _StaleConnection:
            raise UpstreamUnavailable() from None


class UpstreamResponse:
    __slots__ = ("_conn", "_writer", "message", "payload")

    def __init__(
        self,
        conn: UpstreamConnection,
        message: ResponseHead,
        payload: StreamReader,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self._conn = conn
        self.message = message
        self.payload = payload
        self._writer = writer

    def release(self) -> None:
        """Return the connection to the pool if the exchange ended cleanly, else close it."""
        writer = self._writer
        writer_done = writer is None or (
            writer.done() and not writer.cancelled() and writer.exception() is None
        )
        if writer is not None and not writer.done():
            writer.cancel()
        self._conn.release(reuse=writer_done and self._conn.finished())


class _StaleConnection(Exception):
    pass


async def _exchange(
    conn: UpstreamConnection,
    method: str,
    head: bytes,
    body: AsyncIterator[bytes] | None,
    chunked: bool,
    read_timeout: float,
) -> UpstreamResponse:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[tuple[ResponseHead, StreamReader]] = loop.create_future()

    def on_head(
        message: ResponseHead | None, payload: StreamReader | None, err: ExchangeFailed | None
    ) -> None:
        if waiter.done():
            return
        if err is not None:
            waiter.set_exception(err)
        else:
            assert message is not None and payload is not None
            waiter.set_result((message, payload))

    conn.begin(method, read_timeout, on_head, timing=body is None)
    transport = conn.transport
    if transport is None:
        conn.release(reuse=False)
        raise _StaleConnection()
    transport.write(head)
    writer = None
    if body is not None:
        # The body is written concurrently with reading: an upstream may answer
        # (413, 401...) before it has read everything.
        writer = asyncio.create_task(_write_body(conn, body, chunked))
    try:
        message, payload = await waiter
    except ExchangeFailed as exc:
        conn.release(reuse=False)
        finished = writer is not None and writer.done() and not writer.cancelled()
        body_error = writer.exception() if writer is not None and finished else None
        await _cancel(writer)
        if body_error is not None:
            raise body_error from None
        if exc.tls_reason is not None:
            # The upstream refused this new connection at the TLS layer: its
            # application saw nothing, like a refused connect.
            raise ConnectFailed(False, exc.tls_reason, body_spent=body is not None) from None
        if exc.timed_out:
            raise UpstreamTimeout() from None
        if exc.stale and body is None and method in IDEMPOTENT:
            raise _StaleConnection() from None
        raise UpstreamUnavailable() from None
    except BaseException:
        conn.release(reuse=False)
        await _cancel(writer)
        raise
    return UpstreamResponse(conn, message, payload, writer)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # also marks a stored exception as retrieved


async def _write_body(conn: UpstreamConnection, body: AsyncIterator[bytes], chunked: bool) -> None:
    transport = conn.transport
    try:
        async for chunk in body:
            if transport is None or transport.is_closing():
                return
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if conn.writing_paused:
                await conn._drain_helper()
        if chunked and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
    except BaseException:
        # A body that failed (over max_body, client gone) must end the exchange
        # now: closing the connection fails the pending read at once, instead of
        # waiting out the route timeout, and the upstream never sees a full request.
        conn.close()
        raise
    finally:
        # The head wait starts once the request is complete (or failed).
        conn.start_timeout()


def build_head(
    method: str, path_qs: str, host_header: str, lines: list[bytes], chunked: bool
) -> bytes:
    """The request line and header block, as bytes on the wire. ``lines`` come
    from :meth:`gateway.proxy.headers.HeaderRules.upstream_lines`: values the parser
    accepted (no CR/LF/NUL) or the gateway's own."""
    # The path came through the parser as UTF-8 with surrogateescape: the bytes
    # the client sent go on unchanged.
    start = f"{method} {path_qs} HTTP/1.1\r\nHost: {host_header}\r\n".encode(
        "utf-8", "surrogateescape"
    )
    end = b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"\r\n"
    return b"".join((start, *lines, end))


class UpstreamPools:
    """One HostPool per (scheme, host, port, TLS setting), created on first use."""

    def __init__(self, idle_timeout: float) -> None:
        self._pools: dict[PoolKey, HostPool] = {}
        self._default_tls: UpstreamTLS | None = None
        self._idle_timeout = idle_timeout

    def get(self, scheme: str, host: str, port: int, tls: UpstreamTLS | None = None) -> HostPool:
        """The pool for a target; https with no ``tls`` uses the system's CAs."""
        return self.by_key((scheme, host, port, tls))

    def by_key(self, key: PoolKey) -> HostPool:
        """The pool for a key computed once (``routing.Target.pool_key``): the
        request path builds no tuple."""
        pool = self._pools.get(key)
        if pool is None:
            scheme, host, port, tls = key
            if scheme == "https" and tls is None:
                tls = self._default_tls = self._default_tls or UpstreamTLS(
                    ssl.create_default_context()
                )
            pool = self._pools[key] = HostPool(host, port, tls, self._idle_timeout)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


# -- the upstream side of a WebSocket -------------------------------------------------
# A WebSocket upstream is reached through aiohttp's ClientSession (not this
# pool), and aiohttp 3.14's ClientWebSocketResponse offers no public access to
# its connection: these two reach its private ``_response`` here, the one
# place allowed to (docs/design.md, "aiohttp internals we rely on").


def websocket_transport(ws: ClientWebSocketResponse) -> asyncio.Transport | None:
    """The transport under an upstream WebSocket. Taken when the relay starts:
    aiohttp drops its reference when it closes the connection, and a transport
    whose peer does not read must still be aborted then."""
    conn = ws._response.connection
    return conn.transport if conn is not None else None


def drop_websocket(ws: ClientWebSocketResponse) -> None:
    """Close an upstream WebSocket's connection at once, without a close
    handshake (the client side was never accepted: nothing to relay)."""
    ws._response.close()
