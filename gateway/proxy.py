"""Forwarding to upstreams: streamed HTTP both ways, and WebSocket relays.

One long-lived ``ClientSession`` serves every upstream (connection reuse is most
of a proxy's speed). It never decompresses, never stores cookies and adds no
default headers of its own, so what the upstream sends reaches the client
unchanged and what the client sends reaches the upstream unchanged, apart from
the header rules in :mod:`gateway.headers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.errors import BodyTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.headers import HeaderRules
from gateway.routing import Route, Target
from gateway.upstream_pool import ConnectFailed, UpstreamPools, UpstreamResponse, build_head

log = logging.getLogger("gateway.proxy")

CHUNK = 64 * 1024
# aiohttp's client would otherwise add these when the client did not send them.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# aiohttp's ws_connect writes its own handshake fields.
_WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
    }
)


@dataclass(slots=True)
class _BodyState:
    sent: int = 0
    too_large: bool = False


async def _limited_body(
    content: aiohttp.StreamReader, limit: int, state: _BodyState
) -> AsyncIterator[bytes]:
    """The request body as it arrives, stopping the upload once it passes ``limit``
    (a chunked body has no Content-Length to check up front)."""
    async for chunk in content.iter_chunked(CHUNK):
        state.sent += len(chunk)
        if state.sent > limit:
            state.too_large = True
            raise BodyTooLarge()
        yield chunk


class UpstreamClient:
    """The one client session for all upstreams."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        # The HTTP hot path; the session above serves WebSocket upgrades.
        self.pools = UpstreamPools()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # the route timeouts bound waiting; a pool cap would only queue
            keepalive_timeout=30,
            ttl_dns_cache=60,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=_SKIP_AUTO,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        self.pools.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "UpstreamClient.start() was not awaited"
        return self._session


def _url(target: Target, path: str, query: str, scheme: str | None = None) -> URL:
    # encoded=True: the path was normalised by gateway.paths and must reach the
    # upstream byte for byte; yarl must not decode or re-resolve it.
    return URL.build(
        scheme=scheme or target.scheme,
        host=target.host,
        port=target.port,
        path=target.base_path + path,
        query_string=query,
        encoded=True,
    )


async def _open(
    client: UpstreamClient,
    request: web.BaseRequest,
    route: Route,
    path: str,
    query: str,
    headers: CIMultiDict[str],
    state: _BodyState,
) -> UpstreamResponse:
    """Send the request to the first target that accepts a connection."""
    body = None
    chunked = False
    if request.body_exists:
        body = _limited_body(request.content, route.max_body, state)
        # A client's chunked body goes upstream chunked; a Content-Length is kept.
        chunked = request.content_length is None
    path_qs = path + "?" + query if query else path
    timed_out = False
    for target in route.balancer.candidates():
        head = build_head(
            request.method, target.base_path + path_qs, target.host_header, headers, chunked
        )
        pool = client.pools.get(target.scheme, target.host, target.port)
        try:
            return await pool.request(request.method, head, body, chunked, route.timeout)
        except ConnectFailed as exc:
            # Nothing was sent: safe to try the next target even for a POST.
            route.balancer.mark_dead(target)
            timed_out = exc.timed_out
        except (UpstreamUnavailable, UpstreamTimeout):
            if state.too_large:
                raise BodyTooLarge() from None
            raise
    if timed_out:
        raise UpstreamTimeout()
    raise UpstreamUnavailable()


async def proxy_http(
    client: UpstreamClient,
    rules: HeaderRules,
    request: web.BaseRequest,
    route: Route,
    path: str,
    query: str,
    headers: CIMultiDict[str],
    request_id: str,
) -> web.StreamResponse:
    length = request.content_length
    if length is not None and length > route.max_body:
        raise BodyTooLarge()
    state = _BodyState()
    upstream = await _open(client, request, route, path, query, headers, state)
    try:
        message = upstream.message
        headers = rules.downstream_response(message.headers)
        headers["X-Request-Id"] = request_id
        if upstream.payload.is_eof():
            # The whole body came with the head (most API answers): send it as one
            # response, one write, instead of head, body and end separately.
            body = upstream.payload.read_nowait(-1)
            return web.Response(
                status=message.code, reason=message.reason, headers=headers, body=body
            )
        out = web.StreamResponse(status=message.code, reason=message.reason, headers=headers)
        await out.prepare(request)
        try:
            # iter_any: pass bytes on as they arrive (SSE and chunked streams must
            # not wait for a buffer to fill).
            async for chunk in upstream.payload.iter_any():
                await out.write(chunk)
        except (TimeoutError, aiohttp.ClientError):
            # The head is already sent: the only honest signal left is to cut the
            # connection so the client sees a truncated response, not a complete one.
            log.warning("upstream failed mid-body; closing the client connection")
            if request.transport is not None:
                request.transport.close()
            return out
        await out.write_eof()
        return out
    finally:
        upstream.release()


def is_upgrade(request: web.BaseRequest) -> bool:
    return (
        "upgrade" in request.headers.get("Connection", "").lower() and "Upgrade" in request.headers
    )


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    return is_upgrade(request) and request.headers.get("Upgrade", "").lower() == "websocket"


async def proxy_websocket(
    client: UpstreamClient,
    request: web.BaseRequest,
    route: Route,
    path: str,
    query: str,
    headers: CIMultiDict[str],
) -> web.StreamResponse:
    """Relay a WebSocket: connect upstream first (so a dead upstream is a clean
    502), then accept the client with the subprotocol the upstream chose."""
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    for name in list(headers):
        if name.lower() in _WS_HANDSHAKE:
            del headers[name]
    upstream_ws = None
    for target in route.balancer.candidates():
        try:
            upstream_ws = await client.session.ws_connect(
                _url(target, path, query),
                headers=headers,
                protocols=protocols,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=10.0),
                max_msg_size=route.max_body,
                autoping=True,
            )
            break
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            route.balancer.mark_dead(target)
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamUnavailable(
                f"The upstream refused the WebSocket upgrade (status {exc.status})."
            ) from None
        except TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientError:
            raise UpstreamUnavailable() from None
    if upstream_ws is None:
        raise UpstreamUnavailable()
    downstream = web.WebSocketResponse(
        protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
        max_msg_size=route.max_body,
        autoping=True,
    )
    try:
        await downstream.prepare(request)
        await _relay(downstream, upstream_ws)
    finally:
        await upstream_ws.close()
        await downstream.close()
    return downstream


async def _relay(
    downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse
) -> None:
    async def pump(
        source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
        sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    ) -> None:
        async for message in source:
            if message.type is aiohttp.WSMsgType.TEXT:
                await sink.send_str(message.data)
            elif message.type is aiohttp.WSMsgType.BINARY:
                await sink.send_bytes(message.data)
            else:
                break
        # One side closed: close the other with the same code when there was one.
        code = source.close_code or aiohttp.WSCloseCode.OK
        with contextlib.suppress(Exception):
            await sink.close(code=code)

    tasks = [
        asyncio.create_task(pump(downstream, upstream)),
        asyncio.create_task(pump(upstream, downstream)),
    ]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
