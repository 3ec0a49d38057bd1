"""Flow control for the gateway's connection protocols, as aiohttp drives it.

aiohttp's body streams (``StreamReader``), its ``StreamWriter`` and
``WebSocketResponse`` drive the protocol they read from or write to through
the interface of aiohttp's ``BaseProtocol``: ``pause_reading`` and
``resume_reading`` with the ``_reading_paused`` flag, ``writing_paused`` and
``_drain_helper`` for writers, ``connected``, ``transport``. The client
connection (:mod:`gateway.server.protocol`) and the upstream connection
(:mod:`gateway.proxy.pool`) used to subclass ``BaseProtocol`` for it.

Why a class of our own: setup.py compiles both modules with mypyc, and a
compiled (native) class cannot extend ``BaseProtocol``, which has
``__slots__``. A subclass left as a regular class runs its compiled methods
with every ``self.x`` a dictionary lookup, slower than the interpreter's own
attribute caches. This class offers the same interface, behaving as aiohttp
3.14's does (the ``<3.15`` pin; docs/design.md lists what we rely on), so both
protocols compile to native classes.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http_parser import HttpParser
from aiohttp.tcp_helpers import tcp_nodelay

if TYPE_CHECKING:
    from aiohttp.base_protocol import BaseProtocol

# What pause_reading() / resume_reading() raise on a transport without flow
# control (aiohttp's PAUSE_RESUME_READING_ERRORS): nothing to pause, ignored.
_NO_FLOW_CONTROL = (AttributeError, NotImplementedError, RuntimeError)


def as_aiohttp(protocol: FlowControl) -> BaseProtocol:
    """``protocol`` where aiohttp's annotations ask for its ``BaseProtocol``,
    whose interface it offers (a parser, a ``StreamWriter``)."""
    return cast("BaseProtocol", protocol)


def as_asyncio(protocol: FlowControl) -> asyncio.Protocol:
    """``protocol`` where asyncio's annotations ask for an ``asyncio.Protocol``,
    whose methods it has (the loop checks none of its type)."""
    return cast(asyncio.Protocol, protocol)


class FlowControl:
    """One connection's read and write flow control (aiohttp's protocol interface)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, parser: HttpParser[Any] | None) -> None:
        self._loop = loop
        self._paused = False  # the transport's buffer is over its high-water mark
        self._drain_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False  # a body stream holds too much unread
        self._buffer_paused = False  # the protocol's own buffer (queued requests) is full
        self._parser = parser
        self._upgraded = False
        self.transport: asyncio.Transport | None = None

    @property
    def connected(self) -> bool:
        return self.transport is not None

    @property
    def writing_paused(self) -> bool:
        return self._paused

    # -- asyncio.Protocol ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr = cast(asyncio.Transport, transport)
        tcp_nodelay(tr, True)
        self.transport = tr

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        waiter = self._drain_waiter
        if not self._paused or waiter is None:
            return
        self._drain_waiter = None
        if waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            lost = ConnectionError("Connection lost")
            lost.__cause__ = exc
            waiter.set_exception(lost)

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def eof_received(self) -> bool | None:
        return None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- reading, as a body stream asks ----------------------------------------------
    def pause_reading(self) -> None:
        self._reading_paused = True
        if not self._upgraded and self._parser is not None:
            self._parser.pause_reading()
        self._pause_transport_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False
        if not self._upgraded and resume_parser:
            self.data_received(b"")  # what the parser held back while paused
        if not self._reading_paused and not self._buffer_paused:
            self._resume_transport_reading()

    def _pause_reading_for_buffer(self) -> None:
        self._buffer_paused = True
        self._pause_transport_reading()

    def _resume_reading_for_buffer(self) -> None:
        self._buffer_paused = False
        if not self._reading_paused:
            self._resume_transport_reading()

    def _pause_transport_reading(self) -> None:
        if self.transport is not None:
            # try/except, not contextlib.suppress: this runs on the read path.
            try:  # noqa: SIM105
                self.transport.pause_reading()
            except _NO_FLOW_CONTROL:
                pass

    def _resume_transport_reading(self) -> None:
        if self.transport is not None:
            try:  # noqa: SIM105
                self.transport.resume_reading()
            except _NO_FLOW_CONTROL:
                pass

    # -- writing, as a StreamWriter asks ----------------------------------------------
    async def _drain_helper(self) -> None:
        if self.transport is None:
            raise ClientConnectionResetError("Connection lost")
        if not self._paused:
            return
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
        await waiter
