"""The request path, read top to bottom in :meth:`Gateway.handle`.

1. request id; 2. normalise the path (one path for routing, policy and
forwarding); 3. the gateway's own endpoints (never proxied); 4. route match;
5. token policy (strip, then inject); 6. forward, streamed.

The gateway runs on aiohttp's low-level ``web.Server`` rather than
``web.Application``: routing is a longest-prefix match of our own, so the
application router would only add work per request, and the low-level server
lets every error aiohttp produces itself (parser errors, handler timeouts) be
answered in the contract's JSON shape (see :mod:`gateway.server`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from gateway import proxy
from gateway.auth import AuthEndpoints
from gateway.config import Config
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    MethodNotAllowed,
    NoRoute,
    NotReady,
    StorageUnavailable,
    TokenMissing,
    error_response,
    json_error,
)
from gateway.headers import HeaderRules, request_id_from
from gateway.identity import Identity, IdentityResolver
from gateway.metrics import Metrics
from gateway.paths import BadPath, NormalisedPath, normalise
from gateway.routing import Route, Router
from gateway.services import Services
from gateway.storage import StorageError

log = logging.getLogger("gateway")

Handler = Callable[[web.BaseRequest, "Scope"], Awaitable[web.StreamResponse]]
# Methods no reverse proxy should relay: CONNECT opens tunnels, TRACE echoes
# credentials back (cross-site tracing).
_REFUSED_METHODS = ("CONNECT", "TRACE")


@dataclass(slots=True)
class Scope:
    """What the gateway learns about one request as it goes down the path."""

    request_id: str
    path: NormalisedPath | None = None
    route: Route | None = None
    identity: Identity | None = None


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target, accepting the absolute form too."""
    if not target.startswith("/"):
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise BadPath("the request target must be a path")
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    if "#" in target:
        raise BadPath("a fragment is not allowed in a request")
    path, _, query = target.partition("?")
    return path, query


class Gateway:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.router = Router(config.routes, config.server.max_body)
        self.rules = HeaderRules(config)
        self.services = Services(config, clock=clock)
        self.identity = IdentityResolver(
            config, self.services.tokens, self.services.sessions, clock
        )
        self.upstreams = proxy.UpstreamClient()
        self.metrics = Metrics()
        self.auth = AuthEndpoints(config, self.services, self.identity, self.rules)
        self.draining = False
        # Own endpoints: exact normalised path -> method -> handler.
        self.endpoints: dict[str, dict[str, Handler]] = {
            "/healthz": {"GET": self.healthz, "HEAD": self.healthz},
            "/readyz": {"GET": self.readyz, "HEAD": self.readyz},
            "/metrics": {"GET": self.metrics_endpoint},
            **self.auth.endpoints(),
        }
        self._stack = contextlib.AsyncExitStack()

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Open the long-lived resources, each closed by :meth:`close` in reverse."""
        await self.services.start()
        self._stack.push_async_callback(self.services.close)
        await self.upstreams.start()
        self._stack.push_async_callback(self.upstreams.close)

    async def close(self) -> None:
        await self._stack.aclose()

    # -- the request path -------------------------------------------------------
    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        scope = Scope(request_id=request_id_from(request.headers))
        started = time.perf_counter()
        try:
            response = await self._dispatch(request, scope)
        except GatewayError as exc:
            response = error_response(exc, scope.request_id)
        except StorageError as exc:
            # Busy past its retries, read-only, gone: the client may retry later.
            log.warning("storage error (request id %s): %s", scope.request_id, exc)
            response = error_response(StorageUnavailable(), scope.request_id)
        except Exception:
            log.exception("unhandled error (request id %s)", scope.request_id)
            response = json_error(
                500, "internal_error", "Internal error.", request_id=scope.request_id
            )
        if not response.prepared and "X-Request-Id" not in response.headers:
            response.headers["X-Request-Id"] = scope.request_id  # own endpoints too
        self.metrics.observe(scope.route.prefix if scope.route else None, response.status, started)
        return response

    async def _dispatch(self, request: web.BaseRequest, scope: Scope) -> web.StreamResponse:
        try:
            raw_path, query = split_target(request.raw_path)
            scope.path = path = normalise(raw_path)
        except BadPath as exc:
            raise BadRequest(f"Bad path: {exc}.") from None
        own = self.endpoints.get(path.match)
        if own is not None:
            handler = own.get(request.method)
            if handler is None:
                raise MethodNotAllowed(tuple(own))
            return await handler(request, scope)
        if path.match == "/auth" or path.match.startswith("/auth/"):
            raise NoRoute()
        scope.route = route = self.router.match(path.match)
        if route is None:
            raise NoRoute()
        if request.method in _REFUSED_METHODS:
            raise MethodNotAllowed(message=f"{request.method} is not proxied.")
        return await self._forward(request, scope, route, path, query)

    async def _forward(
        self, request: web.BaseRequest, scope: Scope, route: Route, path: NormalisedPath, query: str
    ) -> web.StreamResponse:
        scope.identity = identity = self.identity.for_route(request.headers, route.auth)
        if route.limiter is not None:
            # Keys are namespaced so an openid can never collide with an address.
            key = (
                "o:" + identity.openid
                if identity
                else "ip:" + self.rules.client_ip(request.headers, request.remote)
            )
            route.limiter.check(key)
        upgrade = proxy.is_upgrade(request)
        if upgrade and not (route.websocket and proxy.is_websocket_upgrade(request)):
            raise BadRequest("Upgrade is not allowed on this route.")
        headers = self.rules.upstream_request(
            request.headers,
            peer=request.remote,
            scheme=request.scheme,
            request_id=scope.request_id,
            openid=identity.openid if identity else None,
            unionid=identity.unionid if identity else None,
        )
        upstream_path = route.upstream_path(path)
        if upgrade:
            return await proxy.proxy_websocket(
                self.upstreams, request, route, upstream_path, query, headers
            )
        if request.content_length is not None and request.content_length > route.max_body:
            raise BodyTooLarge()  # before any 100 Continue invites the body
        if request.headers.get("Expect", "").lower() == "100-continue" and request.version >= (
            1,
            1,
        ):
            # The checks passed: let the client send its body (aiohttp's low-level
            # server leaves Expect to the handler; the upstream never sees it).
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await proxy.proxy_http(
            self.upstreams,
            self.rules,
            request,
            route,
            upstream_path,
            query,
            headers,
            scope.request_id,
        )

    # -- own endpoints -----------------------------------------------------------
    async def healthz(self, request: web.BaseRequest, scope: Scope) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.BaseRequest, scope: Scope) -> web.StreamResponse:
        if self.draining:
            raise NotReady("The gateway is shutting down.")
        await self.services.check_ready()
        return web.json_response({"status": "ready"})

    async def metrics_endpoint(self, request: web.BaseRequest, scope: Scope) -> web.StreamResponse:
        return web.Response(text=self.metrics.render(), content_type="text/plain", charset="utf-8")


__all__ = ["Gateway", "Scope", "TokenMissing"]
