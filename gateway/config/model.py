"""The configuration tree: frozen, typed, built once by :mod:`gateway.config.loader`.

Nothing on the request path reads YAML or environment variables; everything it
needs is compiled from this tree at start-up.
"""

from __future__ import annotations

import hmac
import ipaddress
import ssl
from dataclasses import dataclass, field
from typing import Literal

from cryptography.hazmat.primitives.asymmetric import ec

from gateway.config.units import Rate

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AuthPolicy = Literal["required", "optional", "public"]
LogLevel = Literal["debug", "info", "warning", "error"]
# The application log's lines: text for a terminal, JSON for a log shipper
# (the access log is JSON either way).
LogFormat = Literal["text", "json"]
# How the caller's openid appears in the access log: a keyed hash (default),
# in clear, or not at all.
OpenIdInLog = Literal["hash", "clear", "omit"]

# Defaults, named so the docs and the loader agree on one value each.
DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8080
DEFAULT_WORKERS = 1
DEFAULT_MAX_BODY = 10 * 1024**2
DEFAULT_SHUTDOWN_GRACE = 10.0
DEFAULT_DRAIN_DELAY = 1.0
DEFAULT_WECHAT_API_BASE = "https://api.weixin.qq.com"
DEFAULT_WECHAT_TIMEOUT = 5.0
DEFAULT_TOKEN_TTL = 2 * 3600.0
DEFAULT_TOKEN_HEADER = "Authorization"  # noqa: S105 - a header name
DEFAULT_TOKEN_ISSUER = "wx-gateway"  # noqa: S105 - an issuer name
DEFAULT_STORAGE_URL = "sqlite:///./gateway.db"
# Keys of a shared store are namespaced, so several gateways can share one Redis.
DEFAULT_STORAGE_PREFIX = "wxgw:"
# A revocation waits for no replica unless asked (docs/deployment.md, durability);
# a wait must end before the store's 2 s reply timeout.
DEFAULT_STORAGE_WAIT_TIMEOUT = 1.0
MAX_STORAGE_WAIT_TIMEOUT = 1.5
# How long a worker that cannot read a shared store's revocations goes on
# accepting tokens on what it knows; at least a few polls.
DEFAULT_MAX_STALENESS = 30.0
MIN_MAX_STALENESS = 1.0
DEFAULT_ASSERTION_HEADER = "X-Gateway-Assertion"
DEFAULT_ASSERTION_TTL = 300.0
DEFAULT_OPENID_HEADER = "X-OpenId"
DEFAULT_UNIONID_HEADER = "X-UnionId"
DEFAULT_APPID_HEADER = "X-AppId"
DEFAULT_LOGIN_RATE = Rate(20, 1.0)
DEFAULT_IPV6_PREFIX = 64
DEFAULT_ROUTE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 10_000
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_UPSTREAM_IDLE_TIMEOUT = 4.0
DEFAULT_BODY_TIMEOUT = 60.0
DEFAULT_IDLE_TIMEOUT = 75.0
# WebSockets (docs/design.md, "WebSocket lifetime"): closed after this long
# with no message relayed either way, and messages over this size are refused
# (1009) whatever the route's max_body, since a message is held whole.
DEFAULT_WEBSOCKET_IDLE_TIMEOUT = 300.0
DEFAULT_WEBSOCKET_MAX_MESSAGE = 1024 * 1024
MIN_TOKEN_SECRET_BYTES = 32


class Secret:
    """A string that never shows itself in ``repr``/``str`` (so logs and tracebacks
    of a config object cannot leak it). ``reveal()`` is the one explicit way out."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    workers: int = DEFAULT_WORKERS
    max_body: int = DEFAULT_MAX_BODY
    trusted_proxies: tuple[IPNetwork, ...] = ()
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    # On SIGTERM, how long the listener stays open answering /readyz 503 before
    # the drain (HAProxy's `grace`, Traefik's requestAcceptGraceTimeout): the
    # contract's "503 from the moment a shutdown starts" must be observable.
    drain_delay: float = DEFAULT_DRAIN_DELAY
    # Beyond the contract (docs/configuration.md): per-worker connection cap and
    # client timeouts, as HAProxy's maxconn / timeout http-request / client.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    # How long a keep-alive connection to an upstream waits for reuse (nginx's
    # upstream keepalive_timeout): below the upstreams' own, see gateway/proxy/pool.py.
    upstream_idle_timeout: float = DEFAULT_UPSTREAM_IDLE_TIMEOUT
    # A WebSocket with no message relayed either way for this long is closed
    # (pings do not count: a stolen token must not keep a socket by pinging).
    websocket_idle_timeout: float = DEFAULT_WEBSOCKET_IDLE_TIMEOUT
    # A WebSocket message is assembled whole before it is relayed, so its size
    # is memory held per socket: kept far below max_body.
    websocket_max_message: int = DEFAULT_WEBSOCKET_MAX_MESSAGE


@dataclass(frozen=True, slots=True)
class AppConfig:
    """One mini program: its credentials, and the name routes may use for it."""

    appid: str
    secret: Secret
    name: str | None = None

    @property
    def label(self) -> str:
        return self.name or self.appid


@dataclass(frozen=True, slots=True)
class WechatConfig:
    # At least one; the first is the default app, which owns tokens and data
    # from before apps existed (contract section 9) and logins without appid.
    apps: tuple[AppConfig, ...]
    api_base: str = DEFAULT_WECHAT_API_BASE
    timeout: float = DEFAULT_WECHAT_TIMEOUT
    fake: bool = False

    @property
    def default_app(self) -> AppConfig:
        return self.apps[0]

    def app(self, appid: str) -> AppConfig | None:
        """The configured app ``appid``, or None (a handful of apps: a scan is enough)."""
        for app in self.apps:
            if app.appid == appid:
                return app
        return None


@dataclass(frozen=True, slots=True)
class TokenConfig:
    secret: Secret
    previous_secrets: tuple[Secret, ...] = ()
    ttl: float = DEFAULT_TOKEN_TTL
    header: str = DEFAULT_TOKEN_HEADER
    issuer: str = DEFAULT_TOKEN_ISSUER
    leeway: float = 0.0


@dataclass(frozen=True, slots=True)
class StorageConfig:
    url: str = DEFAULT_STORAGE_URL
    prefix: str = DEFAULT_STORAGE_PREFIX
    # Redis only: a logout or a ban waits until this many replicas have it
    # (Redis WAIT), for at most wait_timeout seconds.
    wait_replicas: int = 0
    wait_timeout: float = DEFAULT_STORAGE_WAIT_TIMEOUT
    # Redis only: seconds without a revocation read before tokens get 503.
    max_staleness: float = DEFAULT_MAX_STALENESS

    @property
    def shared(self) -> bool:
        """A store several instances share (Redis), as opposed to the local file."""
        return not self.url.startswith("sqlite:")


@dataclass(frozen=True, slots=True)
class AssertionKey:
    """One EC P-256 private key of ``identity.assertion.keys``, read at load (so
    ``gateway check`` reports a key that cannot be used). Never in a repr."""

    path: str
    key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class AssertionConfig:
    """``identity.assertion`` (contract section 11): the first key signs, every
    key is published at /.well-known/jwks.json."""

    keys: tuple[AssertionKey, ...]
    header: str = DEFAULT_ASSERTION_HEADER
    ttl: float = DEFAULT_ASSERTION_TTL


@dataclass(frozen=True, slots=True)
class UpstreamTLSConfig:
    """How the gateway opens TLS to an https:// upstream: whom it trusts
    (``ca``; None: the system's CAs), which client certificate it shows
    (``cert``/``key``, for upstreams that authenticate callers by mTLS), and the
    name it expects on the upstream's certificate (``server_name``; None: the
    URL's host). ``context`` is built once at load, so a file that cannot be
    used is a config error, not a failed request."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None
    context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    openid_header: str = DEFAULT_OPENID_HEADER
    unionid_header: str = DEFAULT_UNIONID_HEADER
    appid_header: str = DEFAULT_APPID_HEADER
    # Off by default: a phone number is personal data (docs/security.md).
    phone_header: str | None = None
    # Off by default: a signed JWT per forwarded request (contract section 11).
    assertion: AssertionConfig | None = None

    def headers(self) -> tuple[str, ...]:
        """Every identity header the gateway sets upstream (and strips from clients)."""
        assertion = self.assertion.header if self.assertion else None
        named = (
            self.openid_header,
            self.unionid_header,
            self.appid_header,
            self.phone_header,
            assertion,
        )
        return tuple(h for h in named if h)


@dataclass(frozen=True, slots=True)
class RateLimitsConfig:
    login_per_ip: Rate | None = DEFAULT_LOGIN_RATE
    # IPv6 clients are limited per network of this prefix length, not per
    # address: one subscriber gets a whole /64 and can pick any address in it.
    ipv6_prefix: int = DEFAULT_IPV6_PREFIX


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"
    access: bool = True
    openid: OpenIdInLog = "hash"


@dataclass(frozen=True, slots=True)
class RouteConfig:
    prefix: str
    upstreams: tuple[str, ...]
    auth: AuthPolicy = "required"
    strip_prefix: bool = False
    timeout: float = DEFAULT_ROUTE_TIMEOUT
    max_body: int | None = None
    websocket: bool = False
    rate_limit: Rate | None = None
    # The appids whose tokens the route takes (resolved from names at load);
    # None: every configured app.
    apps: frozenset[str] | None = None
    # TLS to this route's https:// upstreams; None: the top-level upstream_tls.
    tls: UpstreamTLSConfig | None = None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    wechat: WechatConfig
    token: TokenConfig
    storage: StorageConfig = field(default_factory=StorageConfig)
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    rate_limits: RateLimitsConfig = field(default_factory=RateLimitsConfig)
    routes: tuple[RouteConfig, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    # TLS to every https:// upstream whose route has no `tls` of its own.
    upstream_tls: UpstreamTLSConfig | None = None
