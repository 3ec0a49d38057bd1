"""The request record: one request as the gateway sees it, and the means to answer it.

One typed record per request, from the parsed head to the access-log line:
the parser's message and body stream, what the request path learns on its way
(request id, route or own endpoint, identity, error, target), and what went
back (status, body bytes). It lives exactly as long as its exchange: the
connection makes a new one per request and forgets it when it is done
(:meth:`gateway.server.protocol.HttpProtocol.request_done`).

Completion is dispatched to the record's :class:`Owner`, the gateway that
handled it (a reload may swap gateways while the request runs): that keeps
this package ignorant of the request path above it.
"""

from __future__ import annotations

import http
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import TYPE_CHECKING, Protocol

from aiohttp import web
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDictProxy

from gateway.server.heads import RequestHead

if TYPE_CHECKING:
    from gateway.server.protocol import HttpProtocol

# Responses that never carry a body (RFC 9110 6.4.1), whatever their headers say.
_NO_BODY_STATUS = frozenset({204, 304})


class Owner(Protocol):
    """Who handled a request, told once when it ends (metrics, access log,
    in-flight count)."""

    def request_done(self, request: Request) -> None: ...


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _asks_keep_alive(message: RequestHead) -> bool:
    """An HTTP/1.0 request's explicit keep-alive, which a ``close`` token anywhere
    in its Connection fields cancels (llhttp lets keep-alive win; h11 and RFC
    9112 9.6 let close win, and a connection the client ends must not be reused)."""
    tokens = {
        token.strip().lower()
        for value in message.headers.getall("Connection", ())
        for token in value.split(",")
    }
    return "keep-alive" in tokens and "close" not in tokens


class _Date:
    """The Date header, formatted once per second rather than per response."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_DATE = _Date()


class Request:
    """One request as the gateway sees it, and the means to answer it.

    It offers the few ``BaseRequest`` attributes the gateway reads (method,
    headers, remote, content...), so the handlers do not care which server
    runs them.
    """

    __slots__ = (
        "content",
        "endpoint",
        "errcode",
        "error",
        "finished",
        "headers",
        "keep_alive",
        "message",
        "method",
        "on_lost",
        "openid",
        "owner",
        "protocol",
        "raw_path",
        "remote",
        "request_id",
        "responded",
        "route",
        "sent",
        "started",
        "status",
        "upstream",
        "version",
    )
    scheme = "http"

    def __init__(
        self, protocol: HttpProtocol, message: RequestHead, payload: StreamReader
    ) -> None:
        self.protocol = protocol
        self.message = message
        self.content = payload
        self.method: str = message.method
        self.raw_path: str = message.path
        self.headers: CIMultiDictProxy[str] = message.headers
        self.version = message.version
        self.remote: str | None = protocol.remote
        self.keep_alive = (
            not message.should_close and not protocol.server.draining and not protocol.last_served
        )
        if self.keep_alive and message.version.minor == 0 and not _asks_keep_alive(message):
            # llhttp also reads Proxy-Connection; HTTP/1.0 persists only on an
            # explicit "Connection: keep-alive" (RFC 9112 9.3, as h11 reads it).
            self.keep_alive = False
        self.responded = False
        self.finished = False
        self.status = 0
        self.started = 0.0  # time.perf_counter() when the gateway took it
        self.request_id = ""
        self.owner: Owner | None = None  # told when the request ends
        self.route: str | None = None  # the matched route's prefix, for metrics
        self.endpoint: str | None = None  # or the own endpoint's path
        self.error: str | None = None  # the error code answered, if any
        self.errcode: int | None = None  # and the WeChat errcode behind it
        # For the access log: who asked (gateway.auth.identity.land), which
        # target answered, body bytes sent.
        self.openid: str | None = None
        self.upstream: str | None = None
        self.sent = 0
        # Called if the client goes away while the answer is pending.
        self.on_lost: Callable[[], None] | None = None

    def finish(self) -> None:
        """The answer is complete: the connection may go on to the next request."""
        if not self.finished:
            self.finished = True
            self.protocol.request_done(self)

    def client_gone(self) -> None:
        """The client went away before its answer was complete: the request
        still ends (access log, metrics, in-flight count), with nginx's 499
        when nothing was answered."""
        self.keep_alive = False
        if not self.responded:
            self.status = 499
            self.error = self.error or "client_closed"
        self.finish()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None else None

    @property
    def body_exists(self) -> bool:
        return self.content is not EMPTY_PAYLOAD

    # -- answering ---------------------------------------------------------------
    def _head(
        self, status: int, reason: str, lines: Iterable[bytes], framing: bytes, own: bool
    ) -> bytes:
        self.responded = True
        self.status = status
        protocol = self.protocol
        if protocol.server.draining or not self.content.is_eof() or protocol.last_served:
            # Draining, answering before the body is in (a 401 on an upload), or
            # no request after this one can be framed: the client is told the
            # connection ends with this answer.
            self.keep_alive = False
        if not self.keep_alive:
            connection = b"Connection: close\r\n"
        elif self.version.minor == 0:
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        status_line = b"HTTP/1.1 %d %s\r\n" % (
            status,
            (reason or reason_phrase(status)).encode("latin-1", "replace"),
        )
        date = _DATE.line() if own else b""
        return b"".join((status_line, *lines, date, framing, connection, b"\r\n"))

    def send(
        self, status: int, reason: str, lines: Iterable[bytes], body: bytes, *, own: bool = False
    ) -> None:
        """A complete answer in one write. ``lines`` are header lines with their CRLF,
        without framing (Content-Length / Transfer-Encoding), which is set here."""
        bodyless = self.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
        framing = b"" if bodyless else b"Content-Length: %d\r\n" % len(body)
        head = self._head(status, reason, lines, framing, own)
        if self.protocol.transport is not None:
            if bodyless:
                self.protocol.write_soon(head)
            else:
                self.protocol.write_soon(head + body)
                self.sent = len(body)

    def send_response(self, response: web.StreamResponse) -> None:
        """Serialise an aiohttp ``Response`` (the gateway's own JSON answers)."""
        body = response.body if isinstance(response, web.Response) else b""
        if not isinstance(body, bytes):
            raise TypeError("own responses carry bytes")
        lines = [
            f"{name}: {value}\r\n".encode("utf-8", "surrogateescape")
            for name, value in response.headers.items()
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "date")
        ]
        if response.keep_alive is False:
            self.keep_alive = False
        self.send(response.status, response.reason, lines, body, own=True)

    async def start_stream(
        self, status: int, reason: str, lines: Iterable[bytes], length: int | None
    ) -> None:
        """Send the head of an answer whose body follows by :meth:`write`."""
        if length is not None:
            framing = b"Content-Length: %d\r\n" % length
            self.protocol.chunked = False
        elif self.version >= (1, 1):
            framing = b"Transfer-Encoding: chunked\r\n"
            self.protocol.chunked = True
        else:
            # An HTTP/1.0 client knows no chunked encoding: the end of the
            # connection marks the end of the body.
            framing = b""
            self.keep_alive = False
            self.protocol.chunked = False
        await self.protocol.write(self._head(status, reason, lines, framing, own=False))

    async def write(self, chunk: bytes) -> None:
        if not chunk or self.method == "HEAD":
            return
        self.sent += len(chunk)
        if self.protocol.chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        await self.protocol.write(chunk)

    async def end_stream(self) -> None:
        if self.protocol.chunked and self.method != "HEAD":
            await self.protocol.write(b"0\r\n\r\n")

    def send_continue(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.write_soon(b"HTTP/1.1 100 Continue\r\n\r\n")

    def abort(self) -> None:
        """Cut the connection: the only honest end of an answer already under way."""
        self.keep_alive = False
        self.protocol.close()
