"""An open WebSocket: the relay between client and upstream, and when it ends.

Opening one (the upstream handshake, then the client's) is
:mod:`gateway.proxy.websocket`; from the accepted upgrade on, a socket is a
:class:`Relay`.

A proxied request ends with its answer; a WebSocket outlives the token check
that let it in. So a relay ends, with a close frame on both sides, when:

- its session is revoked (logout, on any worker: :meth:`Revocations.watch`)
  or its token expires (``exp`` plus ``token.leeway``, on the gateway's clock):
  1008, policy violation;
- no message was relayed either way for ``server.websocket_idle_timeout``:
  1001 (pings and pongs do not count, a stolen token must not keep a socket
  open by pinging; an incomplete message does not count either);
- the gateway shuts down (or a reload retires its configuration): 1001;
- either side closes: its code and reason are passed on to the other;
  either side vanishes without a close frame: the other gets 1011 (the
  upstream went away) or 1001 (the client went away), never 1006, which
  RFC 6455 7.4.1 forbids on the wire; a message over
  ``server.websocket_max_message`` (or a protocol error): the offender gets
  1009 (1002, 1007) from aiohttp's reader and the other side the same code.

Flow control both ways: each direction reads the next message only once the
previous one was handed to the other side's transport and its buffer drained
(aiohttp's writer awaits the drain), and aiohttp's readers stop reading a
socket whose unread messages pass 128 KiB. A peer that stops reading thus
stops the relay reading the other side: memory per socket stays near one
message plus the buffers. While a direction waits on a peer that does not
read, the side it reads from is pinged every :data:`PROBE_INTERVAL`: a socket
whose reading is paused reports no hang-up, and a write to it does.

Every close is bounded (:data:`CLOSE_TIMEOUT`); a peer that does not take
its close frame in time has its connection aborted, so no socket outlives
its relay waiting on a buffer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.auth.identity import Identity
from gateway.auth.revocations import Revocations
from gateway.proxy.pool import websocket_transport
from gateway.server.request import Request
from gateway.server.websocket import ClientSocket

log = logging.getLogger("gateway.websocket")

# How long a close handshake may take before the connection is aborted.
CLOSE_TIMEOUT = 5.0
# After the client's side ended on an error: how long what it still sends is
# read and dropped before its connection closes (see
# gateway.server.websocket.ClientSocket).
LINGER = 2.0
# While one direction waits on a peer that does not read: how often the side it
# reads from is pinged to find out whether it is still there.
PROBE_INTERVAL = 2.0

POLICY_VIOLATION = aiohttp.WSCloseCode.POLICY_VIOLATION  # 1008
GOING_AWAY = aiohttp.WSCloseCode.GOING_AWAY  # 1001
INTERNAL_ERROR = aiohttp.WSCloseCode.INTERNAL_ERROR  # 1011
# Codes an endpoint must never send (RFC 6455 7.4.1): they only describe what
# a receiving endpoint saw.
_NEVER_SENT = frozenset({1005, 1006, 1015})
# The reason a close frame carries is at most 123 bytes (RFC 6455 5.5).
_MAX_REASON = 123

WS = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


@dataclass(frozen=True, slots=True)
class Limits:
    idle_timeout: float
    max_message: int


@dataclass(frozen=True, slots=True)
class Lifetime:
    """What bounds one socket's life from the token that opened it."""

    identity: Identity
    revocations: Revocations
    clock: Callable[[], float]
    leeway: float


@dataclass(frozen=True, slots=True)
class _Close:
    """The close frame one side is sent."""

    code: int
    reason: bytes = b""


@dataclass(frozen=True, slots=True)
class _End:
    """How a relay ends; None: that side is sent no close frame (it is gone,
    or aiohttp already closed it on an error)."""

    to_client: _Close | None
    to_upstream: _Close | None
    why: str


def _reason(text: str | bytes | None) -> bytes:
    raw = text.encode("utf-8", "replace") if isinstance(text, str) else (text or b"")
    if len(raw) <= _MAX_REASON:
        return raw
    # Cut on a character boundary: a reason must be valid UTF-8.
    return raw[:_MAX_REASON].decode("utf-8", "ignore").encode()


def _sendable(code: int | None, fallback: int) -> int:
    if code is None or code in _NEVER_SENT or not 1000 <= code <= 4999:
        return fallback
    return code


class Relay:
    """One proxied WebSocket, from the client's accepted upgrade to both closes."""

    def __init__(
        self,
        request: Request,
        downstream: ClientSocket,
        upstream: aiohttp.ClientWebSocketResponse,
        limits: Limits,
        lifetime: Lifetime | None,
    ) -> None:
        self._request = request
        self._down = downstream
        self._up = upstream
        self._limits = limits
        self._lifetime = lifetime
        self._loop = asyncio.get_running_loop()
        self._ending: asyncio.Future[_End] = self._loop.create_future()
        self.done: asyncio.Future[None] = self._loop.create_future()
        self._close_within = CLOSE_TIMEOUT
        self._last_activity = self._loop.time()
        # Since when each direction waits on its sink's drain (None: not waiting).
        self._stalled: dict[str, float | None] = {"upstream": None, "client": None}
        # Captured now: aiohttp drops its reference when it closes the connection,
        # and a transport whose peer does not read must still be aborted.
        self._client_transport = request.protocol.transport
        self._upstream_transport = websocket_transport(upstream)

    # -- ending from outside ----------------------------------------------------------
    def end(self, end: _End, close_within: float | None = None) -> None:
        """End the relay with ``end`` (the first reason to end wins)."""
        if close_within is not None:
            self._close_within = min(self._close_within, max(close_within, 0.1))
        if not self._ending.done():
            self._ending.set_result(end)

    def shut_down(self, within: float) -> None:
        """The gateway stops (or a reload retires it): 1001 to both sides,
        the closes bounded by ``within`` seconds."""
        going = _Close(GOING_AWAY, b"gateway shutting down")
        self.end(_End(going, going, "shutdown"), close_within=within)

    def _policy(self, reason: bytes) -> None:
        self.end(_End(_Close(POLICY_VIOLATION, reason), _Close(POLICY_VIOLATION, reason), "policy"))

    def _client_lost(self) -> None:
        self.end(_End(None, _Close(GOING_AWAY, b"client went away"), "client lost"))

    # -- the relay ----------------------------------------------------------------------
    async def run(self) -> None:
        unwatch: Callable[[], None] | None = None
        lifetime = self._lifetime
        if lifetime is not None:
            unwatch = lifetime.revocations.watch(
                lifetime.identity, lambda: self._policy(b"token revoked")
            )
            if lifetime.revocations.is_revoked(lifetime.identity):
                self._policy(b"token revoked")  # while the upstream handshake ran
        self._request.on_lost = self._client_lost
        tasks = [
            asyncio.create_task(self._pump(self._down, self._up, "upstream")),
            asyncio.create_task(self._pump(self._up, self._down, "client")),
            asyncio.create_task(self._watch()),
        ]
        try:
            end = await self._ending
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            log.debug("websocket ends: %s", end.why)
            await self._close(end)
            await self._linger()
        except asyncio.CancelledError:
            # Torn down from outside (the worker stopping): nothing is waited on.
            for transport in (self._client_transport, self._upstream_transport):
                if transport is not None:
                    _reset(transport)
            raise
        finally:
            self._request.on_lost = None
            if unwatch is not None:
                unwatch()
            for task in tasks:
                task.cancel()
            self._abort_stuck()
            if not self.done.done():
                self.done.set_result(None)

    async def _pump(self, source: WS, sink: WS, toward: str) -> None:
        while True:
            message = await source.receive()
            kind = message.type
            if kind is aiohttp.WSMsgType.TEXT or kind is aiohttp.WSMsgType.BINARY:
                self._last_activity = self._loop.time()
                self._stalled[toward] = self._last_activity
                try:
                    if kind is aiohttp.WSMsgType.TEXT:
                        await sink.send_str(message.data)
                    else:
                        await sink.send_bytes(message.data)
                except (ConnectionError, aiohttp.ClientError):
                    # The sink's connection went while we wrote to it.
                    if toward == "client":
                        self._client_lost()
                    else:
                        self._upstream_lost()
                    return
                self._stalled[toward] = None
                continue
            self.end(self._end_from(source, message, toward))
            return

    def _end_from(self, source: WS, message: aiohttp.WSMessage, toward: str) -> _End:
        """The end a ``source`` that stopped giving messages asks for."""
        from_client = toward == "upstream"
        if message.type is aiohttp.WSMsgType.CLOSE:
            # A close frame: its code and reason go on to the other side, and the
            # source gets the same code back (RFC 6455 5.5.1's usual echo).
            code = _sendable(message.data, aiohttp.WSCloseCode.OK)
            passed = _Close(code, _reason(message.extra))
            echo = _Close(code)
            if from_client:
                return _End(echo, passed, "client closed")
            return _End(passed, echo, "upstream closed")
        error = message.data if message.type is aiohttp.WSMsgType.ERROR else None
        if isinstance(error, aiohttp.WebSocketError):
            # aiohttp's reader refused what the source sent (1009 too big, 1007 bad
            # UTF-8, 1002 framing) and sent it that code: the other side learns why.
            code = _sendable(error.code, INTERNAL_ERROR)
            reason = _reason(_ERROR_REASONS.get(code, ""))
            if from_client:
                return _End(None, _Close(code, reason), "client error")
            return _End(_Close(code, reason), None, "upstream error")
        # Gone without a close frame (reset, EOF): the other side gets a code
        # that may be sent, never 1006.
        if from_client:
            return _End(None, _Close(GOING_AWAY, b"client went away"), "client lost")
        return _End(_Close(INTERNAL_ERROR, b"upstream went away"), None, "upstream lost")

    async def _watch(self) -> None:
        """Expiry, idleness and, while a direction is stalled, probes."""
        limits = self._limits
        expires = None
        if self._lifetime is not None:
            lifetime = self._lifetime
            left = lifetime.identity.expires_at + lifetime.leeway - lifetime.clock()
            expires = self._loop.time() + left
        while True:
            now = self._loop.time()
            if expires is not None and now >= expires:
                self._policy(b"token expired")
                return
            idle_at = self._last_activity + limits.idle_timeout
            if now >= idle_at:
                self.end(_End(_Close(GOING_AWAY, b"idle"), _Close(GOING_AWAY, b"idle"), "idle"))
                return
            # A stall starts inside a send, unseen from here: look every
            # PROBE_INTERVAL (a timer per socket, cheap next to its buffers).
            wake = min(idle_at, now + PROBE_INTERVAL)
            if expires is not None:
                wake = min(wake, expires)
            if any(since is not None for since in self._stalled.values()):
                await self._probe(now)
            await asyncio.sleep(max(wake - self._loop.time(), 0.0))

    async def _probe(self, now: float) -> None:
        for toward, since in self._stalled.items():
            if since is None or now - since < PROBE_INTERVAL:
                continue
            # The direction toward ``toward`` is stuck on a peer that does not
            # read; is the side it reads from still there?
            source, gone = (
                (self._down, self._client_lost)
                if toward == "upstream"
                else (self._up, self._upstream_lost)
            )
            try:
                async with asyncio.timeout(PROBE_INTERVAL):
                    await source.ping()
            except TimeoutError:
                pass  # that side does not read either: the idle timeout decides
            except (ConnectionError, aiohttp.ClientError, RuntimeError):
                gone()

    def _upstream_lost(self) -> None:
        self.end(_End(_Close(INTERNAL_ERROR, b"upstream went away"), None, "upstream lost"))

    # -- closing ------------------------------------------------------------------------
    async def _close(self, end: _End) -> None:
        closes = []
        if end.to_client is not None:
            closes.append(self._close_one(self._down, end.to_client))
        if end.to_upstream is not None:
            closes.append(self._close_one(self._up, end.to_upstream))
        await asyncio.gather(*closes)
        # A side that was never sent a close frame (it is gone) is still closed
        # on our end, without waiting on anything.
        for ws in (self._down, self._up):
            if not ws.closed:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(0.1):
                        await ws.close()

    async def _linger(self) -> None:
        """Give a client that ClientSocket half closed the time to read its
        close frame and hang up (at most LINGER), then let its connection go."""
        if not self._down.half_closed:
            return
        protocol = self._request.protocol
        deadline = self._loop.time() + LINGER
        # Polled: rare (a close on an error), and bounded.
        while protocol.transport is not None and self._loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _close_one(self, ws: WS, close: _Close) -> None:
        try:
            async with asyncio.timeout(self._close_within):
                await ws.close(code=close.code, message=close.reason)
        except (TimeoutError, ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
            log.debug("websocket close did not complete: %r", exc)

    def _abort_stuck(self) -> None:
        """Abort a connection still holding bytes its peer did not take: closing
        it would wait for that peer to read, holding the socket meanwhile."""
        for transport in (self._client_transport, self._upstream_transport):
            if transport is not None and not _flushed(transport):
                _reset(transport)


def _reset(transport: asyncio.Transport) -> None:
    """Abort with a reset. A plain abort closes the socket, and the kernel
    keeps what it holds for a peer that does not read (and the connection with
    it) for minutes: the bytes a relay stopped on would outlive it there."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError, NotImplementedError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST


def _flushed(transport: asyncio.Transport) -> bool:
    try:
        return transport.get_write_buffer_size() == 0
    except Exception:  # closed already: nothing left to hold
        return True


_ERROR_REASONS: dict[int, str] = {
    aiohttp.WSCloseCode.MESSAGE_TOO_BIG: "message too big",
    aiohttp.WSCloseCode.INVALID_TEXT: "invalid UTF-8",
    aiohttp.WSCloseCode.PROTOCOL_ERROR: "protocol error",
}
