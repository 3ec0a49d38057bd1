"""The request path, read top to bottom in :meth:`Gateway.handle`.

1. request id; 2. normalise the path (one path for routing, policy and
forwarding: :mod:`gateway.proxy.paths`); 3. the gateway's own endpoints (never
proxied: :mod:`gateway.auth.endpoints` and three here); 4. route match
(:mod:`gateway.proxy.routing`); 5. token policy (:mod:`gateway.auth.identity`)
and rate limit; 6. header rules, strip then inject (:mod:`gateway.proxy.headers`);
7. forward, streamed (:mod:`gateway.proxy.forward`, or
:mod:`gateway.proxy.websocket` for an upgrade).

The gateway runs on its own lean HTTP/1.1 server (:mod:`gateway.server.protocol`)
rather than ``web.Application``: routing is a longest-prefix match of our own,
so an application router would only add work per request. Everything known
about a request travels on one record, :class:`gateway.server.request.Request`,
and the server tells the gateway that handled it when it ends
(:meth:`Gateway.request_done`). A proxied answer is written by
:mod:`gateway.proxy.forward` straight to the connection; the gateway's own
endpoints return small aiohttp ``Response`` objects, serialised here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import cast

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.auth.assertion import JWKS_MAX_AGE, Asserter
from gateway.auth.endpoints import AuthEndpoints, Endpoint
from gateway.auth.identity import Identity, IdentityResolver
from gateway.auth.phones import MISSING
from gateway.config import Config
from gateway.config.reserved import JWKS_PATH, is_reserved
from gateway.errors import (
    AppForbidden,
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
from gateway.observability.accesslog import AccessLog
from gateway.observability.metrics import DIR_ENV as METRICS_DIR_ENV
from gateway.observability.metrics import SAVE_EVERY as METRICS_SAVE_EVERY
from gateway.observability.metrics import Metrics
from gateway.proxy import forward as proxy
from gateway.proxy import websocket
from gateway.proxy.headers import HeaderRules, request_id_from
from gateway.proxy.paths import BadPath, NormalisedPath, normalise, split_target
from gateway.proxy.pool import UpstreamPools
from gateway.proxy.relay import Limits
from gateway.proxy.routing import Route, Router
from gateway.ratelimit_shared import RouteLimits
from gateway.runtime.services import Services
from gateway.server.request import Request
from gateway.storage import StorageError

log = logging.getLogger("gateway")

# Methods no reverse proxy should relay: CONNECT opens tunnels, TRACE echoes
# credentials back (cross-site tracing).
_REFUSED_METHODS = ("CONNECT", "TRACE")
# Error codes counted as upstream failures (plus a body cut mid-way).
_UPSTREAM_ERRORS = frozenset({"upstream_unavailable", "upstream_timeout", "upstream_mid_body"})


class Gateway:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.router = Router(
            config.routes,
            config.server.max_body,
            config.rate_limits.ipv6_prefix,
            upstream_tls=config.upstream_tls,
        )
        self.rules = HeaderRules(config)
        self.metrics = Metrics(os.environ.get(METRICS_DIR_ENV))
        self.services = Services(config, clock=clock, metrics=self.metrics)
        # Route rate limits: across instances on a shared store, per process otherwise.
        self.route_limits = RouteLimits(
            self.router.routes,
            self.services.storage,
            ipv6_prefix=config.rate_limits.ipv6_prefix,
            clock=clock,
        )
        self.identity = IdentityResolver(
            config, self.services.tokens, self.services.sessions, clock
        )
        # Upstream connections: a keep-alive pool per target for HTTP, and the
        # WebSockets with the client session that opens them.
        self.pools = UpstreamPools(config.server.upstream_idle_timeout)
        self.websockets = websocket.Sockets(
            Limits(config.server.websocket_idle_timeout, config.server.websocket_max_message),
            self.services.sessions,
            clock,
            config.token.leeway,
            config.server.upstream_idle_timeout,
        )
        self.access_log = AccessLog(config) if config.log.access else None
        # The signed identity for upstreams (contract section 11), when configured.
        assertion = config.identity.assertion
        self.asserter = Asserter(assertion, config.token.issuer, clock) if assertion else None
        self.auth = AuthEndpoints(
            config, self.services, self.identity, self.rules, self.router, self.asserter
        )
        # The phone header's cache, only when the header is on (the proxy path
        # then reads it; off, a user's number is never looked up here).
        self._phones = self.services.phones if config.identity.phone_header else None
        self.draining = False
        self.inflight = 0  # requests handled and not yet finished (a reload waits on them)
        # Own endpoints: exact normalised path -> method -> handler.
        self.endpoints: dict[str, dict[str, Endpoint]] = {
            "/healthz": {"GET": self.healthz, "HEAD": self.healthz},
            "/readyz": {"GET": self.readyz, "HEAD": self.readyz},
            "/metrics": {"GET": self.metrics_endpoint},
            JWKS_PATH: {"GET": self.jwks, "HEAD": self.jwks},
            **self.auth.endpoints(),
        }
        self._stack = contextlib.AsyncExitStack()

    # -- lifecycle ------------------------------------------------------------
    async def start(self) -> None:
        """Open the long-lived resources, each closed by :meth:`close` in reverse."""
        await self.services.start()
        self._stack.push_async_callback(self.services.close)
        await self.route_limits.start()
        self._stack.push_async_callback(self.route_limits.close)
        self._stack.callback(self.pools.close)
        await self.websockets.start()
        # Open sockets get 1001, then their client session closes.
        self._stack.push_async_callback(self.websockets.close)
        saver = asyncio.create_task(self._save_metrics())
        self._stack.callback(self.metrics.save)
        self._stack.callback(saver.cancel)

    async def _save_metrics(self) -> None:
        # The other workers' /metrics read this worker's counts from its file.
        if os.environ.get(METRICS_DIR_ENV):
            while True:
                await asyncio.sleep(METRICS_SAVE_EVERY)
                self.metrics.save()

    async def close(self) -> None:
        await self._stack.aclose()
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)

    # -- the request path -------------------------------------------------------
    def handle(self, request: Request) -> Awaitable[None] | None:
        """Decide everything that needs no I/O at once; return the rest as an
        awaitable (see :data:`gateway.server.protocol.Handler`)."""
        request.request_id = request_id_from(request.headers)
        request.owner = self
        self.inflight += 1
        request.started = time.perf_counter()
        try:
            pending = self._dispatch(request)
        except Exception as exc:
            self._answer(request, None, exc)
            return None
        if pending is None:
            return None  # the fast lane answers from the upstream's callback
        return self._complete(request, pending)

    async def _complete(
        self,
        request: Request,
        pending: Awaitable[web.StreamResponse | None],
    ) -> None:
        try:
            response = await pending
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client is gone: nothing to answer
        except Exception as exc:
            self._answer(request, None, exc)
            return
        self._answer(request, response, None)

    def _answer(
        self,
        request: Request,
        response: web.StreamResponse | None,
        exc: Exception | None,
    ) -> None:
        """Send an own endpoint's response, or the JSON error for ``exc``."""
        if exc is not None:
            response = self._error(request, exc)
        if response is not None:
            if response.prepared:  # a WebSocket, already answered by aiohttp
                request.status = response.status
            elif request.responded:
                # An error after the head went out: cutting the connection is the
                # only signal left that the answer is incomplete.
                request.abort()
            else:
                if "X-Request-Id" not in response.headers:
                    response.headers["X-Request-Id"] = request.request_id  # own endpoints too
                request.send_response(response)
        request.finish()

    def _fail(self, request: Request, exc: Exception) -> None:
        self._answer(request, None, exc)

    def _error(self, request: Request, exc: Exception) -> web.Response:
        if isinstance(exc, GatewayError):
            request.error = exc.code
            errcode = exc.extra.get("wechat_errcode")
            request.errcode = errcode if isinstance(errcode, int) else None
            return error_response(exc, request.request_id)
        if isinstance(exc, StorageError):
            # Busy past its retries, read-only, gone: the client may retry later.
            log.warning("storage error (request id %s): %s", request.request_id, exc)
            return error_response(StorageUnavailable(), request.request_id)
        if isinstance(exc, web.RequestPayloadError):
            # The body broke its own framing (bad chunk size...): nothing after it
            # on this connection can be trusted.
            request.keep_alive = False
            return error_response(BadRequest("The request body is malformed."), request.request_id)
        log.error("unhandled error (request id %s)", request.request_id, exc_info=exc)
        return json_error(500, "internal_error", "Internal error.", request_id=request.request_id)

    def request_done(self, request: Request) -> None:
        """The request is over (answered, failed or abandoned): the server calls
        this once, on the gateway that handled it (its ``owner``)."""
        self.inflight -= 1
        metrics = self.metrics
        metrics.observe(request.route, request.status, request.started)
        error = request.error
        if error is not None and request.route is not None and error in _UPSTREAM_ERRORS:
            metrics.upstream_errors[(request.route, error)] += 1
        elif request.endpoint == "/auth/login":
            metrics.login(error or "ok", request.errcode)  # errcodes folded to a bounded set
        if self.access_log is not None:
            self.access_log.record(request, self.rules.client_ip(request.headers, request.remote))

    def _dispatch(self, request: Request) -> Awaitable[web.StreamResponse | None] | None:
        try:
            raw_path, query = split_target(request.raw_path)
            path = normalise(raw_path)
        except BadPath as exc:
            raise BadRequest(f"Bad path: {exc}.") from None
        own = self.endpoints.get(path.match)
        if own is not None:
            request.endpoint = path.match
            handler = own.get(request.method)
            if handler is None:
                raise MethodNotAllowed(tuple(own))
            return handler(request)
        if is_reserved(path.match):
            raise NoRoute()  # an unknown /auth/... is never forwarded
        route = self.router.match(path.match)
        if route is None:
            raise NoRoute()
        request.route = route.prefix
        if request.method in _REFUSED_METHODS:
            raise MethodNotAllowed(message=f"{request.method} is not proxied.")
        return self._forward(request, route, path, query)

    def _forward(
        self,
        request: Request,
        route: Route,
        path: NormalisedPath,
        query: str,
        loaded_phone: str | object | None = MISSING,
    ) -> Awaitable[web.StreamResponse | None] | None:
        """Forward ``request`` on ``route``. ``loaded_phone``: set when this is the
        second pass of a request that first had to read the user's phone number
        (:meth:`_forward_after_phone`); such a pass never takes the fast lane,
        whose answer would bypass the awaitable already handed to the server."""
        upgrade = websocket.is_upgrade(request)
        if upgrade and not (route.websocket and websocket.is_websocket_upgrade(request)):
            # Before the token: the route cannot take this request whoever sends
            # it (contract section 8: 400, and nothing reaches the upstream).
            raise BadRequest("Upgrade is not allowed on this route.")
        identity = self.identity.identify(request, route.auth)
        phone = None
        if identity is not None:
            if route.apps is not None and identity.appid not in route.apps:
                raise AppForbidden()  # one set lookup on a value the token carries
            if self._phones is not None:
                phone = self._phones.cached(identity.appid, identity.openid)
                if phone is MISSING:
                    phone = loaded_phone
                    if phone is MISSING:
                        # This user's first request on this worker: one storage
                        # read, then a second pass (before the rate limit counts).
                        return self._forward_after_phone(request, route, path, query, identity)
        if route.limiter is not None:
            # Keys are namespaced ("o:", "ip:") so an openid never collides with
            # an address; with several apps one person has one openid per app.
            if identity:
                self.route_limits.check(route, "o:" + identity.appid + ":" + identity.openid)
            else:
                client = self.rules.client_ip(request.headers, request.remote)
                self.route_limits.check_client(route, client)
        upstream_path = route.upstream_path(path)
        openid = identity.openid if identity else None
        unionid = identity.unionid if identity else None
        appid = identity.appid if identity else None
        # A dict lookup per request: signed once per session and route (cached).
        signed = (
            self.asserter.assertion(identity, route.prefix) if identity and self.asserter else None
        )
        if upgrade:
            headers = self.rules.upstream_request(
                request.headers,
                peer=request.remote,
                scheme=request.scheme,
                request_id=request.request_id,
                openid=openid,
                unionid=unionid,
                appid=appid,
                phone=cast("str | None", phone),
                assertion=signed,
            )
            return websocket.proxy_websocket(
                self.websockets,
                request,
                route,
                upstream_path,
                query,
                headers,
                identity,
            )
        lines = self.rules.upstream_lines(
            request.message.raw_headers,
            peer=request.remote,
            scheme=request.scheme,
            request_id=request.request_id,
            openid=openid,
            unionid=unionid,
            appid=appid,
            phone=cast("str | None", phone),
            assertion=signed,
        )
        if request.content_length is not None and request.content_length > route.max_body:
            raise BodyTooLarge()  # before any 100 Continue invites the body
        expects = request.headers.get("Expect", "").lower() == "100-continue"
        if expects and request.version >= (1, 1):
            # The checks passed: let the client send its body (the upstream never
            # sees Expect; the gateway answers it).
            request.send_continue()
        fwd = proxy.Forwarding(
            self.pools, self.rules, route, upstream_path, query, lines, request.request_id
        )
        if loaded_phone is not MISSING:
            return proxy.proxy_http(fwd, request, route.balancer.candidates())
        # A bound method, not a closure over the request: no objects per request.
        return proxy.forward(fwd, request, self._fail)

    async def _forward_after_phone(
        self,
        request: Request,
        route: Route,
        path: NormalisedPath,
        query: str,
        identity: Identity,
    ) -> web.StreamResponse | None:
        assert self._phones is not None
        try:
            phone = await self._phones.load(identity.appid, identity.openid)
        except StorageError:
            # The request goes on without the header, as for a user with no
            # number; the operator sees why.
            log.warning("storage: a user's phone number could not be read; header left out")
            phone = None
        # The second pass checks the token again (a cache hit), so a logout that
        # landed during the read is honoured.
        pending = self._forward(request, route, path, query, phone)
        return await pending if pending is not None else None

    # -- own endpoints -----------------------------------------------------------
    async def healthz(self, request: Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: Request) -> web.StreamResponse:
        if self.draining:
            raise NotReady("The gateway is shutting down.")
        await self.services.check_ready()
        return web.json_response({"status": "ready"})

    async def jwks(self, request: Request) -> web.StreamResponse:
        """The assertion's public keys (every configured key: the first signs, the
        others are published for a rotation). Cacheable: a JWK client refetches
        when it meets an unknown kid, and a rotation waits one max-age."""
        body = self.asserter.jwks_body if self.asserter else b'{"keys": []}'
        return web.Response(
            body=body,
            content_type="application/json",
            headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"},
        )

    async def metrics_endpoint(self, request: Request) -> web.StreamResponse:
        body = await asyncio.to_thread(self.metrics.render)  # reads the other workers' files
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


__all__ = ["Gateway", "TokenMissing"]
