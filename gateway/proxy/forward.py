"""Forwarding an HTTP request to its upstream, streamed both ways.

Two paths: the fast lane (:func:`forward`), for a request with no body when an
idle keep-alive connection to the target is at hand, answers the client from
the upstream connection's callback with no task; the coroutine path
(:func:`proxy_http`) takes bodies, new connections and retries. Both write
pre-built heads to the gateway's own connection pool (:mod:`gateway.proxy.pool`,
one pool per target), which never decompresses and adds no header of its own:
what the upstream sends reaches the client unchanged and what the client sends
reaches the upstream unchanged, apart from the header rules in
:mod:`gateway.proxy.headers`. WebSocket upgrades are :mod:`gateway.proxy.websocket`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp

from gateway.errors import BodyTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.proxy.headers import HeaderRules
from gateway.proxy.pool import (
    IDEMPOTENT,
    ConnectFailed,
    ExchangeFailed,
    UpstreamConnection,
    UpstreamPools,
    UpstreamResponse,
    build_head,
)
from gateway.proxy.routing import Route, Target
from gateway.server.heads import ResponseHead
from gateway.server.request import Request

log = logging.getLogger("gateway.proxy")

CHUNK = 64 * 1024


@dataclass(slots=True)
class _BodyState:
    sent: int = 0
    too_large: bool = False


class _LimitedBody:
    """The request body as it arrives, stopping the upload once it passes ``limit``
    (a chunked body has no Content-Length to check up front). A class rather
    than an async generator: mypyc compiles this module and has none."""

    def __init__(self, content: aiohttp.StreamReader, limit: int, state: _BodyState) -> None:
        self._chunks = content.iter_chunked(CHUNK)
        self._limit = limit
        self._state = state

    def __aiter__(self) -> _LimitedBody:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._chunks.__anext__()
        state = self._state
        state.sent += len(chunk)
        if state.sent > self._limit:
            state.too_large = True
            raise BodyTooLarge()
        return chunk


class Forwarding:
    """What the gateway decided for one proxied request, before any I/O.

    One is made per proxied request: a plain class with slots, not a dataclass,
    whose generated ``__init__`` would stay interpreted where this module is
    compiled (setup.py). Never mutated."""

    __slots__ = ("headers", "path", "pools", "query", "request_id", "route", "rules")

    def __init__(
        self,
        pools: UpstreamPools,
        rules: HeaderRules,
        route: Route,
        path: str,
        query: str,
        headers: list[bytes],
        request_id: str,
    ) -> None:
        self.pools = pools
        self.rules = rules
        self.route = route
        self.path = path  # normalised, as forwarded (after strip_prefix)
        self.query = query
        self.headers = headers  # the upstream request's header lines
        self.request_id = request_id

    def head(self, method: str, target: Target, chunked: bool) -> bytes:
        path_qs = self.path + "?" + self.query if self.query else self.path
        return build_head(
            method, target.base_path + path_qs, target.host_header, self.headers, chunked
        )


async def _open(
    fwd: Forwarding,
    request: Request,
    state: _BodyState,
    candidates: list[Target] | None = None,
) -> UpstreamResponse:
    """Send the request to the first target that accepts a connection."""
    route = fwd.route
    body = None
    chunked = False
    if request.body_exists:
        body = _LimitedBody(request.content, route.max_body, state)
        # A client's chunked body goes upstream chunked; a Content-Length is kept.
        chunked = request.content_length is None
    timed_out = False
    for target in candidates or route.balancer.candidates():
        request.upstream = target.url
        head = fwd.head(request.method, target, chunked)
        pool = fwd.pools.by_key(target.pool_key)
        try:
            return await pool.request(request.method, head, body, chunked, route.timeout)
        except ConnectFailed as exc:
            # The upstream's application saw nothing: safe to try the next
            # target even for a POST, unless its body is already spent.
            if exc.tls_reason is not None:
                tls_failed(route, target, exc.tls_reason)
            route.balancer.mark_dead(target)
            if exc.body_spent:
                raise BodyTooLarge() if state.too_large else UpstreamUnavailable() from None
            timed_out = exc.timed_out
        except (UpstreamUnavailable, UpstreamTimeout):
            if state.too_large:
                raise BodyTooLarge() from None
            raise
    if timed_out:
        raise UpstreamTimeout()
    raise UpstreamUnavailable()


def tls_failed(route: Route, target: Target, reason: str) -> None:
    """The one line an operator needs for a TLS failure: the route, the target
    and OpenSSL's reason. Never a certificate or a key: the config names files,
    and OpenSSL's sentences carry neither."""
    log.warning("route %s: TLS to upstream %s failed: %s", route.prefix, target.url, reason)


def forward(
    fwd: Forwarding, request: Request, fail: Callable[[Request, Exception], None]
) -> Awaitable[None] | None:
    """Forward ``request``: on the fast lane when it can, else as a coroutine.

    The fast lane takes a request with no body when an idle keep-alive
    connection to the chosen target is at hand: the head is written at once and
    the upstream connection's callback answers the client (or hands a streamed
    body over to a task). Everything else (bodies, new connections, retries)
    takes the coroutine path, :func:`proxy_http`.
    """
    candidates = fwd.route.balancer.candidates()
    if not request.body_exists:
        target = candidates[0]
        conn = fwd.pools.by_key(target.pool_key).take_idle()
        if conn is not None:
            _FastExchange(fwd, request, fail, candidates).start(conn, target)
            return None
    return proxy_http(fwd, request, candidates)


class _FastExchange:
    __slots__ = ("candidates", "conn", "fail", "fwd", "request")

    def __init__(
        self,
        fwd: Forwarding,
        request: Request,
        fail: Callable[[Request, Exception], None],
        candidates: list[Target],
    ) -> None:
        self.fwd = fwd
        self.request = request
        self.fail = fail
        self.candidates = candidates
        self.conn: UpstreamConnection | None = None

    def start(self, conn: UpstreamConnection, target: Target) -> None:
        self.conn = conn
        request = self.request
        head = self.fwd.head(request.method, target, False)
        request.upstream = target.url
        conn.begin(request.method, self.fwd.route.timeout, self._on_head, timing=True)
        request.on_lost = self._on_client_lost
        conn.write_soon(head, request.protocol.server.batch)

    def _on_client_lost(self) -> None:
        # The client hung up while we waited: the upstream exchange is abandoned,
        # and the request ends here (no task of its own would end it).
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.release(reuse=False)
        self.request.client_gone()

    def _on_head(
        self,
        message: ResponseHead | None,
        payload: aiohttp.StreamReader | None,
        err: ExchangeFailed | None,
    ) -> None:
        conn = self.conn
        request = self.request
        request.on_lost = None
        if conn is None:
            return
        if err is not None or message is None or payload is None:
            self.conn = None
            conn.release(reuse=False)
            if err is not None and err.stale and request.method in IDEMPOTENT:
                # The upstream had dropped the idle connection: the coroutine path
                # tries once more on a fresh one.
                request.protocol.run_pending(
                    request, proxy_http(self.fwd, request, self.candidates)
                )
                return
            self.fail(
                request,
                UpstreamTimeout() if err is not None and err.timed_out else UpstreamUnavailable(),
            )
            return
        if payload.is_eof():
            self.conn = None
            _send_whole(self.fwd, request, message, payload)
            conn.release(reuse=conn.finished())
            request.finish()
            return
        # A body still on its way: stream it from a task.
        self.conn = None
        request.protocol.run_pending(
            request,
            _stream(
                self.fwd,
                request,
                message,
                payload,
                lambda clean: conn.release(clean and conn.finished()),
            ),
        )


def _answer_lines(fwd: Forwarding, message: ResponseHead) -> list[bytes]:
    return fwd.rules.downstream_lines(message.raw_headers, fwd.request_id.encode())


def _send_whole(
    fwd: Forwarding,
    request: Request,
    message: ResponseHead,
    payload: aiohttp.StreamReader,
) -> None:
    """The whole body came with the head (most API answers): one write."""
    lines = _answer_lines(fwd, message)
    body = payload.read_nowait(-1)
    if request.method == "HEAD" or message.code in (204, 304):
        lines.extend(fwd.rules.length_lines(message.raw_headers))
    request.send(message.code, message.reason, lines, body)


async def _stream(
    fwd: Forwarding,
    request: Request,
    message: ResponseHead,
    payload: aiohttp.StreamReader,
    release: Callable[[bool], None],
) -> None:
    clean = False
    try:
        lines = _answer_lines(fwd, message)
        known = message.headers.get("Content-Length") if not message.chunked else None
        await request.start_stream(
            message.code, message.reason, lines, int(known) if known is not None else None
        )
        try:
            # iter_any: pass bytes on as they arrive (SSE and chunked streams must
            # not wait for a buffer to fill).
            async for chunk in payload.iter_any():
                await request.write(chunk)
        except (TimeoutError, aiohttp.ClientError):
            # The head is already sent: the only honest signal left is to cut the
            # connection so the client sees a truncated response, not a complete one.
            log.warning("upstream failed mid-body; closing the client connection")
            request.error = "upstream_mid_body"
            request.abort()
            return
        await request.end_stream()
        clean = True
    finally:
        release(clean)


async def proxy_http(
    fwd: Forwarding, request: Request, candidates: list[Target] | None = None
) -> None:
    """Forward ``request`` and write the upstream's answer to the client (the
    coroutine path: request bodies, new connections, retries)."""
    length = request.content_length
    if length is not None and length > fwd.route.max_body:
        raise BodyTooLarge()
    state = _BodyState()
    # A client that hangs up while we wait on the upstream cancels the exchange
    # (and its upstream connection) rather than leaving it to the route timeout.
    request.protocol.cancel_on_lost = True
    upstream = await _open(fwd, request, state, candidates)
    request.protocol.cancel_on_lost = False
    if upstream.payload.is_eof():
        try:
            _send_whole(fwd, request, upstream.message, upstream.payload)
        finally:
            upstream.release()
        return
    await _stream(
        fwd, request, upstream.message, upstream.payload, lambda clean: upstream.release()
    )
