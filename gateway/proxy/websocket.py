"""Proxied WebSockets: the upgrade, the two handshakes, and the open sockets.

A WebSocket upgrade on a ``websocket: true`` route connects upstream first (so
a dead upstream is a clean 502), then accepts the client with the subprotocol
the upstream chose, then hands both sides to a :class:`~gateway.proxy.relay.Relay`
until either side, the token's lifetime or the gateway's stop ends it.

Upstream WebSockets go through one long-lived aiohttp ``ClientSession`` of
their own (HTTP requests use the lean pool, :mod:`gateway.proxy.pool`): it
never decompresses, stores no cookies and adds no default headers, so the
handshake the upstream sees is the client's, minus the header rules. An
https target is reached with its route's TLS (client certificate, CA, server
name), as the HTTP pool reaches it, and a failed handshake is reported alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.auth.identity import Identity
from gateway.auth.revocations import Revocations
from gateway.errors import UpstreamTimeout, UpstreamUnavailable
from gateway.proxy.forward import tls_failed
from gateway.proxy.pool import drop_websocket
from gateway.proxy.relay import CLOSE_TIMEOUT, Lifetime, Limits, Relay
from gateway.proxy.routing import Route, Target
from gateway.proxy.tls import tls_reason
from gateway.server.request import Request
from gateway.server.websocket import ClientSocket, handover

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


def is_upgrade(request: Request) -> bool:
    # The parser's reading (llhttp sees every Connection line), not a second one
    # of our own: with "Connection: keep-alive" and "Connection: upgrade" on two
    # lines, the first line alone says no while the parser switched protocols.
    return bool(request.message.upgrade)


def is_websocket_upgrade(request: Request) -> bool:
    return is_upgrade(request) and request.headers.get("Upgrade", "").lower() == "websocket"


class Sockets:
    """One gateway's WebSockets: the client session that opens them upstream,
    their limits, and the open relays, ended together when it stops."""

    def __init__(
        self,
        limits: Limits,
        revocations: Revocations,
        clock: Callable[[], float],
        leeway: float,
        upstream_idle_timeout: float,
    ) -> None:
        self.limits = limits
        self._revocations = revocations
        self._clock = clock
        self._leeway = leeway
        self._idle_timeout = upstream_idle_timeout
        self._session: aiohttp.ClientSession | None = None
        self._open: set[Relay] = set()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0,  # the route timeouts bound waiting; a pool cap would only queue
            keepalive_timeout=self._idle_timeout,
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
        """Close the open sockets (1001), then the session under them."""
        await self.close_all()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Sockets.start() was not awaited"
        return self._session

    def lifetime(self, identity: Identity | None) -> Lifetime | None:
        if identity is None:
            return None  # a public or anonymous socket: only idleness ends it
        return Lifetime(identity, self._revocations, self._clock, self._leeway)

    def __len__(self) -> int:
        return len(self._open)

    async def close_all(self, within: float = CLOSE_TIMEOUT) -> None:
        """Close every open socket with 1001 (going away), each close bounded
        by ``within`` seconds (at most :data:`CLOSE_TIMEOUT`; then the
        connections are aborted)."""
        within = min(within, CLOSE_TIMEOUT)
        relays = list(self._open)
        for relay in relays:
            relay.shut_down(within)
        done = [relay.done for relay in relays]
        if done:
            await asyncio.wait(done, timeout=within + 1.0)

    async def relay(self, relay: Relay) -> None:
        self._open.add(relay)
        try:
            await relay.run()
        finally:
            self._open.discard(relay)


def _url(target: Target, path: str, query: str) -> URL:
    # encoded=True: the path was normalised by gateway.proxy.paths and must reach the
    # upstream byte for byte; yarl must not decode or re-resolve it.
    return URL.build(
        scheme=target.scheme,
        host=target.host,
        port=target.port,
        path=target.base_path + path,
        query_string=query,
        encoded=True,
    )


async def proxy_websocket(
    sockets: Sockets,
    incoming: Request,
    route: Route,
    path: str,
    query: str,
    headers: CIMultiDict[str],
    identity: Identity | None,
) -> web.StreamResponse:
    """Relay a WebSocket: connect upstream first (so a dead upstream is a clean
    502), then accept the client with the subprotocol the upstream chose, then
    relay until either side or the socket's lifetime ends it
    (:mod:`gateway.proxy.relay`)."""
    request = handover(incoming)
    protocols = [
        p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()
    ]
    for name in list(headers):
        if name.lower() in _WS_HANDSHAKE:
            del headers[name]
    # A message is assembled whole before it is relayed: its limit is memory
    # held per socket, so the smaller of the two.
    # aiohttp refuses a frame of exactly its max_msg_size: one more byte lets a
    # message of exactly the limit through.
    max_message = min(route.max_body, sockets.limits.max_message) + 1
    upstream_ws = await _connect(
        sockets.session, route, path, query, headers, protocols, max_message
    )
    downstream = ClientSocket(
        protocols=[upstream_ws.protocol] if upstream_ws.protocol else (),
        max_msg_size=max_message,
        autoping=True,
        autoclose=False,
        timeout=CLOSE_TIMEOUT,
    )
    try:
        await downstream.prepare(request)
    except BaseException:
        drop_websocket(upstream_ws)
        raise
    lifetime = sockets.lifetime(identity)
    await sockets.relay(Relay(incoming, downstream, upstream_ws, sockets.limits, lifetime))
    return downstream


async def _connect(
    session: aiohttp.ClientSession,
    route: Route,
    path: str,
    query: str,
    headers: CIMultiDict[str],
    protocols: list[str],
    max_message: int,
) -> aiohttp.ClientWebSocketResponse:
    """The upstream side of the socket, from the first target that accepts."""
    for target in route.balancer.candidates():
        tls = target.tls
        try:
            # The route timeout bounds the handshake as it bounds a response
            # head: the session itself has no timeout (bodies stream for long).
            async with asyncio.timeout(route.timeout):
                return await session.ws_connect(
                    _url(target, path, query),
                    headers=headers,
                    protocols=protocols,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT),
                    max_msg_size=max_message,
                    autoping=True,
                    # The relay passes each close frame on (gateway.proxy.relay).
                    autoclose=False,
                    # The route's TLS, as the HTTP pool uses it (gateway.proxy.routing).
                    ssl=tls.context if tls is not None else True,
                    server_hostname=tls.server_name if tls is not None else None,
                )
        except aiohttp.ClientSSLError as exc:  # before ClientConnectorError, its base
            tls_failed(route, target, tls_reason(exc.os_error))
            route.balancer.mark_dead(target)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            route.balancer.mark_dead(target)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if tls is None:
                raise UpstreamUnavailable() from None
            # A new TLS connection lost before the handshake's answer: the
            # upstream refused us at the TLS layer (TLS 1.3 servers check a
            # client certificate after the handshake completed on our side).
            tls_failed(route, target, tls_reason(exc.__cause__))
            route.balancer.mark_dead(target)
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamUnavailable(
                f"The upstream refused the WebSocket upgrade (status {exc.status})."
            ) from None
        except TimeoutError:
            raise UpstreamTimeout() from None
        except aiohttp.ClientError:
            raise UpstreamUnavailable() from None
    raise UpstreamUnavailable()
