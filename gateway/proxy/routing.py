"""Route rules compiled once: longest prefix first, segment-boundary matching,
a round-robin set of upstream targets that skips a dead one for a while, and
each https target's TLS (its route's ``tls``, else ``upstream_tls``, else the
system's CAs), resolved here so the request path only reads it."""

from __future__ import annotations

import itertools
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.config import RouteConfig, UpstreamTLSConfig
from gateway.config.model import AuthPolicy
from gateway.proxy.paths import NormalisedPath
from gateway.proxy.pool import PoolKey
from gateway.proxy.tls import UpstreamTLS
from gateway.ratelimit import RateLimiter

# Contract section 8: a target that refused a connection or timed out on connect
# is skipped for 10 s when its route has other targets.
DEAD_FOR = 10.0


@dataclass(slots=True)
class Target:
    """One upstream base URL, split once so the request path needs no URL parsing."""

    url: str
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/base" (no trailing slash)
    tls: UpstreamTLS | None = None  # https only
    dead_until: float = 0.0
    host_header: str = field(init=False)  # what the upstream gets as Host
    pool_key: PoolKey = field(init=False)  # its connections' pool

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.pool_key = (self.scheme, self.host, self.port, self.tls)

    @classmethod
    def parse(cls, url: str, tls: UpstreamTLS | None = None) -> Target:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        tls = tls if parts.scheme == "https" else None
        return cls(url, parts.scheme, parts.hostname or "", port, parts.path.rstrip("/"), tls)


@dataclass(slots=True)
class Balancer:
    targets: tuple[Target, ...]
    clock: Callable[[], float] = time.monotonic
    _cycle: itertools.cycle[Target] = field(init=False)

    def __post_init__(self) -> None:
        self._cycle = itertools.cycle(self.targets)

    def candidates(self) -> list[Target]:
        """Targets to try in order: the next live ones in rotation, then (as a last
        resort, so a route never fails only because all were marked) the dead ones."""
        if len(self.targets) == 1:
            return [self.targets[0]]
        now = self.clock()
        first = next(self._cycle)
        start = self.targets.index(first)
        ordered = self.targets[start:] + self.targets[:start]
        live = [t for t in ordered if t.dead_until <= now]
        return live + [t for t in ordered if t.dead_until > now]

    def mark_dead(self, target: Target) -> None:
        if len(self.targets) > 1:
            target.dead_until = self.clock() + DEAD_FOR


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    auth: AuthPolicy
    strip_segments: int  # path segments dropped when strip_prefix is on (0 = off)
    timeout: float
    max_body: int
    websocket: bool
    balancer: Balancer
    config: RouteConfig
    limiter: RateLimiter | None  # per openid, or per client IP when anonymous
    apps: frozenset[str] | None  # appids whose tokens the route takes; None: all

    def matches(self, path: str) -> bool:
        # Segment boundary (contract section 8): `/api` matches `/api` and `/api/x`
        # but not `/apix`; a prefix ending in `/` matches everything below it.
        if not path.startswith(self.prefix):
            return False
        return (
            self.prefix.endswith("/")
            or len(path) == len(self.prefix)
            or path[len(self.prefix)] == "/"
        )

    def upstream_path(self, path: NormalisedPath) -> str:
        return path.strip_segments(self.strip_segments)


class _TLSSettings:
    """One :class:`UpstreamTLS` per distinct setting, shared by the routes that
    name it (so they share connections), and the system's CAs for https
    routes with none, loaded once and only if such a route exists."""

    def __init__(self, shared: UpstreamTLSConfig | None) -> None:
        self._shared = shared
        self._made: dict[UpstreamTLSConfig | None, UpstreamTLS] = {}

    def for_route(self, cfg: RouteConfig) -> UpstreamTLS | None:
        if not any(urlsplit(u).scheme == "https" for u in cfg.upstreams):
            return None
        setting = cfg.tls or self._shared
        made = self._made.get(setting)
        if made is None:
            made = self._made[setting] = _make_tls(setting)
        return made


def _make_tls(setting: UpstreamTLSConfig | None) -> UpstreamTLS:
    if setting is None:
        return UpstreamTLS(ssl.create_default_context())
    if setting.context is None:
        # Never silently without the client certificate the config names.
        raise ValueError("an UpstreamTLSConfig without its context (build it with build_config)")
    return UpstreamTLS(setting.context, setting.server_name)


class Router:
    def __init__(
        self,
        routes: tuple[RouteConfig, ...],
        default_max_body: int,
        ipv6_prefix: int = 64,
        upstream_tls: UpstreamTLSConfig | None = None,
    ) -> None:
        tls = _TLSSettings(upstream_tls)
        compiled = [self._compile(r, default_max_body, ipv6_prefix, tls) for r in routes]
        # Longest prefix first, so the first match is the most specific.
        self.routes: tuple[Route, ...] = tuple(
            sorted(compiled, key=lambda r: len(r.prefix), reverse=True)
        )

    @staticmethod
    def _compile(
        cfg: RouteConfig, default_max_body: int, ipv6_prefix: int, tls: _TLSSettings
    ) -> Route:
        strip = cfg.prefix.rstrip("/").count("/") if cfg.strip_prefix else 0
        route_tls = tls.for_route(cfg)
        return Route(
            prefix=cfg.prefix,
            auth=cfg.auth,
            strip_segments=strip,
            timeout=cfg.timeout,
            max_body=cfg.max_body if cfg.max_body is not None else default_max_body,
            websocket=cfg.websocket,
            balancer=Balancer(tuple(Target.parse(u, route_tls) for u in cfg.upstreams)),
            config=cfg,
            limiter=(
                RateLimiter(cfg.rate_limit, ipv6_prefix=ipv6_prefix) if cfg.rate_limit else None
            ),
            apps=cfg.apps,
        )

    def match(self, path: str) -> Route | None:
        for route in self.routes:
            if route.matches(path):
                return route
        return None
