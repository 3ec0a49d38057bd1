"""A lean HTTP/1.1 client for the proxy hot path: keep-alive pools per target.

Why not ``ClientSession.request``: profiling showed it spending more time on
generality (URL objects, cookie and auth handling, default headers, tracing)
than on I/O. Here a request is one pre-built head written to a pooled
connection, and the response is parsed by aiohttp's own protocol and llhttp
parser (``ResponseHandler``), so parsing, flow control and read timeouts are
aiohttp's tested code. The body streams both ways; nothing is buffered whole.

A keep-alive connection the upstream closed while idle is the one fault that is
retried: only for a request with no body whose response had not started, on a
fresh connection (RFC 9110 9.2.2: idempotent requests may be retried).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import ClientConnectionError, ClientError, ServerTimeoutError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict

from gateway.errors import UpstreamTimeout, UpstreamUnavailable

MAX_IDLE_PER_TARGET = 256
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class ConnectFailed(Exception):
    """Nothing was sent: the connection could not be opened (refused or timed out)."""

    def __init__(self, timed_out: bool) -> None:
        super().__init__("connect timed out" if timed_out else "connection refused")
        self.timed_out = timed_out


@dataclass(slots=True)
class UpstreamResponse:
    message: RawResponseMessage
    payload: StreamReader
    _pool: HostPool
    _proto: ResponseHandler
    _writer: asyncio.Task[None] | None

    def release(self) -> None:
        """Return the connection to the pool if the exchange ended cleanly, else close it."""
        writer = self._writer
        writer_done = writer is None or (
            writer.done() and not writer.cancelled() and writer.exception() is None
        )
        if self._writer is not None and not self._writer.done():
            self._writer.cancel()
        clean = writer_done and self.payload.is_eof() and not self.message.should_close
        self._pool.release(self._proto, reuse=clean)


class HostPool:
    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self._host = host
        self._port = port
        self._tls = tls
        self._idle: list[ResponseHandler] = []

    async def _connect(self, connect_timeout: float) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    lambda: ResponseHandler(loop),
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls else None,
                ),
                connect_timeout,
            )
        except TimeoutError:
            raise ConnectFailed(timed_out=True) from None
        except OSError:
            raise ConnectFailed(timed_out=False) from None
        return proto

    def _take_idle(self) -> ResponseHandler | None:
        while self._idle:
            proto = self._idle.pop()
            if proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        return None

    def release(self, proto: ResponseHandler, *, reuse: bool) -> None:
        if reuse and proto.is_connected() and len(self._idle) < MAX_IDLE_PER_TARGET:
            self._idle.append(proto)
        else:
            proto.close()

    def close(self) -> None:
        for proto in self._idle:
            proto.close()
        self._idle.clear()

    async def request(
        self,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        read_timeout: float,
    ) -> UpstreamResponse:
        proto = self._take_idle()
        if proto is not None:
            try:
                return await self._exchange(proto, method, head, body, chunked, read_timeout)
            except _StaleConnection:
                pass  # the upstream closed an idle connection: one fresh try below
        proto = await self._connect(read_timeout)
        try:
            return await self._exchange(proto, method, head, body, chunked, read_timeout)
        except _StaleConnection:
            raise UpstreamUnavailable() from None

    async def _exchange(
        self,
        proto: ResponseHandler,
        method: str,
        head: bytes,
        body: AsyncIterator[bytes] | None,
        chunked: bool,
        read_timeout: float,
    ) -> UpstreamResponse:
        proto.set_response_params(
            skip_payload=method == "HEAD",
            auto_decompress=False,
            read_timeout=read_timeout,
            read_bufsize=2**16,
        )
        transport = proto.transport
        assert transport is not None
        transport.write(head)
        writer = None
        if body is None:
            proto.start_timeout()
        else:
            # The body is written concurrently with reading: an upstream may answer
            # (413, 401...) before it has read everything.
            writer = asyncio.create_task(_write_body(proto, body, chunked))
        try:
            message, payload = await proto.read()
        except ServerTimeoutError:
            proto.close()
            await _cancel(writer)
            raise UpstreamTimeout() from None
        except (ClientError, HttpProcessingError, OSError) as exc:
            proto.close()
            finished = writer is not None and writer.done() and not writer.cancelled()
            body_error = writer.exception() if writer is not None and finished else None
            await _cancel(writer)
            if body_error is not None:
                raise body_error from None
            if body is None and method in IDEMPOTENT and isinstance(exc, ClientConnectionError):
                raise _StaleConnection() from None
            raise UpstreamUnavailable() from None
        except BaseException:
            proto.close()
            await _cancel(writer)
            raise
        return UpstreamResponse(message, payload, self, proto, writer)


class _StaleConnection(Exception):
    pass


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task  # also marks a stored exception as retrieved


async def _write_body(proto: ResponseHandler, body: AsyncIterator[bytes], chunked: bool) -> None:
    transport = proto.transport
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
            if proto.writing_paused:
                await proto._drain_helper()
        if chunked and transport is not None and not transport.is_closing():
            transport.write(b"0\r\n\r\n")
    except BaseException:
        # A body that failed (over max_body, client gone) must end the exchange
        # now: closing the connection fails the pending read at once, instead of
        # waiting out the route timeout, and the upstream never sees a full request.
        proto.close()
        raise
    finally:
        # The head wait starts once the request is complete (or failed).
        proto.start_timeout()
    return None


def build_head(
    method: str, path_qs: str, host_header: str, headers: CIMultiDict[str], chunked: bool
) -> bytes:
    """The request line and header block, as bytes on the wire."""
    parts = [f"{method} {path_qs} HTTP/1.1\r\nHost: {host_header}\r\n"]
    for name, value in headers.items():
        parts.append(f"{name}: {value}\r\n")
    if chunked:
        parts.append("Transfer-Encoding: chunked\r\n")
    parts.append("\r\n")
    # Header values came through aiohttp's parser (no CR/LF/NUL) or from the
    # gateway itself; bytes that were not UTF-8 travel back as they came.
    return "".join(parts).encode("utf-8", "surrogateescape")


class UpstreamPools:
    """One HostPool per (host, port), created on first use."""

    def __init__(self) -> None:
        self._pools: dict[tuple[str, str, int], HostPool] = {}
        self._tls: ssl.SSLContext | None = None

    def get(self, scheme: str, host: str, port: int) -> HostPool:
        pool = self._pools.get((scheme, host, port))
        if pool is None:
            tls = None
            if scheme == "https":
                tls = self._tls = self._tls or ssl.create_default_context()
            pool = self._pools[(scheme, host, port)] = HostPool(host, port, tls)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
