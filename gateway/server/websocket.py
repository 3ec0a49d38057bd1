"""The client's side of a WebSocket: the upgrade handed over to aiohttp.

A WebSocket request arrives on our protocol like any other. Accepting it goes
through aiohttp's ``WebSocketResponse`` (handshake, frame reader and writer,
UTF-8, fragmentation and deflate checks), which wants a real ``BaseRequest``:
:func:`handover` builds one bound to our connection. :class:`HttpProtocol`
provides what aiohttp reads and calls on its protocol then (``set_parser``,
``keep_alive``, ``ssl_context``, ``max_field_size``...).

aiohttp 3.14 internals used here (see docs/design.md, "aiohttp internals we
rely on"; the ``<3.15`` pin guards them): ``aiohttp.http_writer.StreamWriter``,
the ``RequestHandler`` a ``BaseRequest`` is typed to take (ours is not one, but
offers what it reads), and ``WebSocketResponse._close_transport``, the hook
:class:`ClientSocket` overrides.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.http_writer import StreamWriter

from gateway.server.flow import as_aiohttp
from gateway.server.request import Request

if TYPE_CHECKING:
    from aiohttp.web_protocol import RequestHandler


def handover(request: Request) -> web.BaseRequest:
    """A real aiohttp request on ``request``'s connection, for
    ``WebSocketResponse.prepare``. From here the connection ends with this
    request, upgraded or refused."""
    protocol = request.protocol
    request.keep_alive = False
    protocol.flush_out()  # aiohttp writes to the transport directly
    task = asyncio.current_task()
    assert task is not None, "a handover runs in the request's task"
    return web.BaseRequest(
        # The parser's own message object, declared by what the gateway reads.
        cast("RawRequestMessage", request.message),
        request.content,
        # Not a RequestHandler: HttpProtocol offers the attributes a
        # BaseRequest and a WebSocketResponse read and call.
        cast("RequestHandler", protocol),
        StreamWriter(as_aiohttp(protocol), protocol.loop),
        task,
        protocol.loop,
    )


class ClientSocket(web.WebSocketResponse):
    """aiohttp's server side of a WebSocket, ending its connection gently.

    aiohttp closes the transport right after a close frame it sent on an error
    (1009, 1007, 1002). A client still sending (the rest of an over-size
    message) then has unread bytes on our side, the kernel answers them with a
    reset, and the reset makes the client's stack drop the close frame it had
    not read yet: it would see 1006, not 1009. So the sending side is shut
    instead (the client reads the close frame, then the end), what still
    arrives is read and dropped by aiohttp's failed reader, and the relay
    closes the connection after a short linger (nginx's lingering close, as
    :meth:`gateway.server.protocol.HttpProtocol._linger` does for HTTP).
    """

    half_closed = False
    _handed: web.BaseRequest | None = None

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter:
        self._handed = request
        return await super().prepare(request)

    def _close_transport(self) -> None:  # overrides aiohttp 3.14's private hook
        request = self._handed
        transport = request.transport if request is not None else None
        if transport is None or transport.is_closing():
            return
        if transport.can_write_eof():
            transport.write_eof()
            self.half_closed = True
        else:
            transport.close()
